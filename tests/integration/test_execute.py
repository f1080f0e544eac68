"""The executor: leasing in the store, routing at completion, worker processes, time limit, results."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from support.execute import (
    add_job,
    claim_all,
    job_row,
    make_config,
    register_test_pipelines,
    spool_files,
    tiny_study_job,
)
from support.node import wait_for, write_series
from support.pipeline import write_threshold_bundle
from support.postgres import BACKENDS, database_url

from ai_models.base import Pipeline
from ai_models.registry import available_pipelines
from dicom_io.testing.synthetic import SyntheticSeries, ct_chest_phantom
from plugin.config import CompletionConfig, Config
from plugin.jobs import execute
from plugin.jobs.completion import CompletionMonitor
from plugin.jobs.execute import JobRunner
from plugin.jobs.executor import LocalExecutor, Task, TaskResult
from plugin.jobs.executor.local import cpu_threads
from plugin.jobs.executor.work import run_task
from plugin.jobs.queue import ClaimedJob, claim_job, fail_job, finish_job, renew_lease, routing_hook
from plugin.route.rules import validate_rules
from plugin.store.engine import Store, migrated_store
from plugin.store.models import Job, JobState, Study, add_queued_job, utcnow

PIPELINES = {"ct-lung", "test-hang"}

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def phantom() -> SyntheticSeries:
    return ct_chest_phantom(rows=64, columns=64, slices=40, seed=3)


@pytest.fixture(scope="module")
def phantom_files(phantom: SyntheticSeries, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom.write(tmp_path_factory.mktemp("phantom"))


@pytest.fixture()
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """The store in the data dir (SQLite); the leasing tests also run on PostgreSQL (`both_databases`)."""
    config = make_config(tmp_path / "data", job_timeout_s=120, max_attempts=2, lease_s=30)
    url = database_url(request, tmp_path / "data")
    return config if url.startswith("sqlite") else config.with_overrides(database_url=url)


both_databases = pytest.mark.parametrize("config", BACKENDS, indirect=True)


@pytest.fixture()
def store(config: Config) -> Iterator[Store]:
    with migrated_store(config.db_url) as s:
        yield s


def _study_with_jobs(store: Store, config: Config, tmp_path: Path, count: int) -> list[int]:
    files = write_series(tmp_path / "src", 2)
    spool_files(store, config, files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return [add_job(store, ds.StudyInstanceUID, ds.SeriesInstanceUID, "ct-lung") for _ in range(count)]


# --- leasing -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claimers() -> Iterator[ProcessPoolExecutor]:
    """Two claiming processes, started once for both databases (each start imports the store)."""
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@both_databases
def test_two_claiming_processes_never_get_the_same_job(
    store: Store, config: Config, tmp_path: Path, claimers: ProcessPoolExecutor
) -> None:
    ids = _study_with_jobs(store, config, tmp_path, 12)
    futures = [claimers.submit(claim_all, config.db_url, str(config.spool_dir), f"w{k}") for k in (1, 2)]
    first, second = (f.result(timeout=120) for f in futures)
    assert not set(first) & set(second)
    assert sorted(first + second) == ids


@both_databases
def test_a_job_is_claimed_once_and_an_expired_lease_is_taken_over(
    store: Store, config: Config, tmp_path: Path
) -> None:
    [job_id] = _study_with_jobs(store, config, tmp_path, 1)
    now = utcnow()
    first = claim_job(store, "a", config.spool_dir, 10, 3, now=now)
    assert first is not None and first.id == job_id and first.attempts == 1
    assert len(first.files) == 2 and all(f.is_file() for f in first.files)
    assert claim_job(store, "b", config.spool_dir, 10, 3, now=now + timedelta(seconds=5)) is None
    second = claim_job(store, "b", config.spool_dir, 10, 3, now=now + timedelta(seconds=11))
    assert second is not None and second.id == job_id and second.attempts == 2
    assert not renew_lease(store, job_id, "a", 10)  # the dead worker came back: no longer its job
    assert not finish_job(store, first, "a", [], {}, enqueue=_no_deliveries)
    assert renew_lease(store, job_id, "b", 10)
    assert job_row(store, job_id).lease_owner == "b"


@both_databases
def test_a_job_abandoned_on_its_last_attempt_fails_with_the_reason(
    store: Store, config: Config, tmp_path: Path
) -> None:
    [job_id] = _study_with_jobs(store, config, tmp_path, 1)
    now = utcnow()
    for attempt, owner in enumerate(("a", "b"), 1):
        claimed = claim_job(store, owner, config.spool_dir, 10, 2, now=now + timedelta(seconds=20 * attempt))
        assert claimed is not None and claimed.attempts == attempt
    assert claim_job(store, "c", config.spool_dir, 10, 2, now=now + timedelta(seconds=100)) is None
    job = job_row(store, job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None and "worker lost" in job.error and job.lease_owner is None


@both_databases
def test_a_retryable_failure_is_requeued_until_max_attempts(
    store: Store, config: Config, tmp_path: Path
) -> None:
    [job_id] = _study_with_jobs(store, config, tmp_path, 1)
    for attempt, expected in ((1, JobState.QUEUED), (2, JobState.FAILED)):
        claimed = claim_job(store, "a", config.spool_dir, 10, 2)
        assert claimed is not None and claimed.attempts == attempt
        timings = {"load_s": 0.5}
        assert fail_job(store, claimed, "a", "boom", timings, retry=True, max_attempts=2) == expected
    job = job_row(store, job_id)
    assert (job.state, job.error, job.timings) == (JobState.FAILED, "boom (attempt 2 of 2)", {"load_s": 0.5})
    assert claim_job(store, "a", config.spool_dir, 10, 2) is None


def test_a_later_revision_names_the_revision_whose_results_it_supersedes(
    store: Store, config: Config, tmp_path: Path
) -> None:
    _study_with_jobs(store, config, tmp_path, 1)
    first = claim_job(store, "a", config.spool_dir, 10, 2)
    assert first is not None and first.supersedes is None
    assert finish_job(store, first, "a", [], {}, enqueue=lambda *_: 0)
    later = add_job(store, first.study_uid, first.series_uid, "ct-lung", revision=2)
    second = claim_job(store, "a", config.spool_dir, 10, 2)
    assert second is not None and (second.id, second.revision, second.supersedes) == (later, 2, 1)


def _no_deliveries(
    session: Session, job_id: int, results: Sequence[tuple[str, Path]], dest: Sequence[str]
) -> int:
    raise AssertionError("a job whose lease was lost must not queue deliveries")


# --- routing at completion -----------------------------------------------------------------------


def _complete(
    store: Store, config: Config, completed: Callable[[], None] = lambda: None
) -> list[tuple[str, int]]:
    rules = validate_rules(
        config.model_copy(
            update={"rules": Config.model_validate(
                {"rules": [{"name": "chest", "match": {"BodyPartExamined": {"equals": "CHEST"}},
                            "pipeline": "ct-lung"}]}
            ).rules}
        ),
        PIPELINES,
    )  # fmt: skip
    monitor = CompletionMonitor(
        store,
        CompletionConfig(quiet_period_s=1),
        on_complete=routing_hook(rules, config.spool_dir),
        completed=completed,
    )
    return monitor.check(utcnow() + timedelta(seconds=5))


def _jobs(store: Store) -> list[tuple[int, str | None, str | None, str]]:
    with store.session() as s:
        rows = s.scalars(select(Job).order_by(Job.id))
        return [(j.study_revision, j.pipeline, j.series_uid, j.state) for j in rows]


def test_a_completed_study_gets_one_job_per_matching_series_and_a_reason_for_the_rest(
    store: Store, config: Config, tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    spool_files(store, config, phantom_files)
    other = write_series(tmp_path / "other", 2, study_uid=phantom.study_uid)  # CT without BodyPartExamined
    spool_files(store, config, other)
    assert len(_complete(store, config)) == 1
    assert _jobs(store) == [(1, "ct-lung", phantom.series_uid, JobState.QUEUED)]

    lonely = write_series(tmp_path / "lonely", 2)
    spool_files(store, config, lonely)
    with caplog.at_level(logging.INFO, logger="plugin.jobs.queue"):
        _complete(store, config)
    study_uid = pydicom.dcmread(lonely[0], stop_before_pixels=True).StudyInstanceUID
    [line] = [r.getMessage() for r in caplog.records if "no job" in r.getMessage()]
    assert study_uid in line and "chest: BodyPartExamined: wanted equals 'CHEST', got absent" in line
    assert len(_jobs(store)) == 1


def test_a_new_revision_reruns_only_the_series_that_grew(
    store: Store, config: Config, tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path]
) -> None:
    spool_files(store, config, phantom_files[:30])
    _complete(store, config)
    spool_files(store, config, phantom_files[30:])  # the series grows: revision 2, job 1 still QUEUED
    _complete(store, config)
    assert _jobs(store) == [
        (1, "ct-lung", phantom.series_uid, JobState.CANCELLED),
        (2, "ct-lung", phantom.series_uid, JobState.QUEUED),
    ]
    seg_back = write_series(tmp_path / "seg", 1, study_uid=phantom.study_uid)  # e.g. a result sent back
    spool_files(store, config, seg_back)
    _complete(store, config)
    assert len(_jobs(store)) == 2  # revision 3 changed another series only: nothing re-runs


# --- running: worker processes, time limit, results ----------------------------------------------


def test_workers_share_the_cores_among_their_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [cpu_threads(slots) for slots in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalExecutor]:
    """One worker process shared by the tests of this module (starting one imports torch)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(register_test_pipelines(tmp_path_factory.mktemp("plugins"))))
        ex = LocalExecutor(1, make_config(Path("unused")).logging, tick_s=0.1)
        yield ex
        ex.close()


class _Deliveries:
    """A stand-in for plugin.dispatch.outbox.enqueue_deliveries that remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[str, Path]], list[str]]] = []

    def __call__(
        self, session: Session, job_id: int, results: Sequence[tuple[str, Path]], dest: Sequence[str]
    ) -> int:
        self.calls.append((job_id, list(results), list(dest)))
        return len(results) * len(dest)


def test_a_job_runs_in_a_worker_and_succeeds_with_results_on_disk(
    store: Store, config: Config, phantom: SyntheticSeries, phantom_files: list[Path], executor: LocalExecutor
) -> None:
    spool_files(store, config, phantom_files)
    job_id = add_job(store, phantom.study_uid, phantom.series_uid, "ct-lung")
    deliveries = _Deliveries()
    assert JobRunner(store, config, executor, enqueue=deliveries).run_one() == job_id
    job = job_row(store, job_id)
    assert (job.state, job.attempts, job.error) == (JobState.SUCCEEDED, 1, None)
    assert job.timings is not None and set(job.timings) == {"load_s", "infer_s", "encode_s"}
    assert job.placement is not None and job.placement["threads"] == str(cpu_threads(executor.slots))
    [(called_id, results, destinations)] = deliveries.calls
    assert called_id == job_id and destinations == []
    out = config.results_dir / str(job_id)
    assert {p.parent for _, p in results} == {out}
    kinds = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for _, p in results}
    assert kinds == {"SEG", "SR", "OT"}
    assert [p.name for p in out.parent.iterdir()] == [str(job_id)]  # no temporary folder left


def test_a_destination_with_include_source_also_gets_the_source_series(
    store: Store, config: Config, phantom: SyntheticSeries, phantom_files: list[Path], executor: LocalExecutor
) -> None:
    orthanc = {"kind": "orthanc", "url": "http://orthanc:8042"}
    research = {**orthanc, "deidentify": {"include_source": True}}
    config = Config.model_validate(
        {**config.model_dump(mode="json"), "destinations": {"pacs": orthanc, "research": research}}
    )
    spool_files(store, config, phantom_files)
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == phantom.study_uid)).one()
        job = add_queued_job(s, study, "ct-lung", phantom.series_uid, "test", ["pacs", "research"])
        s.flush()
        job_id = job.id
    deliveries = _Deliveries()
    assert JobRunner(store, config, executor, enqueue=deliveries).run_one() == job_id
    [(_, results, to_all), (_, sources, to_research)] = deliveries.calls
    assert to_all == ["pacs", "research"] and to_research == ["research"]
    assert {p.parent for _, p in results} == {config.results_dir / str(job_id)}
    spooled = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in phantom_files}
    assert {uid for uid, _ in sources} == spooled
    assert all(p.is_relative_to(config.spool_dir) for _, p in sources)


DENSE = {
    "label": "Dense tissue",
    "category": ["123037004", "SCT", "Anatomical Structure"],
    "type": ["272673000", "SCT", "Bone structure"],
    "color": [250, 250, 210],
}


def test_a_configured_monai_bundle_routed_by_a_rule_runs_in_a_worker(
    store: Store, tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path], executor: LocalExecutor
) -> None:
    """A bundle named in the config's `pipelines`, with an inline label table, from rule to SEG."""
    bundle = write_threshold_bundle(tmp_path / "bundle", resample=False)  # its own table says "Bone"
    config = Config.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "executor": {"poll_s": 0.1},
            "pipelines": {
                "dense-ct": {
                    "kind": "monai-bundle",
                    "bundle_dir": str(bundle),
                    "labels": {1: DENSE},
                    "modalities": ["CT"],
                    "min_slices": 10,
                }
            },
            "rules": [{"name": "dense", "match": {"Modality": {"equals": "CT"}}, "pipeline": "dense-ct"}],
        }
    )
    rules = validate_rules(config, available_pipelines())  # the node's own check at start
    spool_files(store, config, phantom_files)
    monitor = CompletionMonitor(
        store, CompletionConfig(quiet_period_s=1), on_complete=routing_hook(rules, config.spool_dir)
    )
    monitor.check(utcnow() + timedelta(seconds=5))
    assert _jobs(store) == [(1, "dense-ct", phantom.series_uid, JobState.QUEUED)]

    job_id = JobRunner(store, config, executor, enqueue=_Deliveries()).run_one()
    assert job_id is not None
    job = job_row(store, job_id)
    assert (job.state, job.error) == (JobState.SUCCEEDED, None)
    [seg] = [
        p for p in (config.results_dir / str(job.id)).glob("*.dcm") if pydicom.dcmread(p).Modality == "SEG"
    ]
    [segment] = pydicom.dcmread(seg).SegmentSequence
    assert (segment.SegmentLabel, segment.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "Dense tissue",
        "272673000",
    )


def test_a_series_the_pipeline_cannot_use_fails_with_its_reason(
    store: Store, config: Config, tmp_path: Path, executor: LocalExecutor
) -> None:
    [job_id] = _study_with_jobs(store, config, tmp_path, 1)  # 2 slices of 16 x 16
    JobRunner(store, config, executor, enqueue=_no_deliveries).run_one()
    job = job_row(store, job_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.error == "ct-lung: only 2 slices, this pipeline needs at least 5"


def test_a_series_missing_from_this_nodes_spool_fails_with_the_setting_to_fix_it(
    store: Store, config: Config, tmp_path: Path, executor: LocalExecutor
) -> None:
    """Instances another node received into a spool this node does not share: no run on half a
    series, a retry (the node that has them may claim it) and a reason that names the setting."""
    [job_id] = _study_with_jobs(store, config, tmp_path, 1)
    next(config.spool_dir.rglob("*.dcm")).unlink()
    JobRunner(store, config, executor, enqueue=_no_deliveries).run_one()
    job = job_row(store, job_id)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.error is not None and job.error.startswith("1 of 2 instances of series ")
    assert "need cluster.shared_dir" in job.error


# The three tests below end the module's worker process (the next task starts another, importing
# torch again): they come after the other tests that run jobs in it.


def test_a_woken_slot_runs_a_completed_studys_job_at_once_and_says_when_deliveries_are_queued(
    store: Store,
    tmp_path: Path,
    phantom_files: list[Path],
    executor: LocalExecutor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot polls every 600 s here: only the completion's wake-up (and a node's own, after a job's
    deliveries were queued) can start a job within the test's deadlines. Stopping wakes the slot too."""
    config = make_config(tmp_path / "data", poll_s=600)  # the `store` fixture's data dir
    spool_files(store, config, phantom_files)
    claims: list[int | None] = []  # one entry per finished claim, even one that raised

    def claim(*args: Any, **kwargs: Any) -> ClaimedJob | None:
        job = None
        try:
            job = claim_job(*args, **kwargs)
            return job
        finally:
            claims.append(None if job is None else job.id)

    monkeypatch.setattr(execute, "claim_job", claim)
    delivered = threading.Event()
    runner = JobRunner(store, config, executor, enqueue=_Deliveries(), delivered=delivered.set)
    runner.start()
    try:
        wait_for(lambda: claims == [None], 60, "the slot's first claim, which finds nothing")
        woken: list[bool] = []
        assert len(_complete(store, config, completed=lambda: woken.append(True))) == 1
        assert woken == [True]  # once per check that completed studies
        with store.session() as session:
            [job_id] = session.scalars(select(Job.id)).all()
        runner.wake()
        wait_for(lambda: job_row(store, job_id).state == JobState.SUCCEEDED, 120, "the woken slot's job")
        assert not delivered.is_set()  # the rule names no destination
        sent = tiny_study_job(store, config, tmp_path, seed=9, destinations=("archive",))
        runner.wake()
        wait_for(lambda: job_row(store, sent).state == JobState.SUCCEEDED, 120, "the job with a destination")
        wait_for(delivered.is_set, 10, "word that its deliveries are queued")
    finally:
        stopping = threading.Thread(target=runner.stop)
        stopping.start()
        stopping.join(60)
    assert not stopping.is_alive(), "stop waited for the slot's poll"


def _hanging_job(
    store: Store,
    tmp_path: Path,
    phantom: SyntheticSeries,
    files: list[Path],
    executor: LocalExecutor,
    **settings: float,
) -> tuple[JobRunner, int]:
    """A queued job of the test pipeline that never returns, and a runner with these executor settings."""
    config = make_config(tmp_path / "data", **settings)
    spool_files(store, config, files)
    job_id = add_job(store, phantom.study_uid, phantom.series_uid, "test-hang")
    return JobRunner(store, config, executor, enqueue=_no_deliveries), job_id


def test_a_pipeline_that_hangs_is_killed_at_the_time_limit(
    store: Store, tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path], executor: LocalExecutor
) -> None:
    runner, job_id = _hanging_job(
        store, tmp_path, phantom, phantom_files, executor, job_timeout_s=3, max_attempts=1
    )
    runner.run_one()
    job = job_row(store, job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None and job.error.startswith("timed out after 3 s (in infer)"), job.error
    assert job.timings is not None and "load_s" in job.timings
    assert not (tmp_path / "data" / "results" / str(job_id)).exists()


def _lease(store: Store, job_id: int) -> datetime:
    """When the job's lease ends; the epoch while it has none."""
    return job_row(store, job_id).lease_expires_at or datetime.fromtimestamp(0, UTC)


def test_a_running_job_keeps_its_lease_and_is_given_back_when_the_runner_stops(
    store: Store, tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path], executor: LocalExecutor
) -> None:
    runner, job_id = _hanging_job(store, tmp_path, phantom, phantom_files, executor, lease_s=3)
    runner.start()
    try:
        first = wait_for(lambda: _lease(store, job_id), 120, "the job to be claimed")
        renewed = first + timedelta(seconds=3)  # past the first lease: only renewals get there
        wait_for(lambda: _lease(store, job_id) > renewed, 120, "the lease to be renewed")
        assert claim_job(store, "intruder", tmp_path / "data" / "spool", 3, 3) is None
    finally:
        runner.stop()
    job = job_row(store, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)


# --- idempotency and superseding (in this process: run_task is what a worker runs) ----------------


def _run(
    phantom: SyntheticSeries, files: list[Path], out: Path, revision: int, supersedes: int | None
) -> TaskResult:
    """What a worker does with a task, here in the test process."""
    import torch

    files_ = tuple(map(str, files))
    task = Task(1, "ct-lung", phantom.study_uid, phantom.series_uid, revision, files_, str(out), supersedes)
    return run_task(task, torch.device("cpu"), _PIPELINES, lambda *_: None)


_PIPELINES: dict[str, Pipeline] = {}


def _series(results: Sequence[tuple[str, str]]) -> dict[str, tuple[int, str]]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for _, p in results]
    return {str(ds.Modality): (int(ds.SeriesNumber), str(ds.SeriesDescription)) for ds in headers}


def test_a_rerun_reuses_complete_results_and_a_new_revision_supersedes_them(
    tmp_path: Path, phantom: SyntheticSeries, phantom_files: list[Path]
) -> None:
    first = _run(phantom, phantom_files, tmp_path / "1", 1, None)
    again = _run(phantom, phantom_files, tmp_path / "1", 1, None)  # the worker died before recording
    assert first.error is None and again.reused and again.results == first.results
    encoded_again = _run(phantom, phantom_files, tmp_path / "1b", 1, None)  # its folder was lost
    assert [uid for uid, _ in encoded_again.results] == [uid for uid, _ in first.results]

    newer = _run(phantom, phantom_files, tmp_path / "2", 2, 1)
    assert not {uid for uid, _ in newer.results} & {uid for uid, _ in first.results}
    old, new = _series(first.results), _series(newer.results)
    assert old["SEG"] == (1001, "radgate ct-lung SEG")
    assert new["SEG"] == (1011, "radgate (supersedes rev 1) ct-lung SEG")
    assert all(new[kind][0] > old[kind][0] for kind in old)
