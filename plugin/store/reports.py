"""What the web console reads from the store: the overview, the study search, one study's timeline.

Read-only queries; each answer is a frozen dataclass that the console's JSON API returns as it is
(FastAPI describes them in the OpenAPI document). Patient ID and name are in the answers, for
logged-in staff; nothing here logs them.

Counts are grouped in SQL (one query per kind of row), so a page costs a few queries whatever the
number of studies; the search pages with ``limit`` and ``offset`` and counts the matches once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from plugin.jobs.queue import STEPS, placement_text
from plugin.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Reception,
    Series,
    Study,
    StudyState,
    utcnow,
)
from plugin.store.queries import latest

# --- the overview --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """Instances and studies received in a period (a study counts in the period of its first instance)."""

    instances: int
    studies: int
    bytes: int


@dataclass(frozen=True)
class RunningJob:
    """A job a worker runs now: the step it is on and for how long the attempt has been running."""

    id: int
    study_uid: str
    accession_number: str | None
    pipeline: str | None
    step: str
    attempts: int
    worker: str | None
    started_at: datetime | None
    elapsed_s: float


@dataclass(frozen=True)
class FailedJob:
    id: int
    study_uid: str
    accession_number: str | None
    pipeline: str | None
    error: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Overview:
    """What is happening now and what happened today (since midnight UTC)."""

    at: datetime
    today: Received
    studies_in_store: int
    studies_receiving: int
    queue_depth: int
    jobs: dict[str, int]
    running: list[RunningJob]
    failed_today: int
    recent_failures: list[FailedJob]
    deliveries: dict[str, int]
    dead_by_destination: dict[str, int]


def _midnight(now: datetime) -> datetime:
    return datetime.combine(now.date(), time(0), tzinfo=now.tzinfo)


def _current_step(timings: Mapping[str, float] | None) -> str:
    """The step after the last one recorded (`plugin.jobs.queue.record_steps`)."""
    done = timings or {}
    return next((step.removesuffix("_s") for step in STEPS if step not in done), "finishing")


def _received_since(s: Session, since: datetime) -> Received:
    """Instances and studies received since ``since``, read through the studies that can hold one.

    A study that received an instance since then is RECEIVING now, or completed since then, or
    opened its current revision since then; its instances are found by the (study, revision,
    received_at) index, so the overview never scans every instance the node ever received.
    """
    recent = select(Study.id).where(
        or_(
            Study.state == StudyState.RECEIVING,
            Study.completed_at >= since,
            Study.revision_started_at >= since,
        )
    )
    n, size = s.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0)).where(
            Instance.study_id.in_(recent), Instance.received_at >= since
        )
    ).one()
    studies = s.scalar(select(func.count(Study.id)).where(Study.first_received_at >= since))
    return Received(instances=int(n), studies=int(studies or 0), bytes=int(size))


def _by(s: Session, column: Any, *where: ColumnElement[bool]) -> dict[str, int]:
    """Row counts grouped by ``column``."""
    query = select(column, func.count()).group_by(column)
    if where:
        query = query.where(*where)
    return {str(key): int(n) for key, n in s.execute(query)}


def overview(s: Session, now: datetime | None = None, failures: int = 10) -> Overview:
    """The figures of the console's overview page; ``failures``: how many recent failed jobs to list."""
    now = now or utcnow()
    today = _midnight(now)
    running = s.execute(
        select(Job, Study.study_uid, Study.accession_number)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.RUNNING)
        .order_by(Job.started_at)
    ).all()
    failed = s.execute(
        select(Job, Study.study_uid, Study.accession_number)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.FAILED)
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(failures)
    ).all()
    jobs = _by(s, Job.state)
    return Overview(
        at=now,
        today=_received_since(s, today),
        studies_in_store=int(s.scalar(select(func.count(Study.id))) or 0),
        studies_receiving=int(
            s.scalar(select(func.count(Study.id)).where(Study.state == StudyState.RECEIVING)) or 0
        ),
        queue_depth=jobs.get(JobState.QUEUED, 0),
        jobs=jobs,
        running=[
            RunningJob(
                id=job.id,
                study_uid=uid,
                accession_number=accession,
                pipeline=job.pipeline,
                step=_current_step(job.timings),
                attempts=job.attempts,
                worker=job.lease_owner,
                started_at=job.started_at,
                elapsed_s=round((now - job.started_at).total_seconds(), 1) if job.started_at else 0.0,
            )
            for job, uid, accession in running
        ],
        failed_today=int(
            s.scalar(select(func.count(Job.id)).where(Job.state == JobState.FAILED, Job.finished_at >= today))
            or 0
        ),
        recent_failures=[
            FailedJob(job.id, uid, accession, job.pipeline, job.error, job.finished_at)
            for job, uid, accession in failed
        ],
        deliveries=_by(s, Delivery.state),
        dead_by_destination=_by(s, Delivery.destination, Delivery.state == DeliveryState.DEAD),
    )


# --- the study search ----------------------------------------------------------------------------


class StudyFilterState(enum.StrEnum):
    """What the search's ``state`` matches: the study's state, or a job or delivery of it in that state."""

    RECEIVING = StudyState.RECEIVING
    COMPLETE = StudyState.COMPLETE
    QUEUED = JobState.QUEUED
    RUNNING = JobState.RUNNING
    SUCCEEDED = JobState.SUCCEEDED
    FAILED = JobState.FAILED
    CANCELLED = JobState.CANCELLED
    PENDING = DeliveryState.PENDING
    SENDING = DeliveryState.SENDING
    SENT = DeliveryState.SENT
    DEAD = DeliveryState.DEAD


@dataclass(frozen=True)
class StudyQuery:
    """The search: every given criterion must hold. ``accession`` and ``patient_id`` match exactly,
    or as a DICOM wildcard pattern (``*`` any run of characters, ``?`` one); the dates bound the
    Study Date (inclusive; studies without one never match a date)."""

    accession: str | None = None
    patient_id: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    state: StudyFilterState | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class StudyRow:
    """A study as the search lists it, with its jobs and deliveries counted by state and a one-word status."""

    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    revision: int
    state: str
    status: str
    instances: int
    series: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    jobs: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyPage:
    total: int
    limit: int
    offset: int
    studies: list[StudyRow]


def _wildcard(column: Any, value: str) -> ColumnElement[bool]:
    """Equality, or LIKE for a DICOM wildcard value (``*``, ``?``), SQL's own wildcards escaped."""
    if "*" not in value and "?" not in value:
        return column == value
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _has_state(state: StudyFilterState) -> ColumnElement[bool]:
    """The study is in ``state``, or one of its jobs or deliveries is (one uncorrelated subquery)."""
    if state.value in StudyState.__members__:
        return Study.state == state.value
    if state.value in JobState.__members__:
        return Study.id.in_(select(Job.study_id).where(Job.state == state.value))
    with_delivery = select(Job.study_id).join(Delivery, Delivery.job_id == Job.id)
    return Study.id.in_(with_delivery.where(Delivery.state == state.value))


def study_status(state: str, jobs: Mapping[str, int], deliveries: Mapping[str, int]) -> str:
    """Where the study is, in a word: the first of receiving, running, queued, dead (a delivery),
    failed (a job), sending, delivered, done (results kept locally), no job."""
    if state == StudyState.RECEIVING:
        return "receiving"
    for word, held in (
        ("running", jobs.get(JobState.RUNNING)),
        ("queued", jobs.get(JobState.QUEUED)),
        ("dead", deliveries.get(DeliveryState.DEAD)),
        ("failed", jobs.get(JobState.FAILED)),
        ("sending", deliveries.get(DeliveryState.PENDING, 0) + deliveries.get(DeliveryState.SENDING, 0)),
        ("delivered", deliveries.get(DeliveryState.SENT)),
        ("done", jobs.get(JobState.SUCCEEDED)),
    ):
        if held:
            return word
    return "no job"


def _rows(s: Session, studies: Sequence[Study]) -> list[StudyRow]:
    """The listing rows of ``studies``, counted in four grouped queries."""
    ids = [st.id for st in studies]
    counts: dict[int, tuple[int, datetime | None]] = {
        sid: (int(n), last)
        for sid, n, last in s.execute(
            select(Instance.study_id, func.count(Instance.id), func.max(Instance.received_at))
            .where(Instance.study_id.in_(ids))
            .group_by(Instance.study_id)
        )
    }
    series = {
        sid: int(n)
        for sid, n in s.execute(
            select(Series.study_id, func.count(Series.id))
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        )
    }
    jobs: dict[int, dict[str, int]] = {}
    for sid, state, n in s.execute(
        select(Job.study_id, Job.state, func.count(Job.id))
        .where(Job.study_id.in_(ids))
        .group_by(Job.study_id, Job.state)
    ):
        jobs.setdefault(sid, {})[state] = int(n)
    deliveries: dict[int, dict[str, int]] = {}
    for sid, state, n in s.execute(
        select(Job.study_id, Delivery.state, func.count(Delivery.id))
        .join(Job, Job.id == Delivery.job_id)
        .where(Job.study_id.in_(ids))
        .group_by(Job.study_id, Delivery.state)
    ):
        deliveries.setdefault(sid, {})[state] = int(n)
    rows = []
    for st in studies:
        n, last = counts.get(st.id, (0, None))
        job_counts, delivery_counts = jobs.get(st.id, {}), deliveries.get(st.id, {})
        rows.append(
            StudyRow(
                study_uid=st.study_uid,
                accession_number=st.accession_number,
                patient_id=st.patient_id,
                patient_name=st.patient_name,
                study_date=st.study_date,
                revision=st.revision,
                state=st.state,
                status=study_status(st.state, job_counts, delivery_counts),
                instances=n,
                series=series.get(st.id, 0),
                first_received_at=st.first_received_at,
                last_received_at=latest(st.revision_started_at, last, st.resent_at),
                completed_at=st.completed_at,
                jobs=job_counts,
                deliveries=delivery_counts,
            )
        )
    return rows


def search_studies(s: Session, query: StudyQuery) -> StudyPage:
    """The studies matching ``query``, the latest received first, one page of them."""
    where: list[ColumnElement[bool]] = []
    if query.accession:
        where.append(_wildcard(Study.accession_number, query.accession))
    if query.patient_id:
        where.append(_wildcard(Study.patient_id, query.patient_id))
    if query.date_from is not None:
        where.append(Study.study_date >= query.date_from.strftime("%Y%m%d"))
    if query.date_to is not None:
        where.append(Study.study_date <= query.date_to.strftime("%Y%m%d"))
    if query.state is not None:
        where.append(_has_state(query.state))
    total = int(s.scalar(select(func.count(Study.id)).where(*where)) or 0)
    studies = list(
        s.scalars(
            select(Study)
            .where(*where)
            .order_by(Study.first_received_at.desc(), Study.id.desc())
            .limit(query.limit)
            .offset(query.offset)
        )
    )
    return StudyPage(total=total, limit=query.limit, offset=query.offset, studies=_rows(s, studies))


# --- one study's timeline ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesItem:
    series_uid: str
    series_number: int | None
    modality: str | None
    instances: int
    first_received_at: datetime
    last_received_at: datetime | None


@dataclass(frozen=True)
class ReceptionItem:
    """An association (or an Orthanc import) that brought instances of one revision."""

    revision: int
    calling_ae: str | None
    address: str | None
    instances: int
    started_at: datetime
    released_at: datetime | None


@dataclass(frozen=True)
class StepItem:
    name: str
    seconds: float


@dataclass(frozen=True)
class DeliveryItem:
    id: int
    destination: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    sent_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class JobItem:
    """A job with its routing (rule, series, destinations), steps with seconds and deliveries."""

    id: int
    revision: int
    pipeline: str | None
    rule: str | None
    series_uid: str | None
    destinations: list[str]
    state: str
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[StepItem]
    current_step: str | None
    elapsed_s: float | None
    deliveries: list[DeliveryItem]
    placement: dict[str, str] | None = None  # where the last attempt ran (`Placement.as_record`)
    ran_on: str | None = None  # the same in words


@dataclass(frozen=True)
class Event:
    """One line of the timeline: when, what (a short kind), and the details in words."""

    at: datetime
    kind: str
    text: str
    job_id: int | None = None


@dataclass(frozen=True)
class StudyTimeline:
    study: StudyRow
    series: list[SeriesItem]
    receptions: list[ReceptionItem]
    completion: str | None
    jobs: list[JobItem]
    events: list[Event]


def _series(s: Session, study: Study) -> list[SeriesItem]:
    rows = s.execute(
        select(Series, func.count(Instance.id), func.max(Instance.received_at))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.series_uid)
    ).all()
    return [
        SeriesItem(se.series_uid, se.series_number, se.modality, int(n), se.first_received_at, last)
        for se, n, last in rows
    ]


def _receptions(s: Session, study: Study) -> list[ReceptionItem]:
    """Each association with how many instances of the study it brought (by calling AE and revision:
    instances rows do not name their association)."""
    brought = {
        (revision, ae): int(n)
        for revision, ae, n in s.execute(
            select(Instance.study_revision, Instance.calling_ae, func.count(Instance.id))
            .where(Instance.study_id == study.id)
            .group_by(Instance.study_revision, Instance.calling_ae)
        )
    }
    rows = s.scalars(
        select(Reception).where(Reception.study_id == study.id).order_by(Reception.started_at, Reception.id)
    ).all()
    return [
        ReceptionItem(
            r.study_revision,
            r.calling_ae,
            r.address,
            brought.get((r.study_revision, r.calling_ae), 0),
            r.started_at,
            r.released_at,
        )
        for r in rows
    ]


def _completion(study: Study, receptions: Sequence[ReceptionItem], last: datetime | None) -> str | None:
    """Why the current revision is complete, in words (None while it is RECEIVING)."""
    if study.state != StudyState.COMPLETE or study.completed_at is None:
        return None
    mine = [r for r in receptions if r.revision == study.revision]
    at = f"{study.completed_at:%Y-%m-%d %H:%M:%S}Z"
    if mine and all(r.released_at is not None for r in mine):
        released = max(r.released_at for r in mine if r.released_at is not None)
        return (
            f"revision {study.revision} complete at {at}: every association that brought it was "
            f"released (the last at {released:%H:%M:%S}Z), so the shorter quiet period after release applied"
        )
    since = f" since the last instance at {last:%H:%M:%S}Z" if last is not None else ""
    return f"revision {study.revision} complete at {at}: no instance arrived for the quiet period{since}"


def _job_item(job: Job, deliveries: list[Delivery], now: datetime) -> JobItem:
    timings = job.timings or {}
    running = job.state == JobState.RUNNING
    return JobItem(
        id=job.id,
        revision=job.study_revision,
        pipeline=job.pipeline,
        rule=job.rule,
        series_uid=job.series_uid,
        destinations=list(job.destinations or []),
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        steps=[StepItem(step.removesuffix("_s"), float(timings[step])) for step in STEPS if step in timings],
        current_step=_current_step(timings) if running else None,
        elapsed_s=round((now - job.started_at).total_seconds(), 1) if running and job.started_at else None,
        placement=job.placement,
        ran_on=placement_text(job.placement) if job.placement else None,
        deliveries=[
            DeliveryItem(
                d.id,
                d.destination,
                d.sop_instance_uid,
                d.state,
                d.attempts,
                d.last_error,
                d.next_attempt_at,
                d.sent_at,
                d.created_at,
                d.updated_at,
            )
            for d in deliveries
        ],
    )


def _delivery_events(job: JobItem) -> list[Event]:
    """Per destination: when its last instance was sent, or where it stands and the last error."""
    events = []
    by_destination: dict[str, list[DeliveryItem]] = {}
    for d in job.deliveries:
        by_destination.setdefault(d.destination, []).append(d)
    for destination, items in by_destination.items():
        states = {d.state for d in items}
        tries = max(d.attempts for d in items)
        if states == {DeliveryState.SENT}:
            sent = max(d.sent_at or d.updated_at for d in items)
            text = f"{len(items)} result(s) delivered to {destination} ({tries} attempt(s) at most)"
            events.append(Event(sent, "delivered", text, job.id))
            continue
        counted = ", ".join(f"{sum(d.state == st for d in items)} {st}" for st in sorted(states))
        errors = sorted({d.last_error for d in items if d.last_error})
        text = f"to {destination}: {counted}; {tries} attempt(s)" + (
            f"; last error: {errors[-1]}" if errors else ""
        )
        events.append(Event(max(d.updated_at for d in items), "delivery", text, job.id))
    return events


def _events(
    study: Study, receptions: Sequence[ReceptionItem], completion: str | None, jobs: Sequence[JobItem]
) -> list[Event]:
    events = [Event(study.first_received_at, "received", "first instance received")]
    for r in receptions:
        who = f"{r.calling_ae or '?'} ({r.address or '?'})"
        events.append(Event(r.started_at, "association", f"revision {r.revision}: {who} started sending"))
        if r.released_at is not None:
            events.append(
                Event(r.released_at, "released", f"revision {r.revision}: {who} released the association")
            )
    if completion is not None and study.completed_at is not None:
        events.append(Event(study.completed_at, "complete", completion))
    for job in jobs:
        where = ", ".join(job.destinations) or "kept locally"
        routed = f"job {job.id}: {job.pipeline or '-'} on series {job.series_uid or '-'}"
        routed += f" (rule {job.rule or '-'}) -> {where}"
        events.append(Event(job.created_at, "queued", routed, job.id))
        if job.started_at is not None:
            on = f" on {job.ran_on}" if job.ran_on else ""
            events.append(
                Event(job.started_at, "started", f"job {job.id}: attempt {job.attempts} started{on}", job.id)
            )
        if job.finished_at is not None:
            steps = ", ".join(f"{st.name} {st.seconds:.1f} s" for st in job.steps) or "no step"
            why = f": {job.error}" if job.error else ""
            events.append(
                Event(job.finished_at, job.state.lower(), f"job {job.id} {job.state} ({steps}){why}", job.id)
            )
        events += _delivery_events(job)
    return sorted(events, key=lambda e: e.at)


def study_timeline(s: Session, study_uid: str, now: datetime | None = None) -> StudyTimeline | None:
    """One study from its first instance to each delivery; None when no such study was received."""
    now = now or utcnow()
    study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
    if study is None:
        return None
    [row] = _rows(s, [study])
    series = _series(s, study)
    receptions = _receptions(s, study)
    last = s.scalar(
        select(func.max(Instance.received_at)).where(
            Instance.study_id == study.id, Instance.study_revision == study.revision
        )
    )
    completion = _completion(study, receptions, last)
    job_rows = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
    deliveries: dict[int, list[Delivery]] = {}
    for d in s.scalars(
        select(Delivery).where(Delivery.job_id.in_([j.id for j in job_rows])).order_by(Delivery.id)
    ):
        deliveries.setdefault(d.job_id, []).append(d)
    jobs = [_job_item(job, deliveries.get(job.id, []), now) for job in job_rows]
    return StudyTimeline(
        study=row,
        series=series,
        receptions=receptions,
        completion=completion,
        jobs=jobs,
        events=_events(study, receptions, completion, jobs),
    )


def job_study_uid(s: Session, job_id: int) -> str | None:
    """The Study Instance UID of a job, None for an unknown job."""
    return s.scalar(select(Study.study_uid).join(Job, Job.study_id == Study.id).where(Job.id == job_id))
