"""Completion: quiet period, shortened after release, restart behaviour, late instances, job hook."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from support.node import instance_record, wait_for

from plugin.config import CompletionConfig
from plugin.jobs.completion import CompletionMonitor
from plugin.store.engine import Store
from plugin.store.models import Job, utcnow

QUIET = CompletionConfig(quiet_period_s=10, after_release_s=1)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'radgate.db'}")
    s.migrate()
    yield s
    s.dispose()


def _receive(store: Store, study_uid: str, at: datetime, key: str = "assoc-1") -> None:
    store.recorder.record_instance(instance_record(study_uid, "1.2.3.4", key=key, received_at=at))


def _jobs(store: Store) -> list[tuple[int, str | None, str]]:
    with store.session() as s:
        return [(j.study_revision, j.pipeline, j.state) for j in s.scalars(select(Job).order_by(Job.id))]


def test_a_study_completes_after_the_quiet_period_and_queues_one_job(store: Store) -> None:
    t0 = utcnow()
    monitor = CompletionMonitor(store, QUIET, started_at=t0)
    _receive(store, "1.2.3", t0)
    assert monitor.check(t0 + timedelta(seconds=9.9)) == []
    assert monitor.check(t0 + timedelta(seconds=10)) == [("1.2.3", 1)]
    assert monitor.check(t0 + timedelta(seconds=20)) == []
    assert _jobs(store) == [(1, None, "QUEUED")]
    assert store.studies()[0].state == "COMPLETE"


def test_release_shortens_the_wait_only_when_every_association_is_released(store: Store) -> None:
    t0 = utcnow()
    monitor = CompletionMonitor(store, QUIET, started_at=t0)
    _receive(store, "1.2.3", t0, key="a")
    _receive(store, "1.2.3", t0, key="b")
    store.release_association("a", t0 + timedelta(seconds=0.5))
    assert monitor.check(t0 + timedelta(seconds=3)) == []
    store.release_association("b", t0 + timedelta(seconds=2))
    assert monitor.check(t0 + timedelta(seconds=2.9)) == []
    assert monitor.check(t0 + timedelta(seconds=3)) == [("1.2.3", 1)]


def test_after_a_restart_the_quiet_period_counts_from_the_start(store: Store) -> None:
    t0 = utcnow()
    _receive(store, "1.2.3", t0)  # its association died with the previous node process
    restarted = CompletionMonitor(store, QUIET, started_at=t0 + timedelta(seconds=60))
    assert restarted.check(t0 + timedelta(seconds=65)) == []
    assert restarted.check(t0 + timedelta(seconds=70)) == [("1.2.3", 1)]


def test_a_late_instance_opens_a_new_revision_that_completes_with_its_own_job(store: Store) -> None:
    t0 = utcnow()
    monitor = CompletionMonitor(store, QUIET, started_at=t0)
    _receive(store, "1.2.3", t0)
    assert monitor.check(t0 + timedelta(seconds=10)) == [("1.2.3", 1)]
    _receive(store, "1.2.3", t0 + timedelta(seconds=30), key="assoc-2")
    [study] = store.studies()
    assert (study.revision, study.state, study.instance_count) == (2, "RECEIVING", 2)
    assert monitor.check(t0 + timedelta(seconds=35)) == []
    store.release_association("assoc-2", t0 + timedelta(seconds=31))
    assert monitor.check(t0 + timedelta(seconds=32)) == [("1.2.3", 2)]
    assert _jobs(store) == [(1, None, "QUEUED"), (2, None, "QUEUED")]


def test_the_loop_completes_studies_until_stopped(store: Store) -> None:
    monitor = CompletionMonitor(store, CompletionConfig(quiet_period_s=0.2, after_release_s=0.1))
    _receive(store, "1.2.3", utcnow())
    stop = threading.Event()
    loop = threading.Thread(target=monitor.run, args=(stop,))
    loop.start()
    try:
        wait_for(lambda: store.studies()[0].state == "COMPLETE", 10, "the study to complete")
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
