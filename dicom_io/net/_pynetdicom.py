"""Every use of pynetdicom's private parts, fenced into this one module.

radgate receives through pynetdicom (association negotiation, the DUL state machine, every message
other than a C-STORE-RQ), narrowed for speed by a few subclasses of its internal classes:
`_FastDUL` (a DUL whose loop, a rewritten `run_reactor`, blocks in `select` instead of sleeping,
checks each PDU's header before its body and hands P-DATA-TF straight to the DIMSE provider),
`_FastSocket` (whole-PDU reads into one buffer), `_SpoolingDIMSE` (C-STORE-RQs parsed, spooled
and answered on the DUL thread) and `_Association` (the acceptor using them). They rely on
pynetdicom internals: the DUL's queues, timers and state names ("Sta2", "Sta6", ...), the
`_globals` mode, `Association._serve_request`, `_accepted_cx`, `_dul_ready`, `_kill`,
`_bind_defaults` and `evt._INTERVENTION_EVENTS`, the message's `_data_set_file` and the
request's `_dataset_file`. Other modules of `dicom_io.net` use pynetdicom's public API, or this
module.

Internals change between releases without notice, so this module is written against one release,
`PYNETDICOM_VERSION`, pinned exactly in pyproject.toml; importing it with another installed raises
ImportError (`check_pynetdicom_version`). To move to another release, read pynetdicom's changes to
the classes subclassed here, run the transport's tests (tests/integration/test_net.py,
tests/integration/test_hostile_pdu.py, tests/e2e/test_hostile_*.py) against it, then change the
pin and `PYNETDICOM_VERSION` together.
"""

from __future__ import annotations

import pynetdicom

PYNETDICOM_VERSION = "3.0.4"
"""The pynetdicom release this module was written against (and pyproject.toml pins)."""


def check_pynetdicom_version() -> None:
    """Raise ImportError unless the installed pynetdicom is `PYNETDICOM_VERSION`."""
    installed = pynetdicom.__version__
    if installed != PYNETDICOM_VERSION:
        raise ImportError(
            f"dicom_io.net was written against pynetdicom {PYNETDICOM_VERSION} and uses its internals, "
            f"but pynetdicom {installed} is installed: install pynetdicom=={PYNETDICOM_VERSION} "
            "(pyproject.toml pins it), or port dicom_io/net/_pynetdicom.py to the new release "
            "and change the pin"
        )


check_pynetdicom_version()  # before importing its private modules, which may not exist in another release

# ruff: noqa: E402 (the imports below follow the version check)
import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_io.net.incoming import _Spool
from dicom_io.net.interface import STATUS_CANNOT_UNDERSTAND
from dicom_io.net.wire import (
    _ABORT_INVALID_PARAMETER,
    _ABORT_NOT_SPECIFIED,
    _ABORT_UNEXPECTED_PDU,
    _ABORT_UNRECOGNIZED_PDU,
    _PDU_NAMES,
    associate_rq_fault,
    c_store_rsp_command,
    parse_c_store_rq,
    pdv_items,
)

if TYPE_CHECKING:
    from dicom_io.net.connection import _Connection, _ReceiverConfig

LOGGER = logging.getLogger("dicom_io.net")  # the whole transport logs under one name

_IDLE_WAIT_S = 0.02  # upper bound of an idle DUL/association loop; events end the wait at once
_READ_CHUNK = 256 << 10  # the socket buffer's usual size, and so the largest single read
_CONTROL_PDU_LIMIT = _READ_CHUNK  # any PDU but P-DATA-TF (A-ASSOCIATE-RQ: docs/design.md)
_EXPECTED_PDUS = {"Sta2": frozenset({0x01, 0x07}), "Sta6": frozenset({0x04, 0x05, 0x07})}  # acceptor's


class _WakingQueue(queue.Queue[Any]):
    """A pynetdicom queue that also wakes whoever waits for it (the DUL's `select`, the association
    loop's `get_msg`)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _FastDUL(DULServiceProvider):
    """DUL whose idle loop blocks in `select` on the socket and a wake pipe instead of polling.

    The loop never sleeps (`run_reactor`): `_is_transport_event` waits until the peer sends bytes,
    the association queues a primitive (the queues' `put` writes to the wake pipe) or a timeout is due.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _WakingQueue(self.wake)
        self.for_user = threading.Event()  # set when a primitive is put for the association thread
        self.to_user_queue = _WakingQueue(self.for_user.set)
        self._last_activity = time.monotonic()  # a PDU read or a primitive sent: the idle timeout's start

    def wake(self) -> None:
        """Interrupt the idle `select`."""
        with contextlib.suppress(OSError):  # full pipe (already woken) or closed
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _is_transport_event(self) -> bool:
        """Block until the peer's bytes arrive (True after reading a PDU) or something is queued."""
        assoc_sock = cast(AssociationSocket, self.socket)
        if self.state_machine.current_state == "Sta13" and self.assoc.requestor.primitive is None:
            assoc_sock.close()  # aborted a peer that never sent a request: read no more of its bytes
            return False
        sock = assoc_sock.socket if assoc_sock is not None else None
        if sock is None or not assoc_sock._is_connected:
            if select.select([self._wake_r], [], [], _IDLE_WAIT_S)[0]:
                self._drain()
            return False
        if cast(_FastSocket, assoc_sock).buffered or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            self._read_pdu()
            return True
        try:
            ready = select.select([sock, self._wake_r], [], [], _IDLE_WAIT_S)[0]
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as AssociationSocket.ready does
            return False
        if self._wake_r in ready:
            self._drain()
        if sock in ready:
            self._read_pdu()
            return True
        if not ready and self.state_machine.current_state == "Sta6":
            idle = self._config.idle_timeout
            if time.monotonic() - self._last_activity > idle:
                self.refuse(_ABORT_NOT_SPECIFIED, f"no PDU for {idle:g} s (dicom.idle_timeout_s)")
        return False

    @property
    def _config(self) -> _ReceiverConfig:
        return cast(_Association, self.assoc).conn.receiver.config

    def run_reactor(self) -> None:
        """pynetdicom's loop without its `time.sleep` between turns; frees the acceptor at the end.

        A turn blocks only in `_is_transport_event`, and looks at its queues without their locks and
        without raising `queue.Empty`: only this thread takes from them, and a primitive put from
        another thread wakes the `select`.

        When the loop ends before any A-ASSOCIATE-RQ (garbage bytes, a bare connect-and-close, the
        ARTIM timer: no whole request within `pdu_timeout`), the acceptor would wait for a request,
        holding the connection and a slot of `max_associations`; `None` on the user queue is what
        that wait returns on timeout, so it ends at once. The idle timeout is checked in
        `_is_transport_event`, as pynetdicom's association thread does (its own check is off).
        """
        try:
            while not self._kill_thread:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self.artim_timer.expired:
                    if self.state_machine.current_state == "Sta2":
                        self._log_peer(
                            f"no whole A-ASSOCIATE-RQ within {self._config.pdu_timeout:g} s of the "
                            "connection (dicom.pdu_timeout_s); closing"
                        )
                    self.event_queue.put("Evt18")
                try:
                    queued = bool(self.to_provider_queue.queue) and self._process_recv_primitive()
                    # events already queued go first: a blocking read would leave them until the
                    # peer sends again (an A-ASSOCIATE-RQ behind Evt5 waited out the idle wait)
                    if queued:
                        self._last_activity = time.monotonic()
                    elif not self.event_queue.queue:
                        self._is_transport_event()
                except Exception:
                    LOGGER.exception(
                        "%s: error in the DICOM upper layer; aborting the association",
                        cast(_Association, self.assoc).conn.describe(),
                    )
                    self._abort(_ABORT_NOT_SPECIFIED)
                    return
                if not self.event_queue.queue:  # no lock, no exception: most turns queue nothing
                    continue
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    continue
                self.state_machine.do_action(event)
                if self.state_machine.current_state == "Sta1" and self.assoc.requestor.primitive is None:
                    return  # closed before a request: nothing more can happen here
        finally:
            if self.assoc.requestor.primitive is None:
                self.to_user_queue.put(cast(Any, None))

    def _log_peer(self, what: str) -> None:
        """One log line about the peer: its address, its calling AE title once known, `what`; none
        once the acceptor dropped the connection (it said why)."""
        conn = cast(_Association, self.assoc).conn
        if not conn.dropped:
            LOGGER.warning("%s: %s", conn.describe(), what)

    def refuse(self, reason: int, what: str) -> None:
        """A peer broke the protocol or a limit: log it, abort, read nothing more."""
        self._log_peer(f"{what}; A-ABORT")
        self._abort(reason)

    def _abort(self, reason: int) -> None:
        """As pynetdicom's reactor does on an exception: send A-ABORT past the state machine, stop."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02  # the service provider
        abort_pdu.reason_diagnostic = reason
        cast(AssociationSocket, self.socket).send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _read_pdu(self) -> None:
        """Read one PDU, its type and declared length checked before any of its body is read.

        A PDU the acceptor cannot expect in its state (anything but an A-ASSOCIATE-RQ or an A-ABORT
        before a request; an A-ASSOCIATE-AC, -RJ or -RQ, or an A-RELEASE-RP, once established), an
        unknown type, a P-DATA-TF longer than the `max_pdu` we announced, any other PDU longer than
        `_CONTROL_PDU_LIMIT`, or a PDU whose bytes stop coming for `pdu_timeout` (before the
        association: a request not whole within `pdu_timeout` of the connection) is refused:
        one log line, an A-ABORT, nothing more read. So no read holds more than its bound.

        A P-DATA-TF of an established association goes straight to the DIMSE provider. That is
        what the state machine's DT-2 does (Sta6 + Evt10 → Sta6), here without the event queue, the
        PDU object and a copy: the PDV values are views of the socket buffer that the provider
        writes to the spool file. Anything else, or anything while events are queued (they must
        keep their order), is decoded by pynetdicom and goes through its state machine.
        """
        sock = cast(_FastSocket, self.socket)
        state = self.state_machine.current_state
        sock.read_by(time.monotonic() + self.artim_timer.remaining if state == "Sta2" else None)
        try:
            self._read_checked_pdu(sock, state)
        except TimeoutError:
            timeout = self._config.pdu_timeout
            self.refuse(
                _ABORT_NOT_SPECIFIED,
                f"no whole A-ASSOCIATE-RQ within {timeout:g} s of the connection (dicom.pdu_timeout_s)"
                if state == "Sta2"
                else f"a PDU stalled: no byte for {timeout:g} s (dicom.pdu_timeout_s)",
            )
        except OSError:  # reset by the peer: as a close
            self.event_queue.put("Evt17")
        self._last_activity = time.monotonic()

    def _read_checked_pdu(self, sock: _FastSocket, state: str) -> None:
        header = sock.peek(6)
        if len(header) < 6:
            if header:
                self._log_peer(f"closed the connection inside a PDU header ({len(header)} of 6 bytes)")
            self.event_queue.put("Evt17")
            return
        pdu_type = header[0]
        (length,) = struct.unpack_from(">L", header, 2)
        name = _PDU_NAMES.get(pdu_type)
        if name is None:
            self.refuse(_ABORT_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
            return
        expected = _EXPECTED_PDUS.get(state)
        if expected is not None and pdu_type not in expected:
            when = "before an A-ASSOCIATE-RQ" if state == "Sta2" else "in an established association"
            self.refuse(_ABORT_UNEXPECTED_PDU, f"unexpected {name} PDU {when}")
            return
        if pdu_type == 0x04:
            limit, setting = self._config.max_pdu, "dicom.max_pdu"
        else:
            limit, setting = _CONTROL_PDU_LIMIT, "the limit for PDUs other than P-DATA-TF"
        if length > limit:
            self.refuse(
                _ABORT_INVALID_PARAMETER, f"{name} PDU of {length} bytes, over {setting} ({limit} bytes)"
            )
            return
        if state == "Sta6" and pdu_type == 0x04 and not self.event_queue.queue:
            sock.skip(6)
            self._deliver_pdata(sock.take_view(length), length)
            return
        data = sock.take(6 + length)
        if len(data) < 6 + length:
            self._closed_inside(name, len(data) - 6, length)
            return
        fault = associate_rq_fault(data) if pdu_type == 0x01 else None
        if fault is not None:
            self.refuse(_ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {fault}")
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            self.refuse(_ABORT_INVALID_PARAMETER, f"undecodable {name} PDU: {exc}")
            return
        if pdu_type == 0x01 and data[6:8] != b"\x00\x01":  # pynetdicom rejects it (AE-6)
            self._log_peer(f"A-ASSOCIATE-RQ of protocol version 0x{data[6:8].hex()}; A-ASSOCIATE-RJ")
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _closed_inside(self, name: str, received: int, length: int) -> None:
        self._log_peer(f"closed the connection inside its {name} PDU ({received} of {length} bytes)")
        self.event_queue.put("Evt17")

    def _deliver_pdata(self, body: memoryview, length: int) -> None:
        try:
            if len(body) < length:
                self._closed_inside("P-DATA-TF", len(body), length)
                return
            try:
                items = pdv_items(body)
            except ValueError as exc:
                self.refuse(_ABORT_INVALID_PARAMETER, f"invalid P-DATA-TF PDU: {exc}")
                return
            cast(_SpoolingDIMSE, self.assoc.dimse).receive_items(items)
            del items
        finally:
            body.release()

    def send_pdata_now(self, context_id: int, value: bytes) -> bool:
        """Send one PDV at once if that keeps the DUL's order (on its own thread, nothing queued)."""
        if (
            threading.current_thread() is not self
            or self.state_machine.current_state != "Sta6"
            or not self.to_provider_queue.empty()
        ):
            return False
        pdu = struct.pack(">BBLLB", 0x04, 0, 4 + 1 + len(value), 1 + len(value), context_id) + value
        cast(AssociationSocket, self.socket).send(pdu)
        return True

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """P-DATA-TF without pynetdicom's PDU objects, item copies and per-PDU events (see `_PDataTF`)."""
        if bytestream[0] == 0x04:
            return _PDataTF(bytestream), "Evt10"
        return super()._decode_pdu(bytestream)

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's, but wakes the loop and joins it instead of polling `is_alive`."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def close_wake_pipe(self) -> None:
        self._wake_r.close()
        self._wake_w.close()


class _PDataTF:
    """A P-DATA-TF that came through pynetdicom's reader, decoded only as far as DT-2 needs.

    Each PDV value is copied once, and no PDV item objects are built. EVT_DATA_RECV and EVT_PDU_RECV
    do not fire for P-DATA (nothing here binds them). A malformed item raises, which pynetdicom's
    reader turns into Evt19 (A-ABORT).
    """

    def __init__(self, bytestream: bytearray) -> None:
        with memoryview(bytestream) as view:
            self.items = [[cid, bytes(value)] for cid, value in pdv_items(view[6:])]

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list = cast(Any, self.items)
        return primitive


class _FastSocket(AssociationSocket):
    """Reads through one buffer filled by large `recv_into` calls, instead of 4 KiB `recv` calls.

    One system call usually brings several small PDUs, or a whole large one with the next header,
    so the DUL reads a PDU without waiting in `select` in between. Bytes in the buffer are invisible
    to `select`: `_FastDUL._is_transport_event` asks `buffered` first.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket, timeout: float) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._buf = bytearray(_READ_CHUNK)
        self._start = self._end = 0
        self._timeout = timeout
        self._deadline: float | None = None
        client_socket.settimeout(timeout)

    @property
    def buffered(self) -> bool:
        return self._end > self._start

    def read_by(self, deadline: float | None) -> None:
        """Reads from now on raise TimeoutError past `deadline` (`time.monotonic`); with None, when
        no byte comes for the socket's `timeout` (sends too)."""
        if deadline is None and self._deadline is not None:
            cast(socket.socket, self.socket).settimeout(self._timeout)
        self._deadline = deadline

    def take(self, nr_bytes: int) -> bytearray:
        """The next `nr_bytes` (fewer if the peer closed), copied."""
        self._fill(nr_bytes)
        return self._take(min(nr_bytes, self._end - self._start))

    def peek(self, nr_bytes: int) -> bytes:
        """The next `nr_bytes` (fewer if the peer closed), left unread."""
        self._fill(nr_bytes)
        return bytes(self._buf[self._start : min(self._start + nr_bytes, self._end)])

    def skip(self, nr_bytes: int) -> None:
        """Drop `nr_bytes` already peeked."""
        self._take_span(nr_bytes)

    def take_view(self, nr_bytes: int) -> memoryview:
        """The next `nr_bytes` (fewer if the peer closed) as a view of the buffer, without a copy.

        Release it before reading again: the buffer cannot grow while a view of it exists.
        """
        self._fill(nr_bytes)
        start, end = self._take_span(min(nr_bytes, self._end - self._start))
        return memoryview(self._buf)[start:end]

    def _fill(self, nr_bytes: int) -> None:
        """Read until `nr_bytes` are buffered or the peer closed; TimeoutError as `read_by` says."""
        sock = cast(socket.socket, self.socket)
        while self._end - self._start < nr_bytes:
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            if self._start:  # keep the unread tail at the front
                self._buf[: self._end - self._start] = self._buf[self._start : self._end]
                self._end -= self._start
                self._start = 0
            if len(self._buf) - self._end < _READ_CHUNK // 4 or len(self._buf) < nr_bytes:
                self._buf.extend(bytes(max(nr_bytes, _READ_CHUNK) - (len(self._buf) - self._end)))
            with memoryview(self._buf) as view:
                n = sock.recv_into(view[self._end :])
            if not n:  # closed: the caller gets what there is, as AssociationSocket.recv does
                return
            self._end += n

    def _take_span(self, nr_bytes: int) -> tuple[int, int]:
        start = self._start
        self._start += nr_bytes
        if self._start == self._end:
            self._start = self._end = 0
        return start, start + nr_bytes

    def _take(self, nr_bytes: int) -> bytearray:
        start, end = self._take_span(nr_bytes)
        return self._buf[start:end]


@dataclass
class _PendingStore:
    """A C-STORE-RQ whose dataset is streaming into its spool file."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    spool: _Spool


class _SpoolingDIMSE(DIMSEServiceProvider):
    """DIMSE provider that streams C-STORE datasets into the incoming directory and answers them.

    The usual case, a C-STORE-RQ whose command set arrives in one fragment, never builds pydicom
    Datasets or pynetdicom messages: the command is parsed by hand, the dataset fragments are
    written to the spool as they come, and the request is served right here, on the DUL thread,
    with a hand-encoded response, without a hand-over to the association thread.

    Everything else takes pynetdicom's path, with the dataset still spooled (no global
    `_config.STORE_RECV_CHUNKED_DATASET`, no flush per fragment) and `get_msg` waiting on the queue
    instead of pynetdicom's polling. C-ECHO is served on the DUL thread too; messages on
    unknown contexts, which pynetdicom answers by aborting, go through the association thread.
    """

    def __init__(self, assoc: _Association) -> None:
        super().__init__(assoc)
        self._conn = assoc.conn
        self._store: _PendingStore | None = None
        self.msg_queue = _WakingQueue(cast(_FastDUL, assoc.dul).for_user.set)

    def discard_partial(self) -> None:
        """Remove the spool of a dataset the association ended in the middle of."""
        if self._store is not None:
            self._store.spool.discard()
            self._store = None
        msg = self.message
        if msg is not None and isinstance(msg._data_set_file, _Spool):
            msg._data_set_file.discard()

    def _send_c_store_rsp(
        self, context_id: int, sop_class: str, sop_instance: str, message_id: int, status: int
    ) -> None:
        if not 0 <= status <= 0xFFFF:
            LOGGER.error("handler returned status %r, answering 0x%04X", status, STATUS_CANNOT_UNDERSTAND)
            status = STATUS_CANNOT_UNDERSTAND
        value = b"\x03" + c_store_rsp_command(
            sop_class, sop_instance, message_id, status
        )  # last command fragment
        if cast(_FastDUL, self.dul).send_pdata_now(context_id, value):
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [cast(Any, [context_id, value])]
        self.dul.send_pdu(pdata)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A plain C-STORE-RSP is encoded by hand into one P-DATA; everything else as pynetdicom does."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
        ):
            self._send_c_store_rsp(
                context_id,
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(cast(int, primitive.Status)),
            )
            return
        super().send_msg(primitive, context_id)

    def get_msg(self, block: bool = False) -> Any:
        """Without `block` (the association loop's poll): the next message, waiting at most
        `_IDLE_WAIT_S`, and returning at once when an ACSE primitive is queued for the association
        thread too, so that a release or abort is answered without waiting out the idle wait."""
        if block:
            return super().get_msg(True)
        arrived = cast(_FastDUL, self.dul).for_user
        arrived.clear()  # before looking: a put from now on sets it again
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            pass
        if not self.dul.to_user_queue.queue:
            arrived.wait(_IDLE_WAIT_S)
        try:
            return self.msg_queue.get_nowait()
        except queue.Empty:
            return None, None

    def receive_primitive(self, primitive: Any) -> None:
        """A P-DATA through the state machine (DT-2)."""
        self.receive_items(primitive.presentation_data_value_list)

    def receive_items(self, items: Sequence[tuple[int, bytes | memoryview] | list[Any]]) -> None:
        """Take each fragment of a P-DATA: the fast C-STORE path when it applies, else pynetdicom's."""
        pdvs = list(items)
        while pdvs:
            if self._store is None:
                if self.message is None and self._start_store(*pdvs[0]):
                    pdvs.pop(0)
                    continue
                primitive = P_DATA()
                primitive.presentation_data_value_list = cast(Any, [[cid, bytes(data)] for cid, data in pdvs])
                self._receive_with_pynetdicom(primitive)
                return
            context_id, data = pdvs.pop(0)
            if data[0] & 1 or context_id != self._store.context_id:
                self._refuse("a command or another context's fragment arrived inside a dataset")
                return
            self._store.spool.write(memoryview(data)[1:])
            if data[0] & 2:
                self._finish_store()

    def _start_store(self, context_id: int, data: bytes | memoryview) -> bool:
        """Begin the fast path if `data` is a whole C-STORE-RQ command on a storage context."""
        cx = self.assoc._accepted_cx.get(context_id)
        if data[0] & 3 != 3 or cx is None:
            return False
        parsed = parse_c_store_rq(bytes(data[1:]))
        if parsed is None or parsed[1] != str(cx.abstract_syntax):
            return False
        message_id, sop_class, sop_instance = parsed
        ts = str(cast(list[str], cx.transfer_syntax)[0])
        spool = self._conn.open_spool(sop_class, sop_instance, ts)
        self._store = _PendingStore(context_id, message_id, sop_class, sop_instance, ts, spool)
        return True

    def _finish_store(self) -> None:
        store = cast(_PendingStore, self._store)
        self._store = None
        store.spool.complete()
        status = self._conn.store(
            store.spool, store.transfer_syntax, store.sop_class_uid, store.sop_instance_uid
        )
        self._send_c_store_rsp(
            store.context_id, store.sop_class_uid, store.sop_instance_uid, store.message_id, status
        )

    def _refuse(self, what: str) -> None:
        """A message that breaks DIMSE: drop what it left, log it, abort (`_FastDUL.refuse`)."""
        self.discard_partial()
        self.message = None
        cast(_FastDUL, self.dul).refuse(_ABORT_NOT_SPECIFIED, what)

    def _receive_with_pynetdicom(self, primitive: P_DATA) -> None:
        """pynetdicom's decoding, spooling any C-STORE dataset as soon as its command is complete.

        A fragment on a presentation context not accepted, or a message that does not decode, is
        refused with an A-ABORT (PS3.7 and PS3.8 leave nothing else to answer it with).
        """
        for context_id, _ in cast(list[tuple[int, bytes]], primitive.presentation_data_value_list):
            if context_id not in self.assoc._accepted_cx:
                self._refuse(f"a message on presentation context {context_id}, which was not accepted")
                return
        try:
            decoded = self._decode_with_pynetdicom(primitive)
        except Exception as exc:
            self._refuse(f"a DIMSE message that does not decode ({type(exc).__name__}: {exc})")
            return
        if decoded is None:
            return
        context_id, d_primitive = decoded
        if (
            isinstance(d_primitive, (C_STORE, C_ECHO))
            and d_primitive.is_valid_request
            and self.assoc.is_established  # the service classes drop the response until it is
        ):
            self.assoc._serve_request(d_primitive, context_id)
        else:  # anything else takes pynetdicom's path through the association thread
            self.msg_queue.put(cast(Any, (context_id, d_primitive)))

    def _decode_with_pynetdicom(self, primitive: P_DATA) -> tuple[int, Any] | None:
        """The whole message once its last fragment is in (context ID, DIMSE primitive), else None."""
        if self.message is None:
            self.message = DIMSEMessage()
        msg = self.message
        done = msg.decode_msg(primitive, self.assoc)
        if isinstance(msg, C_STORE_RQ) and msg._data_set_file is None:
            cs = msg.command_set
            ts = self.assoc._accepted_cx[cast(int, msg.context_id)].transfer_syntax[0]
            spool = self._conn.open_spool(
                str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID), str(ts)
            )
            pending = cast(BytesIO, msg.data_set).getbuffer()
            spool.write(pending)
            del pending
            msg.data_set = BytesIO()
            msg._data_set_file = cast(Any, spool)
            msg._data_set_path = spool.path
        if not done:
            return None
        if msg._data_set_file is not None:
            cast(_Spool, msg._data_set_file).complete()
        d_primitive = msg.message_to_primitive()
        self.message = None
        return cast(int, msg.context_id), d_primitive


class _Association(Association):
    """An acceptor association using the fast DUL, socket and spooling DIMSE provider."""

    def __init__(self, ae: AE, conn: _Connection) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.conn = conn
        self.dul = _FastDUL(self)
        self.dimse = _SpoolingDIMSE(self)
        # The timers live on the DUL: set them again on the replacement. ARTIM (the request's wait,
        # and the wait for the peer to close) is `pdu_timeout`; the idle timeout is the DUL's own.
        self.acse_timeout = ae.acse_timeout
        self.network_timeout = None

    def accept_on(self, sock: socket.socket) -> None:
        """Set this association up on its connection's socket (TLS handshake done) as pynetdicom's
        acceptor would: its thread's name, `_FastSocket`, the acceptor's maximum PDU, AE title,
        address, implementation and contexts, the requestor's address."""
        conn = self.conn
        cfg = conn.receiver.config
        ae = conn.receiver.ae
        self.name = f"radgate-assoc-{conn.conn_id}"
        self.set_socket(_FastSocket(self, sock, cfg.pdu_timeout))
        self.acceptor.maximum_length = cfg.max_pdu
        self.acceptor.ae_title = cfg.ae_title
        self.acceptor.address_info = AddressInformation.from_tuple(sock.getsockname())
        self.acceptor.implementation_class_uid = ae.implementation_class_uid
        self.acceptor.implementation_version_name = ae.implementation_version_name
        self.acceptor.supported_contexts = conn.receiver.contexts  # read-only; see _on_requested
        self.requestor.address_info = AddressInformation.from_tuple(conn.address)

    def tidy_up(self) -> None:
        """Once the association ended (or failed to start): remove the partial file of a dataset it
        ended in the middle of, stop the DUL, close its wake pipe."""
        cast(_SpoolingDIMSE, self.dimse).discard_partial()  # aborted mid-dataset: the partial file goes
        dul = cast(_FastDUL, self.dul)
        if dul.is_alive():
            dul.kill_dul()
            dul.join(timeout=5)
        dul.close_wake_pipe()

    def _bind_defaults(self) -> None:
        """Only the intervention defaults: pynetdicom's standard handlers log every PDU at debug level,
        formatting it whether or not debug is on."""
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))


def reject(assoc: Association, rsd: tuple[int, int, int]) -> None:
    """From an EVT_REQUESTED handler: answer the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ of (result,
    source, reason) `rsd` and end the association."""
    assoc.acse.send_reject(*rsd)
    assoc.kill()  # waits for the peer to close after the A-ASSOCIATE-RJ, as pynetdicom does


def take_dataset_file(request: C_STORE) -> _Spool | None:
    """The spool a C-STORE request's dataset streamed into (None: the request has no dataset), now
    the caller's: pynetdicom no longer unlinks it."""
    spool = cast(_Spool | None, request._dataset_file)
    request._dataset_file = None  # the file is ours (or the handler's) now: pynetdicom must not unlink it
    return spool
