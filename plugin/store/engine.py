"""Connections to the job store's database: engines with the settings durability relies on, and migrations.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``: in WAL mode NORMAL only syncs the
log at checkpoints, so a power cut could roll back commits already acted upon (a job finished, a
delivery sent). Recording a received instance is the one exception (`plugin.store.recording`). Write
transactions start with ``BEGIN IMMEDIATE`` so that several receiving threads or processes queue on
the busy timeout instead of failing with SQLITE_BUSY when a read transaction tries to become a
writer. Any other SQLAlchemy URL (PostgreSQL) works too: the code relies on unique constraints and
row locks (``FOR UPDATE``, ``FOR SHARE``), not on SQLite's global lock.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text, update
from sqlalchemy.orm import Session, sessionmaker

from plugin.store.models import Reception
from plugin.store.queries import StudySummary, recorded_paths, study_summaries
from plugin.store.recording import InstanceRecorder

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
"""Primary result codes: an extended code (``sqlite_errorcode``) carries its primary in the low byte."""
MIGRATION_LOCK = 0x72616467  # "radg": the PostgreSQL advisory lock key of `Store.migrate`


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
        execute_when_free(dbapi_connection, "PRAGMA journal_mode=WAL")  # a new database: two may race
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=0")  # waits for the write lock in `begin_immediate`, below
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        begin_immediate(conn.connection.driver_connection)

    return engine


def execute_when_free(
    connection: sqlite3.Connection, statement: str, timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000
) -> None:
    """Execute ``statement`` (one that takes a lock: ``BEGIN IMMEDIATE``, setting the journal mode),
    retrying while another connection holds the lock: any busy code, extended ones included (a
    connection that opens the database while another rebuilds its WAL index, on a new database or
    at the first opening after a crash, gets SQLITE_BUSY_RECOVERY).

    Raises sqlite3.OperationalError if it is still held after ``timeout`` seconds (or on any other
    error). The retries start at 50 µs and double up to 1 ms: SQLite's own busy handler sleeps 1, 2,
    5, 10 ms... (far longer than a transaction of the recording path holds the lock), and it is not
    called at all where waiting could deadlock (two connections turning a new database to WAL at once).
    """
    delay, deadline = 50e-6, time.monotonic() + timeout
    while True:
        try:
            connection.execute(statement)
            return
        except sqlite3.OperationalError as err:
            if (err.sqlite_errorcode or 0) & 0xFF not in _BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 1e-3)


def begin_immediate(connection: sqlite3.Connection, timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> None:
    """``BEGIN IMMEDIATE``: take SQLite's write lock, waiting up to ``timeout`` s (`execute_when_free`)."""
    execute_when_free(connection, "BEGIN IMMEDIATE", timeout)


class SchemaTooNew(RuntimeError):
    """The database's schema is at a revision this code does not know: a newer radgate migrated it."""


def alembic_config(connection: Any) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _heads() -> frozenset[str]:
    """The head revision of the migrations, as a set: empty when there are several (a branch to merge)."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config(None)).get_heads()
    return frozenset(heads) if len(heads) == 1 else frozenset()


class Store:
    """The job store on one database: short sessions, migrations, and the instance recorder.

    ``recorder`` records received instances (`plugin.store.recording`); on SQLite it has an engine of
    its own with ``synchronous=NORMAL``. Everything else goes through `session`.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.recorder = InstanceRecorder(
            make_engine(url, synchronous="NORMAL") if url.startswith("sqlite") else self.engine
        )

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (Alembic); safe to run at every start, and by several nodes
        at once: on PostgreSQL the first takes a transaction-level advisory lock (`MIGRATION_LOCK`) and
        the others wait for it, then find the schema up to date; SQLite's write lock does the same.
        A store already at the one head is left as it is without running Alembic's upgrade (which
        loads every migration).

        Raises SchemaTooNew, having changed nothing, when the database is at a revision this code
        does not know (a newer radgate migrated it); the message names both revisions.
        """
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError

        if revision == "head" and self.schema_revision() in _heads():
            return
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg = alembic_config(connection)
            script = ScriptDirectory.from_config(cfg)
            current = MigrationContext.configure(connection).get_current_heads()
            for known in current:
                try:
                    script.get_revision(known)
                except CommandError:
                    raise SchemaTooNew(
                        f"the database schema is at revision {known}, newer than this radgate's newest "
                        f"({script.get_current_head()}): a newer radgate migrated it; run that version "
                        "(or newer) on this database; nothing was changed"
                    ) from None
            command.upgrade(cfg, revision)

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
        self.recorder.close()
        self.engine.dispose()

    def release_association(self, association_key: str, when: datetime) -> int:
        """Mark every study revision this association brought as released; returns how many."""
        with self.session() as s:
            result = s.execute(
                update(Reception)
                .where(Reception.association_key == association_key, Reception.released_at.is_(None))
                .values(released_at=when)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def studies(self) -> list[StudySummary]:
        """Every study, the one received from last (instance or duplicate) last (`study_summaries`)."""
        with self.session() as s:
            return study_summaries(s)

    def recorded_paths(self, study_uid: str) -> set[str]:
        """The spool paths of the study's recorded instances (`plugin.store.queries.recorded_paths`)."""
        with self.session() as s:
            return recorded_paths(s, study_uid)


@contextmanager
def migrated_store(url: str) -> Iterator[Store]:
    """A `Store` on ``url``, its schema brought up to date (`Store.migrate`); disposed on exit,
    whatever is raised (a failed migration included)."""
    store = Store(url)
    try:
        store.migrate()
        yield store
    finally:
        store.dispose()
