"""The Ray executor on a separate cluster (`ray start --head`, reached by Ray Client as ray://):
a study runs without a shared file system, and a head killed mid-job leaves the job queued with
its attempt given back, later jobs waiting, nothing lost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.execute import CONTROL_ENV, job_row, make_config, register_test_pipelines, tiny_study_job
from support.node import free_port, kill_until_gone, wait_for

from plugin.config import Config
from plugin.jobs.execute import JobRunner
from plugin.jobs.executor.output import read_manifest
from plugin.store.engine import Store, migrated_store
from plugin.store.models import JobState

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")


class Head:
    """A Ray head of its own (own temp dir, free ports), killed by the pids of its processes."""

    def __init__(self, temp_dir: Path, env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.client_port = free_port()
        self.gcs_port = free_port()
        command = [
            *(str(RAY_BIN), "start", "--head", f"--port={self.gcs_port}", f"--temp-dir={temp_dir}"),
            *(f"--ray-client-server-port={self.client_port}", "--num-cpus=1", "--num-gpus=0"),
            *("--include-dashboard=false", "--object-store-memory=80000000", "--disable-usage-stats"),
            *("--no-monitor", "--include-log-monitor=false"),  # no autoscaler; no driver takes worker logs
        ]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        wait_for(self._listening, 120, "the Ray Client server")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.client_port)) == 0

    def pids(self) -> list[int]:
        """Its processes: those whose command line names its temp dir, its client port or its GCS
        (the Ray Client server's per-client server), and their descendants (the raylet's agents,
        whose command lines name nothing), zombies left out: none of them may linger after `kill`."""
        found: set[int] = set()
        parents: dict[int, int] = {}
        ends = (f"={self.client_port}", f":{self.gcs_port}")
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
                state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError, ValueError):  # ended meanwhile
                continue
            if state == "Z":
                continue
            parents[int(proc.name)] = int(parent)
            if any(str(self.temp_dir) in a or a.endswith(ends) for a in args):
                found.add(int(proc.name))
        while more := {pid for pid, parent in parents.items() if parent in found} - found:
            found |= more
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL its processes, and those they started meanwhile, until none is left."""
        kill_until_gone(self.pids, 30, "the Ray head's processes to end")


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, control: Path) -> Iterator[Head]:
    plugins = register_test_pipelines(tmp_path_factory.mktemp("plugins"))
    path = [str(plugins), str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    temp_dir = Path(tempfile.mkdtemp(prefix="rg-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # Ray Client sends no token (docs/design.md)
        import ray.util.client.worker

        # a dead head is seen sooner: reconnecting for 2 s (default 30), each try given 1 s (default 5)
        mp.setenv("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "2")
        mp.setattr(ray.util.client.worker, "INITIAL_TIMEOUT_SEC", 1)  # read at import, so not by env
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), CONTROL_ENV: str(control)}
        # else gRPC's fork handlers in the head's Ray Client server crash about every other per-client
        # server it forks (SIGSEGV before exec), and that client is refused after 30-40 s
        env["GRPC_ENABLE_FORK_SUPPORT"] = "0"
        head = Head(temp_dir, env)
        try:
            yield head
        finally:
            head.kill()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def config(tmp_path: Path, head: Head) -> Config:
    ray = {"address": f"ray://127.0.0.1:{head.client_port}", "resources": {"test-tiny": {"cpus": 0.5}}}
    return make_config(tmp_path / "data", kind="ray", max_attempts=2, job_timeout_s=120, lease_s=60, ray=ray)


@pytest.fixture()
def store(config: Config) -> Iterator[Store]:
    with migrated_store(config.db_url) as s:
        yield s


def test_a_remote_cluster_runs_a_study_and_a_dead_head_leaves_jobs_waiting(
    head: Head, store: Store, config: Config, tmp_path: Path, control: Path
) -> None:
    from plugin.jobs.executor.ray_executor import RayExecutor

    executor = RayExecutor(config, tick_s=0.05)
    executor.start()
    runner = JobRunner(store, config, executor)
    try:
        done = tiny_study_job(store, config, tmp_path, 1)

        def ran() -> bool:  # a head still coming up refuses clients: the job waits for a later turn
            runner.run_one()
            return job_row(store, done).state == JobState.SUCCEEDED  # bytes over Ray Client, both ways

        wait_for(ran, 180, "the study to run on the cluster", interval=0.5)
        assert len(read_manifest(config.results_dir / str(done))) == 4

        cut = tiny_study_job(store, config, tmp_path, 2)
        (control / "gate").touch()
        thread = threading.Thread(target=runner.run_one)
        thread.start()
        wait_for((control / "started").exists, 60, "the job to be running on the cluster")
        head.kill()
        thread.join(180)
        assert not thread.is_alive()
        assert job_row(store, cut).state == JobState.QUEUED
        assert runner.run_one() == cut  # the cluster is gone: the job's next turn gives it back at once
    finally:
        (control / "gate").unlink(missing_ok=True)
        executor.close()
    job = job_row(store, cut)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None), job.error
    assert not (config.results_dir / str(cut)).exists()
