"""The job store: every received instance, study state, job and delivery, in one SQL database.

The store is the truth the node recovers from, so it is written before a C-STORE is acknowledged.
SQLite (the default) runs in WAL mode with ``synchronous=FULL``: in WAL mode NORMAL only syncs the
log at checkpoints, so a power cut could roll back commits already acted upon (a job finished, a
delivery sent). Recording a received instance is the one exception and runs with NORMAL: its spool
file is fsync'd before the commit, and spool recovery re-records any spool file the database lost,
so a rolled-back row costs nothing, while the fsync saved is one of three per instance. Write
transactions start with ``BEGIN IMMEDIATE`` so that several receiving threads or processes queue on
the busy timeout instead of failing with SQLITE_BUSY when a read transaction tries to become a
writer. Any other SQLAlchemy URL (PostgreSQL) works too: the code relies on unique constraints and
row locks (``FOR UPDATE``, ``FOR SHARE``), not on SQLite's global lock.

An instance is recorded one way on every database: one guarded INSERT of its row
(`Store.record_instance`), with the study, series and receptions rows looked up or inserted only
when the process does not know them. Nothing counts instances as they arrive: counts and
last-received times are derived from the instances rows when read (`instance_counts`,
`last_instance_of_revision`, `Store.studies`).
"""

from __future__ import annotations

import enum
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000


log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC (SQLite has no time zones) and returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use plugin.store.db.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class StudyState(enum.StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class DeliveryState(enum.StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    SENT = "SENT"
    DEAD = "DEAD"


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One study; ``revision`` grows when instances arrive after it was declared complete.

    How many instances it has and when the last arrived are derived from ``instances`` when read
    (`instance_counts`, `last_activity`), so recording an instance never updates this row.
    """

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)  # the console's search
    revision: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revision_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # migration 0006: counts and last-received times are read from the instances; this is the one
    # time no instance row carries: the latest duplicate received while the study was RECEIVING
    resent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # migration 0008 (the web console's study search): from the study's first instance; shown to
    # logged-in staff, never logged
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Instance(Base):
    """One stored SOP instance; ``spool_path`` is relative to the spool directory."""

    __tablename__ = "instances"
    # what completion and the reports read: a revision's last instance, a study's count
    __table_args__ = (Index("ix_instances_study_revision", "study_id", "study_revision", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    study_revision: Mapped[int] = mapped_column(Integer)
    spool_path: Mapped[str] = mapped_column(String(240))
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae: Mapped[str | None] = mapped_column(String(16))


class Reception(Base):
    """An association that brought instances of one study revision; released_at drives completion."""

    __tablename__ = "receptions"
    __table_args__ = (
        UniqueConstraint("association_key", "study_id", "study_revision"),
        Index("ix_receptions_study_revision", "study_id", "study_revision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_key: Mapped[str] = mapped_column(String(100), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    study_revision: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    """Work on one study revision: QUEUED → RUNNING → SUCCEEDED / FAILED / CANCELLED, leased to a worker."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_lease", "state", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer)
    pipeline: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # migration 0004 (plugin/jobs/queue.py, plugin/jobs/execute.py): what routing decided, per-step seconds
    series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    rule: Mapped[str | None] = mapped_column(String(64))
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)


def add_queued_job(
    session: Session,
    study: Study,
    pipeline: str | None = None,
    series_uid: str | None = None,
    rule: str | None = None,
    destinations: Sequence[str] | None = None,
    *,
    revision: int | None = None,
    now: datetime | None = None,
) -> Job:
    """Add a QUEUED job on the study's current revision (or ``revision``) to the session, unflushed.

    Without ``destinations`` the column stays SQL NULL (a job routing has not reached yet).
    """
    now = now or utcnow()
    job = Job(
        study_id=study.id,
        study_revision=study.revision if revision is None else revision,
        pipeline=pipeline,
        series_uid=series_uid,
        rule=rule,
        state=JobState.QUEUED,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    if destinations is not None:  # an explicit None would be stored as JSON null
        job.destinations = list(destinations)
    session.add(job)
    return job


class Delivery(Base):
    """One result instance to one destination; retried with backoff until SENT or DEAD."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "sop_instance_uid", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # migration 0003 (plugin/dispatch/outbox.py): the file to send, the dispatcher's claim, when it was sent
    file_path: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


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
    accession_number: str | None = None
    modality: str | None = None
    series_number: int | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    accession_number: str | None
    revision: int
    state: str
    instance_count: int
    series_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


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


def instance_counts(session: Session, study_ids: Sequence[int]) -> dict[int, int]:
    """How many instances each study has (every revision); studies without any are left out."""
    rows = session.execute(
        select(Instance.study_id, func.count())
        .where(Instance.study_id.in_(study_ids))
        .group_by(Instance.study_id)
    )
    return {study_id: int(n) for study_id, n in rows}


def last_instance_of_revision() -> Any:
    """A scalar subquery, correlated to ``Study``: when the latest instance of the study's current
    revision was received (NULL if it has none)."""
    return (
        select(func.max(Instance.received_at))
        .where(Instance.study_id == Study.id, Instance.study_revision == Study.revision)
        .correlate(Study)
        .scalar_subquery()
    )


def latest(*times: datetime | None) -> datetime:
    """The latest of the times given that are not None (at least one must be)."""
    return max(t for t in times if t is not None)


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
        if study is None or series_id is None or (rec.accession_number is not None and not study[2]):
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


def make_engine(url: str, synchronous: str = "FULL") -> Engine:
    """An engine with the SQLite settings the node's durability and concurrency rely on."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    database = url.split(":///", 1)[1] if ":///" in url else ""
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # the driver's own call: cheaper

    return engine


def _alembic_config(connection: Any) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


class Store:
    """Sessions on one database, plus the few multi-row operations the receiving side needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # instance rows only: spool recovery restores what a power cut rolls back (module docstring)
        self._ingest_engine = (
            make_engine(url, synchronous="NORMAL") if url.startswith("sqlite") else self.engine
        )
        self._known = _KnownRows()
        self._ingest_lock = threading.Lock()
        self._ingest_connection: Connection | None = None

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (Alembic); safe to run at every start."""
        from alembic import command

        with self.engine.begin() as connection:
            command.upgrade(_alembic_config(connection), revision)

    def schema_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One short transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        with self._ingest_lock:
            if self._ingest_connection is not None:
                self._ingest_connection.close()
                self._ingest_connection = None
        self.engine.dispose()
        self._ingest_engine.dispose()

    @contextmanager
    def _ingest(self, commit: bool = True) -> Iterator[Connection]:
        """One transaction on this process's ingest connection (kept open), committed on success
        (``commit``; else rolled back) and rolled back on any exception. One at a time per process:
        the receiving threads queue on a lock, not on the database's busy timeout. A connection that
        failed (other than on a constraint) is closed, and the next transaction opens another."""
        with self._ingest_lock:
            if self._ingest_connection is None:
                self._ingest_connection = self._ingest_engine.connect()
            conn = self._ingest_connection
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
                    self._ingest_connection = None
                raise

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance of that SOP Instance UID is recorded."""
        with self.session() as s:
            return s.execute(_Sql.find_instance, {"sop": sop_instance_uid}).first() is not None

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
            accession_known = rec.accession_number is not None
            study_id = _insert(
                conn,
                Study,
                study_uid=rec.study_uid,
                accession_number=rec.accession_number,
                patient_id=rec.patient_id,
                patient_name=rec.patient_name,
                study_date=rec.study_date,
                revision=revision,
                state=StudyState.RECEIVING,
                first_received_at=now,
                revision_started_at=now,
            )
        else:
            study_id, revision, state, accession = study
            accession_known = accession is not None or rec.accession_number is not None
            if accession is None and rec.accession_number is not None:
                conn.execute(_Sql.fill_accession, {"row": study_id, "accession": rec.accession_number})
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
                modality=rec.modality,
                series_number=rec.series_number,
                first_received_at=now,
            )
        ids = _RowIds(study_id, revision, series_id)
        self._insert_known(conn, rec, ids, new_reception=False)  # the study row is locked: it holds
        _note_reception(conn, rec, study_id, revision)
        return ids, accession_known

    def release_association(self, association_key: str, when: datetime) -> int:
        """Mark every study revision this association brought as released; returns how many."""
        with self.session() as s:
            result = s.execute(
                update(Reception)
                .where(Reception.association_key == association_key, Reception.released_at.is_(None))
                .values(released_at=when)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def recorded_paths(self, study_uid: str) -> set[str]:
        with self.session() as s:
            rows = s.scalars(
                select(Instance.spool_path)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_uid == study_uid)
            )
            return set(rows)

    def studies(self) -> list[StudySummary]:
        """Every study, the one received from last (instance or duplicate) last."""
        instances = (
            select(
                Instance.study_id,
                func.count(Instance.id).label("n"),
                func.max(Instance.received_at).label("last"),
            )
            .group_by(Instance.study_id)
            .subquery()
        )
        series_count = (
            select(Series.study_id, func.count(Series.id).label("n")).group_by(Series.study_id).subquery()
        )
        with self.session() as s:
            rows = s.execute(
                select(
                    Study,
                    func.coalesce(instances.c.n, 0),
                    instances.c.last,
                    func.coalesce(series_count.c.n, 0),
                )
                .outerjoin(instances, instances.c.study_id == Study.id)
                .outerjoin(series_count, series_count.c.study_id == Study.id)
            ).all()
            summaries = [
                StudySummary(
                    study_uid=st.study_uid,
                    accession_number=st.accession_number,
                    revision=st.revision,
                    state=st.state,
                    instance_count=int(n),
                    series_count=int(n_series),
                    first_received_at=st.first_received_at,
                    last_received_at=latest(st.revision_started_at, last, st.resent_at),
                    completed_at=st.completed_at,
                )
                for st, n, last, n_series in rows
            ]
        return sorted(summaries, key=lambda summary: summary.last_received_at)
