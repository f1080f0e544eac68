"""The storage SCP against real peers: DCMTK echoscu/storescu and pynetdicom SCUs.

Each test starts its own SCP on a free loopback port and stops it. Sending broken datasets needs
their exact bytes on the wire, which DCMTK refuses to send; pynetdicom's chunked send streams a
file's dataset bytes untouched, so those tests wrap the raw bytes in a fresh file meta.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import cast

import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    RTDoseStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from support.testdata import TESTDATA, needs_testdata

from dicom_io.net import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    InstanceRefused,
    Peer,
    ReceivedInstance,
    StorageSCP,
    TlsFiles,
    _pynetdicom,
    c_store_rsp_command,
    connection,
    file_meta_header,
    incoming,
    inspect_dataset,
    inspect_part10,
    received_completely,
)

PYDICOM_FILES = TESTDATA / "pydicom-testfiles"
CT_J2K = TESTDATA / "ct-abdomen-totalseg"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

pytestmark = needs_testdata


# Receiving processes import this module to run its handlers: support.node (it imports the store)
# is imported where it is used, not here, so that each of them starts faster.
def held_incoming(incoming: Path) -> list[Path]:
    from support.node import held_incoming as held

    return held(incoming)


def self_signed_cert(key: Path, cert: Path, subject: str, *extensions: str) -> None:
    from support.node import self_signed_cert as make

    make(key, cert, subject, *extensions)


@dataclass
class Recorder:
    """An instance handler that keeps each file under its SOP Instance UID, as the node would."""

    keep: Path
    status: int = 0
    fail: bool = False
    instances: list[ReceivedInstance] = field(default_factory=list)
    released: list[Peer] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    marked_complete: list[bool] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, inst: ReceivedInstance) -> int:
        if self.fail:
            raise RuntimeError("handler broke")
        dst = self.keep / f"{inst.sop_instance_uid}.dcm"
        complete = received_completely(inst.path.stat())
        os.replace(inst.path, dst)
        with self.cond:
            self.marked_complete.append(complete)
            self.instances.append(inst)
            self.pids.add(os.getpid())
            self.cond.notify_all()
        return self.status

    def on_release(self, peer: Peer) -> None:
        with self.cond:
            self.released.append(peer)
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "condition not met before the deadline"


@dataclass(frozen=True)
class FileRecorder:
    """A handler receiving processes can run (picklable): keeps each file and notes, in files, which
    process stored it; an association's release leaves a marker."""

    keep: Path

    def __call__(self, inst: ReceivedInstance) -> int:
        os.replace(inst.path, self.keep / f"{inst.sop_instance_uid}.dcm")
        note = self.keep / f".{inst.sop_instance_uid}"
        note.write_text(json.dumps({"pid": os.getpid(), "association": inst.peer.association_id}))
        os.replace(note, self.keep / f"{inst.sop_instance_uid}.json")  # whole or not there
        return 0

    def on_release(self, peer: Peer) -> None:
        (self.keep / f"released-{peer.association_id}").touch()

    def prepare(self) -> None:
        (self.keep / f"prepared-{os.getpid()}").touch()

    def prepared(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.keep.glob("prepared-*")}

    def stored(self) -> list[dict[str, object]]:
        return [json.loads(p.read_text()) for p in self.keep.glob("*.json")]

    def released(self) -> int:
        return len(list(self.keep.glob("released-*")))


@pytest.fixture
def file_recorder(tmp_path: Path) -> FileRecorder:
    keep = tmp_path / "kept-by-workers"
    keep.mkdir()
    return FileRecorder(keep)


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    keep = tmp_path / "kept"
    keep.mkdir()
    return Recorder(keep)


@pytest.fixture
def start_scp(tmp_path: Path, recorder: Recorder) -> Iterator[Callable[..., StorageSCP]]:
    """Start an SCP with the recorder (keyword arguments override); every SCP is stopped after."""
    started: list[StorageSCP] = []

    def start(**kwargs: object) -> StorageSCP:
        args: dict[str, object] = {
            "ae_title": "RADGATE",
            "host": "127.0.0.1",
            "port": 0,
            "incoming_dir": tmp_path / "incoming",
            "handler": recorder,
            "on_release": recorder.on_release,
        }
        args.update(kwargs)
        scp = StorageSCP(**args)  # type: ignore[arg-type]
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [f"/usr/bin/{tool}", *args], env=DCMTK_ENV, capture_output=True, text=True, timeout=60
    )


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts in a file's bytes (0 when there is no Part 10 header)."""
    if data[128:132] != b"DICM":
        return 0
    return 132 + 12 + int.from_bytes(data[140:144], "little")


def with_uids(src: Path, dst_dir: Path) -> Path:
    """A copy of `src` with Study/Series/SOP UIDs filled in where the original has them empty."""
    ds = dcmread(src)
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
    out = dst_dir / src.name
    ds.save_as(out, enforce_file_format=True)
    return out


def raw_part10(src: Path, dst: Path, transfer_syntax: str, sop_class: str, sop_instance: str) -> bytes:
    """Write `src`'s dataset bytes, untouched, behind a new file meta; return those bytes."""
    data = src.read_bytes()
    body = data[dataset_offset(data) :]
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
    )
    write_file_meta_info(out, meta)
    dst.write_bytes(out.getvalue() + body)
    return body


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's dataset bytes as they are instead of re-encoding a Dataset."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def scu(contexts: list[tuple[str, str]], ae_title: str = "TESTSCU") -> AE:
    ae = AE(ae_title=ae_title)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    ae.add_requested_context(Verification)
    return ae


# --- DCMTK peers --------------------------------------------------------------------------------


def test_echo_with_dcmtk(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp()
    result = dcmtk("echoscu", "-aec", "RADGATE", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr


# (file, storescu proposal option, needs UIDs filled in)
TRANSFER_SYNTAX_CASES = [
    ("pydicom-testfiles/MR_small_bigendian.dcm", "-xb", False),
    ("pydicom-testfiles/image_dfl.dcm", "-xd", False),
    ("pydicom-testfiles/SC_rgb_jpeg_dcmtk.dcm", "-xy", False),
    ("pydicom-testfiles/JPGExtended.dcm", "-xx", False),
    ("pydicom-testfiles/SC_rgb_jpeg_gdcm.dcm", "-xs", False),
    ("pydicom-testfiles/MR_small_jpeg_ls_lossless.dcm", "-xt", False),
    ("pydicom-testfiles/JPEGLSNearLossless_16.dcm", "-xu", True),
    ("pydicom-testfiles/MR_small_jp2klossless.dcm", "-xv", False),
    ("pydicom-testfiles/JPEG2000.dcm", "-xw", False),
    ("pydicom-testfiles/MR_small_RLE.dcm", "-xr", False),
    ("dcmqi/segmentations/ct-3slice/01.dcm", "-xi", False),
    ("mr-brain-t1-mprage/00001.dcm", "-xe", False),
    ("ct-abdomen-totalseg/CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016583", "-xv", True),
]


@pytest.mark.parametrize(("name", "proposal", "fill_uids"), TRANSFER_SYNTAX_CASES)
def test_storescu_transfer_syntaxes_arrive_unchanged(
    start_scp: Callable[..., StorageSCP],
    recorder: Recorder,
    tmp_path: Path,
    name: str,
    proposal: str,
    fill_uids: bool,
) -> None:
    src = TESTDATA / name
    if fill_uids:
        src = with_uids(src, tmp_path)
    original = dcmread(src)
    scp = start_scp()
    result = dcmtk("storescu", proposal, "-aec", "RADGATE", "127.0.0.1", str(scp.port), str(src))
    assert result.returncode == 0, result.stderr
    recorder.wait_for(lambda: len(recorder.instances) == 1)
    inst = recorder.instances[0]
    assert recorder.marked_complete == [True] and inst.durable_name
    ts = original.file_meta.TransferSyntaxUID
    assert inst.transfer_syntax == ts, "stored in another transfer syntax than the sender's"
    assert (inst.study_uid, inst.series_uid) == (original.StudyInstanceUID, original.SeriesInstanceUID)
    assert inst.sop_instance_uid == original.SOPInstanceUID
    assert inst.peer.ae_title == "STORESCU"
    kept = recorder.keep / f"{inst.sop_instance_uid}.dcm"
    assert inst.size == kept.stat().st_size
    received = dcmread(kept)
    assert received.file_meta.TransferSyntaxUID == ts
    assert received.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert received.file_meta.SourceApplicationEntityTitle == "STORESCU"
    for elem in original:
        # DCMTK drops dataset trailing padding and group lengths when it sends: not content
        if elem.tag.group > 0x0002 and elem.tag not in (0x7FE00010, 0xFFFCFFFC) and elem.tag.element:
            assert received[elem.tag] == elem, f"{elem.tag} changed"
    assert received.PixelData == original.PixelData  # compressed bytes compared, nothing decoded
    assert not held_incoming(tmp_path / "incoming"), "temporary files left behind"


def test_storescu_series_and_release_handler(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(CT_J2K.iterdir())[:5]:
        with_uids(f, series)
    scp = start_scp()
    result = dcmtk("storescu", "-xv", "+sd", "127.0.0.1", str(scp.port), str(series))
    assert result.returncode == 0, result.stderr
    recorder.wait_for(lambda: len(recorder.released) == 1)
    assert len(recorder.instances) == 5
    assert {i.peer.association_id for i in recorder.instances} == {recorder.released[0].association_id}
    assert recorder.released[0].released  # an A-RELEASE, not an abort


def test_handler_status_and_exception(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    src = TESTDATA / "dcmqi/segmentations/ct-3slice/01.dcm"
    scp = start_scp()
    ae = scu([(CTImageStorage, ImplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE")
    assert assoc.is_established
    try:
        recorder.status = 0xB000
        assert assoc.send_c_store(src).Status == 0xB000  # the handler's status goes back as it is
        recorder.fail = True
        assert assoc.send_c_store(src).Status == STATUS_OUT_OF_RESOURCES
        recorder.fail = False
        recorder.status = 0
        assert assoc.send_c_store(src).Status == 0  # the association survived the failure
    finally:
        assoc.release()
    assert not held_incoming(tmp_path / "incoming"), "the failed handler's file was left behind"


# --- broken input -------------------------------------------------------------------------------

# (file, transfer syntax the bytes are announced in, expected status)
BROKEN_CASES = [
    ("MR_truncated.dcm", ExplicitVRLittleEndian, STATUS_CANNOT_UNDERSTAND),
    ("rtplan_truncated.dcm", ImplicitVRLittleEndian, STATUS_CANNOT_UNDERSTAND),
    ("badVR.dcm", ExplicitVRLittleEndian, STATUS_CANNOT_UNDERSTAND),
    ("meta_missing_tsyntax.dcm", ImplicitVRLittleEndian, STATUS_CANNOT_UNDERSTAND),
    ("no_meta.dcm", ExplicitVRLittleEndian, STATUS_CANNOT_UNDERSTAND),  # implicit bytes, explicit announced
]


@pytest.mark.usefixtures("chunked_send")
def test_broken_datasets_refused_association_continues(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = TESTDATA / "dcmqi/segmentations/ct-3slice/01.dcm"
    good_ds = dcmread(good)
    scp = start_scp()
    ae = scu([(CTImageStorage, ExplicitVRLittleEndian), (CTImageStorage, ImplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE")
    assert assoc.is_established
    statuses: dict[str, int] = {}
    try:
        for name, ts, _ in BROKEN_CASES:
            wire = tmp_path / f"wire-{name}"
            raw_part10(PYDICOM_FILES / name, wire, ts, CTImageStorage, generate_uid())
            statuses[name] = assoc.send_c_store(wire).Status
        # no Study/Series UID at all: the real J2K CT as published
        ct = sorted(CT_J2K.iterdir())[0]
        wire = tmp_path / "wire-ct"
        raw_part10(
            ct, wire, ExplicitVRLittleEndian, CTImageStorage, dcmread(ct).file_meta.MediaStorageSOPInstanceUID
        )
        statuses["ct-without-uids"] = assoc.send_c_store(wire).Status
        # a sound dataset announced under another SOP Instance UID
        wire = tmp_path / "wire-mismatch"
        raw_part10(good, wire, ImplicitVRLittleEndian, CTImageStorage, generate_uid())
        statuses["mismatch"] = assoc.send_c_store(wire).Status
        # and a good one still goes through on the same association
        wire = tmp_path / "wire-good"
        body = raw_part10(good, wire, ImplicitVRLittleEndian, CTImageStorage, good_ds.SOPInstanceUID)
        statuses["good"] = assoc.send_c_store(wire).Status
    finally:
        assoc.release()
    expected = {name: status for name, _, status in BROKEN_CASES}
    expected |= {"ct-without-uids": STATUS_CANNOT_UNDERSTAND, "mismatch": STATUS_DATASET_MISMATCH, "good": 0}
    assert statuses == expected
    assert [i.sop_instance_uid for i in recorder.instances] == [good_ds.SOPInstanceUID]
    kept = (recorder.keep / f"{good_ds.SOPInstanceUID}.dcm").read_bytes()
    assert kept[dataset_offset(kept) :] == body, "dataset bytes changed on the way"
    assert not held_incoming(tmp_path / "incoming"), "refused files left behind"
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused C-STORE")]
    assert len(refusals) == len(expected) - 1  # one line per refusal
    assert all("truncated" in r.getMessage() for r in refusals[:2])


@pytest.mark.usefixtures("chunked_send")
def test_jpeg_lossless_non_sv1_bytes_identical(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    """No file in testdata uses process 14 (non-SV1); SV1 bytes are valid process 14 bytes."""
    src = PYDICOM_FILES / "SC_rgb_jpeg_gdcm.dcm"
    ds = dcmread(src)
    scp = start_scp()
    ae = scu([(ds.SOPClassUID, JPEGLossless)])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE")
    wire = tmp_path / "wire.dcm"
    body = raw_part10(src, wire, JPEGLossless, ds.SOPClassUID, ds.SOPInstanceUID)
    try:
        assert assoc.send_c_store(wire).Status == 0
    finally:
        assoc.release()
    assert recorder.instances[0].transfer_syntax == JPEGLossless
    kept = (recorder.keep / f"{ds.SOPInstanceUID}.dcm").read_bytes()
    assert kept[dataset_offset(kept) :] == body


# --- who may connect ----------------------------------------------------------------------------


def test_a_peer_never_waits_out_the_idle_wait(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DUL and association loops block up to `_IDLE_WAIT_S` when idle; the A-ASSOCIATE-RQ (queued
    behind the connection's own event), the C-STORE and the A-RELEASE-RQ must each end that wait at
    once. With the wait made 10 s, a peer that had to wait it out even once would take over 10 s."""
    monkeypatch.setattr(_pynetdicom, "_IDLE_WAIT_S", 10.0)
    scp = start_scp()
    src = with_uids(PYDICOM_FILES / "CT_small.dcm", tmp_path)
    started = time.monotonic()
    result = dcmtk("storescu", "-aec", "RADGATE", "127.0.0.1", str(scp.port), str(src))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert len(recorder.instances) == 1
    assert elapsed < 5, f"the association took {elapsed:.1f} s: a loop waited out its idle wait"


def test_reordered_contexts_are_built_once_per_process(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom validates every UID of a new presentation context, milliseconds for the 120-odd
    SOP classes storescu proposes by default: the contexts reordered for a proposal are built at
    the first association that makes it and reused by the next."""
    built: list[str] = []
    real_build = connection.build_context

    def counting_build(abstract_syntax: str, *transfer_syntax: list[str]) -> object:
        built.append(abstract_syntax)
        return real_build(abstract_syntax, *transfer_syntax)

    monkeypatch.setattr(connection, "build_context", counting_build)
    scp = start_scp()
    src = with_uids(PYDICOM_FILES / "CT_small.dcm", tmp_path)
    at_start = len(built)
    counts = []
    for _ in range(2):  # no -R: every storage SOP class storescu knows is proposed
        assert dcmtk("storescu", "-aec", "RADGATE", "127.0.0.1", str(scp.port), str(src)).returncode == 0
        counts.append(len(built))
    assert counts[0] - at_start > 50
    assert counts[1] == counts[0]
    assert len(recorder.instances) == 2


def test_peer_filter_rejects(start_scp: Callable[..., StorageSCP]) -> None:
    seen: list[Peer] = []

    def only_friends(peer: Peer) -> bool:
        seen.append(peer)
        return peer.ae_title == "FRIEND"

    scp = start_scp(peer_filter=only_friends)
    assert dcmtk("echoscu", "-aet", "STRANGER", "127.0.0.1", str(scp.port)).returncode != 0
    assert dcmtk("echoscu", "-aet", "FRIEND", "127.0.0.1", str(scp.port)).returncode == 0
    assoc = scu([]).associate("127.0.0.1", scp.port)
    assert assoc.is_rejected, f"not rejected: aborted {assoc.is_aborted}, established {assoc.is_established}"
    assert [p.ae_title for p in seen] == ["STRANGER", "FRIEND", "TESTSCU"]
    assert all(p.address == "127.0.0.1" and p.port > 0 for p in seen)
    assert len({p.association_id for p in seen}) == 3


def test_called_ae_title_required(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp(require_called_ae_title=True)
    assert dcmtk("echoscu", "-aec", "SOMEONE", "127.0.0.1", str(scp.port)).returncode != 0
    assert dcmtk("echoscu", "-aec", "RADGATE", "127.0.0.1", str(scp.port)).returncode == 0


def test_association_limit(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp(max_associations=1)
    ae = scu([])
    first = ae.associate("127.0.0.1", scp.port)
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", scp.port)
        assert second.is_rejected
    finally:
        first.release()
    wait_until(lambda: scp.active_associations == 0)
    third = ae.associate("127.0.0.1", scp.port)
    assert third.is_established
    third.release()


def test_garbage_on_the_port_does_no_harm(start_scp: Callable[..., StorageSCP]) -> None:
    scp = start_scp()
    payloads = [os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", b"\x01\x00\xff\xff\xff\xff"]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as s:
            if payload:
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(4096):  # the SCP answers (A-ABORT) or closes; never hangs the client
                pass
    result = dcmtk("echoscu", "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    self_signed_cert(key, cert, "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    return TlsFiles(cert=cert, key=key)


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_association(
    start_scp: Callable[..., StorageSCP], file_recorder: FileRecorder, self_signed: TlsFiles, workers: int
) -> None:
    scp = start_scp(
        tls=self_signed, workers=workers, handler=file_recorder, on_release=file_recorder.on_release
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self_signed.cert))
    ae = scu([(CTImageStorage, ImplicitVRLittleEndian)])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE", tls_args=(client, "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(TESTDATA / "dcmqi/segmentations/ct-3slice/01.dcm").Status == 0
    finally:
        assoc.release()
    assert len(file_recorder.stored()) == 1
    plain = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE")  # no TLS: no association
    assert not plain.is_established


# --- worker processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationModeProbe:
    """A `prepare` that notes, per receiving process, how pydicom validates the values it reads."""

    keep: Path

    def __call__(self) -> None:
        mode = pydicom.config.settings.reading_validation_mode
        (self.keep / f"mode-{os.getpid()}").write_text(str(mode))

    def modes(self) -> dict[int, int]:
        return {int(p.name.split("-")[1]): int(p.read_text()) for p in self.keep.glob("mode-*")}


@dataclass(frozen=True)
class PrepareSteps:
    """A `prepare` that runs several, in order."""

    steps: tuple[Callable[[], None], ...]

    def __call__(self) -> None:
        for step in self.steps:
            step()


def _stored_by(recorder: FileRecorder, files: list[Path]) -> list[dict[str, object]]:
    """What the recorder noted for these files (by their SOP Instance UIDs)."""
    uids = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    return [json.loads((recorder.keep / f"{uid}.json").read_text()) for uid in uids]


def test_receiving_processes_run_the_handlers_and_one_that_dies_is_replaced(
    start_scp: Callable[..., StorageSCP], file_recorder: FileRecorder, tmp_path: Path
) -> None:
    """One SCP with two receiving processes (each start is a process importing the receiving path):

    - pydicom's regex check of every UID pynetdicom builds (it only warns) cost each association
      with a full proposal a third of its decoding: receiving processes switch it off and still
      refuse what the transport checks (see the broken-dataset tests);
    - the handlers run where the instances are received, with no hop back to this process;
    - a receiving process that dies is replaced: the replacement serves like the others, and, like
      them, has run `prepare` before its first association (a receiving process is only counted
      once it is ready)."""
    modes = tmp_path / "modes"
    modes.mkdir()
    probe = ValidationModeProbe(modes)
    scp = start_scp(
        workers=2,
        handler=file_recorder,
        on_release=file_recorder.on_release,
        prepare=PrepareSteps((file_recorder.prepare, probe)),
    )
    assert file_recorder.prepared() == set(scp.receiving_processes)  # start() returned: all ready
    # the UID checks are left to the transport
    assert probe.modes() == {pid: pydicom.config.IGNORE for pid in scp.receiving_processes}
    assert pydicom.config.settings.reading_validation_mode != pydicom.config.IGNORE  # not this process

    # the handlers run where they receive
    dirs = []
    for part in range(2):
        d = tmp_path / f"part{part}"
        d.mkdir()
        for f in sorted(CT_J2K.iterdir())[part * 3 : part * 3 + 3]:
            with_uids(f, d)
        dirs.append(d)
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-xv", "+sd", "127.0.0.1", str(scp.port), str(d)],
            env=DCMTK_ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in dirs
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    wait_until(lambda: len(file_recorder.stored()) == 6 and file_recorder.released() == 2, timeout=30)
    stored = file_recorder.stored()
    assert os.getpid() not in {s["pid"] for s in stored}  # no hop back to this process
    assert {w.process.pid for w in scp._workers} >= {s["pid"] for s in stored}
    assert len({s["association"] for s in stored}) == 2
    assert dcmtk("echoscu", "127.0.0.1", str(scp.port)).returncode == 0

    # a receiving process that dies is replaced
    victim = scp.receiving_processes[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(scp.receiving_processes) == 2 and victim not in scp.receiving_processes, timeout=60
    )
    assert file_recorder.prepared() >= set(scp.receiving_processes)
    later = tmp_path / "later"
    later.mkdir()
    files = [with_uids(f, later) for f in sorted(CT_J2K.iterdir())[6:10]]  # not sent above
    senders = [
        subprocess.Popen(["/usr/bin/storescu", "-xv", "127.0.0.1", str(scp.port), str(f)], env=DCMTK_ENV)
        for f in files
    ]
    assert [p.wait(60) for p in senders] == [0, 0, 0, 0]  # every association served, on either process
    wait_until(lambda: len(file_recorder.stored()) == 10 and scp.active_associations == 0, timeout=30)
    assert {s["pid"] for s in _stored_by(file_recorder, files)} <= set(scp.receiving_processes)


def _failing_prepare() -> None:
    raise RuntimeError("database unreachable")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_prepare_is_logged_and_the_scp_serves(
    start_scp: Callable[..., StorageSCP],
    file_recorder: FileRecorder,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    workers: int,
) -> None:
    """`prepare` only saves the first instance some waiting: if it fails, the process still serves."""
    caplog.set_level(logging.ERROR, logger="dicom_io.net")
    scp = start_scp(
        workers=workers, handler=file_recorder, on_release=file_recorder.on_release, prepare=_failing_prepare
    )
    wait_until(lambda: "preparing the instance handler failed" in caplog.text, timeout=30)
    sent = with_uids(sorted(CT_J2K.iterdir())[0], tmp_path)
    assert dcmtk("storescu", "-xv", "127.0.0.1", str(scp.port), str(sent)).returncode == 0
    wait_until(lambda: len(file_recorder.stored()) == 1, timeout=30)


def test_handlers_that_cannot_go_to_receiving_processes_are_refused_at_start(
    start_scp: Callable[..., StorageSCP],
) -> None:
    with pytest.raises(ValueError, match="pickle"):
        start_scp(workers=2, handler=lambda inst: 0)


# --- checking a dataset without decoding it -------------------------------------------------------


def _part10_with_private_block(tmp_path: Path, block: int) -> tuple[Path, bytes]:
    """A CT file whose Study/Series/SOP UIDs come after `block` bytes of a private OB element, and
    that element's header up to its VR (Explicit VR Little Endian)."""
    ds = dcmread(TESTDATA / "dcmqi/segmentations/ct-3slice/01.dcm")
    private = ds.private_block(0x0009, "RADGATE TEST", create=True)
    private.add_new(0x01, "OB", b"\x00" * block)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    tag = private.get_tag(0x01)
    return path, struct.pack("<HH", tag.group, tag.element) + b"OB"


@pytest.mark.parametrize("block", [10, 200_000])
def test_the_dataset_check_reads_the_file_only_past_the_head_it_holds(tmp_path: Path, block: int) -> None:
    path, _ = _part10_with_private_block(tmp_path, block)
    data = path.read_bytes()
    offset, ts = dataset_offset(data), str(dcmread(path).file_meta.TransferSyntaxUID)
    from_file = inspect_dataset(path, offset, ts)
    assert from_file.study_uid == dcmread(path).StudyInstanceUID
    head = data[offset : offset + 65536]
    assert inspect_dataset(path, offset, ts, head, len(data)) == from_file
    path.unlink()  # with the UIDs inside the head, the file is not read at all
    if block < 65536:
        assert inspect_dataset(path, offset, ts, head, len(data)) == from_file
    else:
        with pytest.raises(FileNotFoundError):
            inspect_dataset(path, offset, ts, head, len(data))


def test_a_dataset_cut_inside_a_long_element_header_is_refused(tmp_path: Path) -> None:
    path, element = _part10_with_private_block(tmp_path, 10)
    data = path.read_bytes()
    offset = dataset_offset(data)
    cut = data.index(element, offset) + 8  # the private OB's header without its 4-byte length
    (tmp_path / "cut.dcm").write_bytes(data[:cut])
    with pytest.raises(InstanceRefused, match="truncated element header"):
        inspect_dataset(tmp_path / "cut.dcm", offset, str(dcmread(path).file_meta.TransferSyntaxUID))


# --- pixel data that cannot hold its image ------------------------------------------------------

CHEST_CT = TESTDATA / "ct-chest-nsclc-lung1-001/ct"
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _item(value: bytes) -> bytes:
    return _ITEM + struct.pack("<L", len(value)) + value


def _with_pixel_bytes(
    src: Path, dst: Path, transfer_syntax: str, pixel_value: bytes, **attrs: object
) -> Path:
    """`src` re-encoded in `transfer_syntax` with Pixel Data's value replaced by `pixel_value` as it is
    (undefined length when it starts with an item, as an encapsulated value does)."""
    ds = dcmread(src)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.save_as(dst, enforce_file_format=True)
    length = 0xFFFFFFFF if pixel_value.startswith(_ITEM) else len(pixel_value)
    if transfer_syntax == ImplicitVRLittleEndian:
        header = struct.pack("<HHL", 0x7FE0, 0x0010, length)
    else:
        header = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", length)
    dst.write_bytes(dst.read_bytes() + header + pixel_value)
    return dst


def _short_pixel_cases(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """Files whose Pixel Data is sound as bytes but cannot be the image, with the status each gets."""
    ct = sorted(CHEST_CT.iterdir())[0]
    pixels = dcmread(ct).PixelData
    j2k = PYDICOM_FILES / "JPEG2000.dcm"
    dose = dcmread(PYDICOM_FILES / "rtdose.dcm")
    frame = len(dose.PixelData) // int(dose.NumberOfFrames)
    return {
        # a slice cut short on the sender's disk, then re-encoded whole around what was left
        "ct-half": (
            _with_pixel_bytes(
                ct, tmp_path / "ct-half.dcm", ExplicitVRLittleEndian, pixels[: len(pixels) // 2]
            ),
            STATUS_DATASET_MISMATCH,
        ),
        "ct-implicit-one-byte-short": (
            _with_pixel_bytes(ct, tmp_path / "ct-short.dcm", ImplicitVRLittleEndian, pixels[:-2]),
            STATUS_DATASET_MISMATCH,
        ),
        "multiframe-missing-a-frame": (
            _with_pixel_bytes(
                PYDICOM_FILES / "rtdose.dcm",
                tmp_path / "dose.dcm",
                ExplicitVRLittleEndian,
                dose.PixelData[:-frame],
            ),
            STATUS_DATASET_MISMATCH,
        ),
        "encapsulated-offset-table-only": (
            _with_pixel_bytes(j2k, tmp_path / "j2k-empty.dcm", JPEG2000, _item(b"") + _SEQUENCE_END),
            STATUS_DATASET_MISMATCH,
        ),
        "encapsulated-unclosed": (
            _with_pixel_bytes(
                j2k, tmp_path / "j2k-open.dcm", JPEG2000, _item(b"") + _item(b"\xff\x4f\xff\x51")
            ),
            STATUS_CANNOT_UNDERSTAND,
        ),
        "encapsulated-in-native-syntax": (
            _with_pixel_bytes(
                ct,
                tmp_path / "ct-encaps.dcm",
                ExplicitVRLittleEndian,
                _item(b"") + _item(pixels) + _SEQUENCE_END,
            ),
            STATUS_CANNOT_UNDERSTAND,
        ),
    }


SOUND_IMAGES = [
    "CT_small.dcm",
    "MR_small_bigendian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",  # two samples a pixel on the wire
    "SC_rgb_small_odd.dcm",  # odd length, padded
    "SC_rgb_rle_2frame.dcm",
    "examples_ybr_color.dcm",  # 30 JPEG frames
    "rtdose.dcm",  # 15 native frames
    "liver_1frame.dcm",  # 1-bit SEG, packed
    "JPEG2000.dcm",
    "image_dfl.dcm",  # deflated
]


@pytest.mark.parametrize("name", SOUND_IMAGES)
def test_sound_images_of_every_encoding_pass_the_pixel_data_check(name: str) -> None:
    assert (
        inspect_part10(PYDICOM_FILES / name).sop_instance_uid == dcmread(PYDICOM_FILES / name).SOPInstanceUID
    )


@pytest.mark.usefixtures("chunked_send")
def test_pixel_data_that_cannot_hold_the_image_is_refused(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = _short_pixel_cases(tmp_path)
    scp = start_scp()
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000]
    ae = scu(
        [
            (sop, ts)
            for sop in (CTImageStorage, RTDoseStorage, SecondaryCaptureImageStorage)
            for ts in syntaxes
        ]
    )
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADGATE")
    assert assoc.is_established
    statuses: dict[str, int] = {}
    try:
        for name, (path, _) in cases.items():
            statuses[name] = assoc.send_c_store(path).Status
        good = sorted(CHEST_CT.iterdir())[1]  # the same association still takes a whole slice
        statuses["good"] = assoc.send_c_store(good).Status
    finally:
        assoc.release()
    assert statuses == {name: status for name, (_, status) in cases.items()} | {"good": 0}
    assert [i.sop_instance_uid for i in recorder.instances] == [dcmread(good).SOPInstanceUID]
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused C-STORE")]
    assert len(refusals) == len(cases)  # one line each
    assert "Pixel Data holds 262144 bytes" in refusals[0] and "needs 524288" in refusals[0]
    assert not held_incoming(tmp_path / "incoming"), "refused files left behind"


# --- hand-made encodings equal the libraries' -----------------------------------------------------


@pytest.mark.parametrize("source_ae", ["STORESCU", "ODD", ""])
def test_file_meta_header_equals_pydicom(source_ae: str) -> None:
    meta = create_file_meta(
        sop_class_uid=UID(CTImageStorage),
        sop_instance_uid=UID("1.2.3.45"),
        transfer_syntax=ExplicitVRLittleEndian,
    )
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    assert file_meta_header(CTImageStorage, "1.2.3.45", ExplicitVRLittleEndian, source_ae) == out.getvalue()


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB000])
def test_c_store_rsp_command_equals_pynetdicom(status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.45"
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    fragments = [pdv for p in message.encode_msg(1, 16384) for _, pdv in p.presentation_data_value_list]
    assert [f[0] for f in fragments] == [0x03]  # one last command fragment
    assert c_store_rsp_command(CTImageStorage, "1.2.3.45", 7, status) == fragments[0][1:]


@pytest.mark.usefixtures("chunked_send")
def test_command_split_over_fragments_takes_pynetdicom_path(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    """A tiny maximum PDU splits the C-STORE-RQ command, which the fast path leaves to pynetdicom."""
    src = PYDICOM_FILES / "MR_small.dcm"
    ds = dcmread(src)
    scp = start_scp(max_pdu=128)
    assoc = scu([(ds.SOPClassUID, ExplicitVRLittleEndian)]).associate(
        "127.0.0.1", scp.port, ae_title="RADGATE"
    )
    wire = tmp_path / "wire.dcm"
    body = raw_part10(src, wire, ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID)
    broken = tmp_path / "broken.dcm"
    raw_part10(
        PYDICOM_FILES / "MR_truncated.dcm", broken, ExplicitVRLittleEndian, ds.SOPClassUID, generate_uid()
    )
    try:
        assert assoc.send_c_store(wire).Status == 0
        assert assoc.send_c_store(broken).Status == STATUS_CANNOT_UNDERSTAND
    finally:
        assoc.release()
    kept = (recorder.keep / f"{ds.SOPInstanceUID}.dcm").read_bytes()
    assert kept[dataset_offset(kept) :] == body
    assert not held_incoming(tmp_path / "incoming")


def test_incoming_files_are_made_ahead_and_removed_at_stop(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    scp = start_scp()
    incoming = tmp_path / "incoming"
    wait_until(lambda: len(list(incoming.iterdir())) >= 16)  # before any C-STORE
    made = list(incoming.iterdir())
    assert all(p.name.startswith(".rx-") and p.stat().st_size == 0 for p in made)
    assert not any(received_completely(p.stat()) for p in made)
    src = with_uids(TESTDATA / "pydicom-testfiles/CT_small.dcm", tmp_path)
    assert dcmtk("storescu", "-aec", "RADGATE", "127.0.0.1", str(scp.port), str(src)).returncode == 0
    recorder.wait_for(lambda: len(recorder.instances) == 1)
    assert recorder.instances[0].path in made  # the C-STORE took one made ahead
    scp.stop()
    assert list(incoming.iterdir()) == []


def test_writeback_starts_early_only_while_one_dataset_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone sender waits on the fsync, so its pages go to the disk as they come and its tail as
    soon as the dataset is whole; with several datasets arriving at once the fsync alone writes each
    file (less CPU), and a closed or discarded file no longer counts."""
    started: list[tuple[int, int]] = []  # (start, end) of each writeback
    monkeypatch.setattr(
        incoming,
        "_SYNC_FILE_RANGE",
        lambda fd, start, length, flags: started.append((start, start + length)) or 0,
    )
    chunk = bytes(incoming._WRITEBACK_STEP)
    files = incoming._IncomingFiles(tmp_path, "t", 0o600)
    try:
        alone = incoming._Spool(files, b"header")
        alone.write(chunk)
        assert started == [(0, incoming._WRITEBACK_STEP)]  # whole pages only while more may come
        second = incoming._Spool(files, b"header")
        alone.write(chunk)
        second.write(chunk)
        second.write(b"tail")
        second.complete()
        assert len(started) == 1
        alone.write(chunk)
        alone.write(b"tail")
        assert len(started) == 2
        alone.complete()
        assert started[-1][1] == alone.size == Path(alone.name).stat().st_size  # the tail, at once
        third = incoming._Spool(files, b"header")
        third.write(chunk)
        assert len(started) == 4
        third.complete()
    finally:
        files.close()


def test_start_removes_partial_files_of_a_previous_run(
    start_scp: Callable[..., StorageSCP], tmp_path: Path
) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    partial = incoming / ".rx-p1-1.dcm"
    partial.write_bytes(b"half a dataset")
    handed_over = incoming / "owned-by-the-node.dcm"
    handed_over.write_bytes(b"")
    start_scp()
    assert not partial.exists()
    assert handed_over.exists()


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition nothing signals (files, counters) until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.01)


def test_abort_in_the_middle_of_a_dataset_leaves_no_file(
    start_scp: Callable[..., StorageSCP], recorder: Recorder, tmp_path: Path
) -> None:
    scp = start_scp(max_pdu=4096)
    incoming = tmp_path / "incoming"
    assoc = scu([(CTImageStorage, ImplicitVRLittleEndian)]).associate(
        "127.0.0.1", scp.port, ae_title="RADGATE"
    )
    assert assoc.is_established
    data = (TESTDATA / "dcmqi/segmentations/ct-3slice/01.dcm").read_bytes()
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = generate_uid()
    req.Priority = 2
    req.DataSet = BytesIO(data[dataset_offset(data) :])
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    pdatas = list(message.encode_msg(cast(int, assoc.accepted_contexts[0].context_id), 4096))
    for pdata in pdatas[: len(pdatas) // 2]:  # the command and half of the dataset
        assoc.dul.send_pdu(pdata)
    wait_until(lambda: bool(held_incoming(incoming)))  # the SCP is writing the dataset
    [partial] = held_incoming(incoming)
    assert not received_completely(partial.stat())  # after a power cut, recovery would not take it
    assoc.abort()
    wait_until(lambda: scp.active_associations == 0)
    assert not held_incoming(incoming), "the partial dataset was left behind"
    assert recorder.instances == []
    recorder.wait_for(lambda: len(recorder.released) == 1)
    assert not recorder.released[0].released  # aborted: the release handler hears it was not released
    assert dcmtk("echoscu", "127.0.0.1", str(scp.port)).returncode == 0


def test_a_received_file_mode_must_be_readable_by_its_owner(tmp_path: Path) -> None:
    """The final mode tells a complete incoming file from one still arriving (write-only, 0200)."""
    with pytest.raises(ValueError, match="readable by its owner"):
        StorageSCP("RADGATE", "127.0.0.1", 0, tmp_path, Recorder(tmp_path), file_mode=0o200)
