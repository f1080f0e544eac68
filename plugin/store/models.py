"""The job store's tables: studies, series, instances, receptions, jobs, deliveries, pseudonyms.

Timestamps are timezone-aware UTC in Python (`utcnow`, `UTCDateTime`). A study's instance count and
last-received time are not columns: they are derived from ``instances`` when read (`plugin.store.queries`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


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
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)  # 0008: /metrics
    # migration 0006: counts and last-received times are read from the instances; this is the one
    # time no instance row carries: the latest duplicate received while the study was RECEIVING
    resent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # migration 0009 (the web console's study search): from the study's first instance; shown to
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
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)  # 0008: /metrics
    # migration 0004 (plugin/jobs/queue.py, plugin/jobs/execute.py): what routing decided, per-step seconds
    series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    rule: Mapped[str | None] = mapped_column(String(64))
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # migration 0011 (plugin/jobs/execute.py): where the last attempt ran (`Placement.as_record`)
    placement: Mapped[dict[str, str] | None] = mapped_column(JSON)


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
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)  # 0008: /metrics


class Pseudonym(Base):
    """A replacement value de-identified exports use (a patient pseudonym or a UID), per domain.

    ``original_hash`` is a keyed hash (HMAC-SHA256 with the node's secret) of the original value,
    never the value itself: the table alone names no patient and no study.
    """

    __tablename__ = "pseudonyms"
    __table_args__ = (UniqueConstraint("domain", "kind", "original_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # "patient" or "uid"
    original_hash: Mapped[str] = mapped_column(String(64))
    pseudonym: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
