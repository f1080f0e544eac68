"""The outbox seam with the executor: enqueue_deliveries is idempotent; no destinations, no rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from plugin.dispatch import enqueue_deliveries
from plugin.store import Delivery, DeliveryState, Job, JobState, Store, Study, StudyState, utcnow


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'radgate.db'}")
    s.migrate()
    yield s
    s.dispose()


def make_job(store: Store) -> int:
    """A SUCCEEDED job on a fresh study, as the executor leaves it."""
    now = utcnow()
    with store.session() as s:
        study = Study(
            study_uid=f"1.2.3.{now.timestamp():.0f}",
            revision=1,
            state=StudyState.COMPLETE,
            instance_count=1,
            first_received_at=now,
            last_received_at=now,
            revision_started_at=now,
        )
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            study_revision=1,
            pipeline="test",
            state=JobState.SUCCEEDED,
            attempts=1,
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        return job.id


def test_one_row_per_result_and_destination_and_idempotent(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    results = [("1.2.3.1", tmp_path / "a.dcm"), ("1.2.3.2", tmp_path / "b.dcm")]
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, results, ["pacs", "web", "pacs"]) == 4
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, results, ["pacs", "web"]) == 0
        assert enqueue_deliveries(s, job_id, [*results, ("1.2.3.3", tmp_path / "c.dcm")], ["web"]) == 1
    with store.session() as s:
        rows = s.scalars(select(Delivery).order_by(Delivery.id)).all()
    assert len(rows) == 5
    assert {r.state for r in rows} == {DeliveryState.PENDING}
    assert {r.attempts for r in rows} == {0}
    assert rows[0].file_path == str((tmp_path / "a.dcm").resolve())


def test_no_destinations_queues_nothing(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    with store.session() as s:
        assert enqueue_deliveries(s, job_id, [("1.2.3.1", tmp_path / "a.dcm")], []) == 0
        assert s.scalars(select(Delivery)).all() == []


def test_rolled_back_with_the_callers_transaction(store: Store, tmp_path: Path) -> None:
    job_id = make_job(store)
    with pytest.raises(RuntimeError), store.session() as s:
        enqueue_deliveries(s, job_id, [("1.2.3.1", tmp_path / "a.dcm")], ["pacs"])
        raise RuntimeError("the executor failed before marking the job SUCCEEDED")
    with store.session() as s:
        assert s.scalars(select(Delivery)).all() == []
