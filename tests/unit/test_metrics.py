"""/metrics' parts without a server: the receiving processes' counter files, the store collector's
gauges and histograms (each finished job observed once), the machine's disk and GPUs."""

from __future__ import annotations

import itertools
import shutil
import sys
import types
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from support.node import instance_record, write_series

from dicom_io.net import Peer, ReceivedInstance, Refusal, RefusalReason
from plugin.config import Config
from plugin.ingest import counters
from plugin.ingest.counters import ReceiveCounters
from plugin.ingest.receive import STATUS_SUCCESS, Receiver
from plugin.store.engine import Store
from plugin.store.models import Delivery, DeliveryState, JobState, Study, StudyState, add_queued_job, utcnow
from plugin.web import system
from plugin.web.metrics import NodeCollector, registry

PEER = Peer(ae_title="SCU", address="127.0.0.1", port=40000, association_id="1")


def samples(config: Config, collector: NodeCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape, parsed back from the text format: (sample name, sorted labels) -> value."""
    text = generate_latest(registry(config, collector)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def received(config: Config, source: Path, name: str) -> ReceivedInstance:
    """What the transport hands the receiver: a copy of ``source`` in the incoming folder."""
    temp = config.incoming_dir / name
    shutil.copyfile(source, temp)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return ReceivedInstance(
        temp,
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
        PEER,
        temp.stat().st_size,
    )


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


# --- the receiving processes' counters ----------------------------------------------------------


def test_counters_of_several_processes_are_summed(
    config: Config, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ReceiveCounters(config.metrics_dir)
    first.stored(1000)
    first.stored(500)
    first.duplicate()
    first.refused(RefusalReason.DATASET_TOO_LARGE, 0xC000)
    monkeypatch.setattr(counters.os, "getpid", lambda: 4_000_001)  # another receiving process's file
    second = ReceiveCounters(config.metrics_dir)
    second.stored(250)
    second.refused(RefusalReason.DATASET_TOO_LARGE, 0xC000)
    second.refused(counters.DISK_FULL, 0xA700)
    second.association_refused(RefusalReason.PEER_NOT_ALLOWED)
    got = samples(config, NodeCollector(config, store))
    assert got[("radgate_instances_received_total", ())] == 3
    assert got[("radgate_received_bytes_total", ())] == 1750
    assert got[("radgate_instances_duplicate_total", ())] == 1
    too_large = (("reason", "dataset_too_large"), ("status", "0xC000"))
    assert got[("radgate_instances_refused_total", too_large)] == 2
    assert got[("radgate_instances_refused_total", (("reason", "disk_full"), ("status", "0xA700")))] == 1
    assert got[("radgate_associations_refused_total", (("reason", "peer_not_allowed"),))] == 1
    first.close()
    second.close()


def test_reset_removes_the_files_of_processes_that_are_gone(config: Config) -> None:
    ReceiveCounters(config.metrics_dir).stored(1)
    gone = config.metrics_dir / "counter_4194305.db"  # above the largest pid Linux hands out
    shutil.copyfile(next(config.metrics_dir.glob("counter_*.db")), gone)
    counters.reset(config.metrics_dir, 0o700)
    assert not gone.exists()
    assert len(list(config.metrics_dir.glob("counter_*.db"))) == 1  # this process runs: kept
    assert config.metrics_dir.stat().st_mode & 0o777 == 0o700


def test_the_receiver_counts_stored_duplicate_and_refused_instances(
    config: Config, store: Store, tmp_path: Path
) -> None:
    [source] = write_series(tmp_path / "src", 1)
    receiver = Receiver(config)
    assert receiver.handle(received(config, source, "tmp-1")) == STATUS_SUCCESS
    assert receiver.handle(received(config, source, "tmp-2")) == STATUS_SUCCESS  # again: stored once
    receiver.refused(Refusal(RefusalReason.INFLATED_TOO_LARGE, association=False, status=0xC000))
    receiver.refused(Refusal(RefusalReason.CALLED_AE_TITLE, association=True))
    receiver.close()
    got = samples(config, NodeCollector(config, store))
    assert got[("radgate_instances_received_total", ())] == 1
    assert got[("radgate_received_bytes_total", ())] == source.stat().st_size
    assert got[("radgate_instances_duplicate_total", ())] == 1
    bomb = (("reason", "inflated_too_large"), ("status", "0xC000"))
    assert got[("radgate_instances_refused_total", bomb)] == 1
    assert got[("radgate_associations_refused_total", (("reason", "called_ae_title"),))] == 1


# --- the store collector --------------------------------------------------------------------------


_uids = itertools.count(1000)


def _job(
    store: Store,
    finished_at: datetime | None,
    *,
    pipeline: str = "ct-lung",
    state: JobState = JobState.SUCCEEDED,
    timings: dict[str, float] | None = None,
    sent_at: list[datetime | None] | None = None,
    received_at: datetime | None = None,
) -> int:
    """A study with one instance (received at ``received_at``) and one job, finished (``state``) at
    ``finished_at`` with ``timings``, with a delivery per ``sent_at`` (None: still PENDING)."""
    uid = f"2.25.{next(_uids)}"
    store.recorder.record_instance(instance_record(uid, received_at=received_at))
    now = utcnow()
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        study.state = StudyState.COMPLETE
        job = add_queued_job(s, study, pipeline, now=now)
        if finished_at is not None:
            job.state, job.finished_at, job.timings = state, finished_at, timings
        s.flush()
        for n, sent in enumerate(sent_at or []):
            s.add(
                Delivery(
                    job_id=job.id,
                    sop_instance_uid=f"{uid}.{n}",
                    destination="pacs",
                    state=DeliveryState.PENDING if sent is None else DeliveryState.SENT,
                    attempts=1,
                    created_at=now,
                    updated_at=now,
                    sent_at=sent,
                )
            )
        return job.id


def _complete(store: Store, job_id: int, sent_at: datetime) -> None:
    with store.session() as s:
        pending = select(Delivery).where(Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING)
        for delivery in s.scalars(pending):
            delivery.state, delivery.sent_at = DeliveryState.SENT, sent_at


def test_gauges_count_the_work_in_flight(config: Config, store: Store) -> None:
    store.recorder.record_instance(instance_record("2.25.1"))  # a study still receiving
    _job(store, None, sent_at=[])
    _job(store, None, pipeline="mr-brain")
    _job(store, utcnow(), sent_at=[None, None, utcnow()])
    _job(store, utcnow(), state=JobState.FAILED)
    got = samples(config, NodeCollector(config, store))
    assert got[("radgate_studies_receiving", ())] == 1
    assert got[("radgate_jobs", (("pipeline", "ct-lung"), ("state", "QUEUED")))] == 1
    assert got[("radgate_jobs", (("pipeline", "mr-brain"), ("state", "QUEUED")))] == 1
    assert got[("radgate_jobs", (("pipeline", "ct-lung"), ("state", "FAILED")))] == 1
    assert ("radgate_jobs", (("pipeline", "ct-lung"), ("state", "SUCCEEDED"))) not in got  # finished: counted
    assert got[("radgate_queue_depth", ())] == 2
    assert got[("radgate_deliveries", (("destination", "pacs"), ("state", "PENDING")))] == 2
    assert ("radgate_deliveries", (("destination", "pacs"), ("state", "SENT"))) not in got
    assert got[("radgate_store_up", ())] == 1
    assert 0 < got[("radgate_disk_free_bytes", ())] <= got[("radgate_disk_total_bytes", ())]


def test_each_finished_job_is_observed_once_from_the_first_scrape_on(config: Config, store: Store) -> None:
    clock = Clock()
    collector = NodeCollector(config, store, clock)
    _job(store, clock.now - timedelta(seconds=5), timings={"load_s": 0.2})  # before the first scrape
    samples(config, collector)
    clock.now += timedelta(seconds=60)
    _job(store, clock.now - timedelta(seconds=1), timings={"load_s": 0.3, "infer_s": 7.0, "encode_s": 0.4})
    late = clock.now - timedelta(seconds=30)  # committed after a later one was seen: still counted
    got = samples(config, collector)
    _job(store, late, timings={"load_s": 0.6, "infer_s": 20.0})
    clock.now += timedelta(seconds=15)
    got = samples(config, collector)
    got = samples(config, collector)  # and once only
    load = (("pipeline", "ct-lung"), ("step", "load"))
    assert got[("radgate_job_step_seconds_count", load)] == 2
    assert got[("radgate_job_step_seconds_sum", load)] == pytest.approx(0.9)
    assert got[("radgate_job_step_seconds_bucket", (("le", "0.5"), *load))] == 1
    assert got[("radgate_jobs_finished_total", (("pipeline", "ct-lung"), ("state", "SUCCEEDED")))] == 2
    infer = (("le", "10.0"), ("pipeline", "ct-lung"), ("step", "infer"))
    assert got[("radgate_job_step_seconds_bucket", infer)] == 1
    assert got[("radgate_job_step_seconds_count", (("pipeline", "ct-lung"), ("step", "infer")))] == 2


def test_end_to_end_runs_from_the_last_instance_to_the_last_delivery(config: Config, store: Store) -> None:
    clock = Clock()
    collector = NodeCollector(config, store, clock)
    samples(config, collector)
    received = clock.now
    job = _job(
        store,
        received + timedelta(seconds=40),
        sent_at=[received + timedelta(seconds=50), None],
        received_at=received,
    )
    clock.now += timedelta(seconds=60)
    got = samples(config, collector)
    assert (
        got.get(("radgate_end_to_end_seconds_count", (("pipeline", "ct-lung"),)), 0) == 0
    )  # one still PENDING
    _complete(store, job, received + timedelta(seconds=95))
    clock.now += timedelta(seconds=60)
    got = samples(config, collector)
    got = samples(config, collector)
    assert got[("radgate_end_to_end_seconds_count", (("pipeline", "ct-lung"),))] == 1
    assert got[("radgate_deliveries_sent_total", (("destination", "pacs"),))] == 2
    assert got[("radgate_end_to_end_seconds_sum", (("pipeline", "ct-lung"),))] == pytest.approx(95)
    assert got[("radgate_end_to_end_seconds_bucket", (("le", "60.0"), ("pipeline", "ct-lung")))] == 0
    assert got[("radgate_end_to_end_seconds_bucket", (("le", "120.0"), ("pipeline", "ct-lung")))] == 1


def test_study_completions_are_counted_once(config: Config, store: Store) -> None:
    clock = Clock()
    collector = NodeCollector(config, store, clock)
    samples(config, collector)
    uid = "2.25.777"
    store.recorder.record_instance(instance_record(uid))
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        study.state, study.completed_at = StudyState.COMPLETE, clock.now + timedelta(seconds=1)
    clock.now += timedelta(seconds=10)
    assert samples(config, collector)[("radgate_study_completions_total", ())] == 1
    assert samples(config, collector)[("radgate_study_completions_total", ())] == 1


def test_a_store_that_does_not_answer_gives_store_up_0_and_the_rest(config: Config, tmp_path: Path) -> None:
    unmigrated = Store(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables
    ReceiveCounters(config.metrics_dir).stored(10)
    got = samples(config, NodeCollector(config, unmigrated))
    assert got[("radgate_store_up", ())] == 0
    assert got[("radgate_instances_received_total", ())] == 1
    assert ("radgate_disk_free_bytes", ()) in got
    unmigrated.dispose()


# --- the machine ---------------------------------------------------------------------------------


def test_disk_free_reads_the_data_dirs_file_system(tmp_path: Path) -> None:
    space = system.disk_free(tmp_path)
    assert 0 < space.free_bytes <= space.total_bytes == shutil.disk_usage(tmp_path).total


def test_no_gpu_metrics_without_nvml(config: Config, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "_nvml", False)
    assert system.gpus() == []
    assert not any(
        name.startswith("radgate_gpu") for name, _ in samples(config, NodeCollector(config, store))
    )


def test_gpu_memory_from_nvml(config: Config, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML as the driver answers it (a stand-in module: this machine has no NVIDIA GPU)."""

    class NVMLError(Exception):
        pass

    fake: Any = types.ModuleType("pynvml")
    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: "NVIDIA H100" if h == 0 else (_ for _ in ()).throw(NVMLError("lost"))
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(system, "_nvml", None)
    assert system.gpus() == [system.GpuMemory(0, "NVIDIA H100", 3 << 30, 80 << 30)]  # GPU 1: unreadable
    got = samples(config, NodeCollector(config, store))
    assert got[("radgate_gpu_memory_used_bytes", (("gpu", "0"), ("name", "NVIDIA H100")))] == 3 << 30
    assert got[("radgate_gpu_memory_total_bytes", (("gpu", "0"), ("name", "NVIDIA H100")))] == 80 << 30
    monkeypatch.setattr(system, "_nvml", None)  # the next caller looks again


def test_the_counter_file_is_allocated_whole(config: Config) -> None:
    ReceiveCounters(config.metrics_dir).stored(1)
    [path] = config.metrics_dir.glob("counter_*.db")
    assert path.stat().st_blocks * 512 >= counters.FILE_BYTES  # no page left to fault on a full disk


def test_an_unwritable_metrics_dir_does_not_stop_ingest(
    config: Config, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config.metrics_dir.write_text("not a folder")
    [source] = write_series(tmp_path / "src", 1)
    receiver = Receiver(config)
    assert receiver.handle(received(config, source, "tmp-1")) == STATUS_SUCCESS
    receiver.close()
    assert "are not counted in /metrics" in caplog.text
    assert [s.instance_count for s in store.studies()] == [1]


def test_a_metrics_folder_that_cannot_be_made_does_not_stop_a_start(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config.data_dir.mkdir(parents=True)
    config.metrics_dir.write_text("not a folder")
    counters.reset(config.metrics_dir, 0o700)
    assert "cannot reset the counters" in caplog.text
