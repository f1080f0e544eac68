"""Hostile datasets against a running node: nesting, deflate bombs, oversize, crafted structures,
and a start with corrupt leftovers in incoming/ and in the spool (issue 15, items 1, 3 and 9).

The datasets are crafted as raw bytes (pydicom itself cannot write or read 300 nested sequences)
and sent untouched by pynetdicom's chunked C-STORE. The node runs in this process with its real
parts (store, spool, transport with two receiving processes) and small configured limits, so its
receiving processes' memory can be read from /proc; the restart tests run `radgate serve`.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from support.node import NodeProcess, free_port, held_incoming, wait_for, write_series

from dicom_io.net import (
    DEFAULT_LIMITS,
    DatasetLimits,
    ReceivedInstance,
    StorageSCP,
    file_meta_header,
    incoming,
)
from plugin.config import Config
from plugin.ingest.receive import dataset_limits
from plugin.node import Node

SR = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a non-image object, no pixel checks
CONTENT_SEQUENCE = (0x0040, 0xA730)
UNDEFINED = 0xFFFFFFFF
MAX_DATASET = 2 << 20  # the 1 GiB deflate bomb (about 1 MB) fits: it must reach the inflater
MAX_INFLATED = 4 << 20
LIMITS = {"max_dataset_bytes": MAX_DATASET, "max_inflated_bytes": MAX_INFLATED, "max_sequence_depth": 32}


# --- crafting raw datasets -------------------------------------------------------------------------


def _explicit(group: int, element: int, vr: bytes, value: bytes | None, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; `value` None: undefined length, the caller adds the rest."""
    size = UNDEFINED if value is None else len(value) if length is None else length
    if vr in (b"SQ", b"OB", b"UN", b"UT"):  # 4-byte lengths
        return struct.pack("<HH2s2xL", group, element, vr, size) + (value or b"")
    return struct.pack("<HH2sH", group, element, vr, size) + (value or b"")


def _implicit(group: int, element: int, value: bytes | None) -> bytes:
    return struct.pack("<HHL", group, element, UNDEFINED if value is None else len(value)) + (value or b"")


def _item(inner: bytes, defined: bool) -> bytes:
    if defined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
    return struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)


def _sequence(item: bytes, explicit: bool, defined: bool, vr: bytes = b"SQ") -> bytes:
    group, element = CONTENT_SEQUENCE
    if defined:
        return _explicit(group, element, vr, item) if explicit else _implicit(group, element, item)
    head = _explicit(group, element, vr, None) if explicit else _implicit(group, element, None)
    return head + item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def nested(depth: int, explicit: bool = True, defined: bool = False, vr: bytes = b"SQ") -> bytes:
    """`depth` Content Sequences, each in the one item of the one above."""
    leaf = _explicit(0x0040, 0xA160, b"UT", b"leaf") if explicit else _implicit(0x0040, 0xA160, b"leaf")
    inner = leaf
    for _ in range(depth):
        inner = _sequence(_item(inner, defined), explicit, defined, vr)
    return inner


def _uid(uid: str) -> bytes:
    return uid.encode() + b"\0" * (len(uid) % 2)


def _header(sop: str, explicit: bool) -> bytes:
    """The identifying elements of a Basic Text SR (a new study and series), in tag order."""
    values = [
        (0x0008, 0x0016, b"UI", _uid(SR)),
        (0x0008, 0x0018, b"UI", _uid(sop)),
        (0x0008, 0x0060, b"CS", b"SR"),
        (0x0020, 0x000D, b"UI", _uid(generate_uid())),
        (0x0020, 0x000E, b"UI", _uid(generate_uid())),
    ]
    if explicit:
        return b"".join(_explicit(g, e, vr, v) for g, e, vr, v in values)
    return b"".join(_implicit(g, e, v) for g, e, _vr, v in values)


def part10(directory: Path, body: Callable[[bytes], bytes], ts: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file: file meta, then `body(header)` where header holds the identifying elements."""
    sop = generate_uid()
    path = directory / f"{sop}.dcm"
    path.write_bytes(
        file_meta_header(SR, sop, ts, "CRAFTED") + body(_header(sop, ts != ImplicitVRLittleEndian))
    )
    return path


@functools.cache
def _deflated_zeros() -> bytes:
    """1 MiB of zeros as raw deflate blocks that end byte-aligned and reference nothing before them:
    repeated, they make one longer stream."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(bytes(1 << 20)) + deflater.flush(zlib.Z_FULL_FLUSH)


def deflate_bomb(header: bytes, inflated: int = 1 << 30) -> bytes:
    """`header` and an OB value of `inflated` zeros (MiB multiple), deflated (1 GiB: about 1 MB)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(header + _explicit(0x0009, 0x1010, b"OB", b"", length=inflated))
    start += deflater.flush(zlib.Z_FULL_FLUSH)
    return start + _deflated_zeros() * (inflated >> 20) + b"\x03\x00"  # an empty final block


CRAFTED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "nested 220 deep": (lambda h: h + nested(220), ExplicitVRLittleEndian),
    "nested 300 deep": (lambda h: h + nested(300), ExplicitVRLittleEndian),
    "nested 300 deep, defined lengths": (lambda h: h + nested(300, defined=True), ExplicitVRLittleEndian),
    "nested 300 deep, implicit VR": (lambda h: h + nested(300, explicit=False), ImplicitVRLittleEndian),
    "nested 300 deep, implicit VR, defined lengths": (
        lambda h: h + nested(300, explicit=False, defined=True),
        ImplicitVRLittleEndian,
    ),
    "nested 300 deep in UN": (lambda h: h + nested(300, vr=b"UN"), ExplicitVRLittleEndian),
    "nested 300 deep, deflated": (
        lambda h: zlib.compress(h + nested(300), wbits=-zlib.MAX_WBITS),
        DeflatedExplicitVRLittleEndian,
    ),
    "deflate bomb": (deflate_bomb, DeflatedExplicitVRLittleEndian),
    "deflate stream cut short": (
        lambda h: zlib.compress(h + bytes(4096), wbits=-zlib.MAX_WBITS)[:-40],
        DeflatedExplicitVRLittleEndian,
    ),
    "not deflated at all": (lambda h: h + b"\xff" * 64, DeflatedExplicitVRLittleEndian),
    "over max_dataset_bytes": (
        lambda h: h + _explicit(0x0009, 0x1010, b"OB", bytes(4 * MAX_DATASET)),
        ExplicitVRLittleEndian,
    ),
    "item longer than its sequence": (
        lambda h: h + _explicit(0x0040, 0xA730, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 64) + bytes(16)),
        ExplicitVRLittleEndian,
    ),
    "sequence never closed": (lambda h: h + nested(3)[:-8], ExplicitVRLittleEndian),
    "delimiter at top level": (lambda h: h + struct.pack("<HHL", 0xFFFE, 0xE00D, 0), ExplicitVRLittleEndian),
    "item holding no item": (
        lambda h: h + _explicit(0x0040, 0xA730, b"SQ", _explicit(0x0040, 0xA160, b"UT", b"text")),
        ExplicitVRLittleEndian,
    ),
}


def test_the_configured_defaults_are_the_transports() -> None:
    assert dataset_limits(Config().dicom) == DEFAULT_LIMITS


# --- a node in this process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    config = Config.model_validate(
        {
            "data_dir": str(data_dir),
            "dicom": {"host": "127.0.0.1", "port": free_port(), "receivers": 2, **LIMITS},
            "web": {"enabled": False},
        }
    )
    running = Node(config, execute=False)
    running.start()
    yield running
    running.stop()


@pytest.fixture()
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's dataset bytes as they are instead of re-encoding a Dataset."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send(port: int, path: Path, calling_ae: str = "HOSTILE") -> int:
    """C-STORE the file's dataset bytes untouched; the status answered."""
    return send_all(port, [path], calling_ae)[0]


def send_all(port: int, paths: list[Path], calling_ae: str = "HOSTILE") -> list[int]:
    """C-STORE the files' dataset bytes untouched, one after the other on one association."""
    ae = AE(ae_title=calling_ae)
    metas = [split_dataset(path)[0] for path in paths]
    for sop_class, ts in dict.fromkeys((m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in metas):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADGATE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def echo(port: int) -> int:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADGATE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def peak_rss(pids: list[int]) -> int:
    """The processes' peak resident memory so far, bytes (VmHWM from /proc): a buffer freed
    before the reading still counts."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def spooled(config: Config, sop: str) -> list[Path]:
    return list(config.spool_dir.rglob(f"{sop}.dcm"))


@pytest.mark.usefixtures("chunked_send")
@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_dataset_is_refused_and_the_node_keeps_serving(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    body, ts = CRAFTED[case]
    path = part10(tmp_path, body, ts)
    sop = path.stem
    good = write_series(tmp_path / "good", 1)[0]
    assert node.scp is not None
    port, receivers = node.scp.port, node.scp.receiving_processes
    before = peak_rss(receivers)
    caplog.set_level(logging.INFO)

    # the peer's data: 0xC000, never 0xA700, never an abort; the association takes the next one
    assert send_all(port, [path, good]) == [0xC000, 0]

    grown = peak_rss(receivers) - before
    assert grown < 64 << 20, f"receiving processes grew by {grown >> 20} MiB"
    refusals = wait_for(
        lambda: [
            r.getMessage()
            for r in caplog.records
            if "refused C-STORE" in r.getMessage() and sop in r.getMessage()
        ],
        10,
        "the refusal's log line",
    )
    assert len(refusals) == 1 and "HOSTILE" in refusals[0] and "127.0.0.1" in refusals[0]
    assert spooled(node.config, sop) == [] and spooled(node.config, good.stem)
    # the refused file goes before the answer; the good one's durable name once the release is handled
    wait_for(lambda: held_incoming(node.config.incoming_dir) == [], 10, "an empty incoming/")
    assert echo(port) == 0
    assert node.scp.receiving_processes == receivers  # none died on the way


@pytest.mark.usefixtures("chunked_send")
def test_the_refusals_name_the_limit_that_was_passed(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert node.scp is not None
    caplog.set_level(logging.INFO)
    expected = {
        "nested 300 deep": ("max_sequence_depth (32)", "sequence_too_deep"),
        "deflate bomb": (f"max_inflated_bytes ({MAX_INFLATED} bytes)", "inflated_too_large"),
        "over max_dataset_bytes": (f"max_dataset_bytes ({MAX_DATASET} bytes)", "dataset_too_large"),
    }
    before = refused_by_reason(node.config)
    for case, (limit, _reason) in expected.items():
        path = part10(tmp_path, *CRAFTED[case])
        assert send(node.scp.port, path) == 0xC000
        wanted = (path.stem, limit)
        wait_for(
            lambda: any(all(w in r.getMessage() for w in wanted) for r in caplog.records),  # noqa: B023
            10,
            f"a log line naming {limit}",
        )
    counted = refused_by_reason(node.config)  # for /metrics, by the receiving process that refused
    for _limit, reason in expected.values():
        assert counted.get(reason, 0) - before.get(reason, 0) == 1, (reason, before, counted)


def refused_by_reason(config: Config) -> dict[str, float]:
    """The receiving processes' counts of refused C-STOREs (`plugin.ingest.counters`), by reason."""
    files = MultiProcessCollector(None, path=str(config.metrics_dir))
    return {
        sample.labels["reason"]: sample.value
        for metric in files.collect()
        if metric.name == "radgate_instances_refused"
        for sample in metric.samples
    }


@pytest.mark.usefixtures("chunked_send")
def test_nesting_up_to_the_limit_is_stored(node: Node, tmp_path: Path) -> None:
    assert node.scp is not None
    path = part10(tmp_path, lambda h: h + nested(32))
    assert send(node.scp.port, path) == 0
    assert spooled(node.config, path.stem)


def test_the_spool_drops_a_dataset_the_moment_it_passes_the_limit(tmp_path: Path) -> None:
    """Nothing past `max_dataset_bytes` is written, and what was written is removed at once."""
    files = incoming._IncomingFiles(tmp_path, "t", 0o600)
    try:
        spool = incoming._Spool(files, b"header", max_dataset_bytes=1000)
        spool.write(bytes(1000))
        assert spool.refused is None and spool.path.stat().st_size == 1006
        spool.write(b"x")
        assert spool.refused is not None and spool.refused.status == 0xC000
        assert not spool.path.exists()
        spool.write(bytes(1 << 20))  # the rest of the dataset still arrives: dropped
        spool.complete()
        assert spool.size == 1006 and not spool.path.exists()
    finally:
        files.close()


def _accept(instance: ReceivedInstance) -> int:
    instance.path.unlink()
    return 0


@pytest.mark.usefixtures("chunked_send")
def test_a_command_split_over_fragments_is_refused_alike(tmp_path: Path) -> None:
    """A maximum PDU of 128 bytes splits the C-STORE-RQ command: pynetdicom's path, the same checks."""
    limits = DatasetLimits(max_dataset_bytes=64 << 10)
    incoming = tmp_path / "incoming"
    with StorageSCP(
        "RADGATE", "127.0.0.1", free_port(), incoming, _accept, max_pdu=128, limits=limits
    ) as scp:
        oversize = part10(tmp_path, lambda h: h + _explicit(0x0009, 0x1010, b"OB", bytes(256 << 10)))
        deep = part10(tmp_path, *CRAFTED["nested 300 deep"])
        fine = part10(tmp_path, lambda h: h + nested(32))
        assert send_all(scp.port, [oversize, deep, fine]) == [0xC000, 0xC000, 0]  # one association
        assert echo(scp.port) == 0
        assert held_incoming(incoming) == []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """`radgate serve` with the small limits, for the tests below: the deep nests over DCMTK first,
    then the start over corrupt leftovers, which stops it, plants them and starts it again."""
    node = NodeProcess(
        tmp_path_factory.mktemp("served") / "node",
        {"dicom": {**LIMITS, "receivers": 2}, "executor": {"workers": 1}},
    )
    node.start()
    yield node
    node.stop_if_running()


def test_storescu_is_told_a_deep_nest_cannot_be_understood(served: NodeProcess, tmp_path: Path) -> None:
    """DCMTK reads and sends the nests (its parser is not recursive in Python); `radgate serve`."""
    node = served
    deep = [part10(tmp_path, lambda h, d=depth: h + nested(d)) for depth in (220, 300)]
    for path in deep:  # one association each: storescu stops at the first failure
        sent = node.storescu(path)
        assert "Received Store Response (Error: CannotUnderstand)" in sent.stderr, sent.stderr
    assert node.echoscu().returncode == 0
    good = write_series(tmp_path / "good", 1)
    assert node.storescu(*good).returncode == 0
    assert list(node.data_dir.glob(f"spool/*/*/{good[0].name}"))
    # the good one's durable incoming name goes once its association's release is handled
    wait_for(lambda: held_incoming(node.data_dir / "incoming") == [], 10, "an empty incoming/")
    assert not [p for path in deep for p in node.data_dir.glob(f"spool/*/*/{path.name}")]


# --- a start with corrupt leftovers ----------------------------------------------------------------


def _plant(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    path.chmod(0o644)  # a complete incoming file (dicom_io.net.received_completely)
    return path


def test_a_node_comes_up_over_corrupt_leftovers(served: NodeProcess, tmp_path: Path) -> None:
    node = served  # started before (the data dir exists, with its store): stopped to plant leftovers
    assert node.stop() == 0
    data = node.data_dir
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    deep = part10(crafted, lambda h: h + nested(300)).read_bytes()
    bomb = part10(crafted, deflate_bomb, DeflatedExplicitVRLittleEndian).read_bytes()
    good = write_series(crafted / "good", 2)
    truncated = good[0].read_bytes()[:-100]
    garbage = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 8
    sop = generate_uid()  # a Transfer Syntax UID too long for the store's column (PostgreSQL refuses it)
    long_uid = file_meta_header(SR, sop, "1.2." * 30 + "1", "CRAFTED") + _header(sop, explicit=True)
    bad = {"deep": deep, "bomb": bomb, "truncated": truncated, "garbage": garbage, "long uid": long_uid}
    planted = [
        _plant(data / "incoming", f".rx-w0.1-{name.replace(' ', '-')}", raw) for name, raw in bad.items()
    ]
    lot = data / "spool" / generate_uid() / generate_uid()
    planted += [_plant(lot, f"{generate_uid()}.dcm", raw) for raw in bad.values()]
    # good leftovers: a complete incoming file whose final name was lost, an unrecorded spool file
    _plant(data / "incoming", ".rx-w0.1-good", good[0].read_bytes())
    header = pydicom.dcmread(good[1], stop_before_pixels=True)
    _plant(
        data / "spool" / header.StudyInstanceUID / header.SeriesInstanceUID,
        good[1].name,
        good[1].read_bytes(),
    )

    node.start()
    assert node.echoscu().returncode == 0
    quarantined = {p.name for p in (data / "quarantine").rglob("*") if p.is_file()}
    assert {p.name for p in planted} <= quarantined
    log = node.log()
    for path in planted:
        assert f"{path.name} is not a usable instance" in log
    assert not [p for p in planted if p.exists()]
    with sqlite3.connect(data / "radgate.db") as db:
        recorded = {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances")}
    assert {good[0].stem, good[1].stem} <= recorded
    assert node.stop() == 0
