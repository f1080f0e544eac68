"""Two ``radgate serve`` nodes on one PostgreSQL store and one shared dir (docs/cluster.md), sending
to one DCMTK storescp that keeps every file it receives (unique names, so a duplicate would show).

A study sent half to each node completes once, runs once and its results arrive once; a node
SIGKILLed while it runs a job: the other takes the job over once its lease ran out, and the results
still arrive once. The nodes run the test pipeline ``test-tiny`` (support.execute), which holds a
job RUNNING while the test keeps its gate file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from support.execute import CONTROL_ENV, register_test_pipelines
from support.node import DCMTK_ENV, RADGATE, NodeProcess, free_port, kill_until_gone, wait_for
from support.postgres import PostgresServer

from dicom_io.testing.synthetic import ct_chest_phantom
from plugin.jobs.executor.output import read_manifest
from plugin.store.engine import Store
from plugin.store.models import Delivery, Job, JobState, Study

pytestmark = pytest.mark.slow  # two nodes, each with a worker process that imports torch

TESTS = Path(__file__).resolve().parents[1]
RAY = RADGATE.with_name("ray")
LEASE_S = 4.0
QUIET_S = 4.0
SLICES = 8


class StoreSCP:
    """DCMTK storescp writing every received instance to its own file (``+uf``: a second copy of a
    SOP Instance UID gets a second file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.port = free_port()
        self.process = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-pm", "+uf", "-od", str(folder), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )

    def received(self) -> Counter[str]:
        """How many times each SOP Instance UID arrived."""
        return Counter(
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in self.folder.iterdir()
        )

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def _gone(pid: int) -> bool:
    """No such process, or only its exit status is left (a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@dataclass
class Cluster:
    nodes: dict[str, NodeProcess]
    store: Store
    pacs: StoreSCP
    control: Path  # the test pipeline's folder: while ``gate`` is there a run waits
    executor: str
    tmp: Path

    @property
    def gate(self) -> Path:
        return self.control / "gate"

    def job(self, study_uid: str) -> Job | None:
        with self.store.session() as s:
            return s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid)).one_or_none()

    def finished(self, study_uid: str, what: str) -> Job:
        """The study's one job once it has ended; it must have SUCCEEDED."""
        job = wait_for(
            lambda: (
                (j := self.job(study_uid)) is not None
                and j.state in (JobState.SUCCEEDED, JobState.FAILED)
                and j
            ),
            180,
            what,
            interval=0.2,
        )
        assert (job.state, job.error) == (JobState.SUCCEEDED, None)
        return job

    def send_half_to_each(self, seed: int) -> str:
        """A new small chest CT (`SLICES` slices), the first half to node a, the rest to node b, both
        at once (storescu); its Study Instance UID."""
        phantom = ct_chest_phantom(rows=32, columns=32, slices=SLICES, seed=seed)
        files = phantom.write(self.tmp / f"ct{seed}")
        halves = {"a": files[: SLICES // 2], "b": files[SLICES // 2 :]}
        senders = [
            subprocess.Popen(
                ["storescu", "-aec", "RADGATE", "127.0.0.1", str(self.nodes[name].port), *map(str, part)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=DCMTK_ENV,
            )
            for name, part in halves.items()
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err
        return phantom.study_uid

    def results(self, job_id: int) -> set[str]:
        """The SOP Instance UIDs of the job's results, in the shared dir."""
        return {uid for uid, _ in read_manifest(self.tmp / "shared" / "results" / str(job_id))}

    def delivered(self, job_id: int) -> list[dict[str, Any]]:
        """The job's deliveries (as ``radgate deliveries`` lists them) once every one is SENT.

        Waited for in the store (a query per poll, not a command line's start each time)."""

        def all_sent() -> bool:
            with self.store.session() as s:
                states = s.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all()
            return bool(states) and all(state == "SENT" for state in states)

        wait_for(all_sent, 60, "every delivery SENT", interval=0.2)
        rows = [d for d in self.nodes["b"].deliveries(cli=False) if d["job_id"] == job_id]
        assert rows and all(d["state"] == "SENT" for d in rows), rows
        return rows


def _session(sid: int) -> list[int]:
    """The processes of session ``sid`` that have not ended (zombies excluded)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # ended meanwhile
            continue
        if int(session) == sid and state != "Z":
            found.append(int(stat.parent.name))
    return found


@contextmanager
def ray_head(folder: Path) -> Iterator[str]:
    """``ray start --head --block`` on loopback, 2 CPUs and 2 declared GPUs (a GPU cluster's stand-in),
    every port its own; its address. Killed at the end with every process of its own session (the
    raylet's agents and workers, which have process groups of their own), never with ``ray stop``,
    which would stop every Ray on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="rg-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    gcs = free_port()
    ports = [
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
    ]
    ports += ["--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--runtime-env-agent-port"]
    command = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}"]
    command += ["--num-cpus=2", "--num-gpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    # what a test cluster can do without: the autoscaler's monitor, the log monitor (the nodes'
    # drivers take no worker logs)
    command += ["--no-monitor", "--include-log-monitor=false"]
    command += [f"--temp-dir={temp}", *(f"{option}={free_port()}" for option in ports)]
    log = folder / "ray.log"
    with log.open("wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: head.poll() is None and "Ray runtime started" in log.read_text(), 120, "Ray's head")
        yield f"127.0.0.1:{gcs}"
    finally:  # a throwaway head: nothing of it to stop gracefully
        kill_until_gone(lambda: _session(head.pid), 30, "the Ray head's processes to end")
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module", params=["local", "ray"])
def cluster(
    request: pytest.FixtureRequest, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two nodes on one PostgreSQL and one shared dir, running their jobs in worker processes of
    their own (local) or on one Ray cluster (ray)."""
    tmp = tmp_path_factory.mktemp("cluster")
    plugins = register_test_pipelines(tmp / "plugins")
    control = tmp / "control"
    control.mkdir()
    url = postgres.new_database()
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        # what the nodes, their workers and Ray's workers inherit
        mp.setenv("PYTHONPATH", os.pathsep.join([str(plugins), str(TESTS), os.environ.get("PYTHONPATH", "")]))
        mp.setenv(CONTROL_ENV, str(control))
        executor: dict[str, Any] = {"lease_s": LEASE_S, "poll_s": 0.2, "max_attempts": 3}
        if request.param == "ray":  # no token: other Rays on this machine share ~/.ray's token file
            mp.setenv("RAY_AUTH_MODE", "disabled")
            address = stack.enter_context(ray_head(tmp))
            gpu_share = {"test-tiny": {"cpus": 0.5, "gpus": 0.5}}  # placed on the declared GPUs
            executor |= {"kind": "ray", "ray": {"address": address, "resources": gpu_share}}
        pacs = StoreSCP(tmp / "pacs")
        stack.callback(pacs.stop)
        store = Store(url)
        stack.callback(store.dispose)
        settings = {
            "database_url": url,
            "executor": executor,
            "dispatch": {"poll_interval_s": 0.2},
            "dicom": {"receivers": 1},  # one association at a time per node
            # no shortcut after a release: the two halves come over two associations that a loaded
            # machine may start seconds apart (docs/cluster.md, "Completion")
            "completion": {"quiet_period_s": QUIET_S, "after_release_s": QUIET_S},
            "destinations": {
                "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
            },
            "rules": [
                {
                    "name": "ct",
                    "match": {"Modality": {"equals": "CT"}},
                    "pipeline": "test-tiny",
                    "destinations": ["pacs"],
                }
            ],
        }
        nodes = {
            name: NodeProcess(
                tmp / name, {**settings, "cluster": {"shared_dir": str(tmp / "shared"), "node_name": name}}
            )
            for name in ("a", "b")
        }
        for node in nodes.values():
            stack.callback(lambda n=node: n.process is not None and n.stop())  # type: ignore[misc]
        with ThreadPoolExecutor(len(nodes)) as pool:  # at once, as a cluster's nodes may start
            list(pool.map(NodeProcess.start, nodes.values()))
        for node in nodes.values():  # the port accepts before the receiving processes serve it
            wait_for(lambda n=node: "radgate serving" in n.log(), 120, "the node to serve")  # type: ignore[misc]
        yield Cluster(nodes, store, pacs, control, request.param, tmp)


def test_a_study_sent_half_to_each_node_completes_runs_and_is_delivered_once(cluster: Cluster) -> None:
    cluster.gate.unlink(missing_ok=True)
    study_uid = cluster.send_half_to_each(seed=1)
    job = cluster.finished(study_uid, "the job to end")
    deliveries = cluster.delivered(job.id)

    [study] = [s for s in cluster.nodes["a"].studies(cli=False) if s["study_uid"] == study_uid]
    assert (study["state"], study["revision"], study["instance_count"]) == ("COMPLETE", 1, SLICES)
    assert job.attempts == 1
    placement = job.placement or {}
    assert placement["executor"] == cluster.executor  # where it ran is on the job
    if cluster.executor == "ray":  # on one of the head's two declared GPUs
        assert placement["gpu"] in {"0", "1"} and placement["actor"].startswith("test-tiny/gpu"), placement
    completed = [
        n for n, node in cluster.nodes.items() if f"study {study_uid} revision 1 complete" in node.log()
    ]
    assert len(completed) == 1, completed  # one node declared it complete, and only once
    received = cluster.pacs.received()
    sent = {d["sop_instance_uid"] for d in deliveries}
    assert sent == cluster.results(job.id) and len(sent) >= 3  # SEG, SR, SC and more
    assert {uid: received[uid] for uid in sent} == dict.fromkeys(sent, 1)


def test_a_node_killed_mid_job_hands_it_to_the_other_and_results_arrive_once(cluster: Cluster) -> None:
    cluster.gate.touch()  # the job stays RUNNING where it started
    study_uid = cluster.send_half_to_each(seed=2)
    running = wait_for(
        lambda: (j := cluster.job(study_uid)) is not None and j.state == JobState.RUNNING and j,
        120,
        "the job to run",
    )
    pids = {node.process.pid: name for name, node in cluster.nodes.items() if node.process is not None}
    victim = pids[int(str(running.lease_owner).split(":")[1])]  # owner: host:pid:slot
    survivor = "b" if victim == "a" else "a"
    wait_for((cluster.control / "started").exists, 120, "the job to be in its pipeline")
    if cluster.executor == "local":
        [worker] = re.findall(r"worker 0 started \(pid (\d+)\)", cluster.nodes[victim].log())
    cluster.nodes[victim].kill()  # SIGKILL, mid-job
    if cluster.executor == "local":  # a worker left running would write results beside the survivor's
        wait_for(lambda: _gone(int(worker)), 30, "the dead node's worker to end")
    cluster.gate.unlink()

    job = cluster.finished(study_uid, "the other node to take the job over and end it")
    assert job.attempts >= 2  # the dead node's attempt counted; the survivor's ran it
    wait_for(
        lambda: f"job {job.id}: SUCCEEDED" in cluster.nodes[survivor].log(), 30, "the survivor's log line"
    )
    deliveries = cluster.delivered(job.id)
    received = cluster.pacs.received()
    sent = {d["sop_instance_uid"] for d in deliveries}
    assert sent == cluster.results(job.id) and len(sent) >= 3
    assert {uid: received[uid] for uid in sent} == dict.fromkeys(sent, 1)
