"""End to end with real parts only: DCMTK storescu → `radgate serve` (its own process, worker processes,
the outbox) → a real Orthanc, checked through Orthanc's REST API and validated with dciodvfy.

Each test pushes a small synthetic chest CT (64×64×40: ct-lung accepts it, a job takes seconds)
and follows the node through `radgate jobs/deliveries --json` or, where a state lasts too short
for a CLI round trip, through `plugin.jobs.queue.list_jobs`, the function behind `radgate jobs --json`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from support.node import RADGATE, NodeProcess, wait_for, write_series

from dicom_io.testing.orthanc_server import OrthancServer
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom
from dicom_io.testing.validate import dciodvfy
from plugin.config import Config
from plugin.jobs.queue import list_jobs
from plugin.store.engine import Store

pytestmark = pytest.mark.slow

RESULT_MODALITIES = ["OT", "SEG", "SR"]


def start_node(workdir: Path, dicom_port: int, **sections: dict[str, Any]) -> NodeProcess:
    """`radgate serve` on the default rules, sending to the archive at ``dicom_port``."""
    settings: dict[str, Any] = {
        "destinations": {
            "archive": {"kind": "dicom", "host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC"}
        },
    }
    for key, values in sections.items():
        settings.setdefault(key, {}).update(values)
    return NodeProcess(workdir, settings).start()


@pytest.fixture()
def phantom(tmp_path: Path) -> tuple[SyntheticSeries, list[Path]]:
    """A new chest CT study (its own UIDs) written to disk."""
    series = ct_chest_phantom(rows=64, columns=64, slices=40, seed=7)
    return series, series.write(tmp_path / "phantom")


def send(node: NodeProcess, files: list[Path]) -> None:
    sent = node.storescu(*files)
    assert sent.returncode == 0 and sent.stdout.count("(Success)") + sent.stderr.count("(Success)") == len(
        files
    ), sent.stdout + sent.stderr


def all_sent(node: NodeProcess, study_uid: str | None = None) -> list[dict[str, Any]]:
    """Every delivery (of ``study_uid``'s jobs, if given) once all of them are SENT; empty until then
    (DEAD fails at once)."""
    found = node.deliveries(cli=False)
    if study_uid is not None:
        jobs = {j["id"] for j in study_jobs(node, study_uid)}
        found = [d for d in found if d["job_id"] in jobs]
    assert not [d for d in found if d["state"] == "DEAD"], found
    return found if found and all(d["state"] == "SENT" for d in found) else []


def study_jobs(node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    """The node's jobs on one study (the shared node holds other tests' studies too)."""
    return [j for j in node.jobs(cli=False) if j["study_uid"] == study_uid]


@pytest.fixture(scope="module")
def shared_node(
    tmp_path_factory: pytest.TempPathFactory, orthanc_session: OrthancServer
) -> Iterator[NodeProcess]:
    """One node sending to the shared Orthanc, for every test but the demo's; each sends its own
    study. A dead node's lease and any send it had claimed are taken over after a few seconds (the
    kill test kills and restarts it); a failed send is tried again within seconds, never given up
    (the destination-down test stops the Orthanc)."""
    retry = {"retry_base_s": 0.5, "retry_max_s": 1.0, "retry_jitter": 0.0, "max_attempts": 1000}
    node = start_node(
        tmp_path_factory.mktemp("e2e") / "node",
        orthanc_session.dicom_port,
        executor={"lease_s": 3.0},
        dispatch={"claim_timeout_s": 3.0, **retry},
    )
    yield node
    node.stop_if_running()


@pytest.fixture()
def node(shared_node: NodeProcess) -> NodeProcess:
    """The shared node, running (started again if a test before stopped it)."""
    assert shared_node.process is not None
    if shared_node.process.poll() is not None:
        shared_node.start()
    return shared_node


def results_in_orthanc(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Modality -> Orthanc instance ids of each result series in the study, sorted by modality."""
    series = orthanc.series_of_study(study_uid)
    return {s["MainDicomTags"]["Modality"]: s["Instances"] for s in sorted(series, key=_modality)}


def _modality(series: dict[str, Any]) -> str:
    return str(series["MainDicomTags"]["Modality"])


def test_a_pushed_ct_comes_back_as_valid_seg_sr_sc_in_its_study_and_an_unmatched_series_is_left_alone(
    tmp_path: Path, orthanc: OrthancServer, phantom: tuple[SyntheticSeries, list[Path]], node: NodeProcess
) -> None:
    series, files = phantom
    # the same study, same association: a series with no chest anatomy in its header (no rule matches)
    unmatched = write_series(tmp_path / "unmatched", 5, study_uid=series.study_uid)
    unmatched_series = pydicom.dcmread(unmatched[0], stop_before_pixels=True).SeriesInstanceUID
    send(node, files + unmatched)
    delivered = wait_for(lambda: all_sent(node, series.study_uid), 240, "every delivery SENT", interval=0.5)
    jobs = study_jobs(node, series.study_uid)

    assert [(j["series_uid"], j["state"], j["rule"]) for j in jobs] == [
        (series.series_uid, "SUCCEEDED", "chest-ct")
    ]  # one job: the unmatched series has none
    by_modality = results_in_orthanc(orthanc, series.study_uid)
    assert sorted(by_modality) == RESULT_MODALITIES  # SEG, SR, SC (OT) in the SOURCE study, nothing else
    stored = []
    for modality, ids in by_modality.items():
        for instance_id in ids:
            path = tmp_path / f"{modality}-{instance_id}.dcm"
            path.write_bytes(orthanc.instance_file(instance_id))
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == series.study_uid and ds.Modality == modality
            if modality in ("SEG", "SR"):  # made from the CT series only (an SR names its SEG too)
                assert series.series_uid in _referenced_series(ds)
                assert unmatched_series not in _referenced_series(ds)
            verdict = dciodvfy(path)
            assert verdict.ran and verdict.ok, f"{modality}: {verdict}"
            stored.append(str(ds.SOPInstanceUID))
    assert sorted(stored) == sorted(d["sop_instance_uid"] for d in delivered)


def _referenced_series(ds: pydicom.Dataset) -> set[str]:
    """The source series a SEG (ReferencedSeriesSequence) or an SR (its evidence) names."""
    found = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        found |= {str(item.SeriesInstanceUID) for item in study.ReferencedSeriesSequence}
    return found


def test_results_wait_for_a_destination_that_is_down_and_arrive_once_it_is_back(
    orthanc: OrthancServer, phantom: tuple[SyntheticSeries, list[Path]], node: NodeProcess
) -> None:
    series, files = phantom
    ports = (orthanc.http_port, orthanc.dicom_port)  # where the node sends; Orthanc comes back there
    orthanc.stop(kill=True)
    try:
        send(node, files)

        def failing() -> list[dict[str, Any]]:
            jobs = {j["id"] for j in study_jobs(node, series.study_uid)}
            found = [d for d in node.deliveries(cli=False) if d["job_id"] in jobs]
            return [d for d in found if d["attempts"] >= 2 and d["last_error"]]

        tried = wait_for(failing, 240, "deliveries failing against the stopped destination", interval=0.5)
        assert all(d["state"] in ("PENDING", "SENDING") for d in tried), tried  # retried, not DEAD
    finally:
        orthanc.start(ports=ports)
    delivered = wait_for(
        lambda: all_sent(node, series.study_uid), 120, "every delivery SENT once Orthanc is up", interval=0.5
    )
    by_modality = results_in_orthanc(orthanc, series.study_uid)

    assert sorted(by_modality) == RESULT_MODALITIES
    assert sum(map(len, by_modality.values())) == len(delivered)


def _running(store: Store, node: NodeProcess, study_uid: str) -> list[dict[str, Any]]:
    """The node's RUNNING jobs on the study, read in-process from ``store`` (the node's): a small job
    runs for less than a CLI round trip."""
    jobs = list_jobs(store, node.data_dir / "results")
    return [j for j in jobs if j["state"] == "RUNNING" and j["study_uid"] == study_uid]


def test_a_node_killed_while_a_job_runs_delivers_its_results_exactly_once_after_restart(
    tmp_path: Path, orthanc: OrthancServer, phantom: tuple[SyntheticSeries, list[Path]], node: NodeProcess
) -> None:
    series, files = phantom
    # the shared node: the dead node's lease and any send it had claimed are taken over after a few seconds
    try:
        send(node, files)
        store = Store(Config.model_validate({"data_dir": str(node.data_dir)}).db_url)  # one for every poll
        try:
            wait_for(
                lambda: _running(store, node, series.study_uid), 240, "the job to be RUNNING", interval=0.02
            )
        finally:
            store.dispose()
        node.kill()  # SIGKILL: no clean stop, the job stays RUNNING in the store with its lease
        assert [j["state"] for j in study_jobs(node, series.study_uid)] == ["RUNNING"]
        node.start()
        delivered = wait_for(
            lambda: all_sent(node, series.study_uid),
            240,
            "every delivery SENT after the restart",
            interval=0.5,
        )
        [job] = study_jobs(node, series.study_uid)
    finally:
        assert node.stop() == 0, node.log()

    assert (job["state"], job["attempts"]) == ("SUCCEEDED", 2)  # the killed run, then the one that finished
    uids = [d["sop_instance_uid"] for d in delivered]
    assert len(uids) == len(set(uids))  # each result instance queued for the archive once
    by_modality = results_in_orthanc(orthanc, series.study_uid)
    assert sorted(by_modality) == RESULT_MODALITIES  # one series each: no duplicate from the re-run
    instances = orthanc.instances_of_study(series.study_uid)
    per_sop = Counter(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in instances)
    assert per_sop == Counter(uids)  # every delivered instance there exactly once, nothing else


def test_radgate_demo_runs_the_whole_way_round_and_exits_0(tmp_path: Path) -> None:
    command = [
        str(RADGATE),
        "demo",
        "--rows",
        "64",
        "--slices",
        "40",
        "--timeout",
        "240",
        "--dir",
        str(tmp_path),
    ]
    # its own process group: if it hangs, its Orthanc and node go with it (SIGTERM: both stop cleanly)
    demo = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = demo.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, out + err
    for expected in ("SEG  series", "SR   series", "OT   series", "Right lung", "%LAA-950", "mean density"):
        assert expected in out, out
    assert re.search(r"Emphysema \(LAA-950\)\s+volume [0-9.]+ mL", out), out
    assert "/app/explorer.html#study?uuid=" in out
    assert "Phantom" not in (tmp_path / "node" / "node.log").read_text()  # no patient name in the log
