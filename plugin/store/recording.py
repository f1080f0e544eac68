"""Recording a received instance: the one write on the receiving hot path.

An instance is recorded one way on every database: one guarded INSERT of its row
(`InstanceRecorder.record_instance`), with the study, series and receptions rows looked up or
inserted only when the process does not know them. Nothing counts instances as they arrive.
On SQLite the recorder's connection runs with ``synchronous=NORMAL``: the spool file is fsync'd
before the commit and spool recovery re-records any file whose row a power cut rolled back.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Integer, String, bindparam, case, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from plugin.store.models import Base, Instance, Reception, Series, Study, StudyState, UTCDateTime, utcnow


@dataclass(frozen=True)
class HeaderTags:
    """Study and series attributes recorded with the first instance of a series. The patient's ID
    and name go into the store only (the console shows them to logged-in staff), never into a log."""

    accession_number: str | None = None
    modality: str | None = None
    series_number: int | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """What the spool knows about a file it made durable, ready to be recorded."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    spool_path: str
    size: int
    received_at: datetime
    calling_ae: str | None = None
    address: str | None = None
    association_key: str | None = None
    tags: HeaderTags = HeaderTags()


def _insert(conn: Connection, table: type[Base], **values: Any) -> int:
    """INSERT one row and return its primary key."""
    result = conn.execute(insert(table), values)
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def _later(column: Any, now: Any) -> Any:
    """The later of a timestamp column (NULL: none yet) and ``now``."""
    return case((column.is_(None), now), (column < now, now), else_=column)


_INSTANCE_COLUMNS = (
    "study_id",
    "series_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax",
    "study_revision",
    "spool_path",
    "size",
    "received_at",
    "calling_ae",
)
_INSTANCE_TYPES: dict[str, Any] = {
    "study_id": Integer(),
    "series_id": Integer(),
    "study_revision": Integer(),
    "size": Integer(),
    "received_at": UTCDateTime(),
}


def _guarded_instance_insert() -> Any:
    """INSERT the instances row only while its study is RECEIVING at the given revision.

    The values are selected from the study row itself, so the check and the insert are one
    statement: on SQLite it runs under the database's write lock; on PostgreSQL ``FOR SHARE``
    waits for a completion that holds the row ``FOR UPDATE`` and then sees the new state (no row
    inserted), while a completion that comes second waits for this transaction and then counts
    the instance. No row inserted: the revision is no longer receiving (the caller looks again).
    """
    from_study = {"study_id": Study.id, "study_revision": Study.revision}
    values = [
        from_study.get(column, bindparam(column, type_=_INSTANCE_TYPES.get(column, String())))
        for column in _INSTANCE_COLUMNS
    ]
    receiving = (
        select(*values)
        .where(
            Study.id == bindparam("study_id", type_=Integer()),
            Study.revision == bindparam("study_revision", type_=Integer()),
            Study.state == StudyState.RECEIVING,
        )
        .with_for_update(read=True)
    )
    guarded = insert(Instance).from_select(list(_INSTANCE_COLUMNS), receiving)
    return guarded.execution_options(preserve_rowcount=True)  # INSERT: SQLAlchemy keeps it only if asked


class _Sql:
    """The statements of the recording path, built once (SQLAlchemy then compiles each once)."""

    find_instance = select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop"))
    find_study = (
        select(Study.id, Study.revision, Study.state, Study.accession_number)
        .where(Study.study_uid == bindparam("uid"))
        .with_for_update()
    )
    fill_accession = (
        update(Study)
        .where(Study.id == bindparam("row"), Study.accession_number.is_(None))
        .values(accession_number=bindparam("accession", type_=String()))
    )
    resent = (  # an instance received again: the study revision is still being sent
        update(Study)
        .where(Study.id == bindparam("row"))
        .values(resent_at=_later(Study.resent_at, bindparam("now", type_=UTCDateTime())))
    )
    reopen_study = (
        update(Study)
        .where(Study.id == bindparam("row"))
        .values(
            revision=bindparam("new_revision"),
            state=StudyState.RECEIVING,
            revision_started_at=bindparam("now", type_=UTCDateTime()),
            completed_at=None,
        )
    )
    find_series = select(Series.id).where(Series.series_uid == bindparam("uid"))
    insert_instance = _guarded_instance_insert()
    insert_reception = insert(Reception)
    find_reception = select(Reception.id).where(
        Reception.association_key == bindparam("key"),
        Reception.study_id == bindparam("study_id"),
        Reception.study_revision == bindparam("revision"),
    )


def _instance_row(rec: InstanceRecord, study_id: int, series_id: int, revision: int) -> dict[str, Any]:
    values = (study_id, series_id, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax, revision)
    row = (*values, rec.spool_path, rec.size, rec.received_at, rec.calling_ae)
    return dict(zip(_INSTANCE_COLUMNS, row, strict=True))


def _reception_row(rec: InstanceRecord, study_id: int, revision: int) -> dict[str, Any]:
    """The receptions row of ``rec``'s association for this study revision (``association_key`` set)."""
    return {
        "association_key": rec.association_key,
        "study_id": study_id,
        "study_revision": revision,
        "calling_ae": rec.calling_ae,
        "address": rec.address,
        "started_at": rec.received_at,
    }


def _note_reception(conn: Connection, rec: InstanceRecord, study_id: int, revision: int) -> None:
    """Insert the receptions row of ``rec``'s association for this study revision, if not there yet."""
    if rec.association_key is not None:
        reception = {"key": rec.association_key, "study_id": study_id, "revision": revision}
        if conn.execute(_Sql.find_reception, reception).first() is None:
            conn.execute(_Sql.insert_reception, _reception_row(rec, study_id, revision))


def _received_again(conn: Connection, rec: InstanceRecord) -> None:
    """A recorded instance sent again: while its study is RECEIVING, the duplicate counts as one more
    sign that the revision is still being sent (`plugin.jobs.completion`): its quiet period starts again
    (``Study.resent_at``) and the association is one that brings it (its release, not only the
    earlier ones', counts). A COMPLETE study is left as it is: a whole study sent again opens no
    revision."""
    study = conn.execute(_Sql.find_study, {"uid": rec.study_uid}).first()
    if study is None or study.state != StudyState.RECEIVING:
        return
    conn.execute(_Sql.resent, {"row": study.id, "now": rec.received_at})
    _note_reception(conn, rec, study.id, study.revision)


@dataclass(frozen=True)
class _RowIds:
    study_id: int
    revision: int
    series_id: int


class _KnownRows:
    """Row ids this process recorded instances under, so that the next instance of the same study
    revision and series goes straight to the guarded INSERT, and the receptions rows it inserted.

    Nothing here is trusted: the INSERT checks the study revision is still RECEIVING, the foreign
    keys check the rows exist, and the unique constraints catch a receptions row inserted elsewhere;
    any failure forgets the study and takes the path that looks everything up. Bounded in size.
    """

    _LIMIT = 10_000

    def __init__(self) -> None:
        self.studies: dict[str, tuple[int, int, bool]] = {}  # uid: id, revision, accession known
        self.series: dict[str, int] = {}
        self.receptions: set[tuple[str, int, int]] = set()

    def get(self, rec: InstanceRecord) -> _RowIds | None:
        study, series_id = self.studies.get(rec.study_uid), self.series.get(rec.series_uid)
        if study is None or series_id is None or (rec.tags.accession_number is not None and not study[2]):
            return None  # unknown, or an accession number the study row may still lack
        return _RowIds(study[0], study[1], series_id)

    def remember(self, rec: InstanceRecord, ids: _RowIds, accession_known: bool) -> None:
        if len(self.series) > self._LIMIT:
            self.studies.clear()
            self.series.clear()
        self.studies[rec.study_uid] = (ids.study_id, ids.revision, accession_known)
        self.series[rec.series_uid] = ids.series_id
        if rec.association_key is not None:
            self.note_reception((rec.association_key, ids.study_id, ids.revision))

    def note_reception(self, reception: tuple[str, int, int]) -> None:
        """Bounded on its own: a sender that opens an association per instance adds one each time."""
        if len(self.receptions) >= self._LIMIT:
            self.receptions.clear()  # an association seen again inserts its row, fails, looks it up
        self.receptions.add(reception)

    def forget(self, rec: InstanceRecord) -> None:
        self.studies.pop(rec.study_uid, None)
        self.series.pop(rec.series_uid, None)


class _Stale(Exception):
    """A remembered study revision is no longer RECEIVING."""


class InstanceRecorder:
    """Records instances on one connection of its own, kept open; thread-safe (one transaction at a time)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known = _KnownRows()
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        self._engine.dispose()

    @contextmanager
    def _ingest(self, commit: bool = True) -> Iterator[Connection]:
        """One transaction on this process's ingest connection (kept open), committed on success
        (``commit``; else rolled back) and rolled back on any exception. One at a time per process:
        the receiving threads queue on a lock, not on the database's busy timeout. A connection that
        failed (other than on a constraint) is closed, and the next transaction opens another."""
        with self._lock:
            if self._connection is None:
                self._connection = self._engine.connect()
            conn = self._connection
            try:
                transaction = conn.begin()
                try:
                    yield conn
                except BaseException:
                    transaction.rollback()
                    raise
                if commit:
                    transaction.commit()
                else:
                    transaction.rollback()
            except DBAPIError as err:
                if not isinstance(err, IntegrityError):  # a constraint leaves the connection sound
                    conn.close()
                    self._connection = None
                raise

    def record_duplicate(self, rec: InstanceRecord) -> bool:
        """If ``rec``'s SOP Instance UID is recorded, count it as received again (`_received_again`)
        and return True; False (nothing changed) if it is not recorded."""
        with self._ingest() as conn:
            if conn.execute(_Sql.find_instance, {"sop": rec.sop_instance_uid}).first() is None:
                return False
            _received_again(conn, rec)
            return True

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a durable spool file; False if that SOP Instance UID was already recorded (then
        counted as received again, `_received_again`).

        An instance of a study that is no longer RECEIVING opens the study's next revision. The
        instances row is always written by one guarded INSERT (`_guarded_instance_insert`); the
        study, series and receptions rows are looked up or inserted only when this process does not
        know them yet.
        """
        ids = self._known.get(rec)
        if ids is not None:
            reception = (
                (rec.association_key, ids.study_id, ids.revision) if rec.association_key is not None else None
            )
            new_reception = reception is not None and reception not in self._known.receptions
            try:
                with self._ingest() as conn:
                    self._insert_known(conn, rec, ids, new_reception)
            except (_Stale, DBAPIError):  # completed meanwhile, a duplicate, a row gone, a lost connection
                self._known.forget(rec)
            else:
                if reception is not None and new_reception:
                    self._known.note_reception(reception)
                return True
        failures = 0
        while True:
            try:
                with self._ingest() as conn:
                    found = self._record(conn, rec)
            except IntegrityError:  # a concurrent writer (PostgreSQL: no global write lock) won a race
                failures += 1
                if failures >= 3:
                    raise
                continue
            if found is None:
                return False
            self._known.remember(rec, *found)
            return True

    def warm_up(self) -> None:
        """Open an ingest connection and compile the recording statements, then roll back, so that
        the first instances a receiving process records wait for no statement to be compiled."""
        uid = f"2.25.{uuid.uuid4().int}"
        now = utcnow()
        first, second = (
            InstanceRecord(
                study_uid=f"{uid}.1",
                series_uid=f"{uid}.2",
                sop_instance_uid=f"{uid}.3.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                transfer_syntax="1.2.840.10008.1.2.1",
                spool_path=f"{uid}.{n}.dcm",
                size=0,
                received_at=now,
                association_key=f"warm-up:{uid}:{n}",
            )
            for n in (1, 2)
        )
        with self._ingest(commit=False) as conn:
            found = self._record(conn, first)  # a new study and series
            assert found is not None
            self._insert_known(conn, second, found[0], new_reception=True)  # now known
            conn.execute(_Sql.resent, {"row": found[0].study_id, "now": now})

    @staticmethod
    def _insert_known(conn: Connection, rec: InstanceRecord, ids: _RowIds, new_reception: bool) -> None:
        """The instances row (and the association's receptions row when new) under known row ids."""
        row = _instance_row(rec, ids.study_id, ids.series_id, ids.revision)
        if conn.execute(_Sql.insert_instance, row).rowcount != 1:
            raise _Stale
        if new_reception:  # the association's first instance of this study revision
            conn.execute(_Sql.insert_reception, _reception_row(rec, ids.study_id, ids.revision))

    def _record(self, conn: Connection, rec: InstanceRecord) -> tuple[_RowIds, bool] | None:
        """Look up (or insert) the study, series and receptions rows, then insert the instance; the
        row ids and whether the study has an accession number, or None for a duplicate."""
        if conn.execute(_Sql.find_instance, {"sop": rec.sop_instance_uid}).first() is not None:
            _received_again(conn, rec)
            return None
        now = rec.received_at
        study = conn.execute(_Sql.find_study, {"uid": rec.study_uid}).first()  # locked till commit
        if study is None:
            revision = 1
            accession_known = rec.tags.accession_number is not None
            study_id = _insert(
                conn,
                Study,
                study_uid=rec.study_uid,
                accession_number=rec.tags.accession_number,
                patient_id=rec.tags.patient_id,
                patient_name=rec.tags.patient_name,
                study_date=rec.tags.study_date,
                revision=revision,
                state=StudyState.RECEIVING,
                first_received_at=now,
                revision_started_at=now,
            )
        else:
            study_id, revision, state, accession = study
            accession_known = accession is not None or rec.tags.accession_number is not None
            if accession is None and rec.tags.accession_number is not None:
                conn.execute(_Sql.fill_accession, {"row": study_id, "accession": rec.tags.accession_number})
            if state != StudyState.RECEIVING:
                revision += 1
                conn.execute(_Sql.reopen_study, {"row": study_id, "new_revision": revision, "now": now})
        series_id = conn.execute(_Sql.find_series, {"uid": rec.series_uid}).scalar()
        if series_id is None:
            series_id = _insert(
                conn,
                Series,
                study_id=study_id,
                series_uid=rec.series_uid,
                modality=rec.tags.modality,
                series_number=rec.tags.series_number,
                first_received_at=now,
            )
        ids = _RowIds(study_id, revision, series_id)
        self._insert_known(conn, rec, ids, new_reception=False)  # the study row is locked: it holds
        _note_reception(conn, rec, study_id, revision)
        return ids, accession_known
