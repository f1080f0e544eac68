"""The storage SCP: the listener and acceptor, the handlers' guards, and the receiving processes
(`workers`) fed by the acceptor, whose log records are forwarded to the parent."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, cast

from pydicom import config as pydicom_config

from dicom_io.net.connection import _Receiver, _ReceiverConfig
from dicom_io.net.incoming import INCOMING_PREFIX
from dicom_io.net.inspection import DEFAULT_LIMITS, DatasetLimits
from dicom_io.net.interface import (
    STATUS_OUT_OF_RESOURCES,
    InstanceHandler,
    Peer,
    PeerFilter,
    ReceivedInstance,
    Refusal,
    RefusalHandler,
    RefusalReason,
    ReleaseHandler,
    TlsFiles,
)

LOGGER = logging.getLogger("dicom_io.net")  # the whole transport logs under one name


@dataclass(frozen=True)
class _Handlers:
    """The SCP's handlers with the guards every caller needs; plain data, so a worker gets a copy."""

    handler: InstanceHandler
    on_release: ReleaseHandler | None
    peer_filter: PeerFilter | None
    prepare: Callable[[], None] | None = None
    on_refused: RefusalHandler | None = None

    def prepare_process(self) -> None:
        """Run `prepare` where the handlers will run; a failure is logged, and the first instance
        then pays for the set-up, as it would without `prepare`."""
        if self.prepare is None:
            return
        try:
            self.prepare()
        except Exception:
            LOGGER.exception("preparing the instance handler failed; it will set up on its first instance")

    def allow(self, peer: Peer) -> bool:
        """Peer filter; no filter accepts everyone."""
        return self.peer_filter is None or bool(self.peer_filter(peer))

    def store(self, instance: ReceivedInstance) -> int:
        """Run the instance handler; an exception answers 0xA700 and removes the left-over file."""
        try:
            return int(self.handler(instance))
        except Exception:
            LOGGER.exception(
                "instance handler failed for sop_instance=%s (association %s)",
                instance.sop_instance_uid,
                instance.peer.association_id,
            )
            with contextlib.suppress(OSError):
                instance.path.unlink()
            return STATUS_OUT_OF_RESOURCES

    def released(self, peer: Peer) -> None:
        if self.on_release is not None:
            self.on_release(peer)

    def refused(self, refusal: Refusal) -> None:
        """Tell `on_refused` of a refusal; its failure is logged, never raised into the transport."""
        if self.on_refused is None:
            return
        try:
            self.on_refused(refusal)
        except Exception:
            LOGGER.exception("refusal handler failed (%s)", refusal.reason)


class _WorkerCallbacks:
    """A receiving process's callbacks: its own copy of the handlers; `closed` goes to the parent."""

    def __init__(self, handlers: _Handlers, notify: _Notifier) -> None:
        self.handlers = handlers
        self.notify = notify
        self.allow = handlers.allow
        self.store = handlers.store
        self.released = handlers.released
        self.refused = handlers.refused

    def established(self, conn_id: int) -> None:
        self.notify("established", conn_id)

    def closed(self, conn_id: int) -> None:
        self.notify("closed", conn_id)


class _Notifier:
    """A worker's one-way messages to the parent (ready, established, closed, log records), from any
    thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __call__(self, kind: str, payload: Any) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._conn.send((kind, payload))


class _ForwardLogs(logging.Handler):
    """Sends a worker's log records to the parent, which logs them under the same logger name:
    the message, and the traceback as text (``exc_text``) when the record has one."""

    def __init__(self, notify: _Notifier) -> None:
        super().__init__(logging.INFO)
        self._notify = notify
        self._traceback = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            traceback = record.exc_text
            if record.exc_info and not traceback:
                traceback = self._traceback.formatException(record.exc_info)
            self._notify("log", (record.name, record.levelno, record.getMessage(), traceback))


def _worker_main(
    config: _ReceiverConfig, handlers: _Handlers, fd_conn: Connection, notify_conn: Connection, index: int
) -> None:
    """Entry point of a receiving process: take sockets from the parent until told to stop.

    SIGINT and SIGTERM are ignored from here on: the parent stops its receiving processes, and a
    signal sent to the whole process group (Ctrl-C in a terminal, a service manager stopping the
    group) must not end them first, or the parent would take that for a crash and start others
    while it stops. A parent that dies closes the pipe, which ends this process too.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    notify = _Notifier(notify_conn)
    # pydicom's value validation (a regex per UID pynetdicom builds from a proposal) only warns; this
    # process relies on its own checks (pynetdicom's at negotiation, `inspect_dataset`, `_same_uid`,
    # the spool's `check_uid`).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(_ForwardLogs(notify))
    ssl_context = config.tls.context() if config.tls is not None else None
    callbacks = _WorkerCallbacks(handlers, notify)
    receiver = _Receiver(config, callbacks, ssl_context, tag=f"w{index}.{os.getpid()}")
    handlers.prepare_process()
    gc.freeze()  # start-up objects live until exit: full collections need not scan them
    notify("ready", None)
    while True:
        try:
            item = fd_conn.recv()
        except (EOFError, OSError):
            break
        if item is None:
            break
        if item[0] == "drop":
            receiver.drop(item[1])
            continue
        _, conn_id, address, refusal = item
        fd = recv_handle(fd_conn)
        receiver.handle(socket.socket(fileno=fd), address, conn_id, refusal)
    receiver.close(timeout=5)


def _log_forwarded(worker: _Worker, name: str, level: int, text: str, traceback: str | None) -> None:
    """Log a record a receiving process forwarded (see `_ForwardLogs`), its traceback included."""
    logger = logging.getLogger(name)
    if logger.isEnabledFor(level):
        record = logger.makeRecord(name, level, __file__, 0, "[pid %s] %s", (worker.process.pid, text), None)
        record.exc_text = traceback  # formatters print it as the record's traceback
        logger.handle(record)


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    fd_conn: Connection
    notify_conn: Connection
    index: int
    active: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Accepted:
    """The acceptor's record of a connection, from `accept` to `closed`."""

    address: str
    slot: bool  # counts against max_associations and max_associations_per_peer
    pending: bool = True  # no association negotiated yet (and not dropped)
    worker: _Worker | None = None


# --- the SCP -------------------------------------------------------------------------------------


class StorageSCP:
    """DICOM Storage SCP (C-ECHO, C-STORE of every storage SOP class) feeding an `InstanceHandler`.

    `start()` serves in background threads and returns once the port is listening; `stop()` ends
    it; `serve_forever()` blocks until `stop()` (from another thread or a signal handler). The
    handlers run on the association's thread, concurrently for concurrent associations, so they must
    be thread-safe. Peers are bounded as docs/design.md ("Ingest and transport") says:
    `max_pdu` and `pdu_timeout` per PDU, `idle_timeout` per association, `max_associations` and
    `max_associations_per_peer` (further requests are rejected), `max_pending` connections not yet
    associated (past it the oldest is dropped). With `workers` > 1, that many processes receive
    (the machine's cores run associations in parallel) and each runs its own copy of the handlers,
    where the instance was received: no hop back to this process before the acknowledgement. The
    handlers must then be picklable and keep no state that this process needs (the node's
    `Receiver` opens its database per process). `prepare`, if given, runs once in each receiving
    process before it takes an association, so that one-time set-up (opening a database, compiling
    statements) is not paid for by the first instance a sender waits on. `limits` bound what
    one dataset may be (`DatasetLimits`): past one, the C-STORE is answered 0xC000 with one log
    line and the association goes on. `on_refused`, if given, is told of each refused C-STORE and
    association (`Refusal`: a `RefusalReason` code), in the process that refused it, on the
    association's thread (so it must be quick and picklable too). A received file gets
    ``file_mode`` once its dataset is whole (owner-readable; until then it is write-only, see
    `received_completely`); ValueError if ``file_mode`` is not a permission mode readable by its
    owner.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        incoming_dir: Path,
        handler: InstanceHandler,
        on_release: ReleaseHandler | None = None,
        peer_filter: PeerFilter | None = None,
        *,
        max_pdu: int = 262144,
        max_associations: int = 16,
        max_associations_per_peer: int = 8,
        max_pending: int = 8,
        pdu_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        tls: ssl.SSLContext | TlsFiles | None = None,
        require_called_ae_title: bool = False,
        workers: int = 1,
        dimse_timeout: float = 60.0,
        prepare: Callable[[], None] | None = None,
        limits: DatasetLimits = DEFAULT_LIMITS,
        file_mode: int = 0o600,
        on_refused: RefusalHandler | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not file_mode & 0o400 or file_mode & ~0o777:
            raise ValueError(f"file_mode {file_mode:o}: a received file must be readable by its owner")
        if workers > 1 and isinstance(tls, ssl.SSLContext):
            raise ValueError("with workers > 1 give TLS as TlsFiles: an SSLContext cannot cross processes")
        self.host = host
        self.port = port
        self.handlers = _Handlers(handler, on_release, peer_filter, prepare, on_refused)
        self.max_associations = max_associations
        self.max_associations_per_peer = max_associations_per_peer
        self.max_pending = max_pending
        self.workers = workers
        incoming_dir = Path(incoming_dir)
        incoming_dir.mkdir(parents=True, exist_ok=True)
        self.config = _ReceiverConfig(
            ae_title=ae_title,
            incoming_dir=incoming_dir,
            max_pdu=max_pdu,
            require_called_ae_title=require_called_ae_title,
            pdu_timeout=pdu_timeout,
            idle_timeout=idle_timeout,
            dimse_timeout=dimse_timeout,
            file_mode=file_mode,
            tls=tls if isinstance(tls, TlsFiles) else None,
            limits=limits,
        )
        self._ssl_context = tls.context() if isinstance(tls, TlsFiles) else tls
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepted: dict[int, _Accepted] = {}  # by connection id, in the order accepted
        self._conn_ids = itertools.count(1)
        self._receiver: _Receiver | None = None
        self._workers: list[_Worker] = []

    # -- lifecycle --

    def start(self) -> None:
        """Listen and serve in background threads (and worker processes); returns when ready.

        Incoming files a previous run left in `incoming_dir` are removed first: a handler that needs
        them (`plugin.ingest.spool.Spool.recover`) has taken what it needs before.
        """
        stale = list(self.config.incoming_dir.glob(f"{INCOMING_PREFIX}*"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            LOGGER.warning(
                "removed %d unacknowledged partial files from %s", len(stale), self.config.incoming_dir
            )
        listener = socket.create_server((self.host, self.port), backlog=128, reuse_port=False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        if self.workers == 1:
            self._receiver = _Receiver(self.config, self, self._ssl_context, tag=f"p{os.getpid()}")
            self.handlers.prepare_process()
        else:
            self._start_workers()
        self._spawn(self._accept_loop, "radgate-accept")
        LOGGER.info(
            "storage SCP %s listening on %s:%d (%d receiving process%s, max PDU %d%s)",
            self.config.ae_title,
            self.host,
            self.port,
            self.workers,
            "es" if self.workers > 1 else "",
            self.config.max_pdu,
            ", TLS" if self._ssl_context else "",
        )

    def serve_forever(self) -> None:
        """Blocking form for the node's main thread."""
        if self._listener is None:
            self.start()
        self._stopped.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort running associations, end workers; safe to call twice."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stop_w.send(b"\0")
        for t in self._threads:
            if t.name == "radgate-accept":
                t.join(timeout)
        if self._listener is not None:
            self._listener.close()
        if self._receiver is not None:
            self._receiver.close(timeout)
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(OSError), w.send_lock:
                w.fd_conn.send(None)
        for w in workers:
            w.process.join(timeout)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout)
            w.fd_conn.close()
            w.notify_conn.close()
        for t in self._threads:
            t.join(timeout)
        self._stop_r.close()
        self._stop_w.close()
        self._stopped.set()

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def active_associations(self) -> int:
        """Connections being served now (for health checks)."""
        return len(self._accepted)

    @property
    def receiving_processes(self) -> list[int]:
        """Process ids of the receiving processes now taking associations (empty with `workers` 1)."""
        with self._lock:
            return [cast(int, w.process.pid) for w in self._workers]

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # -- accepting --

    def _accept_loop(self) -> None:
        listener = cast(socket.socket, self._listener)
        while not self._stopping.is_set():
            ready = select.select([listener, self._stop_r], [], [])[0]
            if self._stop_r in ready:
                return
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EINTR):
                    LOGGER.error("accept failed: %s", exc)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn_id = next(self._conn_ids)
            refusal = self._admit(conn_id, address[0])
            try:
                self._dispatch(sock, (address[0], address[1]), conn_id, refusal)
            except Exception:
                LOGGER.exception("cannot hand over connection %d", conn_id)
                sock.close()
                self.closed(conn_id)

    def _admit(self, conn_id: int, address: str) -> tuple[str, str] | None:
        """Record a new connection; drop the oldest one still negotiating when `max_pending` of
        them are; the limit its request is to be rejected for (words, `RefusalReason` code), or None."""
        with self._lock:
            pending = [cid for cid, conn in self._accepted.items() if conn.pending]
            dropped = pending[0] if len(pending) >= self.max_pending else None
            if dropped is not None:
                oldest = self._accepted[dropped]
                oldest.pending = oldest.slot = False
            slots = [conn.address for conn in self._accepted.values() if conn.slot]
            refusal: tuple[str, str] | None = None
            if len(slots) >= self.max_associations:
                refusal = (
                    f"dicom.max_associations ({self.max_associations})",
                    RefusalReason.MAX_ASSOCIATIONS,
                )
            elif slots.count(address) >= self.max_associations_per_peer:
                refusal = (
                    f"dicom.max_associations_per_peer ({self.max_associations_per_peer})",
                    RefusalReason.MAX_ASSOCIATIONS_PER_PEER,
                )
            self._accepted[conn_id] = _Accepted(address, slot=refusal is None)
        if dropped is not None:
            LOGGER.warning(
                "dropping connection %d from %s: not associated yet, and dicom.max_pending (%d) "
                "connections are negotiating",
                dropped,
                oldest.address,
                self.max_pending,
            )
            self._drop(dropped, oldest.worker)
        return refusal

    def _drop(self, conn_id: int, worker: _Worker | None) -> None:
        if self._receiver is not None:
            self._receiver.drop(conn_id)
        elif worker is not None:
            with contextlib.suppress(OSError), worker.send_lock:
                worker.fd_conn.send(("drop", conn_id))

    def _dispatch(
        self, sock: socket.socket, address: tuple[str, int], conn_id: int, refusal: tuple[str, str] | None
    ) -> None:
        if self._receiver is not None:
            self._receiver.handle(sock, address, conn_id, refusal)
            return
        with self._lock:
            worker = min(self._workers, key=lambda w: w.active)
            worker.active += 1
            accepted = self._accepted.get(conn_id)
            if accepted is not None:
                accepted.worker = worker
        with worker.send_lock:
            worker.fd_conn.send(("serve", conn_id, address, refusal))
            send_handle(worker.fd_conn, sock.fileno(), cast(int, worker.process.pid))
        sock.close()

    # -- callbacks of the in-process receiver (workers call their own copy of the handlers) --

    def allow(self, peer: Peer) -> bool:
        return self.handlers.allow(peer)

    def store(self, instance: ReceivedInstance) -> int:
        return self.handlers.store(instance)

    def released(self, peer: Peer) -> None:
        self.handlers.released(peer)

    def refused(self, refusal: Refusal) -> None:
        self.handlers.refused(refusal)

    def established(self, conn_id: int) -> None:
        with self._lock:
            accepted = self._accepted.get(conn_id)
            if accepted is not None:
                accepted.pending = False

    def closed(self, conn_id: int) -> None:
        with self._lock:
            accepted = self._accepted.pop(conn_id, None)
            if accepted is not None and accepted.worker is not None:
                accepted.worker.active -= 1

    # -- worker processes --

    def _start_workers(self) -> None:
        for index in range(self.workers):
            try:
                worker = self._start_worker(index)
            except Exception:
                self.stop()
                raise
            with self._lock:
                self._workers.append(worker)
        for worker in list(self._workers):
            if not worker.ready.wait(60):
                self.stop()
                raise RuntimeError("a receiving process did not start")

    def _start_worker(self, index: int) -> _Worker:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        fd_parent, fd_child = ctx.Pipe(duplex=True)
        notify_parent, notify_child = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker_main,
            args=(self.config, self.handlers, fd_child, notify_child, index),
            name=f"radgate-receiver-{index}",
            daemon=True,
        )
        try:
            process.start()
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"with workers > 1 each receiving process runs the handlers, so they must pickle: {exc}"
            ) from exc
        finally:
            fd_child.close()
            notify_child.close()
        worker = _Worker(process, fd_parent, notify_parent, index)
        self._spawn(self._serve_worker, f"radgate-worker-{index}", worker)
        return worker

    def _worker_ended(self, worker: _Worker) -> None:
        """A receiving process is gone: forget its associations and, unless stopping, start another."""
        if self._stopping.is_set():
            return
        worker.process.join(5)
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            lost = [conn_id for conn_id, conn in self._accepted.items() if conn.worker is worker]
        for conn_id in lost:
            self.closed(conn_id)
        LOGGER.error(
            "receiving process %d (pid %s) ended, exit code %s (%d association(s) lost); starting another",
            *(worker.index, worker.process.pid, worker.process.exitcode, len(lost)),
        )
        worker.fd_conn.close()
        worker.notify_conn.close()
        try:
            replacement = self._start_worker(worker.index)
        except Exception:
            LOGGER.exception("cannot start a receiving process in place of pid %s", worker.process.pid)
            return
        if not replacement.ready.wait(60):
            LOGGER.error("the receiving process started in place of pid %s is not ready", worker.process.pid)
            return
        with self._lock:
            if not self._stopping.is_set():
                self._workers.append(replacement)

    def _serve_worker(self, worker: _Worker) -> None:
        """Take one worker's notifications (ready, closed connections, log records) until it ends."""
        while True:
            try:
                kind, payload = worker.notify_conn.recv()
            except (EOFError, OSError):
                self._worker_ended(worker)
                return
            if kind == "closed":
                self.closed(payload)
            elif kind == "established":
                self.established(payload)
            elif kind == "log":
                _log_forwarded(worker, *payload)
            elif kind == "ready":
                worker.ready.set()
