"""The Ray executor on a real local Ray (2 CPUs, 1 declared GPU): warm actors, a killed actor, CUDA
out-of-memory, idle release, where each job ran. The job store stays the truth throughout.

One Ray for the module (starting one costs seconds); the tiny test pipeline (`support.execute`)
runs in milliseconds, so the time goes into scheduling, which is the point here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from sqlalchemy import func, select
from support.execute import CONTROL_ENV, job_row, make_config, register_test_pipelines, tiny_study_job
from support.node import wait_for

from plugin.cli import main
from plugin.config import Config
from plugin.jobs.execute import JobRunner
from plugin.jobs.executor import ExecutorUnavailable, Placement, Task, TaskResult, Watch
from plugin.jobs.executor.output import read_manifest
from plugin.store.engine import Store, migrated_store
from plugin.store.models import Delivery, JobState

if TYPE_CHECKING:
    from plugin.jobs.executor.ray_executor import RayExecutor

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
RAY = {"resources": {"test-tiny": {"cpus": 0.5, "gpus": 0.5}}}
"""Half a CPU per actor, so that 4 fit the 2 CPUs; half of the one declared GPU."""


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder whose files steer the test pipeline in the actors (`support.execute.TinyPipeline`)."""
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, control: Path) -> Iterator[None]:
    """A local Ray for the module; its workers see the test pipelines and the control folder."""
    import ray

    from plugin.jobs.executor.ray_executor import NAMESPACE

    plugins = register_test_pipelines(tmp_path_factory.mktemp("plugins"))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(plugins))
        path = [str(plugins), str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
        mp.setenv(CONTROL_ENV, str(control))
        # as the other Ray tests: no token in ~/.ray to create (two Rays starting at once on a new
        # machine could each write one) and no RAY_AUTH_MODE=token left behind by ray.init
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=2,
            num_gpus=1,
            object_store_memory=80 * 2**20,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            yield
        finally:
            ray.shutdown()


def _config(data_dir: Path, **ray_settings: Any) -> Config:
    return make_config(
        data_dir,
        kind="ray",
        max_attempts=2,
        job_timeout_s=120,
        lease_s=30,
        ray={**RAY, **ray_settings},
    ).model_copy(update={"destinations": {}})


@pytest.fixture(scope="module")
def executor(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayExecutor]:
    from plugin.jobs.executor.ray_executor import RayExecutor

    ex = RayExecutor(_config(tmp_path_factory.mktemp("unused")), tick_s=0.05)
    yield ex
    ex.close()


@pytest.fixture()
def config(tmp_path: Path) -> Config:
    return Config.model_validate(
        {
            **_config(tmp_path / "data").model_dump(mode="json"),
            "destinations": {"pacs": {"kind": "orthanc", "url": "http://orthanc.invalid:8042"}},
        }
    )


@pytest.fixture()
def store(config: Config) -> Iterator[Store]:
    with migrated_store(config.db_url) as s:
        yield s


def _placement(store: Store, job_id: int) -> dict[str, str]:
    placement = job_row(store, job_id).placement
    assert placement is not None
    return placement


def _deliveries(store: Store, job_id: int) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count(Delivery.id)).where(Delivery.job_id == job_id)) or 0)


def _succeeded(store: Store, config: Config, job_id: int) -> list[tuple[str, str]]:
    """Assert the job SUCCEEDED with a whole results folder queued once to pacs; its (UID, path)s."""
    job = job_row(store, job_id)
    assert (job.state, job.error) == (JobState.SUCCEEDED, None)
    results = list(read_manifest(config.results_dir / str(job_id)))
    modalities = {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for _, p in results}
    assert modalities == {"SEG", "SR", "OT"}
    assert _deliveries(store, job_id) == len(results)  # each result once to the one destination
    assert not [p for p in config.results_dir.iterdir() if p.name.startswith(".")]  # no temporary folder
    return results


def _loads(actor: str) -> dict[str, int]:
    import ray

    from plugin.jobs.executor.ray_executor import NAMESPACE

    loads: dict[str, int] = ray.get(ray.get_actor(actor, namespace=NAMESPACE).loads.remote())
    return loads


def test_studies_run_on_a_warm_actor_placed_on_the_gpu_and_radgate_jobs_says_where(
    store: Store, config: Config, tmp_path: Path, executor: RayExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    runner = JobRunner(store, config, executor)
    first, second = (tiny_study_job(store, config, tmp_path, seed, ["pacs"]) for seed in (1, 2))
    assert runner.run_one() == first and runner.run_one() == second
    for job_id in (first, second):
        _succeeded(store, config, job_id)
    placed = _placement(store, first)
    assert (
        placed["executor"] == "ray"
        and placed["gpu"] == "0"
        and placed["node_id"] == ray.get_runtime_context().get_node_id()
    )
    assert _placement(store, second) == placed  # the same actor, process and GPU
    assert _loads(placed["actor"]) == {"test-tiny": 1}  # the second study did not load the model again

    assert main(["jobs", "--data-dir", str(config.data_dir)]) == 0
    table = capsys.readouterr().out
    assert f"ray {placed['ip']} node {placed['node_id'][:8]}, {placed['worker']}, GPU 0" in table
    assert main(["jobs", "--json", "--data-dir", str(config.data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["placement"] == placed


def test_an_actor_killed_mid_job_is_replaced_and_the_job_delivered_once(
    store: Store, config: Config, tmp_path: Path, executor: RayExecutor, control: Path
) -> None:
    job_id = tiny_study_job(store, config, tmp_path, 3, ["pacs"])
    (control / "gate").touch()
    runner = JobRunner(store, config, executor)
    thread = threading.Thread(target=runner.run_one)
    thread.start()
    try:
        wait_for((control / "started").exists, 60, "the job to be running in its actor")
        killed = _placement(store, job_id)
        os.kill(int(killed["worker"].removeprefix("pid ")), signal.SIGKILL)  # as the OOM killer would
        thread.join(60)
    finally:
        (control / "gate").unlink()
        (control / "started").unlink(missing_ok=True)
    lost = job_row(store, job_id)
    assert (lost.state, lost.attempts) == (JobState.QUEUED, 1)
    assert lost.error is not None and f"Ray actor {killed['actor']} lost" in lost.error, lost.error
    assert _deliveries(store, job_id) == 0

    assert runner.run_one() == job_id
    assert job_row(store, job_id).attempts == 2
    _succeeded(store, config, job_id)
    assert _placement(store, job_id)["actor"] != killed["actor"]


def test_cuda_out_of_memory_is_recorded_run_on_the_cpu_and_the_gpu_actor_serves_on(
    store: Store, config: Config, tmp_path: Path, executor: RayExecutor, control: Path
) -> None:
    runner = JobRunner(store, config, executor)
    before, during, after = (tiny_study_job(store, config, tmp_path, seed, ["pacs"]) for seed in (4, 5, 6))
    assert runner.run_one() == before
    gpu_actor = _placement(store, before)
    (control / "oom").touch()
    try:
        assert runner.run_one() == during
    finally:
        (control / "oom").unlink()
    _succeeded(store, config, during)
    moved = _placement(store, during)
    assert job_row(store, during).attempts == 1
    assert "gpu" not in moved and moved["device"] == "cpu" and moved["actor"] != gpu_actor["actor"]
    assert moved["note"].startswith(
        "CUDA out of memory on cpu: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert moved["note"].endswith("; ran on the CPU")

    assert runner.run_one() == after
    _succeeded(store, config, after)
    assert _placement(store, after) == gpu_actor
    assert _loads(gpu_actor["actor"]) == {"test-tiny": 1}


def test_an_actor_on_shared_paths_writes_the_results_and_is_released_when_idle(
    cluster: None, store: Store, config: Config, tmp_path: Path
) -> None:
    import ray

    from plugin.jobs.executor.ray_executor import NAMESPACE, RayExecutor

    settings = {"idle_timeout_s": 0.5, "shared_paths": True, "resources": {"test-tiny": {"cpus": 0.5}}}
    idle = RayExecutor(_config(tmp_path, **settings), 0.05)
    try:
        job_id = tiny_study_job(store, config, tmp_path, 7, ["pacs"])
        assert JobRunner(store, config, idle).run_one() == job_id
        _succeeded(store, config, job_id)  # the actor read the spool and wrote results_dir itself
        placed = _placement(store, job_id)
        assert "gpu" not in placed  # declared CPU only
        _loads(placed["actor"])  # alive after the job

        def gone() -> bool:
            try:
                ray.get_actor(placed["actor"], namespace=NAMESPACE)
            except ValueError:
                return True
            return False

        wait_for(gone, 30, "the idle actor to be released")
    finally:
        idle.close()


def test_a_job_whose_resources_are_taken_waits_in_the_queue(
    cluster: None, store: Store, config: Config, tmp_path: Path
) -> None:
    from plugin.jobs.executor.ray_executor import RayExecutor

    greedy = RayExecutor(_config(tmp_path, resources={"test-tiny": {"cpus": 8}}), 0.05)  # Ray has 2
    try:
        job_id = tiny_study_job(store, config, tmp_path, 9, ["pacs"])
        short = config.model_copy(
            update={"executor": config.executor.model_copy(update={"job_timeout_s": 1.0})}
        )
        assert JobRunner(store, short, greedy).run_one() == job_id
    finally:
        greedy.close()
    job = job_row(store, job_id)
    assert (job.state, job.attempts, job.lease_owner, job.placement) == (JobState.QUEUED, 0, None, None)


class _Down:
    """An executor whose cluster cannot be reached (its `run` raises before anything ran)."""

    slots = 1

    def start(self) -> None:
        pass

    def run(self, slot: int, task: Task, timeout_s: float, watch: Watch) -> TaskResult:
        watch.placed(Placement("ray", "nowhere", "-", "cpu"))
        raise ExecutorUnavailable("Ray at ray://head:10001 unreachable: ray client connection timeout")

    def close(self) -> None:
        pass


def test_a_job_waits_in_the_queue_while_the_cluster_is_unreachable(
    store: Store, config: Config, tmp_path: Path
) -> None:
    job_id = tiny_study_job(store, config, tmp_path, 8, ["pacs"])
    assert JobRunner(store, config, _Down()).run_one() == job_id
    job = job_row(store, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)


def test_a_ray_that_does_not_start_is_logged_and_jobs_wait_in_the_queue(
    store: Store,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from plugin.jobs.executor.ray_executor import RayExecutor

    def timed_out(self: RayExecutor) -> None:  # what ray.init raises when the raylet never registers
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(RayExecutor, "_init_ray", timed_out)
    own = RayExecutor(_config(tmp_path / "own"), 0.05)
    with caplog.at_level(logging.WARNING, logger="plugin.jobs.executor.ray_executor"):
        own.start()  # the node starts all the same
    assert "own Ray did not start: The current node timed out during startup." in caplog.text
    job_id = tiny_study_job(store, config, tmp_path, 10, ["pacs"])
    assert JobRunner(store, config, own).run_one() == job_id
    job = job_row(store, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)
