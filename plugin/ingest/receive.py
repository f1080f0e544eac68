"""The handlers the DICOM transport calls: store one instance durably, note a released association.

The transport calls these from many threads at once (one per association), in each receiving
process (a pickled copy each): a ``Receiver`` opens its database engine once per process, in
``prepare`` before the process takes an association (or on first use), and keeps no other shared
state; the store serialises writers (one ingest transaction at a time per SQLite file, under a
``flock``; PostgreSQL: unique constraints and row locks), so concurrent calls are safe.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError

from dicom_io.durable import fsync_dir, fsync_file
from dicom_io.net import DatasetLimits, InstanceRefused, Peer, ReceivedInstance, Refusal, inspect_part10
from plugin.config import AllowedPeer, Config, DicomConfig
from plugin.ingest import counters
from plugin.ingest.counters import ReceiveCounters
from plugin.ingest.spool import InstanceIds, Spool, same_content
from plugin.store.engine import Store
from plugin.store.models import utcnow

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the spool or the database could not take the instance
STATUS_CANNOT_UNDERSTAND = 0xC000  # not a storable instance (unreadable header, unsafe UID)


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _this_process() -> int:
    """os.getpid() without its system call on every instance."""
    return _pid


def dataset_limits(dicom: DicomConfig) -> DatasetLimits:
    """The configured limits on one dataset, as the transport and spool recovery take them."""
    return DatasetLimits(dicom.max_dataset_bytes, dicom.max_inflated_bytes, dicom.max_sequence_depth)


def make_spool(config: Config) -> Spool:
    """The spool of ``config``'s data dir, reading files within its `dicom` dataset limits."""
    return Spool(config.spool_dir, config.incoming_dir, config.quarantine_dir, dataset_limits(config.dicom))


class Receiver:
    """``InstanceHandler`` (``handle``), ``ReleaseHandler`` (``release``) and ``RefusalHandler``
    (``refused``) for the storage SCP; each process counts what it received and refused in its
    `ReceiveCounters`."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._run_token = uuid.uuid4().hex[:12]  # association ids are only unique per process run
        self._lock = threading.Lock()
        self._seen_series: set[str] = set()
        self._pid: int | None = None
        self._spool: Spool | None = None
        self._store: Store | None = None
        self._counters: ReceiveCounters | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration: a spawned receiver opens its own database engine."""
        return {"_config": self._config, "_run_token": self._run_token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._config = state["_config"]
        self._run_token = state["_run_token"]
        self._lock = threading.Lock()
        self._seen_series = set()
        self._pid, self._spool, self._store, self._counters = None, None, None, None

    def _parts(self) -> tuple[Spool, Store, ReceiveCounters]:
        spool, store, tally = self._spool, self._store, self._counters
        if spool is not None and store is not None and tally is not None and self._pid == _this_process():
            return spool, store, tally  # the usual case, without the lock
        with self._lock:
            if (
                self._pid != _this_process()
                or self._spool is None
                or self._store is None
                or self._counters is None
            ):
                self._pid = _this_process()
                self._spool = make_spool(self._config)
                self._store = Store(self._config.db_url)  # an engine must not cross a fork
                self._counters = ReceiveCounters(self._config.metrics_dir, self._config.file_modes.dir)
            return self._spool, self._store, self._counters

    def prepare(self) -> None:
        """Open this process's spool and store and warm the store's recording path (the transport
        runs this in each receiving process before it takes an association)."""
        _spool, store, _counters = self._parts()
        store.recorder.warm_up()

    def _remember_series(self, series_uid: str) -> None:
        """Series whose rows exist: later instances skip reading the header (bounded memory)."""
        if len(self._seen_series) > 100_000:
            self._seen_series.clear()
        self._seen_series.add(series_uid)

    def close(self) -> None:
        with self._lock:
            if self._spool is not None:
                self._spool.settle()
            if self._store is not None:
                self._store.dispose()
            if self._counters is not None:
                self._counters.close()
            self._pid, self._spool, self._store, self._counters = None, None, None, None

    def association_key(self, peer: Peer) -> str:
        return f"{self._run_token}:{_this_process()}:{peer.association_id}"

    def handle(self, instance: ReceivedInstance) -> int:
        """Store one instance: durable in the spool and recorded, or a failure status. Never raises.

        The temporary file is removed, or, when its name is durable, kept until the spool has synced
        the final name's directory (`Spool.settle_later`).
        """
        kept = False
        try:
            status, kept = self._handle(instance)
            return status
        except Exception:  # the peer must get a status, whatever went wrong
            log.exception("unexpected error storing SOP %s", instance.sop_instance_uid)
            self._count_refusal(counters.INTERNAL_ERROR, STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES
        finally:
            if not kept:
                try:
                    instance.path.unlink(missing_ok=True)
                except OSError as err:
                    log.warning("cannot remove temporary file %s: %s", instance.path.name, err.strerror)

    def _handle(self, instance: ReceivedInstance) -> tuple[int, bool]:
        """The status, and whether the spool keeps the temporary file (for `Spool.settle`)."""
        spool, store, tally = self._parts()
        peer = instance.peer
        sop = instance.sop_instance_uid
        now = utcnow()
        peer_fields: dict[str, Any] = {
            "calling_ae": peer.ae_title.strip()[:16],
            "address": peer.address,
            "association_key": self.association_key(peer),
        }
        ids = InstanceIds(
            instance.study_uid, instance.series_uid, sop, instance.sop_class_uid, instance.transfer_syntax
        )
        try:
            # the transport has checked the UIDs; the header is read once per series, for its rows
            tags = None if instance.series_uid in self._seen_series else spool.read_tags(instance.path)
            rec = spool.record_for(ids, now, tags, instance.size, **peer_fields)
            placed = spool.place(instance.path, rec, sync_dir=not instance.durable_name)
            if not placed.created:
                if store.recorder.record_duplicate(rec):  # counted: its study is still being sent
                    same = same_content(instance.path, placed.path)
                    _log_duplicate(rec.sop_instance_uid, rec.study_uid, same=same)
                    tally.duplicate()
                    return STATUS_SUCCESS, False
                # the file is there but unrecorded (another receiver mid-way, or the Orthanc bridge):
                # make it durable and record it
                fsync_file(placed.path)
                fsync_dir(os.path.dirname(placed.final))
                tags = spool.read_tags(placed.path)
                rec = spool.record_for(ids, now, tags, placed.path.stat().st_size, **peer_fields)
            if store.recorder.record_instance(rec):
                tally.stored(rec.size)
            else:
                _log_duplicate(rec.sop_instance_uid, rec.study_uid, same=True)
                tally.duplicate()
            self._remember_series(instance.series_uid)
        except (InvalidDicomError, AttributeError, ValueError) as err:
            log.warning("refused SOP %s from %s: not a storable instance (%s)", sop, peer.ae_title, err)
            tally.refused(counters.NOT_STORABLE, STATUS_CANNOT_UNDERSTAND)
            return STATUS_CANNOT_UNDERSTAND, False
        except OSError as err:
            log.error(
                "cannot write SOP %s of study %s to the spool: %s (%s); answered 0xA700",
                *(sop, instance.study_uid, err.strerror or err, err.filename or ""),
            )
            tally.refused(counters.spool_error_reason(err), STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES, False
        except SQLAlchemyError as err:
            log.error(
                "cannot record SOP %s of study %s in the job store: %s; answered 0xA700",
                *(sop, instance.study_uid, getattr(err, "orig", None) or type(err).__name__),
            )
            tally.refused(counters.DATABASE_ERROR, STATUS_OUT_OF_RESOURCES)
            return STATUS_OUT_OF_RESOURCES, False
        log.debug("stored SOP %s of study %s from %s", sop, rec.study_uid, peer.ae_title)
        if placed.created and instance.durable_name:
            spool.settle_later(instance.path, placed)
            return STATUS_SUCCESS, True
        return STATUS_SUCCESS, False

    def handle_file(self, path: Path, peer: Peer, what: str) -> int | None:
        """Store a whole DICOM Part 10 file the node wrote itself (an Orthanc import, a C-GET, a
        WADO-RS retrieve) exactly as a received C-STORE: checked and identified as the transport
        checks one (`dicom_io.net.inspect_part10`, within the `dicom` limits), then `handle`.

        Returns `handle`'s status, or None when the file is not a storable instance (one log line
        naming ``what``, the file removed). The file is the handler's from here on. Raises OSError
        when the file cannot be read.
        """
        try:
            found = inspect_part10(path, dataset_limits(self._config.dicom))
        except InstanceRefused as err:
            log.warning("%s not taken: not a storable instance (%s)", what, err)
            path.unlink(missing_ok=True)
            return None
        received = ReceivedInstance(
            path=path,
            study_uid=found.study_uid,
            series_uid=found.series_uid,
            sop_instance_uid=found.sop_instance_uid,
            sop_class_uid=found.sop_class_uid,
            transfer_syntax=found.transfer_syntax,
            peer=peer,
            size=path.stat().st_size,
        )
        return self.handle(received)

    def release(self, peer: Peer) -> None:
        """An association ended. Released (``peer.released``): its studies may complete after the
        short after-release period. Aborted or cut off: the sender may well send again, so its
        studies wait their whole quiet period (its receptions stay open, as after a crash).

        The spool's unsynced final names are made durable first (`Spool.settle`), however it ended.
        """
        spool, store, _counters = self._parts()
        try:
            spool.settle()
        except Exception:  # the release must still be recorded; recovery keeps the files safe
            log.exception("cannot settle the spool after association %s", peer.association_id)
        if not peer.released:
            return
        try:
            store.release_association(self.association_key(peer), utcnow())
        except SQLAlchemyError as err:  # completion falls back to the quiet period
            log.error("cannot record the release of association %s: %s", peer.association_id, err)

    def refused(self, refusal: Refusal) -> None:
        """Count a refusal by the transport (which has logged it)."""
        if refusal.association:
            self._parts()[2].association_refused(refusal.reason)
        else:
            self._count_refusal(refusal.reason, refusal.status or STATUS_OUT_OF_RESOURCES)

    def _count_refusal(self, reason: str, status: int) -> None:
        """Count a refused C-STORE; a failure to count is logged, never raised."""
        try:
            self._parts()[2].refused(reason, status)
        except Exception:
            log.exception("cannot count a refused instance (%s)", reason)


def _log_duplicate(sop: str, study_uid: str, same: bool) -> None:
    if same:
        log.info("SOP %s of study %s received again; kept the stored copy", sop, study_uid)
    else:
        log.warning("SOP %s of study %s received again with other content; kept the first", sop, study_uid)


class PeerFilter:
    """Admits a peer if the allow-list is empty or one entry matches its calling AE and address."""

    def __init__(self, allowed: list[AllowedPeer]) -> None:
        self._allowed = list(allowed)

    def __call__(self, peer: Peer) -> bool:
        return not self._allowed or any(p.admits(peer.ae_title, peer.address) for p in self._allowed)
