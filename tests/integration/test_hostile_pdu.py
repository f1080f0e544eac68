"""Hostile and broken peers at the PDU level, against a real StorageSCP over loopback sockets.

Each malformed case is sent on a raw socket; the test asserts the SCP's answer (A-ABORT,
A-ASSOCIATE-RJ or a closed connection) within a deadline, its one log line naming the peer and
the limit or fault, and that afterwards the SCP still answers C-ECHO and acknowledges a C-STORE
whose file is then present. Timeouts and limits are tiny so that the suite stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.net import Peer, ReceivedInstance, StorageSCP, TlsFiles, wire

MAX_PDU = 16384
PDU_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
ANSWER_WITHIN = 10.0  # a deadline on every wait for the SCP: far above the timeouts it must keep
ABORT, REJECT, CLOSED = "A-ABORT", "A-ASSOCIATE-RJ", "closed"


# The receiving processes import this module to run `KeepFiles`: what only the tests use
# (support.node imports the store, plugin.node the whole node) is imported where it is used.
def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    from support.node import wait_for as wait

    wait(condition, timeout, what)


@dataclass(frozen=True)
class KeepFiles:
    """The handler (picklable, so receiving processes run it): keeps each file under its SOP UID."""

    keep: Path

    def __call__(self, inst: ReceivedInstance) -> int:
        os.replace(inst.path, self.keep / f"{inst.sop_instance_uid}.dcm")
        return 0

    def on_release(self, peer: Peer) -> None:
        """Nothing to do at the end of an association."""


# --- PDUs built by hand ---------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value) if length is None else length) + value


def context(context_id: int, abstract: str, *transfer: str) -> bytes:
    syntaxes = b"".join(item(0x40, ts.encode()) for ts in transfer)
    return item(0x20, bytes([context_id, 0, 0, 0]) + item(0x30, abstract.encode()) + syntaxes)


def associate_rq(
    version: int = 1,
    app_context: bytes = item(0x10, b"1.2.840.10008.3.1.1.1"),
    contexts: bytes = context(1, Verification, ImplicitVRLittleEndian),
    user: bytes = item(0x50, item(0x51, struct.pack(">L", MAX_PDU)) + item(0x52, b"1.2.3.4")),
) -> bytes:
    fixed = struct.pack(">HH", version, 0) + b"RADGATE".ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
    return pdu(0x01, fixed + app_context + contexts + user)


GOOD_RQ = associate_rq()
_ECHO_ELEMENTS = (
    struct.pack("<HHL", 0, 0x0002, 18)
    + b"1.2.840.10008.1.1\x00"
    + struct.pack("<HHLH", 0, 0x0100, 2, 0x0030)
    + struct.pack("<HHLH", 0, 0x0110, 2, 1)
    + struct.pack("<HHLH", 0, 0x0800, 2, 0x0101)
)
ECHO_COMMAND = (  # a C-ECHO-RQ command set (Implicit VR LE) as the last command fragment
    b"\x03" + struct.pack("<HHLL", 0, 0x0000, 4, len(_ECHO_ELEMENTS)) + _ECHO_ELEMENTS
)


def pdata(*pdvs: tuple[int, bytes]) -> bytes:
    return pdu(0x04, b"".join(struct.pack(">LB", 1 + len(value), cid) + value for cid, value in pdvs))


# --- the SCP and a well-behaved peer ----------------------------------------------------------------


@dataclass
class Node:
    scp: StorageSCP
    keep: Path
    pids: list[int]  # the receiving processes at start (none crashes)


def start(tmp: Path, **limits: object) -> Node:
    keep = tmp / "kept"
    keep.mkdir(parents=True)
    handler = KeepFiles(keep)
    args: dict[str, object] = {"max_pdu": MAX_PDU, "pdu_timeout": PDU_TIMEOUT, "idle_timeout": IDLE_TIMEOUT}
    args.update(limits)
    scp = StorageSCP("RADGATE", "127.0.0.1", 0, tmp / "incoming", handler, handler.on_release, **args)  # type: ignore[arg-type]
    scp.start()
    return Node(scp, keep, scp.receiving_processes)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One SCP with two receiving processes for the whole module (its limits tiny)."""
    started = start(tmp_path_factory.mktemp("hostile"), workers=2, max_associations_per_peer=16)
    yield started
    started.scp.stop()


def echo_and_store(node: Node, tls: ssl.SSLContext | None = None) -> None:
    """C-ECHO succeeds and a C-STORE is acknowledged, its file then present, within the deadline."""
    ae = AE(ae_title="WELLBEHAVED")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ANSWER_WITHIN
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    from support.node import ct_instance

    ds = ct_instance(generate_uid(), generate_uid(), 1)
    tls_args = (tls, "localhost") if tls is not None else None
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="RADGATE", tls_args=tls_args)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert (node.keep / f"{ds.SOPInstanceUID}.dcm").is_file()


def connect(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.scp.port), timeout=ANSWER_WITHIN)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def associated(node: Node) -> socket.socket:
    """A raw socket with an established association (context 1: Verification)."""
    sock = connect(node)
    sock.sendall(GOOD_RQ)
    header = read_exact(sock, 6)
    assert header[0] == 0x02, f"expected A-ASSOCIATE-AC, got {header!r}"
    read_exact(sock, struct.unpack(">L", header[2:])[0])
    return sock


def answer(sock: socket.socket) -> str:
    """The first PDU the SCP sends back, by name, or CLOSED when it closes (or resets) without one;
    waits at most ANSWER_WITHIN. After an A-ABORT or A-ASSOCIATE-RJ the SCP must close too."""
    sock.settimeout(ANSWER_WITHIN)
    try:
        header = read_exact(sock, 6)
    except ConnectionResetError:
        return CLOSED
    if len(header) < 6:
        return CLOSED
    name = wire._PDU_NAMES.get(header[0], f"PDU type 0x{header[0]:02X}")
    if name in (ABORT, REJECT):
        assert_closes(sock)
    return name


def assert_closes(sock: socket.socket) -> None:
    """The SCP closes the connection (EOF or reset) within the deadline."""
    sock.settimeout(ANSWER_WITHIN)
    deadline = time.monotonic() + ANSWER_WITHIN
    try:
        while sock.recv(65536):
            assert time.monotonic() < deadline, "the SCP did not close the connection"
    except ConnectionResetError:
        pass


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def logged(caplog: pytest.LogCaptureFixture, *words: str, times: int = 1) -> Callable[[], bool]:
    """Whether at least ``times`` log records hold all of ``words``."""
    return lambda: sum(all(w in r.getMessage() for w in words) for r in caplog.records) >= times


# --- the malformed PDU cases ------------------------------------------------------------------------


def then_close(data: bytes) -> Callable[[socket.socket], None]:
    """Send `data`, then close our side."""

    def send(sock: socket.socket) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    return send


def trickle(data: bytes, every: float) -> Callable[[socket.socket], None]:
    """Send `data` a byte at a time, `every` seconds apart, until the SCP closes (or all is sent)."""

    def send(sock: socket.socket) -> None:
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(every)  # the peer's pace, not a wait for the SCP

    return send


@dataclass(frozen=True)
class Case:
    """A malformed input, sent before (or after) an association is established, and its answer."""

    send: bytes | Callable[[socket.socket], None]
    expected: str
    log: tuple[str, ...]  # words of the SCP's one log line about it (none: a peer's own A-ABORT)
    associate_first: bool = False
    slow: float = 0.0  # the answer is due only after this long (a timeout)


HALF_RQ = GOOD_RQ[: len(GOOD_RQ) // 2]
BIG = 1 << 20
OVER_CONTROL_LIMIT = (256 << 10) + 1
PDATA_HEADER_ONLY = struct.pack(">BBL", 0x04, 0, 1000)

CASES: dict[str, Case] = {
    # absurd lengths and unknown types before any association
    "unknown type 0x00": Case(pdu(0x00, bytes(4)), ABORT, ("unknown PDU type 0x00",)),
    "unknown type 0x08": Case(pdu(0x08, bytes(4)), ABORT, ("unknown PDU type 0x08",)),
    "unknown type 0xFF, length 0xFFFFFFFF": Case(
        pdu(0xFF, bytes(64), 0xFFFFFFFF), ABORT, ("unknown PDU type 0xFF",)
    ),
    "A-ASSOCIATE-RQ of 0xFFFFFFFF bytes": Case(
        pdu(0x01, GOOD_RQ[6:], 0xFFFFFFFF), ABORT, ("A-ASSOCIATE-RQ PDU of 4294967295 bytes", "limit")
    ),
    "A-ASSOCIATE-RQ over the control limit": Case(
        pdu(0x01, GOOD_RQ[6:], OVER_CONTROL_LIMIT), ABORT, ("A-ASSOCIATE-RQ PDU of", "limit")
    ),
    "A-ASSOCIATE-RQ of length 0": Case(pdu(0x01, b""), ABORT, ("0 bytes, shorter than its fixed fields",)),
    "A-ASSOCIATE-RQ cut inside its fixed fields": Case(
        pdu(0x01, GOOD_RQ[6:40]), ABORT, ("malformed A-ASSOCIATE-RQ", "shorter than its fixed fields")
    ),
    "A-ASSOCIATE-RQ item longer than the PDU": Case(
        associate_rq(contexts=item(0x20, bytes(8), 0x4000)), ABORT, ("malformed", "overruns the PDU")
    ),
    "A-ASSOCIATE-RQ sub-item longer than its item": Case(
        associate_rq(contexts=item(0x20, bytes(4) + item(0x30, b"1.2", 40))),
        ABORT,
        ("malformed", "sub-item 0x30 overruns item 0x20"),
    ),
    "A-ASSOCIATE-RQ user information cut": Case(
        associate_rq(user=item(0x50, item(0x51, bytes(4))[:6])), ABORT, ("malformed", "overruns item 0x50")
    ),
    "A-ASSOCIATE-RQ of unknown protocol version": Case(
        associate_rq(version=2), REJECT, ("127.0.0.1", "protocol version 0x0002")
    ),
    "A-ASSOCIATE-RQ without an application context": Case(
        associate_rq(app_context=b""), ABORT, ("malformed", "no application context item")
    ),
    "A-ASSOCIATE-RQ without a presentation context": Case(
        associate_rq(contexts=b""), ABORT, ("malformed", "no presentation context item")
    ),
    "A-ASSOCIATE-RQ with an unknown item type": Case(
        associate_rq(contexts=item(0x99, b"junk") + context(1, Verification, ImplicitVRLittleEndian)),
        ABORT,
        ("A-ASSOCIATE-RQ",),
    ),
    # wrong PDU types before an association
    "P-DATA-TF before association": Case(
        pdata((1, ECHO_COMMAND)), ABORT, ("unexpected P-DATA-TF PDU before an A-ASSOCIATE-RQ",)
    ),
    "P-DATA-TF of 0xFFFFFFFF bytes before association": Case(
        pdu(0x04, bytes(64), 0xFFFFFFFF), ABORT, ("unexpected P-DATA-TF PDU before",)
    ),
    "A-ASSOCIATE-AC from the requestor": Case(
        pdu(0x02, GOOD_RQ[6:]), ABORT, ("unexpected A-ASSOCIATE-AC PDU",)
    ),
    "A-ASSOCIATE-RJ from the requestor": Case(
        pdu(0x03, bytes([0, 1, 1, 1])), ABORT, ("unexpected A-ASSOCIATE-RJ PDU",)
    ),
    "A-RELEASE-RQ before association": Case(pdu(0x05, bytes(4)), ABORT, ("unexpected A-RELEASE-RQ PDU",)),
    "A-ABORT before association": Case(pdu(0x07, bytes(4)), CLOSED, ()),
    "A-RELEASE-RP before association": Case(pdu(0x06, bytes(4)), ABORT, ("unexpected A-RELEASE-RP PDU",)),
    # garbage and cut-off bytes
    "an HTTP request": Case(b"GET / HTTP/1.1\r\nHost: radgate\r\n\r\n", ABORT, ("unknown PDU type 0x47",)),
    "a TLS ClientHello on the plain port": Case(
        bytes.fromhex("16030100a5010000a10303") + os.urandom(32), ABORT, ("unknown PDU type 0x16",)
    ),
    "random bytes": Case(b"\xee" + os.urandom(4095), ABORT, ("unknown PDU type 0xEE",)),
    "three bytes of a header, then close": Case(
        then_close(GOOD_RQ[:3]), CLOSED, ("inside a PDU header", "3 of 6")
    ),
    "half an A-ASSOCIATE-RQ, then close": Case(
        then_close(HALF_RQ), CLOSED, ("closed the connection inside its A-ASSOCIATE-RQ PDU",)
    ),
    # stalls before an association: ARTIM, a deadline on the whole request
    "connect and say nothing": Case(b"", CLOSED, ("no whole A-ASSOCIATE-RQ within",), slow=PDU_TIMEOUT),
    "half an A-ASSOCIATE-RQ, then stall": Case(
        HALF_RQ, ABORT, ("no whole A-ASSOCIATE-RQ within",), slow=PDU_TIMEOUT
    ),
    "an A-ASSOCIATE-RQ trickled a byte at a time": Case(
        trickle(GOOD_RQ, PDU_TIMEOUT / 4), ABORT, ("no whole A-ASSOCIATE-RQ within",), slow=PDU_TIMEOUT
    ),
    # established associations
    "P-DATA-TF one byte over the negotiated maximum": Case(
        pdata((1, b"\x00" + bytes(MAX_PDU - 5))),
        ABORT,
        ("P-DATA-TF PDU of 16385 bytes", "dicom.max_pdu"),
        True,
    ),
    "P-DATA-TF of 1 MB": Case(pdata((1, b"\x00" + bytes(BIG))), ABORT, ("dicom.max_pdu",), True),
    "P-DATA-TF of 0xFFFFFFFF bytes": Case(
        pdu(0x04, bytes(64), 0xFFFFFFFF), ABORT, ("P-DATA-TF PDU of 4294967295 bytes", "dicom.max_pdu"), True
    ),
    "P-DATA-TF without a PDV item": Case(pdu(0x04, b""), ABORT, ("invalid P-DATA-TF PDU",), True),
    "PDV item shorter than its header": Case(
        pdu(0x04, struct.pack(">LB", 1, 1)), ABORT, ("invalid P-DATA-TF PDU",), True
    ),
    "PDV item longer than its PDU": Case(
        pdu(0x04, struct.pack(">LBB", 100, 1, 3) + bytes(10)), ABORT, ("invalid P-DATA-TF PDU",), True
    ),
    "PDV item header cut short": Case(pdu(0x04, bytes(3)), ABORT, ("invalid P-DATA-TF PDU",), True),
    "a command on a context never negotiated": Case(
        pdata((99, ECHO_COMMAND)), ABORT, ("presentation context 99, which was not accepted",), True
    ),
    "a command set that does not decode": Case(
        pdata((1, b"\x03" + os.urandom(40))), ABORT, ("DIMSE message that does not decode",), True
    ),
    "a dataset fragment before any command": Case(
        pdata((1, b"\x02" + bytes(16))), ABORT, ("DIMSE message that does not decode",), True
    ),
    "a second A-ASSOCIATE-RQ": Case(
        GOOD_RQ, ABORT, ("unexpected A-ASSOCIATE-RQ PDU in an established",), True
    ),
    "A-ASSOCIATE-AC inside an association": Case(
        pdu(0x02, GOOD_RQ[6:]), ABORT, ("unexpected A-ASSOCIATE-AC PDU in an established",), True
    ),
    "A-RELEASE-RP inside an association": Case(
        pdu(0x06, bytes(4)), ABORT, ("unexpected A-RELEASE-RP PDU in an established",), True
    ),
    "unknown type 0x09 inside an association": Case(
        pdu(0x09, bytes(4)), ABORT, ("unknown PDU type 0x09",), True
    ),
    "A-RELEASE-RQ of 0xFFFFFFFF bytes": Case(
        pdu(0x05, bytes(4), 0xFFFFFFFF), ABORT, ("A-RELEASE-RQ PDU of 4294967295 bytes",), True
    ),
    "a P-DATA-TF that stalls": Case(
        PDATA_HEADER_ONLY + bytes(10), ABORT, ("a PDU stalled", "dicom.pdu_timeout_s"), True, PDU_TIMEOUT
    ),
    "a P-DATA-TF header that stalls": Case(
        PDATA_HEADER_ONLY[:4], ABORT, ("a PDU stalled", "dicom.pdu_timeout_s"), True, PDU_TIMEOUT
    ),
    "an idle association": Case(b"", ABORT, ("no PDU for", "dicom.idle_timeout_s"), True, IDLE_TIMEOUT),
}


def send_and_answer(node: Node, case: Case) -> tuple[str, float]:
    """Send the case on a new connection (an association first, if it says so): the SCP's answer and
    how long after the sending began it came."""
    with associated(node) if case.associate_first else connect(node) as sock:
        began = time.monotonic()
        if callable(case.send):
            case.send(sock)
        elif case.send:
            with contextlib.suppress(OSError):  # the SCP may abort first: its answer is still read
                sock.sendall(case.send)
        return answer(sock), time.monotonic() - began


PROMPT = [name for name, case in CASES.items() if not case.slow]
STALLED = [name for name, case in CASES.items() if case.slow]


@pytest.mark.parametrize("name", PROMPT)
def test_a_malformed_pdu_is_answered_and_the_node_serves_on(
    node: Node, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    case = CASES[name]
    with caplog.at_level(logging.INFO):
        got, took = send_and_answer(node, case)
        assert got == case.expected
        assert took < ANSWER_WITHIN
        if case.log:  # none for a peer's own A-ABORT
            wait_for(logged(caplog, *case.log), ANSWER_WITHIN, f"a log line with {case.log}")
    echo_and_store(node)
    assert node.scp.receiving_processes == node.pids


def test_stalled_peers_are_timed_out_each_on_its_own_and_the_node_serves_on(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The cases the SCP answers only when a timeout runs out, all at once (each on its own
    connection, the timeouts counted for each): every one is answered as alone, not before its
    timeout, and logged; the SCP then serves."""
    from concurrent.futures import ThreadPoolExecutor

    with caplog.at_level(logging.INFO), ThreadPoolExecutor(len(STALLED)) as pool:
        answers = pool.map(lambda name: send_and_answer(node, CASES[name]), STALLED)
        for name, (got, took) in zip(STALLED, answers, strict=True):
            case = CASES[name]
            assert got == case.expected, name
            assert case.slow * 0.9 <= took < case.slow + ANSWER_WITHIN, (name, took)
        for words in {CASES[name].log for name in STALLED}:  # as many lines as cases that log them
            count = sum(CASES[name].log == words for name in STALLED)
            wait_for(logged(caplog, *words, times=count), ANSWER_WITHIN, f"{count} log lines with {words}")
    echo_and_store(node)
    assert node.scp.receiving_processes == node.pids


# --- memory, the pending cap, the per-peer cap, TLS -------------------------------------------------

STREAMED = 48 << 20  # what a peer streams behind a declared length of 0xFFFFFFFF
RSS_GROWTH_KIB = 16 << 10


@pytest.mark.parametrize("associate_first", [False, True], ids=["A-ASSOCIATE-RQ", "P-DATA-TF"])
def test_a_declared_length_of_4_gib_takes_no_memory(node: Node, associate_first: bool) -> None:
    pids = node.scp.receiving_processes
    assert pids
    before = {pid: rss_kib(pid) for pid in pids}
    header = struct.pack(">BBL", 0x04 if associate_first else 0x01, 0, 0xFFFFFFFF)
    sent = 0
    chunk = bytes(1 << 20)
    with associated(node) if associate_first else connect(node) as sock:
        try:
            sock.sendall(header)
            while sent < STREAMED:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # aborted and closed: the rest of the stream is refused by the kernel
            pass
        else:
            assert answer(sock) in (ABORT, CLOSED)
    assert sent < STREAMED, "the SCP read the whole stream instead of refusing the PDU"
    grown = {pid: rss_kib(pid) - before[pid] for pid in pids}
    assert max(grown.values()) < RSS_GROWTH_KIB, grown
    echo_and_store(node)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """One self-signed certificate for the module's TLS nodes."""
    from support.node import self_signed_cert

    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    self_signed_cert(key, cert, "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    return TlsFiles(cert=cert, key=key)


@pytest.mark.parametrize("tls", [False, True], ids=["half A-ASSOCIATE-RQ", "no TLS handshake"])
def test_stalls_beyond_the_pending_cap_leave_the_node_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls_files: TlsFiles, tls: bool
) -> None:
    pending = 4
    limits = {"max_pending": pending, "max_associations": 8, "max_associations_per_peer": 8}
    files = tls_files if tls else None
    node = start(tmp_path, pdu_timeout=60.0, tls=files, **limits)  # no stall times out in the test
    stalled: list[socket.socket] = []
    try:
        for _ in range(3 * pending):
            sock = connect(node)
            if not tls:
                sock.sendall(HALF_RQ)
            stalled.append(sock)
        wait_for(logged(caplog, "dicom.max_pending (4)"), ANSWER_WITHIN, "the log line of a dropped stall")
        began = time.monotonic()
        echo_and_store(node, ssl.create_default_context(cafile=str(files.cert)) if files else None)
        assert time.monotonic() - began < ANSWER_WITHIN
        for sock in stalled[: 2 * pending]:  # the oldest were dropped to make room
            assert answer(sock) == CLOSED
        wait_for(lambda: node.scp.active_associations <= pending, ANSWER_WITHIN, "the dropped ones gone")
        closes = ("closed the connection inside", "closed before an association")
        assert not any(logged(caplog, words)() for words in closes)  # the drop's one line says it all
    finally:
        for sock in stalled:
            sock.close()
        node.scp.stop()


def test_associations_per_peer_are_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = start(tmp_path, max_associations_per_peer=2)
    try:
        held = [associated(node) for _ in range(2)]
        with connect(node) as third:
            third.sendall(GOOD_RQ)
            assert answer(third) == REJECT
        wait_for(
            logged(caplog, "HOSTILE", "dicom.max_associations_per_peer (2)"), ANSWER_WITHIN, "a log line"
        )
        for sock in held:
            sock.sendall(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
            assert answer(sock) == "A-RELEASE-RP"
            sock.close()
        wait_for(lambda: node.scp.active_associations == 0, ANSWER_WITHIN, "the released associations")
        echo_and_store(node)
    finally:
        node.scp.stop()


def test_tls_peers_that_never_handshake_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls_files: TlsFiles
) -> None:
    """Two peers at once, each on its own connection: one silent, one that sends a handshake record's
    header, then its body a byte at a time (the timeout bounds the whole handshake, not each read)."""
    from concurrent.futures import ThreadPoolExecutor

    files = tls_files
    node = start(tmp_path, tls=files)

    def dropped(trickled: bool) -> tuple[str, float]:
        with connect(node) as sock:
            began = time.monotonic()
            if trickled:
                trickle(bytes.fromhex("1603010200") + bytes(512), PDU_TIMEOUT / 4)(sock)
            return answer(sock), time.monotonic() - began

    try:
        with ThreadPoolExecutor(2) as pool:
            for got, took in pool.map(dropped, [False, True]):
                assert got == CLOSED
                assert PDU_TIMEOUT * 0.9 <= took < ANSWER_WITHIN
        words = ("no TLS handshake within 1 s", "127.0.0.1")
        wait_for(logged(caplog, *words, times=2), ANSWER_WITHIN, "a log line for each")
        echo_and_store(node, ssl.create_default_context(cafile=str(files.cert)))
    finally:
        node.scp.stop()


def test_the_node_takes_its_limits_from_the_configuration(tmp_path: Path) -> None:
    from plugin.config import Config
    from plugin.node import Node as RadgateNode

    dicom = {"max_pdu": 8192, "max_associations_per_peer": 3, "max_pending": 5}
    timeouts = {"pdu_timeout_s": 7.0, "idle_timeout_s": 9.0}
    config = Config.model_validate({"data_dir": str(tmp_path), "dicom": {**dicom, **timeouts}})
    node = RadgateNode(config, listen=True, execute=False)  # built, not started
    node.receiver.close()
    node.store.dispose()
    scp = node.scp
    assert scp is not None
    assert (scp.config.max_pdu, scp.max_associations_per_peer, scp.max_pending) == tuple(dicom.values())
    assert (scp.config.pdu_timeout, scp.config.idle_timeout) == tuple(timeouts.values())
