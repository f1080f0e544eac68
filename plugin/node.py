"""``radgate serve``: the node — store, spool recovery, DICOM listener, completion loop, executor.

A listening node also works the fetch requests (`plugin.fetch.FetchWorker`): it pulls studies from
the configured sources, which a C-MOVE sends to its own listener.

``radgate worker`` is the same node without the DICOM listener (studies arrive some other way,
e.g. through the Orthanc plugin, into the same data dir and store); ``serve --no-executor`` is
the listener without the executor, when GPU workers elsewhere run the jobs. Only a node that
listens recovers the spool at start: another receiver (the Orthanc plugin) may be writing it.

One node per data dir: a listening node takes the data dir's lock (`plugin.ingest.datadir.SERVE`) before
anything else and holds it until it stops; a second one finds it held, names the holder and stops
without having touched the data dir. ``radgate worker`` takes no lock: several workers (and the
node's own executor) share a data dir by design, each job leased to one of them. Both set the
process umask first (`Config.file_modes`), so what they and their children create is private.

With ``web.enabled`` a listening node also serves the web console (`plugin.web.app.WebServer`, a
thread of this process): it starts after the store is migrated and before the DICOM listener, so
a console port that is taken stops the start with a clear message before any peer is accepted,
and it is stopped first. A worker serves no console; ``radgate web`` serves it alone.

Start order matters for durability: the schema is migrated and the spool recovered (leftover
temporary files removed, unrecorded files recorded or quarantined) before the listener accepts
anything, so recovery never races a live transfer. The routing rules are checked against the
installed pipelines before anything starts, so a rule naming an unknown pipeline stops the node
instead of failing every job later.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from ai_models.registry import available_pipelines
from dicom_io.net import StorageSCP, TlsFiles
from plugin.config import Config, ConfigError
from plugin.dispatch.outbox import Dispatcher
from plugin.fetch import FetchWorker, Routing, completion_hook
from plugin.ingest import counters
from plugin.ingest.datadir import SERVE, DataDirLock, apply_file_modes, named_node
from plugin.ingest.receive import PeerFilter, Receiver, dataset_limits, make_spool
from plugin.jobs.completion import CompletionMonitor
from plugin.jobs.execute import JobRunner
from plugin.jobs.executor import make_executor
from plugin.logs import setup_logging
from plugin.route.archive import FetchArchive
from plugin.route.pipelines import series_lookup
from plugin.route.requires import RequirementsWorker
from plugin.route.rules import validate_rules
from plugin.store.engine import SchemaTooNew, Store
from plugin.store.models import utcnow
from plugin.web.audit import config_loaded

if TYPE_CHECKING:
    from plugin.web.app import WebServer

log = logging.getLogger(__name__)


class Node:
    """The running parts of one node; ``start`` brings them up in order, ``stop`` takes them down."""

    def __init__(self, config: Config, listen: bool = True, execute: bool = True) -> None:
        self.config = config
        self.lock = DataDirLock(config.data_dir, config.file_modes, SERVE) if listen else None
        self.incoming_lock = (
            DataDirLock(config.incoming_dir.parent, config.file_modes, named_node(config.cluster.node_name))
            if listen and config.cluster.shared_dir is not None
            else None
        )
        # ConfigError: unknown pipeline
        self.rules = validate_rules(config, available_pipelines(), series_lookup=series_lookup(config))
        for note in self.rules.notes:
            log.info("routing: %s", note)
        self.store = Store(config.db_url)
        self.receiver = Receiver(config)
        routing = Routing(self.rules, config.spool_dir, tuple(config.destinations))
        self.dispatcher = Dispatcher(self.store, config)
        # a job's deliveries wake the dispatcher, a completed study the job slots: what this node
        # queues it starts at once; the polls find what other nodes sharing the store queue
        self.jobs = (
            JobRunner(self.store, config, make_executor(config), delivered=self.dispatcher.wake)
            if execute
            else None
        )
        self.completion = CompletionMonitor(
            self.store,
            config.completion,
            on_complete=completion_hook(routing),
            completed=self.jobs.wake if self.jobs is not None else lambda: None,
        )
        # pulls studies from the configured sources; a C-MOVE sends them to this node's listener
        self.fetcher = FetchWorker(self.store, config, self.receiver, routing) if listen else None
        # moves the jobs on whose rule requires a series or a prior (plugin.route.requires); on a
        # worker too (beside the Orthanc plugin), so they never wait past their time
        self.requirements = (
            RequirementsWorker(self.store, self.rules, FetchArchive(config, self.store), config.spool_dir)
            if any(rule.requires for rule in self.rules.rules)
            else None
        )
        self.web: WebServer | None = None
        if listen and config.web.enabled:
            from plugin.web.app import WebServer

            self.web = WebServer(config, self.store)
        dicom = config.dicom
        tls = dicom.tls
        self.scp = (
            None
            if not listen
            else StorageSCP(
                dicom.ae_title,
                dicom.host,
                dicom.port,
                config.incoming_dir,
                self.receiver.handle,
                self.receiver.release,
                PeerFilter(dicom.allowed_peers),
                max_pdu=dicom.max_pdu,
                max_associations=dicom.max_associations,
                max_associations_per_peer=dicom.max_associations_per_peer,
                max_pending=dicom.max_pending,
                pdu_timeout=dicom.pdu_timeout_s,
                idle_timeout=dicom.idle_timeout_s,
                tls=TlsFiles(tls.cert_file, tls.key_file, tls.ca_file)
                if tls.enabled and tls.cert_file and tls.key_file
                else None,
                require_called_ae_title=dicom.require_called_ae_title,
                workers=dicom.receivers,
                prepare=self.receiver.prepare,
                limits=dataset_limits(dicom),
                file_mode=config.file_modes.file,
                on_refused=self.receiver.refused,
            )
        )

    def start(self) -> None:
        """Bring the node up; DataDirBusy (nothing touched) if another node holds the data dir."""
        for lock in (self.lock, self.incoming_lock):
            if lock is not None:
                lock.acquire()
        self.store.migrate()
        config_loaded(self.store, self.config, "serve" if self.scp is not None else "worker")
        if self.web is not None:
            self.web.start()  # WebStartError (an OSError): the port is taken
        if self.scp is not None:
            make_spool(self.config).recover(self.store)
            counters.reset(self.config.metrics_dir, self.config.file_modes.dir)
            self.scp.start()
            # senders can reach us from now on: a study left RECEIVING waits its quiet period from here
            self.completion.started_at = utcnow()
        if self.fetcher is not None:
            self.fetcher.start()
        if self.requirements is not None:
            self.requirements.start()
        if self.jobs is not None:
            self.jobs.start()
        self.dispatcher.start()

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.dispatcher.stop()
        if self.jobs is not None:
            self.jobs.stop()
        if self.requirements is not None:
            self.requirements.stop()
        if self.fetcher is not None:
            self.fetcher.stop()
        if self.scp is not None:
            self.scp.stop()
        self.receiver.close()
        self.store.dispose()
        for lock in (self.incoming_lock, self.lock):
            if lock is not None:
                lock.release()


def serve(config: Config, listen: bool = True, execute: bool = True) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean stop, 1 if the node could not start (another
    node holds the data dir, a file or the database cannot be opened), 2 for a configuration error."""
    setup_logging(config.logging)
    apply_file_modes(config.file_modes)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    try:
        node = Node(config, listen, execute)
    except ConfigError as err:
        log.error("cannot start the node: %s", err)
        return 2
    except OSError as err:  # e.g. TLS certificate or key unreadable
        log.error("cannot start the node: %s", err)
        return 1
    try:
        node.start()
    except (OSError, SQLAlchemyError, SchemaTooNew) as err:  # DataDirBusy included
        log.error("cannot start the node: %s", err)
        node.stop()
        return 1
    gc.freeze()  # start-up objects live until exit: full collections need not scan them
    dicom = config.dicom
    if node.scp is None:
        log.info("radgate worker: no DICOM listener, data dir %s", config.data_dir.resolve())
    else:
        log.info(
            "radgate serving: AE %s on %s:%d, data dir %s, %d receiving process(es)%s",
            *(dicom.ae_title, dicom.host, node.scp.port, config.data_dir.resolve(), dicom.receivers),
            ", TLS" if dicom.tls.enabled else "",
        )
    try:
        node.completion.run(stop)
    finally:
        node.stop()
        log.info("radgate stopped")
    return 0
