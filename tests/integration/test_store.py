"""The job store: schema migrations, SQLite settings, recording instances, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, func, select, text

from plugin.store.engine import MIGRATIONS_DIR, Store, alembic_config, begin_immediate, make_engine
from plugin.store.models import Base, Instance, Job, Reception, Series, Study, StudyState, utcnow
from plugin.store.recording import HeaderTags, InstanceRecord, InstanceRecorder

# The recording processes of test_concurrent_processes_record_into_one_study import this module: what
# only the tests in this process use (pydicom, alembic's tools, support.node) is imported where used.


def generate_uid() -> str:
    from pydicom.uid import generate_uid as new_uid

    return new_uid()


def instance_record(
    study_uid: str, series_uid: str | None = None, sop: str | None = None, key: str | None = "a1", **more: Any
) -> InstanceRecord:
    from support.node import instance_record as record

    return record(study_uid, series_uid, sop, key, **more)


def compiled_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from support.node import compiled_statements as compiled

    return compiled(monkeypatch)


def _record(
    study_uid: str, series_uid: str | None = None, sop: str | None = None, key: str | None = "a1"
) -> InstanceRecord:
    return instance_record(study_uid, series_uid, sop, key, calling_ae="SCU", accession_number="ACC1")


def _head() -> str | None:
    """The newest migration: other rooms add migrations, so the test does not pin a number."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def test_migrated_schema_matches_the_models(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert store.schema_revision() == _head()


def test_sqlite_runs_in_wal_mode_with_full_sync_except_for_instance_rows(store: Store) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("SQLite settings")
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 0  # begin_immediate waits
    with store.recorder._engine.connect() as connection:  # spool recovery restores lost instance rows
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_begin_immediate_waits_for_the_write_lock_until_its_timeout(tmp_path: Path) -> None:
    """A transaction waits while another connection holds SQLite's write lock, gets it once released,
    and fails with the database's own error when the lock is held past the timeout."""
    database = tmp_path / "lock.db"
    holder, waiter = (
        sqlite3.connect(database, isolation_level=None),
        sqlite3.connect(database, isolation_level=None, check_same_thread=False),
    )
    for connection in (holder, waiter):
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA busy_timeout=0")
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    got = threading.Event()

    def take() -> None:
        begin_immediate(waiter, timeout=30)
        got.set()

    taker = threading.Thread(target=take)
    taker.start()
    assert not got.wait(0.2)  # still held
    holder.execute("COMMIT")
    assert got.wait(10)
    taker.join()
    waiter.execute("COMMIT")


class _Refusing:
    """A connection whose first ``refusals`` statements fail with SQLite's extended error ``code``."""

    def __init__(self, code: int, refusals: int) -> None:
        self.code, self.refusals = code, refusals
        self.tries: list[str] = []

    def execute(self, statement: str) -> None:
        self.tries.append(statement)
        if len(self.tries) <= self.refusals:
            err = sqlite3.OperationalError(f"extended code {self.code}")
            err.sqlite_errorcode = self.code
            raise err


def test_begin_immediate_waits_out_extended_busy_codes_and_raises_other_errors_at_once() -> None:
    """Two stores migrating a new database at once failed about once in 150 tries: one connection
    met the other's WAL recovery, SQLITE_BUSY_RECOVERY (261, an extended code of SQLITE_BUSY)."""
    recovering = _Refusing(sqlite3.SQLITE_BUSY | 1 << 8, refusals=3)
    begin_immediate(cast(sqlite3.Connection, recovering), timeout=10)
    assert recovering.tries == ["BEGIN IMMEDIATE"] * 4
    failing = _Refusing(sqlite3.SQLITE_IOERR | 3 << 8, refusals=3)  # SQLITE_IOERR_WRITE
    with pytest.raises(sqlite3.OperationalError, match="extended code 778"):
        begin_immediate(cast(sqlite3.Connection, failing), timeout=10)
    assert failing.tries == ["BEGIN IMMEDIATE"]


def test_a_new_database_is_turned_to_wal_once_a_writer_that_holds_it_commits(tmp_path: Path) -> None:
    """Turning a new database to WAL while another connection writes to it gets SQLITE_BUSY at once,
    without SQLite's busy handler (it could deadlock): two nodes or commands starting together on a
    new data dir met it. The connection waits for the writer instead of failing."""
    database = tmp_path / "new.db"
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("INSERT INTO t VALUES (1)")  # a RESERVED lock on a database still in rollback mode
    commit = threading.Timer(0.3, holder.execute, ("COMMIT",))
    commit.start()
    engine = make_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("SELECT x FROM t").scalar() == 1  # after the commit
    finally:
        commit.join()
        engine.dispose()
        holder.close()


def test_an_old_database_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    old = Store(f"sqlite:///{tmp_path / 'old.db'}")
    old.migrate("0001")
    with old.engine.begin() as connection:  # rows as revision 0001 wrote them (with a content hash)
        when = "2026-11-28 08:00:00.000000"
        connection.exec_driver_sql(
            "INSERT INTO studies VALUES (1, '1.2.3', NULL, 1, 'RECEIVING', 1, ?, ?, ?, NULL)", (when,) * 3
        )
        connection.exec_driver_sql(
            "INSERT INTO series VALUES (1, 1, '1.2.3.4', 'CT', 1, 1, ?, ?)", (when,) * 2
        )
        connection.exec_driver_sql(
            "INSERT INTO instances VALUES (1, 1, 1, '1.2.3.4.5', '1.2.840.10008.5.1.4.1.1.2', "
            "'1.2.840.10008.1.2.1', 1, '1.2.3/1.2.3.4/1.2.3.4.5.dcm', 1, ?, ?, 'SCU')",
            ("0" * 64, when),
        )
        rows = connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
        tables = {r[0] for r in rows}
    assert "jobs" not in tables
    old.dispose()

    upgraded = Store(f"sqlite:///{tmp_path / 'old.db'}")
    upgraded.migrate()
    assert upgraded.schema_revision() == _head()
    assert [s.study_uid for s in upgraded.studies()] == ["1.2.3"]
    with upgraded.session() as s:
        study = s.scalars(select(Study)).one()
        s.add(
            Job(
                study_id=study.id,
                study_revision=1,
                state="QUEUED",
                attempts=0,
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )
    with upgraded.session() as s:
        assert s.execute(text("SELECT count(*) FROM jobs")).scalar() == 1
    upgraded.dispose()


def test_the_counters_become_derived_and_a_receiving_study_keeps_its_quiet_period(tmp_path: Path) -> None:
    """Migration 0006 drops the counters on a database with rows (SQLite's own DROP COLUMN, under
    the foreign keys that point at studies and series): counts then come from the instances, and a
    study still RECEIVING keeps its last-received time (a duplicate's included) as ``resent_at``."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Store(url)
    old.migrate("0005")
    with old.engine.begin() as connection:  # rows as revision 0005 wrote them, a duplicate at 08:00:09
        first, resent = "2026-11-28 08:00:00.000000", "2026-11-28 08:00:09.000000"
        connection.exec_driver_sql(
            "INSERT INTO studies VALUES (1, '1.2.3', NULL, 1, 'RECEIVING', 1, ?, ?, ?, NULL)",
            (first, resent, first),
        )
        connection.exec_driver_sql(
            "INSERT INTO series VALUES (1, 1, '1.2.3.4', 'CT', 1, 1, ?, ?)", (first,) * 2
        )
        connection.exec_driver_sql(
            "INSERT INTO instances VALUES (1, 1, 1, '1.2.3.4.5', '1.2.840.10008.5.1.4.1.1.2', "
            "'1.2.840.10008.1.2.1', 1, '1.2.3/1.2.3.4/1.2.3.4.5.dcm', 1, ?, 'SCU')",
            (first,),
        )
    old.dispose()
    upgraded = Store(url)
    upgraded.migrate()
    try:
        [summary] = upgraded.studies()
        assert (summary.instance_count, summary.series_count) == (1, 1)
        assert summary.last_received_at.isoformat() == "2026-11-28T08:00:09+00:00"
        with upgraded.engine.begin() as connection:  # and back: the counters are filled in from the rows
            command.downgrade(alembic_config(connection), "0005")
        with upgraded.engine.connect() as connection:
            row = connection.exec_driver_sql("SELECT instance_count, last_received_at FROM studies").one()
        assert tuple(row) == (1, resent)
        upgraded.migrate()
        assert upgraded.schema_revision() == _head()
    finally:
        upgraded.dispose()


def test_the_same_instance_is_recorded_once(store: Store) -> None:
    rec = _record("1.2.3")
    assert store.recorder.record_instance(rec) is True
    assert store.recorder.record_instance(rec) is False
    [summary] = store.studies()
    assert (summary.instance_count, summary.series_count, summary.revision) == (1, 1, 1)
    assert summary.accession_number == "ACC1"
    with store.session() as s:
        assert s.scalars(select(Instance.sop_instance_uid)).all() == [rec.sop_instance_uid]


def _receiving(store: Store) -> tuple[str, Any, list[tuple[str, int, Any]]]:
    """The one study's state and last received time (an instance's or a duplicate's), and its
    receptions (key, revision, released_at)."""
    [summary] = store.studies()
    with store.session() as s:
        receptions = s.execute(
            select(Reception.association_key, Reception.study_revision, Reception.released_at).order_by(
                Reception.id
            )
        )
        return summary.state, summary.last_received_at, [tuple(row) for row in receptions]


@pytest.mark.parametrize("found_by", ["record_instance", "record_duplicate"])
def test_a_duplicate_keeps_a_receiving_study_open_but_reopens_no_complete_one(
    store: Store, found_by: str
) -> None:
    """Both places that find a duplicate count it: the quiet period starts again and its association
    is one that brings the revision (until released, the after-release shortcut does not apply)."""
    t0 = utcnow()
    first = replace(_record("1.2.3", key="before-crash"), received_at=t0)
    assert store.recorder.record_instance(first)
    store.release_association("before-crash", t0)
    again = replace(first, association_key="resend", received_at=t0 + timedelta(seconds=5))
    record = getattr(store.recorder, found_by)
    assert record(again) is (found_by == "record_duplicate")
    assert _receiving(store) == (
        "RECEIVING",
        t0 + timedelta(seconds=5),
        [("before-crash", 1, t0), ("resend", 1, None)],
    )
    assert store.recorder.record_duplicate(replace(again, received_at=t0)) is True  # never moves back
    assert _receiving(store)[1] == t0 + timedelta(seconds=5)
    with store.session() as s:
        s.scalars(select(Study)).one().state = StudyState.COMPLETE
    later = replace(again, association_key="late", received_at=t0 + timedelta(seconds=9))
    record(later)
    state, last, receptions = _receiving(store)
    assert (state, last, len(receptions)) == ("COMPLETE", t0 + timedelta(seconds=5), 2)
    assert store.recorder.record_duplicate(_record("1.2.3", key="x")) is False  # not recorded: nothing done
    assert store.studies()[0].instance_count == 1


def test_an_instance_after_completion_opens_a_new_revision(store: Store) -> None:
    series = generate_uid()
    first = _record("1.2.3", series)
    store.recorder.record_instance(first)
    with store.session() as s:
        study = s.scalars(select(Study)).one()
        study.state = StudyState.COMPLETE
        study.completed_at = utcnow()
    assert store.recorder.record_instance(first) is False  # a resend of a known instance reopens nothing
    assert store.studies()[0].state == "COMPLETE"
    store.recorder.record_instance(_record("1.2.3", series))
    [summary] = store.studies()
    assert (summary.revision, summary.state, summary.instance_count) == (2, "RECEIVING", 2)
    assert summary.completed_at is None


def test_an_instance_of_a_remembered_revision_that_completed_meanwhile_opens_the_next(store: Store) -> None:
    """The store remembers the study revision: its guarded INSERT must not add to it once complete."""
    series = generate_uid()
    assert store.recorder.record_instance(_record("1.2.3", series))
    with store.session() as s:
        s.scalars(select(Study)).one().state = StudyState.COMPLETE
    assert store.recorder.record_instance(_record("1.2.3", series))
    [summary] = store.studies()
    assert (summary.revision, summary.state, summary.instance_count) == (2, "RECEIVING", 2)
    with store.session() as s:
        assert sorted(s.scalars(select(Instance.study_revision)).all()) == [1, 2]


def test_release_marks_the_associations_receptions(store: Store) -> None:
    store.recorder.record_instance(_record("1.2.3", key="assoc-1"))
    store.recorder.record_instance(_record("1.2.3", key="assoc-1"))
    store.recorder.record_instance(_record("1.2.4", key="assoc-1"))
    assert store.release_association("assoc-1", utcnow() + timedelta(seconds=1)) == 2
    assert store.release_association("assoc-1", utcnow()) == 0


def test_a_new_association_of_a_known_series_takes_the_known_path(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Senders that open an association per instance are common: the first instance of a new
    association, in a study revision and series this process knows, inserts its receptions row
    beside the instance instead of looking everything up. A row there already (it never is, unless
    another path wrote it) fails the unique constraint, and the lookups take over."""
    series = generate_uid()
    assert store.recorder.record_instance(_record("1.2.3", series, key="assoc-1"))
    full_path: list[str] = []
    record = InstanceRecorder._record

    def counted(self: InstanceRecorder, conn: object, rec: InstanceRecord) -> object:
        full_path.append(rec.sop_instance_uid)
        return record(self, conn, rec)  # type: ignore[arg-type]

    monkeypatch.setattr(InstanceRecorder, "_record", counted)
    for key in ("assoc-2", "assoc-3"):
        assert store.recorder.record_instance(_record("1.2.3", series, key=key))
    assert full_path == []
    store.recorder._known.receptions.discard(next(iter(store.recorder._known.receptions)))  # as if never seen
    for key in ("assoc-1", "assoc-2", "assoc-3"):
        assert store.recorder.record_instance(_record("1.2.3", series, key=key))
    assert len(full_path) == 1
    with store.session() as s:
        keys = s.scalars(select(Reception.association_key)).all()
    assert sorted(keys) == ["assoc-1", "assoc-2", "assoc-3"]
    assert store.release_association("assoc-2", utcnow()) == 1
    [summary] = store.studies()
    assert summary.instance_count == 6


def _statements(store: Store) -> list[str]:
    """From now on, the first word of each statement the store's recording path sends."""
    sent: list[str] = []

    @event.listens_for(store.recorder._engine, "before_cursor_execute")
    def _sent(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement.split()[0])

    return sent


def test_a_known_instance_is_one_insert_and_reads_back_as_the_counters_did(store: Store) -> None:
    """An instance of a study revision and series this process knows is one guarded INSERT (in its
    transaction), the same on SQLite and PostgreSQL. What the counters held comes out of the rows:
    counts, the later of two receive times, the first accession number seen, a receptions row for
    each new association."""
    t0, series = utcnow(), generate_uid()
    assert store.recorder.record_instance(instance_record("1.2.3", series, key="a1", received_at=t0))
    later = instance_record("1.2.3", series, key="a1", received_at=t0 + timedelta(seconds=5))
    # fills the study's accession in
    assert store.recorder.record_instance(replace(later, tags=HeaderTags(accession_number="ACC1")))
    sent = _statements(store)
    assert store.recorder.record_instance(replace(later, sop_instance_uid=generate_uid()))
    assert [s for s in sent if s not in ("BEGIN", "COMMIT")] == ["INSERT"]
    assert store.recorder.record_instance(
        instance_record("1.2.3", series, key="a2", received_at=t0 + timedelta(seconds=2))
    )
    assert store.recorder.record_instance(
        replace(later, sop_instance_uid=generate_uid(), tags=HeaderTags(accession_number="ACC2"))
    )
    assert [s for s in sent if s not in ("BEGIN", "COMMIT")] == ["INSERT"] * 4  # a2: its receptions row
    [summary] = store.studies()
    assert (summary.instance_count, summary.series_count) == (5, 1)
    assert summary.last_received_at == t0 + timedelta(seconds=5)
    assert summary.accession_number == "ACC1"
    with store.session() as s:
        keys = sorted(s.scalars(select(Reception.association_key)).all())
    assert keys == ["a1", "a2"]


def test_a_warmed_up_store_records_its_first_instances_without_compiling(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiving process warms its store up before it takes an association (`Receiver.prepare`):
    the first instances it records, of a new study and series, then wait for no statement to be
    compiled. The warm-up itself leaves no row behind."""
    store.recorder.warm_up()
    with store.session() as s:
        counts = [s.scalar(select(func.count()).select_from(t)) for t in (Study, Series, Instance, Reception)]
    assert counts == [0, 0, 0, 0]
    compiled = compiled_statements(monkeypatch)
    series = generate_uid()
    assert store.recorder.record_instance(_record("1.2.3", series, key="assoc-1"))  # a new study and series
    assert store.recorder.record_instance(
        _record("1.2.3", generate_uid(), key="assoc-2")
    )  # a new series of it
    assert store.recorder.record_instance(_record("1.2.3", series, key="assoc-1"))  # the prepared path
    assert compiled == []
    [summary] = store.studies()
    assert (summary.instance_count, summary.series_count) == (3, 2)


def test_the_remembered_associations_stay_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """One association per instance, for months: the receptions this process remembers are bounded
    on their own, and an association forgotten that sends again still gets one row."""
    monkeypatch.setattr(type(store.recorder._known), "_LIMIT", 3)
    series = generate_uid()
    for n in range(10):
        assert store.recorder.record_instance(_record("1.2.3", series, key=f"assoc-{n}"))
        assert len(store.recorder._known.receptions) <= 3
    assert store.recorder.record_instance(_record("1.2.3", series, key="assoc-0"))  # forgotten by now
    with store.session() as s:
        keys = s.scalars(select(Reception.association_key)).all()
    assert sorted(keys) == sorted(f"assoc-{n}" for n in range(10))
    assert store.studies()[0].instance_count == 11


def _write_many(url: str, records: list[InstanceRecord]) -> None:
    s = Store(url)
    for record in records:
        assert s.recorder.record_instance(record)
    s.dispose()


def test_concurrent_processes_record_into_one_study(store: Store) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    # fresh processes, forked from a server that imported the store once: not each importing it again
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "plugin.store.engine", "plugin.store.recording"])
    batches = [[_record(study_uid, series_uid, key=f"proc-{k}") for _ in range(40)] for k in range(3)]
    procs = [ctx.Process(target=_write_many, args=(store.url, batch)) for batch in batches]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    [summary] = store.studies()
    assert (summary.instance_count, summary.series_count) == (120, 1)


def test_recording_makes_no_file_beside_the_database_but_sqlites_own(tmp_path: Path) -> None:
    """Two receiving processes share the database through SQLite's own locking: no side-car lock."""
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.migrate()
    try:
        series = generate_uid()
        assert store.recorder.record_instance(_record("1.2.3", series))
        assert store.recorder.record_instance(_record("1.2.3", series))  # the known path too
        assert store.studies()[0].instance_count == 2
        assert {p.name for p in tmp_path.iterdir()} <= {"s.db", "s.db-wal", "s.db-shm"}
    finally:
        store.dispose()


def test_recording_goes_on_after_the_database_server_dropped_its_connections(store: Store) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a database server")
    series = generate_uid()
    assert store.recorder.record_instance(_record("1.2.3", series))
    assert store.recorder.record_instance(_record("1.2.3", series))  # the known path, on a pooled connection
    with store.engine.begin() as connection:  # what a server restart does to every other session
        connection.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert store.recorder.record_instance(_record("1.2.3", series))
    assert store.recorder.record_instance(_record("1.2.3", series))
    assert store.studies()[0].instance_count == 4
