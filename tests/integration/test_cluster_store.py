"""Several nodes on one store, without the nodes: completion raced by two monitors, migrations by
two starts, and the schema check at start, each on SQLite and on PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from support.node import instance_record
from support.postgres import BACKENDS

from plugin.config import CompletionConfig, Config
from plugin.jobs.completion import CompletionMonitor, queue_unrouted_job
from plugin.node import Node, serve
from plugin.store.engine import MIGRATIONS_DIR, SchemaTooNew, Store, alembic_config
from plugin.store.models import Job, Study, utcnow


def head() -> str | None:
    """The newest migration (alembic is imported here, not at collection)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def test_two_monitors_complete_a_study_once_and_queue_one_job(store: Store) -> None:
    """Node A completes the study and holds its row until it commits; node B saw the study due
    meanwhile, waits for the row, finds it COMPLETE and does nothing."""
    t0 = utcnow()
    store.recorder.record_instance(instance_record("1.2.3", "1.2.3.4", key="a", received_at=t0))
    store.recorder.record_instance(instance_record("1.2.3", "1.2.3.4", key="b", received_at=t0))
    in_hook, b_started, b_done = threading.Event(), threading.Event(), threading.Event()

    def slow_hook(session: Session, study: Study) -> None:
        in_hook.set()
        assert b_started.wait(10)
        assert not b_done.wait(0.3)  # B waits on the row A holds
        queue_unrouted_job(session, study)

    quiet = CompletionConfig(quiet_period_s=1, after_release_s=0)
    a = CompletionMonitor(store, quiet, started_at=t0, on_complete=slow_hook)
    other = Store(store.url)  # node B's own engine and connections
    b = CompletionMonitor(other, quiet, started_at=t0)
    due = t0 + timedelta(seconds=2)

    def run_b() -> list[tuple[str, int]]:
        assert in_hook.wait(10)
        b_started.set()
        try:
            return b.check(due)
        finally:
            b_done.set()

    try:
        with ThreadPoolExecutor(1) as pool:
            from_b = pool.submit(run_b)
            assert a.check(due) == [("1.2.3", 1)]
            assert from_b.result(timeout=30) == []
    finally:
        other.dispose()
    with store.session() as s:
        assert [(j.study_revision, j.state) for j in s.scalars(select(Job))] == [(1, "QUEUED")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_starts_migrate_a_new_database_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two nodes starting at once on an empty database: one migrates, the other waits and finds
    the schema up to date (PostgreSQL: an advisory lock; SQLite: its write lock)."""
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'second.db'}"
    stores = [Store(url), Store(url)]
    try:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(s.migrate) for s in stores]:
                done.result(timeout=120)
        assert {s.schema_revision() for s in stores} == {head()}
    finally:
        for s in stores:
            s.dispose()


def test_the_migrations_go_down_to_nothing_and_up_again(store: Store) -> None:
    from alembic import command

    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert store.schema_revision() is None
    store.migrate()
    assert store.schema_revision() == head()


def _config(tmp_path: Path, url: str) -> Config:
    return Config.model_validate(
        {"data_dir": str(tmp_path / "node"), "database_url": url, "web": {"enabled": False}}
    )


def test_an_older_schema_is_upgraded_when_a_node_starts(store: Store, tmp_path: Path) -> None:
    from alembic import command

    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0005")
    node = Node(_config(tmp_path, store.url), listen=False, execute=False)
    try:
        node.start()
        assert node.store.schema_revision() == head()
    finally:
        node.stop()


def test_a_newer_schema_stops_the_node_naming_both_revisions(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaTooNew, match=f"revision 9999, newer than this radgate's newest \\({head()}\\)"):
        store.migrate()
    # serve in this process: it must leave pytest's logging, umask and signal handlers as they are
    monkeypatch.setattr("plugin.node.setup_logging", lambda _config: None)
    monkeypatch.setattr("plugin.node.apply_file_modes", lambda _modes: None)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with caplog.at_level(logging.ERROR, logger="plugin.node"):
            assert serve(_config(tmp_path, store.url), listen=False, execute=False) == 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert f"revision 9999, newer than this radgate's newest ({head()})" in caplog.text
    assert store.schema_revision() == "9999"  # nothing was changed
