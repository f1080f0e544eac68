"""The real node: `radgate serve` as a subprocess, DCMTK and pynetdicom as peers, the real SQLite file."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from support.node import DCMTK_ENV, RADGATE, STORESCU, NodeProcess, held_incoming, wait_for, write_series
from support.testdata import TESTDATA, needs_testdata

pytestmark = pytest.mark.slow  # many nodes started: the module is long, so it starts early
TESTFILES = TESTDATA / "pydicom-testfiles"


# the peers the module's tests send as (storescu, echoscu, pynetdicom): any other calling AE is refused
PEERS = [
    {"ae_title": "PACS", "address": "127.0.0.1"},
    *({"ae_title": ae} for ae in ("STORESCU", "ECHOSCU", "PYSCU")),
]


@pytest.fixture(scope="module")
def port_taken() -> list[int]:
    """The port the shared node chose first, taken by another listener before the node bound it."""
    return []


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory, port_taken: list[int]) -> Iterator[NodeProcess]:
    """One node (two receiving processes, as the product's default) for the module's tests that need
    nothing else: each sends its own study (new UIDs), so they do not see each other's. Only the
    peers in PEERS may associate. Its first port is taken (as another test's node or Orthanc might
    take a port that free_port() found) before it starts: NodeProcess.start tries again on another
    port."""
    n = NodeProcess(tmp_path_factory.mktemp("node"), {"dicom": {"allowed_peers": PEERS, "receivers": 2}})
    with socket.create_server(("127.0.0.1", n.port)):
        port_taken.append(n.port)
        n.start(preexec_fn=os.setpgrp)  # its own process group: the SIGTERM test below signals it last
    yield n
    n.stop_if_running()


@pytest.fixture()
def node(shared_node: NodeProcess) -> NodeProcess:
    """The shared node, still serving after the tests before."""
    assert shared_node.process is not None and shared_node.process.poll() is None, shared_node.log()
    return shared_node


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _complete(node: NodeProcess, study_uid: str, count: int, revision: int | None = 1) -> dict:
    """The study once it is COMPLETE with ``count`` instances at ``revision`` (None: at any revision)."""

    def done() -> dict | None:
        for study in node.studies(cli=False):
            if (
                study["study_uid"] == study_uid
                and study["state"] == "COMPLETE"
                and (study["revision"] == revision or (revision is None and study["instance_count"] == count))
            ):
                return study
        return None

    study = wait_for(done, 30, "the study to complete", interval=0.2)
    assert study["instance_count"] == count
    return study


def _spooled(node: NodeProcess, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def _same_dataset(a: Path, b: Path) -> bool:
    """Equal as datasets (the receiver writes its own file meta, so bytes before the dataset differ)."""
    return pydicom.dcmread(a) == pydicom.dcmread(b)


def test_a_sent_study_is_stored_and_listed_complete(node: NodeProcess, tmp_path: Path) -> None:
    files = write_series(tmp_path / "src", 12)
    sent = node.storescu(*files)
    assert sent.returncode == 0, sent.stderr
    study = _complete(node, _study_uid(files), 12)
    assert (study["series_count"], study["revision"], study["accession_number"]) == (1, 1, "ACC1")
    assert all(_same_dataset(f, _spooled(node, f)) for f in files)
    listing = subprocess.run(
        [str(RADGATE), "studies", "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert study["study_uid"] in listing.stdout and "COMPLETE" in listing.stdout


def test_the_same_instance_twice_is_stored_once(node: NodeProcess, tmp_path: Path) -> None:
    [first, second] = write_series(tmp_path / "src", 2)
    assert node.storescu(first, second).returncode == 0
    stored = _spooled(node, first).read_bytes()
    resent = node.storescu(first)
    assert resent.returncode == 0 and "Success" in resent.stderr, resent.stderr
    _complete(node, _study_uid([first]), 2)
    assert _spooled(node, first).read_bytes() == stored


def test_a_late_instance_opens_a_new_revision_that_completes_again(node: NodeProcess, tmp_path: Path) -> None:
    """Which jobs each revision queues is routing's business (tests/test_node_completion.py: one each)."""
    files = write_series(tmp_path / "src", 3)
    assert node.storescu(*files[:2]).returncode == 0
    study_uid = _study_uid(files)
    first = _complete(node, study_uid, 2)
    assert node.storescu(files[2]).returncode == 0
    second = _complete(node, study_uid, 3, revision=2)
    assert second["completed_at"] > first["completed_at"]
    with sqlite3.connect(node.data_dir / "radgate.db") as db:
        revisions = db.execute(
            "SELECT study_revision, count(*) FROM instances JOIN studies ON studies.id = instances.study_id"
            " WHERE studies.study_uid = ? GROUP BY 1 ORDER BY 1",
            (study_uid,),
        ).fetchall()
    assert revisions == [(1, 2), (2, 1)]


def _send_raw(port: int, path: Path) -> int:
    """C-STORE a file's bytes as they are: pynetdicom streams the dataset without decoding it."""
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="PYSCU")
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADGATE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


@needs_testdata
@pytest.mark.parametrize("broken", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_a_broken_instance_is_refused_and_the_node_keeps_serving(
    node: NodeProcess, tmp_path: Path, broken: str
) -> None:
    status = _send_raw(node.port, TESTFILES / broken)
    assert status >= 0xA000, hex(status)
    files = write_series(tmp_path / "src", 2)
    assert node.storescu(*files).returncode == 0
    _complete(node, _study_uid(files), 2)
    assert held_incoming(node.data_dir / "incoming") == []


def test_a_start_whose_port_was_taken_meanwhile_is_tried_again_on_another(
    node: NodeProcess, port_taken: list[int]
) -> None:
    """NodeProcess.start waits for its own node's "radgate serving" line: a bind that failed because
    another process took the port is tried again on a new port, never taken for the node serving."""
    assert port_taken and node.port != port_taken[0]
    refused = f"Address already in use (while attempting to bind on address ('127.0.0.1', {port_taken[0]}))"
    assert node.log().count(refused) == 1
    assert f"radgate serving: AE RADGATE on 127.0.0.1:{node.port}, " in node.log()


def test_a_disallowed_peer_is_rejected_at_association(node: NodeProcess, tmp_path: Path) -> None:
    """The shared node allows PACS from 127.0.0.1 and the module's own senders (PEERS), no one else."""
    refused = node.echoscu(calling_ae="INTRUDER")
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout
    files = write_series(tmp_path / "src", 1)
    assert "Association Rejected" in node.storescu(*files, calling_ae="INTRUDER").stderr
    assert node.echoscu(calling_ae="PACS").returncode == 0
    assert [s for s in node.studies(cli=False) if s["study_uid"] == _study_uid(files)] == []


def test_a_client_that_does_not_speak_dicom_does_no_harm(node: NodeProcess, tmp_path: Path) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: radgate\r\n\r\n")
        s.settimeout(10)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            s.recv(1024)  # an A-ABORT or a closed connection, whichever the transport sends
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
        s.sendall(b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"\x00" * 64)  # an A-ASSOCIATE-RQ claiming 4 GiB
    socket.create_connection(("127.0.0.1", node.port), timeout=10).close()  # connect and hang up
    assert node.echoscu().returncode == 0
    files = write_series(tmp_path / "src", 1)
    assert node.storescu(*files).returncode == 0
    _complete(node, _study_uid(files), 1)


def test_a_wrong_config_key_stops_the_start_with_a_message_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: ./x\ncompletion:\n  quiet_periode_s: 3\n")
    result = subprocess.run(
        [str(RADGATE), "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "completion.quiet_periode_s" in result.stderr


def test_a_spool_write_failure_answers_out_of_resources(node: NodeProcess, tmp_path: Path) -> None:
    [blocked, *_] = files = write_series(tmp_path / "src", 2)
    study_dir = _spooled(node, blocked).parent.parent
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    study_dir.write_bytes(b"a file where the study directory should be")  # mkdir fails: ENOTDIR
    logged = len(node.log())  # the shared node's log so far
    sent = node.storescu(*files)  # storescu stops at the first refused instance
    assert "Refused: OutOfResources" in sent.stderr and "Success" not in sent.stderr, sent.stderr
    # the receiving process forwards its log lines to the node's log: the line may come after the answer
    wait_for(lambda: "0xA700" in node.log()[logged:], 10, "the refusal in the node's log")
    assert held_incoming(node.data_dir / "incoming") == []
    study_dir.unlink()
    assert node.storescu(*files).returncode == 0  # the node kept serving; the resend is stored
    _complete(node, _study_uid(files), 2)


def _own_group_and_file_size_limit() -> None:
    """In the node's process before it runs: a process group of its own, and no file written past
    1 MiB (room for the job store and its WAL: the schema's 0.2 MB and the tests' writes)."""
    os.setpgrp()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.fixture(scope="module")
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A second node, for the file size limit test and then the SIGINT test: two receiving
    processes (which inherit the limit), in a process group of its own, files limited to 1 MiB
    (`_own_group_and_file_size_limit`)."""
    n = NodeProcess(tmp_path_factory.mktemp("own"), {"dicom": {"receivers": 2}})
    n.start(preexec_fn=_own_group_and_file_size_limit)
    yield n
    n.stop_if_running()


def test_a_file_size_limit_on_the_node_answers_out_of_resources(
    own_node: NodeProcess, tmp_path: Path
) -> None:
    node = own_node
    assert node.process is not None and node.process.poll() is None, node.log()
    big = write_series(tmp_path / "big", 1, size=1024)  # 2 MiB of pixels
    sent = node.storescu(*big)
    assert "Refused: OutOfResources" in sent.stderr and "Success" not in sent.stderr, sent.stderr
    wait_for(lambda: "0xA700" in node.log(), 10, "the refusal in the node's log")
    assert held_incoming(node.data_dir / "incoming") == []  # the partial file is gone
    small = write_series(tmp_path / "small", 2)
    assert node.storescu(*small).returncode == 0
    _complete(node, _study_uid(small), 2)


def test_concurrent_associations_into_two_receiving_processes_fill_one_study(
    node: NodeProcess, tmp_path: Path
) -> None:
    """The shared node has two receiving processes. One series may complete before
    the other arrives (a new revision then): what counts is the study COMPLETE with both series."""
    study_uid = generate_uid()
    series = [write_series(tmp_path / name, 25, study_uid=study_uid) for name in ("a", "b")]
    senders = [
        subprocess.Popen(
            [STORESCU, "-aec", "RADGATE", "127.0.0.1", str(node.port), *map(str, files)], env=DCMTK_ENV
        )
        for files in series
    ]
    assert [p.wait(120) for p in senders] == [0, 0]
    study = _complete(node, study_uid, 50, revision=None)
    assert (study["study_uid"], study["series_count"]) == (study_uid, 2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_stops_the_node_cleanly(
    signum: int, request: pytest.FixtureRequest
) -> None:
    """Ctrl-C in a terminal (or a service manager) signals the node and its receiving processes at
    once: the node stops with 0, its receiving processes are not taken for crashed and restarted.
    SIGINT goes to the module's second node, SIGTERM to its shared node (each with two receiving
    processes in a process group of its own), which no test after this one uses."""
    node: NodeProcess = request.getfixturevalue("own_node" if signum == signal.SIGINT else "shared_node")
    assert node.process is not None and node.process.poll() is None, node.log()
    wait_for(lambda: "radgate serving" in node.log(), 30, "the node to be up")  # not during its start
    os.killpg(node.process.pid, signum)
    assert node.process.wait(20) == 0, node.log()
    assert "ended, exit code" not in node.log()
    assert "radgate stopped" in node.log()


@pytest.mark.parametrize("problem", ["port in use", "TLS key missing"])
def test_a_node_that_cannot_start_says_why_and_exits_non_zero(tmp_path: Path, problem: str) -> None:
    blocker = socket.create_server(("127.0.0.1", 0))
    settings: dict = {"dicom": {"port": blocker.getsockname()[1]}}
    if problem == "TLS key missing":
        blocker.close()
        missing = {
            "enabled": True,
            "cert_file": str(tmp_path / "no.crt"),
            "key_file": str(tmp_path / "no.key"),
        }
        settings = {"dicom": {"tls": missing}}
    node = NodeProcess(tmp_path, settings)
    try:
        result = subprocess.run(
            [str(RADGATE), "serve", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        blocker.close()
    assert result.returncode == 1
    assert "cannot start the node" in result.stderr and "Traceback" not in result.stderr, result.stderr
