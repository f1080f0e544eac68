"""End to end on Ray: `radgate serve` with ``executor.kind: ray`` starts its own local Ray, runs a
study received by DCMTK on a warm actor, says where in `radgate jobs`, and leaves no Ray behind."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from support.execute import register_test_pipelines
from support.node import NodeProcess, wait_for

from dicom_io.testing.synthetic import ct_chest_phantom
from plugin.cli import main
from plugin.store.engine import Store
from plugin.store.models import Job, JobState

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (pid -> command line), read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found.update(children)
        todo += children
    return {p: _cmdline(p) for p in found}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pids: dict[int, str]) -> list[str]:
    """Those still running as the same program (a pid reused by another is not ours)."""
    return [cmd for pid, cmd in pids.items() if cmd and _cmdline(pid) == cmd]


RAY = {"num_cpus": 1, "num_gpus": 0, "object_store_mb": 80, "resources": {"test-tiny": {"cpus": 0.5}}}


def test_a_node_on_its_own_ray_runs_studies_on_a_warm_actor_and_stops_its_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plugins = register_test_pipelines(tmp_path / "plugins")  # the node and its Ray workers find test-tiny
    path = [str(plugins), str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    rules = [{"name": "any-ct", "match": {"Modality": {"equals": "CT"}}, "pipeline": "test-tiny"}]
    settings = {
        "rules": rules,
        "executor": {"kind": "ray", "poll_s": 0.2, "ray": RAY},
        "dicom": {"receivers": 1},  # one association at a time: one receiving process is enough
    }
    node = NodeProcess(tmp_path, settings).start()
    store = Store(f"sqlite:///{node.data_dir / 'radgate.db'}")  # polled directly: no CLI per poll
    try:
        studies = [ct_chest_phantom(rows=16, columns=16, slices=4, seed=seed) for seed in (11, 12)]
        for study in studies:
            assert node.storescu(*study.write(tmp_path / study.study_uid)).returncode == 0

        def succeeded() -> bool:
            with store.session() as s:
                count = s.scalar(select(func.count(Job.id)).where(Job.state == JobState.SUCCEEDED))
            return count == 2

        wait_for(succeeded, 180, "both studies' jobs to succeed", interval=0.5)
        jobs = node.jobs(cli=False)
        assert len(jobs) == 2 and all(j["state"] == "SUCCEEDED" for j in jobs), jobs
        assert node.process is not None
        ray_processes = _descendants(node.process.pid)
        assert any("raylet" in cmd for cmd in ray_processes.values()), ray_processes
    finally:
        store.dispose()
        assert node.stop() == 0, node.log()
    assert {j["study_uid"] for j in jobs} == {s.study_uid for s in studies}
    first, second = (j["placement"] for j in jobs)
    assert isinstance(first, dict) and first["executor"] == "ray" and first["device"] == "cpu"
    assert second == first  # one warm actor served both studies
    for job in jobs:
        kinds = {
            pydicom.dcmread(p, stop_before_pixels=True).Modality
            for p in Path(str(job["results_dir"])).glob("*.dcm")
        }
        assert kinds == {"SEG", "SR", "OT"}
    assert main(["jobs", "--config", str(node.config_path)]) == 0
    assert f"ray {first['ip']} node {first['node_id'][:8]}, {first['worker']}, cpu" in capsys.readouterr().out
    wait_for(lambda: not _running(ray_processes), 30, "the node's Ray to stop with it")
