"""The spool: received instances on disk, durable before they are acknowledged.

Layout: ``<spool>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``. The transport writes each
instance to a temporary file in the incoming directory (same file system); the spool *hard-links*
it to its final name and fsyncs the file, and only then may the instance be recorded and
acknowledged. ``os.link`` is atomic like ``rename`` but never replaces an existing name, so the
first copy of a SOP Instance UID wins and a later duplicate cannot change a file that a job may
already be reading (the same UID with different bytes is a sender error; we keep the first and log
it).

The final name must reach the disk too (an fsync of its directory). When the temporary name is
itself durable (the transport's incoming files are: `dicom_io.net`), that fsync waits: the temporary
name keeps the fsync'd file safe meanwhile, and `settle` syncs the directories of many instances at
once (each `SETTLE_BATCH` instances and when an association ends) and only then removes their
temporary names. Any other temporary file (the Orthanc bridge's) has its directory synced before
the answer, as POSIX asks.

Linking before the fsync lets one journal commit (ext4) make both the data and the new name durable.
The price is that a power cut between link and fsync can leave a final name over incomplete data,
never acknowledged and never recorded. So recovery at start (before the listener) first links every
complete incoming file (`dicom_io.net.received_completely`) whose final name is missing, removes the
incoming files, and then, for spool files the store does not know, records those whose every
element is complete and whose UIDs match where they lie, and moves the rest to quarantine.
Recovery never stops at a file it cannot read, whatever the reader raises: a complete incoming file
or an unrecorded spool file that cannot be described goes to quarantine with a log line, so a node
always starts (docs/design.md, "Ingest and transport").
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_io.durable import fsync_dir, fsync_file
from dicom_io.net import (
    DEFAULT_LIMITS,
    INCOMING_PREFIX,
    DatasetLimits,
    inspect_part10,
    received_completely,
)
from plugin.store.engine import Store
from plugin.store.recording import HeaderTags, InstanceRecord

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SETTLE_BATCH = 64  # placed instances whose directories are synced together (module docstring)


class InvalidUID(ValueError):
    """A UID that is not digits and dots (it would be unsafe as a file name)."""


def check_uid(uid: str) -> str:
    """``uid`` itself; InvalidUID when it is longer than 64 characters or not digits and dots."""
    if len(uid) > 64 or not _UID.match(uid):
        raise InvalidUID(f"not a valid UID: {uid[:80]!r}")
    return uid


def same_content(a: Path, b: Path) -> bool:
    """Byte-for-byte equal (only a duplicate SOP Instance UID ever asks)."""
    return filecmp.cmp(a, b, shallow=False)


@dataclass(frozen=True)
class InstanceIds:
    """The UIDs that place an instance in the spool and the store."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


_TAG_KEYWORDS = ("AccessionNumber", "Modality", "SeriesNumber", "PatientID", "PatientName", "StudyDate")


def _text(ds: Dataset, keyword: str, length: int) -> str | None:
    """An attribute as text, cut to ``length`` (its VR's limit), None when absent or empty."""
    return str(ds.get(keyword) or "").strip()[:length] or None


def _tags(ds: Dataset) -> HeaderTags:
    """Lenient: a malformed value of these informative attributes must not refuse the instance."""
    try:
        series_number: int | None = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        series_number = None
    study_date = _text(ds, "StudyDate", 8)
    return HeaderTags(
        accession_number=_text(ds, "AccessionNumber", 16),  # SH, 16 characters
        modality=_text(ds, "Modality", 16),  # CS, 16 characters
        series_number=series_number,
        patient_id=_text(ds, "PatientID", 64),  # LO
        patient_name=_text(ds, "PatientName", 324),  # PN: 3 component groups of 64 + separators
        study_date=study_date
        if study_date is not None and len(study_date) == 8 and study_date.isdigit()
        else None,
    )


@dataclass(frozen=True)
class Placed:
    """Where `Spool.place` put an instance, and whether it made that name."""

    final: str  # where the instance lies (a string: no Path built per instance)
    created: bool  # False: a file of that SOP Instance UID was already there (kept as it was)

    @property
    def path(self) -> Path:
        return Path(self.final)


@dataclass(frozen=True)
class RecoveryReport:
    """What `Spool.recover` did, in files."""

    temp_removed: int = 0
    rerecorded: int = 0
    quarantined: int = 0
    adopted: int = 0  # complete incoming files linked to a final name the crash had lost


class Spool:
    """Moves received files to their final names durably and describes them for the store."""

    def __init__(
        self, root: Path, incoming: Path, quarantine: Path, limits: DatasetLimits = DEFAULT_LIMITS
    ) -> None:
        self.root = root
        self.incoming = incoming
        self.quarantine = quarantine
        self.limits = limits  # what `describe` reads of a file (the transport's limits)
        self._root = str(root)  # the per-instance path work is done on strings: pathlib costs more
        self._known_dirs: set[str] = set()
        self._unsettled: list[tuple[str, str]] = []  # (temporary name, final directory), see settle
        self._unsettled_lock = threading.Lock()

    def prepare(self) -> None:
        for d in (self.root, self.incoming, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def spool_path(ids: InstanceIds) -> str:
        """Where an instance lies, relative to the spool (InvalidUID if a UID is unsafe as a name)."""
        return f"{check_uid(ids.study_uid)}/{check_uid(ids.series_uid)}/{check_uid(ids.sop_instance_uid)}.dcm"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _ensure_dir(self, directory: str) -> None:
        """Create the series directory and make its new entries durable in their parents."""
        if directory in self._known_dirs:
            return
        series_dir = Path(directory)
        for d in (series_dir.parent, series_dir):
            if not d.is_dir():
                d.mkdir(exist_ok=True)
                fsync_dir(d.parent)
        self._known_dirs.add(directory)

    def place(self, temp: Path, rec: InstanceRecord, sync_dir: bool = True) -> Placed:
        """Link ``temp`` to its final name and fsync it; temp stays for the caller.

        ``sync_dir`` False: the directory is not fsync'd here, the caller keeps ``temp`` (a durable
        name) until `settle` has done it (`settle_later`). A name that exists already is left as it
        was (``created`` False) and nothing is synced.
        """
        final = os.path.join(self._root, rec.spool_path)
        directory = os.path.dirname(final)
        self._ensure_dir(directory)
        try:
            created = self._link(temp, final)
        except FileNotFoundError:  # the series directory went away (a clean-up) since we made it
            self._known_dirs.discard(directory)
            self._ensure_dir(directory)
            created = self._link(temp, final)
        if created:
            fsync_file(final)
            if sync_dir:
                fsync_dir(directory)
        return Placed(final, created)

    def settle_later(self, temp: Path, placed: Placed) -> None:
        """Keep ``temp`` until ``placed``'s directory is fsync'd (`settle`, due every `SETTLE_BATCH`)."""
        with self._unsettled_lock:
            self._unsettled.append((str(temp), os.path.dirname(placed.final)))
            due = len(self._unsettled) >= SETTLE_BATCH
        if due:
            self.settle()

    def settle(self) -> None:
        """Make the final names placed so far durable, one fsync per directory, then remove their
        temporary names. A directory that cannot be synced keeps them (recovery links them again)."""
        with self._unsettled_lock:
            unsettled, self._unsettled = self._unsettled, []
        synced: set[str] = set()
        for directory in {directory for _, directory in unsettled}:
            try:
                fsync_dir(directory)
                synced.add(directory)
            except OSError as err:
                log.error("cannot sync spool directory %s: %s", directory, err.strerror or err)
        for temp, directory in unsettled:
            if directory in synced:
                with contextlib.suppress(OSError):  # a name left over is harmless: recovery removes it
                    os.unlink(temp)

    @staticmethod
    def _link(temp: Path, final: str) -> bool:
        """Link without replacing: False if the final name exists already."""
        try:
            os.link(temp, final)
        except FileExistsError:
            return False
        return True

    def describe(self, path: Path, received_at: datetime) -> InstanceRecord:
        """Everything the store records about a DICOM file, read from the file itself (recovery).

        The file is checked and identified as the transport checks a received dataset
        (`dicom_io.net.inspect_part10` within `limits`: every length fits the bytes, nesting and
        inflated size bounded, UIDs well formed) before pydicom reads its three recorded attributes
        (`read_tags`). Raises InstanceRefused (not a usable instance), InvalidUID (a UID unsafe as a
        file name) or OSError.
        """
        found = inspect_part10(path, self.limits)
        ids = InstanceIds(
            found.study_uid,
            found.series_uid,
            found.sop_instance_uid,
            found.sop_class_uid,
            found.transfer_syntax,
        )
        return self.record_for(ids, received_at, self.read_tags(path), path.stat().st_size)

    def read_tags(self, path: Path) -> HeaderTags:
        """The study and series attributes the store keeps (header only, no pixels)."""
        return _tags(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAG_KEYWORDS)))

    def record_for(
        self, ids: InstanceIds, received_at: datetime, tags: HeaderTags | None, size: int, **peer: Any
    ) -> InstanceRecord:
        """The store's record of an instance: ``spool_path`` is where it belongs (from its UIDs).

        ``tags`` None: the study and series rows exist already, their attributes are not needed.
        ``peer``: the record's fields about the sender (``calling_ae``, ``address``, ``association_key``).
        """
        return InstanceRecord(
            study_uid=ids.study_uid,
            series_uid=ids.series_uid,
            sop_instance_uid=ids.sop_instance_uid,
            sop_class_uid=ids.sop_class_uid,
            transfer_syntax=ids.transfer_syntax,
            spool_path=self.spool_path(ids),
            size=size,
            received_at=received_at,
            tags=tags or HeaderTags(),
            **peer,
        )

    def recover(self, store: Store) -> RecoveryReport:
        """Clean up after a crash; call before the transport starts (nothing may be in flight)."""
        self.prepare()
        temp_removed = adopted = quarantined = 0
        for entry in sorted(self.incoming.iterdir()):
            if not (entry.is_file() or entry.is_symlink()):
                continue
            complete = not entry.is_symlink() and received_completely(entry.stat())
            if complete and entry.name.startswith(INCOMING_PREFIX):
                rec = self._found(entry, f"incoming {entry.name}")
                if rec is None:  # never acknowledged, but kept for whoever looks into it
                    self._quarantine(entry, f"incoming/{entry.name}")
                    quarantined += 1
                    continue
                adopted += self._adopt(entry, rec)
            entry.unlink()
            temp_removed += 1
        rerecorded = 0
        for study_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            recorded = store.recorded_paths(study_dir.name)
            for path in sorted(p for p in study_dir.rglob("*") if not p.is_dir()):
                rel = self.relative(path)
                if rel in recorded:
                    continue
                if self._rerecord(store, path):
                    rerecorded += 1
                else:
                    self._quarantine(path, rel)
                    quarantined += 1
        fsync_dir(self.incoming)
        report = RecoveryReport(temp_removed, rerecorded, quarantined, adopted)
        log.info(
            "spool recovery: %d complete incoming files put back in the spool, %d temporary files "
            "removed, %d unrecorded instances recorded, %d quarantined",
            *(report.adopted, report.temp_removed, report.rerecorded, report.quarantined),
        )
        return report

    def _adopt(self, temp: Path, rec: InstanceRecord) -> int:
        """Link a complete incoming file to its final name if that name is missing (a power cut took it
        before `settle`); 1 if linked. The spool pass of `recover` then records it if unrecorded."""
        placed = self.place(temp, rec)  # an existing final name is left as it is
        if placed.created:
            log.info(
                "spool recovery: SOP %s of study %s put back from %s",
                rec.sop_instance_uid,
                rec.study_uid,
                temp.name,
            )
        return int(placed.created)

    def _found(self, path: Path, name: str) -> InstanceRecord | None:
        """`describe` of a file recovery found (received when last modified), None if unusable.

        Any exception is taken as unusable (a reader's RecursionError, MemoryError or zlib error on
        a crafted file included): recovery must go on to the next file.
        """
        try:
            return self.describe(path, datetime.fromtimestamp(path.stat().st_mtime, UTC))
        except Exception as err:
            log.warning("spool recovery: %s is not a usable instance (%s: %s)", name, type(err).__name__, err)
            return None

    def _rerecord(self, store: Store, path: Path) -> bool:
        """Record an unrecorded spool file if it is a DICOM file whose UIDs match where it lies."""
        rec = self._found(path, self.relative(path))
        if rec is None:
            return False
        if rec.spool_path != self.relative(path):
            log.warning("spool recovery: %s does not lie under its own UIDs", self.relative(path))
            return False
        fsync_file(path)  # a killed receiver linked it but may not have synced it yet
        if store.recorder.record_instance(rec):
            log.info("spool recovery: recorded SOP %s of study %s", rec.sop_instance_uid, rec.study_uid)
        return True

    def _quarantine(self, path: Path, name: str) -> None:
        """Move ``path`` to ``<quarantine>/<time>/<name>``."""
        target = self.quarantine / datetime.now(UTC).strftime("%Y%m%dT%H%M%S") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        log.warning("spool recovery: moved %s to %s", name, target)
