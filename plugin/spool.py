"""The spool: received instances on disk, durable before they are acknowledged.

Layout: ``<spool>/<Study UID>/<Series UID>/<SOP Instance UID>.dcm``. A file only ever appears
under its final name complete and fsync'd: the transport writes a temporary file in the incoming
directory (same file system), the spool fsyncs it and *hard-links* it to the final name, then
fsyncs the directory. ``os.link`` is atomic like ``rename`` but never replaces an existing name,
so the first copy of a SOP Instance UID wins and a later duplicate cannot change a file that a
job may already be reading (the same UID with different bytes is a sender error; we keep the
first and log it). Recovery at start removes leftover temporary files and records, or moves to
quarantine, spool files that the store does not know (a crash between link and commit).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from plugin.store import InstanceRecord, Store

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CHUNK = 1 << 20


class InvalidUID(ValueError):
    """A UID that is not digits and dots (it would be unsafe as a file name)."""


def check_uid(uid: str) -> str:
    if len(uid) > 64 or not _UID.match(uid):
        raise InvalidUID(f"not a valid UID: {uid[:80]!r}")
    return uid


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_hash(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class InstanceIds:
    """The UIDs that place an instance in the spool and the store."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class HeaderTags:
    """Study and series attributes recorded with the first instance of a series (no patient data)."""

    accession_number: str | None = None
    modality: str | None = None
    series_number: int | None = None


_TAG_KEYWORDS = ("AccessionNumber", "Modality", "SeriesNumber")


def _tags(ds: Dataset) -> HeaderTags:
    """Lenient: a malformed value of these informative attributes must not refuse the instance."""
    try:
        series_number: int | None = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        series_number = None
    return HeaderTags(
        accession_number=str(ds.get("AccessionNumber") or "")[:16] or None,  # SH, 16 characters
        modality=str(ds.get("Modality") or "")[:16] or None,  # CS, 16 characters
        series_number=series_number,
    )


@dataclass(frozen=True)
class Placed:
    path: Path
    created: bool  # False: a file of that SOP Instance UID was already there (kept as it was)


@dataclass(frozen=True)
class RecoveryReport:
    temp_removed: int = 0
    rerecorded: int = 0
    quarantined: int = 0


class Spool:
    """Moves received files to their final names durably and describes them for the store."""

    def __init__(self, root: Path, incoming: Path, quarantine: Path) -> None:
        self.root = root
        self.incoming = incoming
        self.quarantine = quarantine
        self._known_dirs: set[Path] = set()

    def prepare(self) -> None:
        for d in (self.root, self.incoming, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)

    def final_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        parts = (check_uid(study_uid), check_uid(series_uid), check_uid(sop_instance_uid))
        return self.root / parts[0] / parts[1] / f"{parts[2]}.dcm"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _ensure_dir(self, directory: Path) -> None:
        """Create the series directory and make its new entries durable in their parents."""
        if directory in self._known_dirs:
            return
        missing = [d for d in (directory.parent, directory) if not d.is_dir()]
        for d in missing:
            d.mkdir(exist_ok=True)
            fsync_dir(d.parent)
        self._known_dirs.add(directory)

    def place(self, temp: Path, rec: InstanceRecord) -> Placed:
        """Make ``temp`` durable under its final name (fsync, link, fsync dir); temp stays for the caller."""
        final = self.root / rec.spool_path
        self._ensure_dir(final.parent)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        try:
            created = self._link(temp, final)
        except FileNotFoundError:  # the series directory went away (a clean-up) since we made it
            self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            created = self._link(temp, final)
        fsync_dir(final.parent)
        return Placed(final, created)

    @staticmethod
    def _link(temp: Path, final: Path) -> bool:
        """Link without replacing: False if the final name exists already."""
        try:
            os.link(temp, final)
        except FileExistsError:
            return False
        return True

    def describe(self, path: Path, received_at: datetime) -> InstanceRecord:
        """Everything the store records about a DICOM file, read from the file itself (recovery).

        Raises InvalidDicomError, InvalidUID, AttributeError (a UID missing) or OSError.
        """
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        ids = InstanceIds(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.get("SOPInstanceUID") or meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(ds.get("SOPClassUID") or meta.MediaStorageSOPClassUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
        )
        return self.record_for(path, ids, received_at, _tags(ds))

    def read_tags(self, path: Path) -> HeaderTags:
        """The study and series attributes the store keeps (header only, no pixels)."""
        return _tags(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAG_KEYWORDS)))

    def record_for(
        self, path: Path, ids: InstanceIds, received_at: datetime, tags: HeaderTags | None
    ) -> InstanceRecord:
        """The store's record of ``path``: ``spool_path`` is where it belongs (from its UIDs), size, hash.

        ``tags`` None: the study and series rows exist already, their attributes are not needed.
        """
        size, sha = _size_and_hash(path)
        final = self.final_path(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
        tags = tags or HeaderTags()
        return InstanceRecord(
            study_uid=ids.study_uid,
            series_uid=ids.series_uid,
            sop_instance_uid=ids.sop_instance_uid,
            sop_class_uid=ids.sop_class_uid,
            transfer_syntax=ids.transfer_syntax,
            spool_path=self.relative(final),
            size=size,
            sha256=sha,
            received_at=received_at,
            accession_number=tags.accession_number,
            modality=tags.modality,
            series_number=tags.series_number,
        )

    def recover(self, store: Store) -> RecoveryReport:
        """Clean up after a crash; call before the transport starts (nothing may be in flight)."""
        self.prepare()
        temp_removed = 0
        for entry in self.incoming.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                temp_removed += 1
        rerecorded = quarantined = 0
        for study_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            recorded = store.recorded_paths(study_dir.name)
            for path in sorted(p for p in study_dir.rglob("*") if not p.is_dir()):
                rel = self.relative(path)
                if rel in recorded:
                    continue
                if self._rerecord(store, path):
                    rerecorded += 1
                else:
                    self._quarantine(path)
                    quarantined += 1
        fsync_dir(self.incoming)
        report = RecoveryReport(temp_removed, rerecorded, quarantined)
        log.info(
            "spool recovery: %d temporary files removed, %d unrecorded instances recorded, %d quarantined",
            *(report.temp_removed, report.rerecorded, report.quarantined),
        )
        return report

    def _rerecord(self, store: Store, path: Path) -> bool:
        """Record an unrecorded spool file if it is a DICOM file whose UIDs match where it lies."""
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        try:
            rec = self.describe(path, mtime)
        except (InvalidDicomError, AttributeError, ValueError, OSError) as err:
            log.warning("spool recovery: %s is not a usable instance (%s)", self.relative(path), err)
            return False
        if rec.spool_path != self.relative(path):
            log.warning("spool recovery: %s does not lie under its own UIDs", self.relative(path))
            return False
        if store.record_instance(rec):
            log.info("spool recovery: recorded SOP %s of study %s", rec.sop_instance_uid, rec.study_uid)
        return True

    def _quarantine(self, path: Path) -> None:
        target = self.quarantine / datetime.now(UTC).strftime("%Y%m%dT%H%M%S") / self.relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        log.warning("spool recovery: moved %s to %s", self.relative(path), target)
