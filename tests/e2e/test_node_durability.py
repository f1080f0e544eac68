"""SIGKILL durability: every instance acknowledged before a crash survives it, whole, and completes."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from support.node import NodeProcess, held_incoming, wait_for, write_series

from dicom_io.net import received_completely

COUNT = 300


def _send_all(port: int, files: list[Path], acked: dict[str, int], done: threading.Event) -> None:
    """C-STORE files in order, recording each response status, until the node goes away."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # what the files hold
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADGATE")
        for path in files:
            if not assoc.is_established:
                break
            try:
                status = assoc.send_c_store(path)
            except (OSError, RuntimeError):
                break
            if "Status" not in status:  # no response: the association died
                break
            acked[path.stem] = int(status.Status)
        if assoc.is_established:
            assoc.release()
    finally:
        done.set()


def _dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def test_instances_acknowledged_before_sigkill_survive_whole_and_the_study_completes(tmp_path: Path) -> None:
    files = write_series(tmp_path / "src", COUNT, size=64)
    source = {p.stem: p for p in files}
    # the study completes a short quiet period after the restart: no sender comes back
    node = NodeProcess(tmp_path / "node", {"completion": {"quiet_period_s": 0.5}}).start()
    acked: dict[str, int] = {}
    done = threading.Event()
    sender = threading.Thread(target=_send_all, args=(node.port, files, acked, done))
    sender.start()
    wait_for(
        lambda: len(acked) >= COUNT // 3 or done.is_set(), 120, "a third of the instances to be acknowledged"
    )
    node.kill()  # SIGKILL, mid-transfer
    sender.join(timeout=120)
    assert not sender.is_alive()
    stored_ok = {sop for sop, status in acked.items() if status == 0x0000}
    assert COUNT // 3 <= len(stored_ok) < COUNT, "the kill must land mid-transfer"

    spool = node.data_dir / "spool"

    def spooled() -> dict[str, Path]:
        return {p.stem: p for p in spool.rglob("*") if p.is_file()}

    # straight after the crash: nothing half-written under a final name, every acknowledged one there
    after_crash = spooled()
    assert stored_ok <= after_crash.keys()
    for sop, path in after_crash.items():
        assert path.suffix == ".dcm" and _dataset(path) == _dataset(source[sop]), path
    # received whole but killed before its final name: recovery puts it back (never acknowledged)
    whole_incoming = {
        _dataset(path).SOPInstanceUID
        for path in held_incoming(node.data_dir / "incoming")
        if received_completely(path.stat())
    }

    node.start()  # restart on the same data: recovery, then the quiet period from the start
    try:
        study = wait_for(
            lambda: next((s for s in node.studies(cli=False) if s["state"] == "COMPLETE"), None),
            60,
            "the study to complete after the restart",
            interval=0.2,
        )
        after_restart = spooled()
        assert after_restart.keys() == after_crash.keys() | whole_incoming
        assert study["instance_count"] == len(after_restart)
        assert held_incoming(node.data_dir / "incoming") == []
        for sop, path in after_restart.items():
            assert _dataset(path) == _dataset(source[sop]), sop
    finally:
        assert node.stop() == 0, node.log()
