"""The data dir against a second node, other local users and a crash mid-study (issue 15, items 5, 6, 8).

Every node here is a real `radgate serve` subprocess; stores go over loopback with pynetdicom.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from support.node import RADGATE, NodeProcess, wait_for, write_series

from dicom_io.testing.synthetic import ct_chest_phantom
from plugin.ingest.datadir import SERVE

ENDED = ("SUCCEEDED", "FAILED")


def _associate(node: NodeProcess) -> Association:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # what write_series makes
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADGATE")
    assert assoc.is_established
    return assoc


def _store(assoc: Association, files: list[Path], pause_s: float = 0.0) -> list[int]:
    """C-STORE each file in order (``pause_s`` after each: a slow sender); the response statuses."""
    statuses = []
    for path in files:
        response = assoc.send_c_store(path)
        statuses.append(int(response.Status) if "Status" in response else -1)
        time.sleep(pause_s)  # pacing the sender, not waiting for the node
    return statuses


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every name under ``root`` with its size, modification time and mode."""
    return {
        str(path.relative_to(root)): (status.st_size, status.st_mtime_ns, status.st_mode)
        for path in sorted(root.rglob("*"))
        for status in [path.lstat()]
    }


def _openers(path: Path) -> set[int]:
    """The processes that have ``path`` open (from /proc; a process gone meanwhile is skipped)."""
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(path):
                pids.add(int(fd.parts[2]))
        except OSError:
            continue
    return pids


def _spooled(node: NodeProcess) -> set[str]:
    return {path.stem for path in (node.data_dir / "spool").rglob("*.dcm")}


def _refused_while_held(holder: NodeProcess, workdir: Path) -> None:
    """Another `radgate serve` on the serving ``holder``'s data dir exits 1 naming the holder and
    touches nothing there, while the holder (its receiving processes never holding the lock) goes
    on receiving."""
    assert holder.process is not None
    early = write_series(workdir / "early", 5)
    assoc = _associate(holder)
    assert _store(assoc, early) == [0] * 5
    assoc.release()
    # what spool recovery would remove (an incoming file) and quarantine (an unrecorded spool file)
    incoming = holder.data_dir / "incoming" / ".rx-live.dcm"
    incoming.write_bytes(b"a dataset still arriving")
    unrecorded = holder.data_dir / "spool" / "1.2.3" / "1.2.4" / "1.2.5.dcm"
    unrecorded.parent.mkdir(parents=True)
    unrecorded.write_bytes(b"not yet recorded")
    early_uid = pydicom.dcmread(early[0], stop_before_pixels=True).StudyInstanceUID
    wait_for(
        lambda: [
            s for s in holder.studies(cli=False) if s["study_uid"] == early_uid and s["state"] == "COMPLETE"
        ],
        30,
        "the first study",
        interval=0.2,
    )
    before = _snapshot(holder.data_dir)

    other = NodeProcess(workdir / "node", {"data_dir": str(holder.data_dir)})
    refused = subprocess.run(
        [str(RADGATE), "serve", "--config", str(other.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    named = f"in use by radgate serve, pid {holder.process.pid} on {socket.gethostname()} since "
    assert named in refused.stderr, refused.stderr
    assert "spool recovery" not in refused.stderr and "radgate serving" not in refused.stderr
    assert _snapshot(holder.data_dir) == before  # no recovery, no schema or row written, no file
    # the receiving and executor processes (spawned) never share the lock: none can drop or keep it
    assert _openers((holder.data_dir / SERVE.lock_name).resolve()) == {holder.process.pid}

    files = write_series(workdir / "later", 100)
    assoc = _associate(holder)
    statuses = _store(assoc, files)
    assoc.release()
    assert statuses == [0x0000] * 100
    assert {p.stem for p in files} <= _spooled(holder)
    assert incoming.exists() and unrecorded.exists()
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    wait_for(
        lambda: [
            s for s in holder.studies(cli=False) if s["study_uid"] == uid and s["instance_count"] == 100
        ],
        30,
        "the 100 instances recorded",
        interval=0.2,
    )


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc; a process gone meanwhile is skipped)."""
    children = set()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat_file.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_when_the_holder_is_killed_the_next_node_takes_the_data_dir_and_refuses_a_third(
    tmp_path: Path,
) -> None:
    """A killed holder (its receiving processes end with it) leaves the data dir to the next node,
    which then holds it against a third as any holder does (`_refused_while_held`)."""
    first = NodeProcess(tmp_path / "first", {"dicom": {"receivers": 2}}).start()
    try:
        assert first.process is not None
        pid = first.process.pid
        # both receiving processes, spawned as the node starts
        children = wait_for(lambda: c if len(c := _children(pid)) >= 2 else None, 30, "the receivers")
        assoc = _associate(first)  # an association open when the node dies keeps no receiver alive
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock
    wait_for(lambda: not any(_alive(pid) for pid in children), 3, "the killed node's processes to end")
    assoc.abort()
    # two receiving processes: none of them may hold the lock (`_refused_while_held`)
    second = NodeProcess(tmp_path / "second", {"data_dir": str(first.data_dir), "dicom": {"receivers": 2}})
    second.start()
    try:
        assert second.echoscu().returncode == 0
        assert second.process is not None
        lock = (first.data_dir / SERVE.lock_name).read_text()
        assert lock.startswith(f"pid={second.process.pid} host={socket.gethostname()} since=")
        _refused_while_held(second, tmp_path / "third")
    finally:
        assert second.stop() == 0, second.log()


def _lung_node(workdir: Path, **settings: Any) -> NodeProcess:
    """A node on the shipped rules (ct-lung on a chest CT), with two receiving processes: what they
    create is the node's too."""
    return NodeProcess(workdir, {"dicom": {"receivers": 2}, **settings})


def _phantom(directory: Path) -> list[Path]:
    """A small chest CT of 40 slices that the shipped chest rule sends to ct-lung, one file a slice."""
    return ct_chest_phantom(rows=64, columns=64, slices=40, seed=7).write(directory)


def _ended_jobs(node: NodeProcess) -> list[dict[str, Any]]:
    """The jobs once there are some and each has ended; empty until then."""
    jobs = node.jobs(cli=False)
    return jobs if jobs and all(job["state"] in ENDED for job in jobs) else []


def _walk(root: Path) -> Iterator[tuple[Path, int]]:
    """``root`` and everything under it, with its permission bits (names that vanish are skipped)."""
    for directory, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(directory, name)
            try:
                yield path, stat.S_IMODE(path.lstat().st_mode)
            except FileNotFoundError:  # a temporary file removed meanwhile
                continue


def _assert_modes(
    tmp_path: Path,
    node: NodeProcess,
    files: list[Path],
    job: dict[str, Any],
    running: dict[Path, int],
    stopped: dict[Path, int],
    group_readable: bool,
) -> None:
    """What ``node`` created (walked while it ran and after it stopped: its store, the spooled
    ``files``, the ``job``'s results) is no other user's to read; with ``group_readable`` its group
    may read it."""
    names = {path.name for path in running}
    assert {SERVE.lock_name, "radgate.db", "radgate.db-wal"} <= names
    spooled = {path.name for path in running if path.is_relative_to(node.data_dir / "spool")}
    assert {f"{pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm" for f in files} <= spooled
    assert any(path.suffix == ".dcm" and path.parent == Path(job["results_dir"]) for path in running)
    for path, mode in {**running, **stopped}.items():
        shown = f"{path.relative_to(tmp_path)}: {mode:o}"
        if group_readable:
            assert not mode & 0o007, shown
            assert mode & 0o040 or not mode & 0o400, shown  # write-only incoming files are no one's to read
        else:
            assert not mode & 0o077, shown


def test_files_and_folders_a_group_readable_node_creates_are_not_readable_by_other_users(
    tmp_path: Path,
) -> None:
    """With ``group_readable`` the node's group may read what it creates, no one else; the default
    (private) modes are checked by the crash test below."""
    node = _lung_node(tmp_path, group_readable=True).start()
    try:
        files = _phantom(tmp_path / "src")
        assert node.storescu(*files).returncode == 0
        [job] = wait_for(lambda: _ended_jobs(node), 120, "the job to end", interval=0.2)
        assert job["state"] == "SUCCEEDED", job
        running = dict(_walk(node.data_dir))
    finally:
        assert node.stop() == 0, node.log()
    _assert_modes(tmp_path, node, files, job, running, dict(_walk(node.data_dir)), group_readable=True)


def test_a_study_resent_slowly_after_a_crash_completes_once_on_every_instance(tmp_path: Path) -> None:
    """Everything the node created (default file modes), the crash's leftovers included, is private."""
    quiet_s = 1.0
    node = _lung_node(tmp_path, completion={"quiet_period_s": quiet_s, "after_release_s": 0.5})
    files = _phantom(tmp_path / "src")
    node.start()
    assoc = _associate(node)
    assert _store(assoc, files[:20]) == [0] * 20
    node.kill()  # mid-study, the association still open
    assoc.abort()
    node.start()
    try:
        # the sender sends the whole study again: its 20 duplicates alone span twice the quiet period
        assoc = _associate(node)
        statuses = _store(assoc, files[:20], pause_s=2 * quiet_s / 20) + _store(assoc, files[20:])
        assert statuses == [0] * 40
        assoc.release()
        [job] = wait_for(lambda: _ended_jobs(node), 120, "the job to end", interval=0.2)
        [study] = node.studies(cli=False)
        running = dict(_walk(node.data_dir))
    finally:
        assert node.stop() == 0, node.log()
    assert (study["revision"], study["state"], study["instance_count"]) == (1, "COMPLETE", 40)
    assert (job["revision"], job["state"]) == (1, "SUCCEEDED"), job
    completions = [line for line in node.log().splitlines() if " complete: " in line]
    assert len(completions) == 1 and completions[0].endswith("revision 1 complete: 40 instances")
    [sr] = Path(job["results_dir"]).glob("SR-*.dcm")  # its evidence: the images the pipeline ran on
    [evidence] = pydicom.dcmread(sr).CurrentRequestedProcedureEvidenceSequence
    sent = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    [series] = [s for s in evidence.ReferencedSeriesSequence if s.SeriesInstanceUID == sent]
    assert len(series.ReferencedSOPSequence) == 40
    _assert_modes(tmp_path, node, files, job, running, dict(_walk(node.data_dir)), group_readable=False)
