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
row locks (``FOR UPDATE``), not on SQLite's global lock.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
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
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError
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
            raise ValueError("naive datetime given to the store; use plugin.store.utcnow()")
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
    """One study; ``revision`` grows when instances arrive after it was declared complete."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revision_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Instance(Base):
    """One stored SOP instance; ``spool_path`` is relative to the spool directory."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
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
    __table_args__ = (UniqueConstraint("association_key", "study_id", "study_revision"),)

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
    # migration 0004 (plugin/jobs.py, plugin/execute.py): what routing decided, per-step seconds
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
    # migration 0003 (plugin/dispatch.py): the file to send, the dispatcher's claim, when it was sent
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
    """The later of a timestamp column and ``now`` (instances may commit out of order)."""
    return case((column < now, now), else_=column)


def _count_study(row: Any, accession: Any, now: Any) -> Any:
    """Count one more instance of a study (the values are bind parameters or trigger columns)."""
    return (
        update(Study)
        .where(Study.id == row)
        .values(
            instance_count=Study.instance_count + 1,
            last_received_at=_later(Study.last_received_at, now),
            accession_number=func.coalesce(Study.accession_number, accession),
        )
    )


def _count_receiving_study(row: Any, revision: Any, accession: Any, now: Any) -> Any:
    """`_count_study`, only while that study revision is still RECEIVING (else no row changes)."""
    return _count_study(row, accession, now).where(
        Study.revision == revision, Study.state == StudyState.RECEIVING
    )


def _count_series(row: Any, now: Any) -> Any:
    return (
        update(Series)
        .where(Series.id == row)
        .values(
            instance_count=Series.instance_count + 1, last_received_at=_later(Series.last_received_at, now)
        )
    )


_NOW = bindparam("now", type_=UTCDateTime())


class _Sql:
    """Statements built once: building them per call cost more than running them."""

    find_instance = select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop"))
    find_study = (
        select(Study.id, Study.revision, Study.state)
        .where(Study.study_uid == bindparam("uid"))
        .with_for_update()
    )
    count_study = _count_study(bindparam("row"), bindparam("accession", type_=String()), _NOW)
    touch_study = (  # an instance received again: the study revision is still being sent
        update(Study)
        .where(Study.id == bindparam("row"))
        .values(last_received_at=_later(Study.last_received_at, _NOW))
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
    count_receiving_study = _count_receiving_study(
        bindparam("row"), bindparam("at_revision"), bindparam("accession", type_=String()), _NOW
    )
    find_series = select(Series.id).where(Series.series_uid == bindparam("uid"))
    count_series = _count_series(bindparam("row"), _NOW)
    insert_instance = insert(Instance)
    find_reception = select(Reception.id).where(
        Reception.association_key == bindparam("key"),
        Reception.study_id == bindparam("study_id"),
        Reception.study_revision == bindparam("revision"),
    )


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


def _instance_values(
    rec: InstanceRecord, study_id: int, series_id: int, revision: int, received_at: Any = None
) -> tuple[Any, ...]:
    """The values of ``rec``'s instances row, in the order of `_INSTANCE_COLUMNS` (``received_at``:
    the time as the driver takes it, if already processed)."""
    values = (study_id, series_id, rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax, revision)
    return (*values, rec.spool_path, rec.size, received_at or rec.received_at, rec.calling_ae)


def _instance_row(rec: InstanceRecord, study_id: int, series_id: int, revision: int) -> dict[str, Any]:
    return dict(zip(_INSTANCE_COLUMNS, _instance_values(rec, study_id, series_id, revision), strict=True))


_RECEPTION_COLUMNS = ("association_key", "study_id", "study_revision", "calling_ae", "address", "started_at")


def _reception_row(rec: InstanceRecord, study_id: int, revision: int) -> dict[str, Any]:
    """The receptions row of ``rec``'s association for this study revision (``association_key`` set)."""
    values = (rec.association_key, study_id, revision, rec.calling_ae, rec.address, rec.received_at)
    return dict(zip(_RECEPTION_COLUMNS, values, strict=True))


def _note_reception(conn: Connection, rec: InstanceRecord, study_id: int, revision: int) -> None:
    """Insert the receptions row of ``rec``'s association for this study revision, if not there yet."""
    if rec.association_key is not None:
        reception = {"key": rec.association_key, "study_id": study_id, "revision": revision}
        if conn.execute(_Sql.find_reception, reception).first() is None:
            _insert(conn, Reception, **_reception_row(rec, study_id, revision))


def _received_again(conn: Connection, rec: InstanceRecord) -> None:
    """A recorded instance sent again: while its study is RECEIVING, the duplicate counts as one more
    sign that the revision is still being sent (`plugin.completion`): its quiet period starts again
    and the association is one that brings it (its release, not only the earlier ones', counts).
    A COMPLETE study is left as it is: a whole study sent again opens no revision."""
    study = conn.execute(_Sql.find_study, {"uid": rec.study_uid}).first()
    if study is None or study.state != StudyState.RECEIVING:
        return
    conn.execute(_Sql.touch_study, {"row": study.id, "now": rec.received_at})
    _note_reception(conn, rec, study.id, study.revision)


@dataclass(frozen=True)
class _RowIds:
    study_id: int
    revision: int
    series_id: int


class _StaleIds(Exception):
    """A remembered study revision or series row no longer holds."""


class _Prepared:
    """A Core statement compiled once for one dialect and run straight on a DBAPI cursor.

    SQLAlchemy's per-execution work (execution context, parameter processing, result set) cost
    five times what SQLite took to run these statements, on the path to every acknowledgement.
    The bind processors are SQLAlchemy's own (``UTCDateTime`` included), so the rows are the same.
    """

    def __init__(self, statement: Any, dialect: Dialect, column_keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self._sql = compiled.string
        self._defaults = compiled.construct_params(_check=False)  # the statement's own literal values
        self._processors = compiled._bind_processors
        self._positions = compiled.positiontup  # None for named paramstyles (psycopg)

    def bind_value(self, key: str, value: Any) -> Any:
        """``value`` as the driver takes it for parameter ``key`` (see ``run``'s ``bound``)."""
        process = self._processors.get(key)
        return value if process is None else process(value)

    def run(self, cursor: Any, params: dict[str, Any], bound: dict[str, Any] | None = None) -> int:
        """Execute; the number of rows it changed. ``bound`` holds values already processed by
        ``bind_value`` (a timestamp used by several statements is formatted once)."""
        values = {**self._defaults, **params}
        for key, process in self._processors.items():
            if bound is None or key not in bound:
                values[key] = process(values[key])
        if bound is not None:
            values.update(bound)
        cursor.execute(self._sql, values if self._positions is None else [values[k] for k in self._positions])
        return int(cursor.rowcount)


class _KnownInstanceTrigger:
    """SQLite: an instance of a known study revision and series recorded by one INSERT statement.

    The INSERT goes into a temporary view of this connection, and the view's INSTEAD OF trigger does
    what the statements of `_IngestIds` do (count the study revision, only while it is RECEIVING,
    and the series; insert the instances row, and the receptions row when asked), so one call into
    SQLite in autocommit mode records the instance. Python's sqlite3 hands the GIL back around each
    call: the five calls of BEGIN, three statements and COMMIT each had to win it back from the
    process's other receiving threads while holding the ingest lock, and took 0.5 ms in it over four
    associations instead of the 0.08 ms of work. A remembered row that no longer holds raises in the
    trigger (``changes()`` is 0), and the statement leaves nothing behind. Temporary objects belong
    to the one connection (other connections and the schema never see them) and go with it.
    """

    VIEW = "radgate_known_instance"
    COLUMNS = (*_INSTANCE_COLUMNS, "accession_number", "association_key", "address", "new_reception")

    def __init__(self, dialect: Dialect) -> None:
        def sql(statement: Any) -> str:
            return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))

        new: dict[str, Any] = {column: literal_column(f"NEW.{column}") for column in self.COLUMNS}
        stale = "SELECT RAISE(ABORT, 'radgate: {}') WHERE changes() = 0"
        reception = {
            column: new["received_at" if column == "started_at" else column] for column in _RECEPTION_COLUMNS
        }
        body = [
            sql(
                _count_receiving_study(
                    new["study_id"], new["study_revision"], new["accession_number"], new["received_at"]
                )
            ),
            stale.format("the study revision is no longer receiving"),
            sql(_count_series(new["series_id"], new["received_at"])),
            stale.format("the series row is gone"),
            sql(insert(Instance).values({column: new[column] for column in _INSTANCE_COLUMNS})),
            sql(
                insert(Reception).from_select(
                    list(reception),
                    select(*reception.values()).where(new["new_reception"] == literal_column("1")),
                )
            ),
        ]
        columns = ", ".join(self.COLUMNS)
        self.setup = (
            "PRAGMA temp_store = MEMORY",
            f"CREATE TEMP VIEW IF NOT EXISTS {self.VIEW} ({columns}) AS SELECT "
            + ", ".join("NULL" for _ in self.COLUMNS),
            f"CREATE TEMP TRIGGER IF NOT EXISTS {self.VIEW}_insert INSTEAD OF INSERT ON {self.VIEW} BEGIN "
            + "; ".join(body)
            + "; END",
        )
        self.insert = f"INSERT INTO temp.{self.VIEW} VALUES ({', '.join('?' for _ in self.COLUMNS)})"

    def values(
        self, rec: InstanceRecord, ids: _RowIds, received_at: Any, new_reception: bool
    ) -> tuple[Any, ...]:
        """The values to insert, in the order of `COLUMNS` (``received_at`` processed for the driver)."""
        row = _instance_values(rec, ids.study_id, ids.series_id, ids.revision, received_at)
        return (*row, rec.accession_number, rec.association_key, rec.address, int(new_reception))

    def install(self, connection: Any) -> None:
        """Create the view and its trigger on a new DBAPI connection."""
        cursor = connection.cursor()
        for statement in self.setup:
            cursor.execute(statement)
        connection.commit()


class _IngestIds:
    """Row ids this process recorded instances under, so the next instance of the same study
    revision and series needs no lookups: two conditional UPDATEs and one INSERT (two for a new
    association) in one transaction, prepared once and run on the driver's cursor (about 0.05 ms
    instead of 0.7 ms, most of the store's share of the time to the acknowledgement). On SQLite a
    trigger runs them, for one INSERT (`_KnownInstanceTrigger`).

    Nothing here is trusted: the study UPDATE only counts while the study is still RECEIVING at the
    remembered revision, and the series UPDATE only if the row is there; anything else (the study
    completed meanwhile, a duplicate SOP Instance UID, a row removed, any database error) rolls back
    and takes the full path, which looks everything up and reports errors as SQLAlchemy does.
    """

    _LIMIT = 10_000

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        dialect = engine.dialect
        self._trigger = _KnownInstanceTrigger(dialect) if dialect.name == "sqlite" else None
        self._count_study = _Prepared(_Sql.count_receiving_study, dialect)
        self._count_series = _Prepared(_Sql.count_series, dialect)
        self._insert_instance = _Prepared(_Sql.insert_instance, dialect, list(_INSTANCE_COLUMNS))
        self._insert_reception = _Prepared(insert(Reception), dialect, list(_RECEPTION_COLUMNS))
        self._studies: dict[str, tuple[int, int]] = {}
        self._series: dict[str, int] = {}
        self._receptions: set[tuple[str, int, int]] = set()
        self._thread_lock = threading.Lock()
        database = engine.url.database if dialect.name == "sqlite" else None
        self._lock_path = Path(f"{database}-ingest.lock") if database and database != ":memory:" else None
        self._lock_fd: int | None = None
        self._connection: Any = None  # one DBAPI connection, used under the lock only

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold while recording: one ingest transaction at a time in this process and, on SQLite, in
        every process on the database file. SQLite's own wait for its write lock sleeps 1 ms and more
        per retry, which two receiving processes hit at every other instance; a blocking ``flock``
        hands over the moment the holder is done.
        """
        with self._thread_lock:
            if self._lock_path is not None and self._lock_fd is None:
                try:  # read access is enough for flock, so another user's file will do
                    self._lock_fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
                except OSError as err:  # SQLite's own (slower) locking still keeps the rows right
                    log.warning("cannot open %s (%s); ingest goes without it", self._lock_path, err.strerror)
                    self._lock_path = None
            if self._lock_fd is None:
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._thread_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def remember(self, rec: InstanceRecord, ids: _RowIds) -> None:
        if len(self._series) > self._LIMIT:
            self._studies.clear()
            self._series.clear()
        self._studies[rec.study_uid] = (ids.study_id, ids.revision)
        self._series[rec.series_uid] = ids.series_id
        if rec.association_key is not None:
            self._note_reception((rec.association_key, ids.study_id, ids.revision))

    def _note_reception(self, reception: tuple[str, int, int]) -> None:
        """Bounded on its own: a sender that opens an association per instance adds one each time."""
        if len(self._receptions) >= self._LIMIT:
            self._receptions.clear()  # an association seen again inserts its row, fails, takes the full path
        self._receptions.add(reception)

    def connection(self) -> Any:
        """The DBAPI connection the prepared path runs on, opened on first use. Call under ``lock()``."""
        if self._connection is None:
            connection = self._engine.raw_connection()  # kept: a pool checkout per instance costs
            if self._trigger is not None:
                self._trigger.install(connection)
            self._connection = connection
        return self._connection

    def record_known(self, rec: InstanceRecord) -> bool:
        """Record ``rec`` if its study revision and series are known; False: not done. An association's
        first instance of that revision also inserts its receptions row (a row there already, from
        another path, fails the unique constraint: rolled back, and the full path finds it).

        Call under ``lock()``.
        """
        study, series_id = self._studies.get(rec.study_uid), self._series.get(rec.series_uid)
        if study is None or series_id is None:
            return False
        ids = _RowIds(study[0], study[1], series_id)
        reception = (
            (rec.association_key, ids.study_id, ids.revision) if rec.association_key is not None else None
        )
        new_reception = reception is not None and reception not in self._receptions
        connection = self.connection()
        try:
            now = self._insert_instance.bind_value("received_at", rec.received_at)
            cursor = connection.cursor()
            if self._trigger is not None:  # autocommit: the statement is its transaction
                cursor.execute(self._trigger.insert, self._trigger.values(rec, ids, now, new_reception))
            else:
                self._run_statements(cursor, rec, ids, now, new_reception)
                connection.commit()
        except _StaleIds:
            connection.rollback()
            self._forget(rec)
            return False
        except self._engine.dialect.loaded_dbapi.Error:  # stale ids, a duplicate, a lock, a broken connection
            try:
                connection.rollback()
            except self._engine.dialect.loaded_dbapi.Error:  # broken (a database restart): a new one next
                connection.invalidate()
                self._connection = None
            self._forget(rec)
            return False
        if reception is not None and new_reception:
            self._note_reception(reception)
        return True

    def _run_statements(
        self, cursor: Any, rec: InstanceRecord, ids: _RowIds, now: Any, new_reception: bool
    ) -> None:
        """What the trigger does, as separate statements in the driver's transaction (PostgreSQL)."""
        bound = {"now": now}
        study = {"row": ids.study_id, "at_revision": ids.revision, "accession": rec.accession_number}
        if (
            self._count_study.run(cursor, study, bound) != 1
            or self._count_series.run(cursor, {"row": ids.series_id}, bound) != 1
        ):
            raise _StaleIds
        row = _instance_row(rec, ids.study_id, ids.series_id, ids.revision)
        self._insert_instance.run(cursor, row, {"received_at": now})
        if new_reception:  # the association's first instance of this study revision
            reception_row = _reception_row(rec, ids.study_id, ids.revision)
            self._insert_reception.run(cursor, reception_row, {"started_at": now})

    def _forget(self, rec: InstanceRecord) -> None:
        self._studies.pop(rec.study_uid, None)
        self._series.pop(rec.series_uid, None)


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
        conn.exec_driver_sql("BEGIN IMMEDIATE")

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
        self._ingest_sessions = sessionmaker(self._ingest_engine, expire_on_commit=False)
        self._ingest_ids = _IngestIds(self._ingest_engine)

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
        self._ingest_ids.close()
        self.engine.dispose()
        self._ingest_engine.dispose()

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Whether an instance of that SOP Instance UID is recorded."""
        with self.session() as s:
            return s.execute(_Sql.find_instance, {"sop": sop_instance_uid}).first() is not None

    def record_duplicate(self, rec: InstanceRecord) -> bool:
        """If ``rec``'s SOP Instance UID is recorded, count it as received again (`_received_again`)
        and return True; False (nothing changed) if it is not recorded."""
        with self._ingest_ids.lock(), self._ingest_sessions() as s, s.begin():
            conn = s.connection()
            if conn.execute(_Sql.find_instance, {"sop": rec.sop_instance_uid}).first() is None:
                return False
            _received_again(conn, rec)
            return True

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a durable spool file; False if that SOP Instance UID was already recorded (then
        counted as received again, `_received_again`).

        An instance of a study that is no longer RECEIVING opens the study's next revision.
        """
        with self._ingest_ids.lock():
            if self._ingest_ids.record_known(rec):
                return True
            failures = 0
            while True:
                try:
                    with self._ingest_sessions() as s, s.begin():
                        ids = self._record(s, rec)
                except IntegrityError:  # a concurrent writer (PostgreSQL: no global write lock) won a race
                    failures += 1
                    if failures >= 3:
                        raise
                    continue
                if ids is None:
                    return False
                self._ingest_ids.remember(rec, ids)
                return True

    def warm_up(self) -> None:
        """Open the ingest connections and compile the recording statements, then roll back.

        SQLAlchemy compiles each statement on its first use in a process: without this, the first
        instance a receiving process takes waits ~20 ms longer for its answer, and the first of
        each further association the process takes meanwhile waits as long again.
        """
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
                association_key=f"warm-up:{uid}",
            )
            for n in (1, 2)
        )
        with self._ingest_ids.lock():
            self._ingest_ids.connection()
            with self._ingest_sessions() as s:
                s.begin()
                try:
                    self._record(s, first)  # a new study and series
                    self._record(s, second)  # the same study and series, now known
                finally:
                    s.rollback()

    def _record(self, s: Session, rec: InstanceRecord) -> _RowIds | None:
        """Prepared Core statements (see ``_Sql``), not the ORM: this runs once per received instance."""
        conn = s.connection()
        if conn.execute(_Sql.find_instance, {"sop": rec.sop_instance_uid}).first() is not None:
            _received_again(conn, rec)
            return None
        now = rec.received_at
        study = conn.execute(_Sql.find_study, {"uid": rec.study_uid}).first()
        if study is None:
            revision = 1
            study_id = _insert(
                conn,
                Study,
                study_uid=rec.study_uid,
                accession_number=rec.accession_number,
                revision=revision,
                state=StudyState.RECEIVING,
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
                revision_started_at=now,
            )
        else:
            study_id, revision, state = study
            conn.execute(_Sql.count_study, {"row": study_id, "now": now, "accession": rec.accession_number})
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
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
            )
        else:
            conn.execute(_Sql.count_series, {"row": series_id, "now": now})
        conn.execute(_Sql.insert_instance, _instance_row(rec, study_id, series_id, revision))
        _note_reception(conn, rec, study_id, revision)
        return _RowIds(study_id, revision, series_id)

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
        series_count = (
            select(Series.study_id, func.count(Series.id).label("n")).group_by(Series.study_id).subquery()
        )
        with self.session() as s:
            rows = s.execute(
                select(Study, func.coalesce(series_count.c.n, 0))
                .outerjoin(series_count, series_count.c.study_id == Study.id)
                .order_by(Study.last_received_at)
            ).all()
            return [
                StudySummary(
                    study_uid=st.study_uid,
                    accession_number=st.accession_number,
                    revision=st.revision,
                    state=st.state,
                    instance_count=st.instance_count,
                    series_count=int(n),
                    first_received_at=st.first_received_at,
                    last_received_at=st.last_received_at,
                    completed_at=st.completed_at,
                )
                for st, n in rows
            ]
