"""The audit trail: who did what and when, in the job store, and optionally as IHE ATNA messages.

`record` writes one ``audit_events`` row (and sends it to the ATNA collector when one is attached
to the store, `attach_syslog`). The life of each study (received, complete, routed, each job's
states, each delivery) is not written on the ingest path: `study_events` reads it from the
studies, jobs and deliveries tables when the trail is read, and `events` merges both by time.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select, true

from plugin.config import Config
from plugin.store.accounts import AuditEvent
from plugin.store.db import Delivery, DeliveryState, Job, JobState, Store, Study, utcnow

if TYPE_CHECKING:
    from plugin.web.atna import SyslogSender


_MAX_TEXT = {"actor": 64, "target": 200, "remote": 64}
_syslog: weakref.WeakKeyDictionary[Store, SyslogSender] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Event:
    """One line of the trail as it is shown and exported; ``source`` is ``audit`` (a recorded row)
    or ``store`` (a study's life, read from the store's tables)."""

    at: datetime
    actor: str | None
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any] | None
    remote: str | None
    source: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


def attach_syslog(store: Store, sender: SyslogSender) -> None:
    """Send every event recorded in ``store`` from now on to ``sender`` as well."""
    _syslog[store] = sender


def _clip(field: str, value: str | None) -> str | None:
    return None if value is None else value[: _MAX_TEXT[field]]


def record(
    store: Store,
    actor: str | None,
    action: str,
    target: str | None = None,
    outcome: str = "ok",
    detail: Mapping[str, object] | None = None,
    remote: str | None = None,
) -> None:
    """One row in the audit trail (and an ATNA message when a collector is attached).

    ``actor`` is the user (None: the node itself or an anonymous caller), ``action`` a dotted name
    (``login``, ``job.retry``), ``outcome`` ``ok`` or ``failure``; ``detail`` must be JSON-able and
    hold no patient data and no secret. Texts too long for their column are cut.
    """
    event = Event(
        at=utcnow(),
        actor=_clip("actor", actor),
        action=action[:64],
        target=_clip("target", target),
        outcome=outcome[:16],
        detail=None if detail is None else json.loads(json.dumps(dict(detail), default=str)),
        remote=_clip("remote", remote),
        source="audit",
    )
    with store.session() as s:
        s.add(
            AuditEvent(
                at=event.at,
                actor=event.actor,
                action=event.action,
                target=event.target,
                outcome=event.outcome,
                detail=event.detail,
                remote=event.remote,
            )
        )
    sender = _syslog.get(store)
    if sender is not None:
        sender.send(event)


def config_digest(config: Config) -> str:
    """SHA-256 of the configuration as loaded, secrets masked (pydantic's SecretStr shows stars)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def config_loaded(store: Store, config: Config, by: str) -> None:
    """Record that ``by`` (``serve``, ``web``) started with ``config``: its digest, never its values."""
    record(store, None, "config.loaded", target=by, detail={"sha256": config_digest(config)})


def _aware(when: datetime | None) -> datetime | None:
    return when.replace(tzinfo=UTC) if when is not None and when.tzinfo is None else when


def _recorded(store: Store, since: datetime | None, until: datetime | None) -> list[Event]:
    query = select(AuditEvent).order_by(AuditEvent.at, AuditEvent.id)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    with store.session() as s:
        return [
            Event(row.at, row.actor, row.action, row.target, row.outcome, row.detail, row.remote, "audit")
            for row in s.scalars(query)
        ]


def _life(
    at: datetime | None, action: str, target: str, detail: dict[str, Any], outcome: str = "ok"
) -> Iterator[Event]:
    if at is not None:
        yield Event(at, None, action, target, outcome, detail or None, None, "store")


def _within(since: datetime | None, until: datetime | None, *columns: Any) -> Any:
    """SQL: any of the time columns falls in [since, until)."""
    bounded = [
        and_(
            column >= since if since is not None else true(),
            column < until if until is not None else true(),
        )
        for column in columns
    ]
    return or_(*bounded)


def study_events(store: Store, since: datetime | None = None, until: datetime | None = None) -> list[Event]:
    """The life of each study, read from the store: received, complete, each job queued (routed)
    and its states, each delivery sent or DEAD; targets are Study Instance UIDs. Only the rows with
    a time in [since, until) are read."""
    events: list[Event] = []
    with store.session() as s:
        for st in s.scalars(
            select(Study).where(_within(since, until, Study.first_received_at, Study.completed_at))
        ):
            events += _life(st.first_received_at, "study.received", st.study_uid, {})
            events += _life(st.completed_at, "study.complete", st.study_uid, {"revision": st.revision})
        jobs = select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
        times = (Job.created_at, Job.started_at, Job.finished_at)
        for job, uid in s.execute(jobs.where(_within(since, until, *times))):
            about: dict[str, Any] = {"job": job.id, "pipeline": job.pipeline, "revision": job.study_revision}
            events += _life(job.created_at, "job.routed", uid, {**about, "rule": job.rule})
            events += _life(job.started_at, "job.running", uid, about)
            outcome = "failure" if job.state in (JobState.FAILED, JobState.CANCELLED) else "ok"
            events += _life(job.finished_at, f"job.{job.state.lower()}", uid, about, outcome)
        deliveries = (
            select(Delivery, Study.study_uid)
            .join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(Delivery.state.in_([DeliveryState.SENT, DeliveryState.DEAD]))
        )
        for d, uid in s.execute(deliveries.where(_within(since, until, Delivery.updated_at))):
            about = {"job": d.job_id, "destination": d.destination, "sop_instance_uid": d.sop_instance_uid}
            if d.state == DeliveryState.SENT:
                events += _life(d.sent_at, "delivery.sent", uid, about)
            else:
                events += _life(
                    d.updated_at, "delivery.dead", uid, {**about, "attempts": d.attempts}, "failure"
                )
    return [e for e in events if (since is None or e.at >= since) and (until is None or e.at < until)]


def events(
    store: Store,
    since: datetime | None = None,
    until: datetime | None = None,
    studies: bool = True,
) -> list[Event]:
    """The trail between ``since`` (inclusive) and ``until`` (exclusive), oldest first: the recorded
    events and, with ``studies``, each study's life (`study_events`). A time without a zone is UTC."""
    since, until = _aware(since), _aware(until)
    merged = _recorded(store, since, until) + (study_events(store, since, until) if studies else [])
    return sorted(merged, key=lambda e: e.at)
