"""One receiving process's side of the transport: `_Receiver` runs each accepted connection on
its own thread (`_Connection`): TLS handshake, association negotiation (refusals logged with
the limit or check that refused), and each received dataset checked and handed to the handler."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.net import _pynetdicom
from dicom_io.net.incoming import _IncomingFiles, _Spool
from dicom_io.net.inspection import DEFAULT_LIMITS, DatasetLimits, InstanceRefused, inspect_dataset
from dicom_io.net.interface import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    TRANSFER_SYNTAXES,
    Peer,
    ReceivedInstance,
    Refusal,
    RefusalReason,
    TlsFiles,
)
from dicom_io.net.wire import file_meta_header

LOGGER = logging.getLogger("dicom_io.net")  # the whole transport logs under one name


class _Callbacks(Protocol):
    """What a receiver calls: the handlers, and `closed` for the SCP's count of associations."""

    def allow(self, peer: Peer) -> bool: ...
    def store(self, instance: ReceivedInstance) -> int: ...
    def released(self, peer: Peer) -> None: ...
    def refused(self, refusal: Refusal) -> None: ...
    def established(self, conn_id: int) -> None: ...
    def closed(self, conn_id: int) -> None: ...


@dataclass(frozen=True)
class _ReceiverConfig:
    """Everything a receiving process needs; plain data so it can be handed to a worker."""

    ae_title: str
    incoming_dir: Path
    max_pdu: int
    require_called_ae_title: bool
    pdu_timeout: float  # docs/design.md, "Ingest and transport"
    idle_timeout: float
    dimse_timeout: float
    file_mode: int
    tls: TlsFiles | None = None
    limits: DatasetLimits = DEFAULT_LIMITS


class _Connection:
    """State of one accepted TCP connection and the association on it."""

    def __init__(
        self,
        receiver: _Receiver,
        sock: socket.socket,
        address: tuple[str, int],
        conn_id: int,
        refusal: tuple[str, str] | None,
    ) -> None:
        self.receiver = receiver
        self.sock = sock
        self.address = address
        self.conn_id = conn_id
        # the limit its A-ASSOCIATE-RQ is rejected for (local limit exceeded): its words, its code
        self.refusal = refusal
        self.peer: Peer | None = None
        self.established = False
        self.dropped = False  # by `drop`
        self.assoc: _pynetdicom._Association | None = None

    def open_spool(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> _Spool:
        """Take an incoming file for a C-STORE-RQ and write its preamble and file meta."""
        header = file_meta_header(
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax,
            self.peer.ae_title if self.peer is not None else "",
        )
        return _Spool(self.receiver.incoming, header, self.receiver.config.limits.max_dataset_bytes)

    def describe(self) -> str:
        """Who this connection is, for log lines: address, port and calling AE title once known."""
        ae = f"calling AE {self.peer.ae_title}" if self.peer is not None else "no A-ASSOCIATE-RQ yet"
        return f"connection {self.conn_id} from {self.address[0]}:{self.address[1]} ({ae})"

    def drop(self) -> None:
        """End a connection still negotiating (its reads see the close); an association is kept."""
        if not self.established:
            self.dropped = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Run the association to its end, then tidy up whatever it left."""
        cfg = self.receiver.config
        try:
            sock = self.sock
            tls = self.receiver.ssl_context
            if tls is not None:
                sock.settimeout(cfg.pdu_timeout)  # the whole handshake (CPython's deadline)
                sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self.sock = sock  # before the handshake, so that `drop` can end it
                if self.dropped:  # `drop` came while wrap_socket had detached the plain socket
                    return
                sock.do_handshake()
            assoc = _pynetdicom._Association(self.receiver.ae, self)
            self.assoc = assoc
            assoc.accept_on(sock)
            assoc.bind(evt.EVT_REQUESTED, self._on_requested)
            assoc.bind(evt.EVT_ACCEPTED, self._on_accepted)
            assoc.bind(evt.EVT_C_STORE, self._on_c_store)
            assoc.start()
            assoc.join()
        except TimeoutError:
            LOGGER.warning(
                "%s: no TLS handshake within %g s (dicom.pdu_timeout_s); closing",
                self.describe(),
                cfg.pdu_timeout,
            )
        except (OSError, ssl.SSLError) as exc:
            if not self.dropped:  # else the acceptor said why
                LOGGER.warning(
                    "connection %d from %s closed before an association: %s",
                    self.conn_id,
                    self.address[0],
                    exc,
                )
        except Exception:
            LOGGER.exception("connection %d from %s failed", self.conn_id, self.address[0])
        finally:
            self._finish()

    def _finish(self) -> None:
        assoc = self.assoc
        if assoc is not None:
            assoc.tidy_up()
        with contextlib.suppress(OSError):
            self.sock.close()
        callbacks = self.receiver.callbacks
        if self.established and self.peer is not None:
            try:
                callbacks.released(replace(self.peer, released=assoc is not None and assoc.is_released))
            except Exception:
                LOGGER.exception("release handler failed for association %s", self.peer.association_id)
        callbacks.closed(self.conn_id)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        request = cast(A_ASSOCIATE, rq.primitive)
        assoc.acceptor.supported_contexts = _preferring_requested(
            self.receiver.contexts, request.presentation_context_definition_list, self.receiver.built_contexts
        )
        self.peer = Peer(
            ae_title=str(request.calling_ae_title).strip(),
            address=str(rq.address),
            port=int(rq.port),
            association_id=f"{self.receiver.tag}-{self.conn_id}",
        )
        if self.refusal is not None:
            LOGGER.warning(
                "rejecting association %s from %s (%s): %s reached",
                self.peer.association_id,
                self.peer.ae_title,
                self.peer.address,
                self.refusal[0],
            )
            self._reject(assoc, (0x02, 0x03, 0x02), self.refusal[1])
            return
        cfg = self.receiver.config
        called = str(request.called_ae_title).strip()
        if cfg.require_called_ae_title and called != cfg.ae_title:
            LOGGER.warning(
                "rejecting association %s from %s (%s): called AE title %r, this node is %r",
                *(self.peer.association_id, self.peer.ae_title, self.peer.address, called, cfg.ae_title),
            )
            self._reject(assoc, (0x01, 0x01, 0x07), RefusalReason.CALLED_AE_TITLE)
            return
        try:
            allowed = self.receiver.callbacks.allow(self.peer)
        except Exception:
            LOGGER.exception("peer filter failed; rejecting %s", self.peer.association_id)
            allowed = False
        if not allowed:
            LOGGER.warning(
                "rejecting association %s from %s (%s): peer filter",
                self.peer.association_id,
                self.peer.ae_title,
                self.peer.address,
            )
            self._reject(assoc, (0x01, 0x01, 0x03), RefusalReason.PEER_NOT_ALLOWED)

    def _reject(self, assoc: Association, rsd: tuple[int, int, int], reason: str) -> None:
        _pynetdicom.reject(assoc, rsd)
        self.receiver.callbacks.refused(Refusal(reason, association=True))

    def _on_accepted(self, event: evt.Event) -> None:
        self.established = True
        self.receiver.callbacks.established(self.conn_id)

    def _on_c_store(self, event: evt.Event) -> int:
        """pynetdicom's path (a command split over fragments): the same checks and handler."""
        req = cast(C_STORE, event.request)
        spool = _pynetdicom.take_dataset_file(req)
        if spool is None:  # C-STORE without a dataset
            return STATUS_CANNOT_UNDERSTAND
        ts = str(event.context.transfer_syntax)
        return self.store(
            spool, ts, str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or "")
        )

    def store(self, spool: _Spool, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str) -> int:
        """Check a received dataset and hand it to the handler; the status to answer with."""
        peer = cast(Peer, self.peer)
        if spool.error is not None:
            LOGGER.error(
                "cannot write received sop_instance=%s from %s (association %s), status 0x%04X: %s",
                sop_instance_uid,
                peer.ae_title,
                peer.association_id,
                STATUS_OUT_OF_RESOURCES,
                spool.error,
            )
            spool.discard()
            return self._refused(RefusalReason.WRITE_FAILED, STATUS_OUT_OF_RESOURCES)
        try:
            if spool.refused is not None:
                raise spool.refused
            ident = inspect_dataset(
                spool.path,
                spool.dataset_offset,
                transfer_syntax,
                spool.head,
                spool.size,
                self.receiver.config.limits,
            )
            sop_class = _same_uid(ident.sop_class_uid, sop_class_uid, "SOPClassUID")
            sop_instance = _same_uid(ident.sop_instance_uid, sop_instance_uid, "SOPInstanceUID")
        except InstanceRefused as exc:
            LOGGER.warning(
                "refused C-STORE sop_instance=%s from %s (%s, association %s), status 0x%04X: %s",
                sop_instance_uid,
                peer.ae_title,
                peer.address,
                peer.association_id,
                exc.status,
                exc.reason,
            )
            spool.discard()
            return self._refused(exc.code, exc.status)
        except OSError as exc:
            LOGGER.error("cannot read back received sop_instance=%s: %s", sop_instance_uid, exc)
            spool.discard()
            return self._refused(RefusalReason.WRITE_FAILED, STATUS_OUT_OF_RESOURCES)
        instance = ReceivedInstance(
            path=spool.path,
            study_uid=ident.study_uid,
            series_uid=ident.series_uid,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            transfer_syntax=transfer_syntax,
            peer=peer,
            size=spool.size,
            durable_name=True,
        )
        return self.receiver.callbacks.store(instance)

    def _refused(self, reason: str, status: int) -> int:
        """Tell the callbacks of a refused C-STORE; the status to answer with."""
        self.receiver.callbacks.refused(Refusal(reason, association=False, status=status))
        return status


_ContextKey = tuple[str, tuple[str, ...]]  # abstract syntax, transfer syntaxes in our preferred order
_CONTEXT_CACHE_LIMIT = 4096


def _preferring_requested(
    supported: list[PresentationContext],
    requested: list[PresentationContext],
    built: dict[_ContextKey, PresentationContext],
) -> list[PresentationContext]:
    """Our contexts, with transfer syntaxes reordered so negotiation picks the sender's first choice.

    pynetdicom picks by the acceptor's order; a sender lists the syntax its data is in first, and
    taking it spares a transcode (DCMTK cannot even transcode JPEG 2000). A syntax's rank is its
    best position in any requested context of that SOP class; ties keep our order. Only requested
    SOP classes get reordered contexts, and each is built once per process and kept in `built`
    (negotiation only reads them; pynetdicom validates every UID of a context it builds).
    """
    rank: dict[str, dict[str, int]] = {}
    for cx in requested:
        ranks = rank.setdefault(str(cx.abstract_syntax), {})
        for pos, ts in enumerate(cx.transfer_syntax):
            ranks[str(ts)] = min(pos, ranks.get(str(ts), pos))
    result = []
    for cx in supported:
        wanted = rank.get(str(cx.abstract_syntax))
        if wanted:
            ours = [str(ts) for ts in cx.transfer_syntax]
            preferred = sorted(ours, key=lambda ts: (wanted.get(ts, len(ours)), ours.index(ts)))
            key = (str(cx.abstract_syntax), tuple(preferred))
            known = built.get(key)
            if known is None:
                known = build_context(key[0], preferred)
                if len(built) < _CONTEXT_CACHE_LIMIT:
                    built[key] = known
            cx = known
        result.append(cx)
    return result


def _same_uid(in_dataset: str, requested: str, name: str) -> str:
    """The request's UID, refused with 0xA900 when the dataset holds a different one."""
    requested = requested.strip()
    if in_dataset and in_dataset != requested:
        raise InstanceRefused(STATUS_DATASET_MISMATCH, f"{name} differs from the C-STORE request")
    return requested


class _Receiver:
    """Runs associations on accepted sockets: in the SCP's own process or in a worker process."""

    def __init__(
        self, config: _ReceiverConfig, callbacks: _Callbacks, ssl_context: ssl.SSLContext | None, tag: str
    ) -> None:
        self.config = config
        self.callbacks = callbacks
        self.ssl_context = ssl_context
        self.tag = tag  # makes incoming names and association ids unique across processes
        self.incoming = _IncomingFiles(config.incoming_dir, tag, config.file_mode)
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu
        # the listener's caps (`refusal`) are the ones, with their log line: pynetdicom's own (10 by
        # default) refused associations past it without a word
        self.ae.maximum_associations = 2**31 - 1
        self.ae.acse_timeout = config.pdu_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.contexts: list[PresentationContext] = [build_context(Verification)] + [
            build_context(cast(str, cx.abstract_syntax), list(TRANSFER_SYNTAXES))
            for cx in AllStoragePresentationContexts
        ]
        self.built_contexts: dict[_ContextKey, PresentationContext] = {}  # see _preferring_requested
        self._lock = threading.Lock()
        self._active: dict[int, tuple[_Connection, threading.Thread]] = {}

    def handle(
        self, sock: socket.socket, address: tuple[str, int], conn_id: int, refusal: tuple[str, str] | None
    ) -> None:
        """Serve one accepted connection on its own thread; `refusal`: the limit (words, code) its
        association is to be rejected for."""
        conn = _Connection(self, sock, address, conn_id, refusal)
        thread = threading.Thread(target=self._run, args=(conn,), name=f"radgate-conn-{conn_id}", daemon=True)
        with self._lock:
            self._active[conn_id] = (conn, thread)
        thread.start()

    def _run(self, conn: _Connection) -> None:
        try:
            conn.serve()
        finally:
            with self._lock:
                self._active.pop(conn.conn_id, None)

    def drop(self, conn_id: int) -> None:
        """End a connection if it is still negotiating (`_Connection.drop`)."""
        with self._lock:
            running = self._active.get(conn_id)
        if running is not None:
            running[0].drop()

    def close(self, timeout: float) -> None:
        """Abort every association, wait (bounded) for their threads, remove the unused incoming files."""
        with self._lock:
            running = list(self._active.values())
        for conn, _ in running:
            if conn.assoc is not None and conn.assoc.is_alive():
                with contextlib.suppress(Exception):
                    conn.assoc.abort()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        for _, thread in running:
            thread.join(timeout=timeout)
        self.incoming.close()
