"""Jobs in the store: queued by routing when a study completes, leased by workers, listed and retried.

Every state change is one short transaction guarded by a conditional UPDATE whose row count says
who won, so several worker processes (and several nodes on PostgreSQL) can share one store:

* claim: ``UPDATE jobs SET state=RUNNING, lease_owner=me ... WHERE id=? AND (state=QUEUED OR
  (state=RUNNING AND lease_expires_at < now))`` — exactly one claimer sees rowcount 1. A RUNNING
  job whose lease expired belonged to a dead worker; it is taken over, or FAILED once it used up
  ``max_attempts``.
* renew, finish, fail: ``... WHERE id=? AND state=RUNNING AND lease_owner=me`` — a worker that lost
  its lease (it stalled and another took over) can no longer change the job.

Routing at completion (`queue_routed_jobs`): the series headers come from the spool (one instance
per series, no pixels), `plugin.route.rules.plan_study` decides, one QUEUED job per planned job. On a
later revision of a study a planned job runs again only when its series received instances in
that revision, so a result the PACS sends back into the study (a new SEG series) does not re-run
the pipeline on an unchanged series; a study-scope rule whose choice moved to another series (a
better reconstruction arrived) runs on the new one. A still QUEUED job of an earlier revision with
the same input (same series, or for a study-scope rule the same rule) and pipeline is CANCELLED,
since its input is out of date.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from plugin.dispatch.outbox import retry_deliveries
from plugin.route.rules import RuleSet, SeriesInfo, StudyPlan, plan_study
from plugin.route.selection import chosen, rank_series
from plugin.store.engine import Store
from plugin.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    add_queued_job,
    utcnow,
)
from plugin.store.pauses import PauseKind, paused_names

log = logging.getLogger(__name__)

STEPS = ("load_s", "infer_s", "encode_s")
"""The timed steps of a run, as keys of ``Job.timings``."""


# --- routing at completion -----------------------------------------------------------------------


@dataclass(frozen=True)
class _SeriesRow:
    series_uid: str
    instances: int
    first_path: str
    changed: bool  # received instances in the study's current revision


def _series_of(session: Session, study: Study) -> list[_SeriesRow]:
    first = (
        select(
            Instance.series_id,
            func.min(Instance.id).label("first_id"),
            func.count(Instance.id).label("instances"),
        )
        .where(Instance.study_id == study.id)
        .group_by(Instance.series_id)
        .subquery()
    )
    changed = (
        select(Instance.series_id)
        .where(Instance.study_id == study.id, Instance.study_revision == study.revision)
        .distinct()
        .subquery()
    )
    rows = session.execute(
        select(Series.series_uid, first.c.instances, Instance.spool_path, changed.c.series_id)
        .join(first, first.c.series_id == Series.id)
        .join(Instance, Instance.id == first.c.first_id)
        .outerjoin(changed, changed.c.series_id == Series.id)
        .where(Series.study_id == study.id)
        .order_by(Series.series_number, Series.series_uid)
    ).all()
    return [_SeriesRow(uid, int(n), path, changed_id is not None) for uid, n, path, changed_id in rows]


def _explain(plan: StudyPlan) -> str:
    """Why a study got no job, per series: the rules that did not match and what they saw, or
    why the pipeline of the study-scope rule that matched rejected it."""
    rejected = {
        r.series_uid: f"{selection.pipeline} rejects it: {', '.join(r.reasons)}"
        for selection in plan.selections
        for r in selection.ranking
    }
    parts = []
    for series_uid, decision in plan.decisions.items():
        lost = "; ".join(f"{o.rule}: {', '.join(o.reasons)}" for o in decision.not_matched)
        parts.append(f"series {series_uid}: {rejected.get(series_uid) or lost or 'no rules'}")
    return " | ".join(parts) or "no readable series"


def _earlier_job(session: Session, study: Study, series_uid: str, pipeline: str) -> int | None:
    """The latest revision before this one that already has a job for this series and pipeline."""
    return session.scalar(
        select(func.max(Job.study_revision)).where(
            Job.study_id == study.id,
            Job.series_uid == series_uid,
            Job.pipeline == pipeline,
            Job.study_revision < study.revision,
            Job.state != JobState.CANCELLED,
        )
    )


def read_study_series(session: Session, study: Study, spool_dir: Path) -> tuple[list[SeriesInfo], set[str]]:
    """Every series of the study as routing sees it (one header from the spool, the instance
    count), and the UIDs of those that received instances in the study's current revision."""
    rows = _series_of(session, study)
    infos = []
    for row in rows:
        try:
            header = pydicom.dcmread(spool_dir / row.first_path, stop_before_pixels=True)
        except Exception as err:  # a spool file that went bad must not block the other series
            log.warning("study %s: series %s not routed: %s", study.study_uid, row.series_uid, err)
            continue
        infos.append(SeriesInfo(row.series_uid, header, row.instances))
    return infos, {row.series_uid for row in rows if row.changed}


def rules_in_force(session: Session, rules: RuleSet) -> RuleSet:
    """``rules`` with the rules an operator paused now (the store's) marked paused."""
    return dataclasses.replace(rules, paused=paused_names(session, PauseKind.RULE))


def queue_routed_jobs(session: Session, study: Study, rules: RuleSet, spool_dir: Path) -> list[Job]:
    """Route a study revision that just completed and queue its jobs, in the caller's transaction."""
    infos, changed = read_study_series(session, study, spool_dir)
    plan = plan_study(infos, rules_in_force(session, rules))
    for selection in plan.selections:  # a rule whose pipeline can use none: in the no-job line below
        if selection.series_uid is None:
            continue
        log.info(
            "study %s revision %d: rule %s: %s prefers series %s; %s",
            *(study.study_uid, study.revision, selection.rule, selection.pipeline, selection.series_uid),
            " | ".join(
                f"series {r.series_uid}: {'rejected' if r.place is None else 'lost'}: {', '.join(r.reasons)}"
                for r in selection.ranking
                if r.place != 1
            )
            or "no other series",
        )
    if not plan.jobs:
        log.info("study %s revision %d: no job: %s", study.study_uid, study.revision, _explain(plan))
        return []
    now = utcnow()
    queued = []
    for planned in plan.jobs:
        action = planned.action
        earlier = _earlier_job(session, study, planned.series_uid, action.pipeline)
        if earlier is not None and planned.series_uid not in changed:
            log.info(
                "study %s revision %d: %s on series %s not re-run: unchanged since revision %d",
                *(study.study_uid, study.revision, action.pipeline, planned.series_uid, earlier),
            )
            continue
        same_input = (
            Job.rule == action.rule  # study scope: one series per study and rule, whichever it was
            if action.scope == "study"
            else Job.series_uid == planned.series_uid
        )
        session.execute(
            update(Job)
            .where(
                Job.study_id == study.id,
                same_input,
                Job.pipeline == action.pipeline,
                Job.state == JobState.QUEUED,
            )
            .values(
                state=JobState.CANCELLED,
                error=f"superseded by revision {study.revision} before it ran",
                updated_at=now,
                finished_at=now,
            )
        )
        job = add_queued_job(
            session, study, action.pipeline, planned.series_uid, action.rule, action.destinations, now=now
        )
        queued.append(job)
    session.flush()
    for job in queued:
        log.info(
            "study %s revision %d: job %d queued: %s on series %s (rule %s) -> %s",
            *(study.study_uid, study.revision, job.id, job.pipeline, job.series_uid, job.rule),
            ", ".join(job.destinations or ()) or "kept locally",
        )
    return queued


ON_DEMAND_RULE = "on-demand"
"""The rule name a job queued on demand carries (a pipeline chosen by a person, not by the rules)."""


class NoUsableSeries(ValueError):
    """A pipeline asked for by name can use none of the study's series; the message says why per series."""


def queue_named_job(
    session: Session,
    study: Study,
    pipeline: str,
    rules: RuleSet,
    spool_dir: Path,
    destinations: Sequence[str],
) -> Job:
    """Queue ``pipeline`` on the series of the study it prefers, whatever the rules say (on demand:
    the Orthanc plugin's run route, the console's re-run), in the caller's transaction.

    Raises `NoUsableSeries` when the pipeline rejects every series of the study.
    """
    series, _ = read_study_series(session, study, spool_dir)
    ranking = rank_series(series, rules.series_wanted(pipeline))
    series_uid = chosen(ranking)
    if series_uid is None:
        raise NoUsableSeries(
            f"{pipeline} can use no series of study {study.study_uid}: "
            + (" | ".join(f"series {r.series_uid}: {', '.join(r.reasons)}" for r in ranking) or "none")
        )
    job = add_queued_job(session, study, pipeline, series_uid, ON_DEMAND_RULE, destinations)
    session.flush()
    log.info(
        "study %s revision %d: job %d queued on demand: %s on series %s",
        *(study.study_uid, study.revision, job.id, pipeline, series_uid),
    )
    return job


def routing_hook(rules: RuleSet, spool_dir: Path) -> Callable[[Session, Study], None]:
    """The `CompletionMonitor.on_complete` hook that routes each completed study revision."""

    def hook(session: Session, study: Study) -> None:
        queue_routed_jobs(session, study, rules, spool_dir)

    return hook


# --- leasing: claim, renew, finish, fail ---------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job it has just leased."""

    id: int
    study_uid: str
    revision: int
    series_uid: str
    pipeline: str
    destinations: tuple[str, ...]
    attempts: int
    files: tuple[Path, ...]  # the series' spool files as of the job's revision
    sop_uids: tuple[str, ...]  # the SOP Instance UIDs of ``files``, in the same order
    supersedes: int | None  # the latest earlier revision with results on this series and pipeline


def _runnable(now: datetime, max_attempts: int) -> Any:
    return and_(
        Job.pipeline.is_not(None),
        Job.series_uid.is_not(None),
        or_(
            Job.state == JobState.QUEUED,
            and_(
                Job.state == JobState.RUNNING,
                Job.lease_expires_at < now,
                Job.attempts < max_attempts,
            ),
        ),
    )


def _fail_abandoned(s: Session, max_attempts: int, now: datetime) -> None:
    """FAIL the RUNNING jobs whose lease expired after their last allowed attempt."""
    s.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now, Job.attempts >= max_attempts)
        .values(
            state=JobState.FAILED,
            error=f"worker lost (lease expired) and all {max_attempts} attempts used",
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
            finished_at=now,
        )
    )


def claim_job(
    store: Store, owner: str, spool_dir: Path, lease_s: float, max_attempts: int, now: datetime | None = None
) -> ClaimedJob | None:
    """Lease the oldest runnable job to ``owner``; None when there is none (or others took them all)."""
    now = now or utcnow()
    with store.session() as s:
        _fail_abandoned(s, max_attempts, now)
        candidates = list(
            s.scalars(select(Job.id).where(_runnable(now, max_attempts)).order_by(Job.id).limit(8))
        )
    for job_id in candidates:
        with store.session() as s:
            won = s.execute(
                update(Job)
                .where(Job.id == job_id, _runnable(now, max_attempts))
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=Job.attempts + 1,
                    started_at=now,
                    updated_at=now,
                    timings=None,  # this attempt's steps are recorded as they finish (record_steps)
                    placement=None,  # and where it runs, once the executor says (record_placement)
                )
            )
            if won.rowcount != 1:  # type: ignore[attr-defined]
                continue
            return _claimed(s, job_id, spool_dir)
    return None


def _claimed(s: Session, job_id: int, spool_dir: Path) -> ClaimedJob:
    job = s.get_one(Job, job_id)
    study = s.get_one(Study, job.study_id)
    assert job.pipeline is not None and job.series_uid is not None  # _runnable holds
    rows = s.execute(
        select(Instance.sop_instance_uid, Instance.spool_path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.series_uid == job.series_uid, Instance.study_revision <= job.study_revision)
        .order_by(Instance.id)
    ).all()
    supersedes = s.scalar(
        select(func.max(Job.study_revision)).where(
            Job.study_id == job.study_id,
            Job.series_uid == job.series_uid,
            Job.pipeline == job.pipeline,
            Job.study_revision < job.study_revision,
            Job.state == JobState.SUCCEEDED,
        )
    )
    return ClaimedJob(
        id=job.id,
        study_uid=study.study_uid,
        revision=job.study_revision,
        series_uid=job.series_uid,
        pipeline=job.pipeline,
        destinations=tuple(job.destinations or ()),
        attempts=job.attempts,
        files=tuple(spool_dir / row.spool_path for row in rows),
        sop_uids=tuple(row.sop_instance_uid for row in rows),
        supersedes=supersedes,
    )


def _mine(job_id: int, owner: str) -> Any:
    return and_(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == owner)


def _update_mine(s: Session, job_id: int, owner: str, **values: Any) -> bool:
    """Change a job only while ``owner`` holds its lease; whether it did."""
    result = s.execute(update(Job).where(_mine(job_id, owner)).values(updated_at=utcnow(), **values))
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


_UNLEASED = {"lease_owner": None, "lease_expires_at": None}


def renew_lease(store: Store, job_id: int, owner: str, lease_s: float) -> bool:
    """Push the lease forward; False when the job is no longer ours (taken over or cancelled)."""
    with store.session() as s:
        return _update_mine(s, job_id, owner, lease_expires_at=utcnow() + timedelta(seconds=lease_s))


def record_steps(store: Store, job_id: int, owner: str, timings: dict[str, float]) -> bool:
    """Record the steps a running job has finished so far (the console shows the one it is on);
    False when the job is no longer ours."""
    with store.session() as s:
        return _update_mine(s, job_id, owner, timings=dict(timings))


def record_placement(store: Store, job_id: int, owner: str, placement: dict[str, str]) -> bool:
    """Record where a running job runs (`Placement.as_record`); False when the job is no longer ours."""
    with store.session() as s:
        return _update_mine(s, job_id, owner, placement=dict(placement))


def placement_text(placement: dict[str, str] | None) -> str:
    """Where a job ran, in a few words: executor, host (Ray: IP and node), worker, GPU or device."""
    if not placement:
        return "-"
    p = placement
    host = p.get("ip") or p.get("hostname", "?")
    node = f" node {p['node_id'][:8]}" if "node_id" in p else ""
    device = f"GPU {p['gpu']}" if "gpu" in p else p.get("device", "?")
    note = f" ({p['note']})" if "note" in p else ""
    return f"{p.get('executor', '?')} {host}{node}, {p.get('worker', '?')}, {device}{note}"


Enqueue = Callable[[Session, int, Sequence[tuple[str, Path]], Sequence[str]], int]
"""The signature of `plugin.dispatch.outbox.enqueue_deliveries`."""


def finish_job(
    store: Store,
    job: ClaimedJob,
    owner: str,
    results: Sequence[tuple[str, Path]],
    timings: dict[str, float],
    enqueue: Enqueue,
) -> bool:
    """Queue the deliveries and mark the job SUCCEEDED in one transaction; False if the lease was lost."""
    with store.session() as s:
        done = {"state": JobState.SUCCEEDED, "error": None, "timings": timings, "finished_at": utcnow()}
        if not _update_mine(s, job.id, owner, **done, **_UNLEASED):
            return False
        enqueue(s, job.id, results, job.destinations)
    return True


def fail_job(
    store: Store,
    job: ClaimedJob,
    owner: str,
    reason: str,
    timings: dict[str, float],
    *,
    retry: bool,
    max_attempts: int,
) -> str | None:
    """Re-queue the job (``retry`` and attempts left) or FAIL it; its new state, None if not ours."""
    again = retry and job.attempts < max_attempts
    state = JobState.QUEUED if again else JobState.FAILED
    ended = {
        "state": state,
        "error": f"{reason} (attempt {job.attempts} of {max_attempts})" if retry else reason,
        "timings": timings or None,
        "finished_at": None if again else utcnow(),
    }
    with store.session() as s:
        changed = _update_mine(s, job.id, owner, **ended, **_UNLEASED)
    return state if changed else None


def release_job(store: Store, job: ClaimedJob, owner: str) -> bool:
    """Give a job back to the queue without counting the attempt (the node is stopping)."""
    with store.session() as s:
        return _update_mine(s, job.id, owner, state=JobState.QUEUED, attempts=Job.attempts - 1, **_UNLEASED)


# --- operator commands: list and retry -----------------------------------------------------------


def list_jobs(store: Store, results_dir: Path) -> list[dict[str, Any]]:
    """Every job with its study, routing, state, step timings and a count of deliveries per state."""
    with store.session() as s:
        rows = s.execute(
            select(Job, Study.study_uid, Study.accession_number)
            .join(Study, Study.id == Job.study_id)
            .order_by(Job.id)
        ).all()
        counts: dict[int, dict[str, int]] = {}
        for job_id, state, n in s.execute(
            select(Delivery.job_id, Delivery.state, func.count(Delivery.id)).group_by(
                Delivery.job_id, Delivery.state
            )
        ):
            counts.setdefault(job_id, {})[state] = int(n)
    return [
        {
            "id": job.id,
            "study_uid": study_uid,
            "accession_number": accession,
            "revision": job.study_revision,
            "series_uid": job.series_uid,
            "pipeline": job.pipeline,
            "rule": job.rule,
            "destinations": job.destinations or [],
            "state": job.state,
            "attempts": job.attempts,
            "error": job.error,
            "timings": job.timings or {},
            "placement": job.placement,
            "deliveries": counts.get(job.id, {}),
            "results_dir": str(results_dir / str(job.id)) if job.state == JobState.SUCCEEDED else None,
            "created_at": job.created_at.isoformat(),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        }
        for job, study_uid, accession in rows
    ]


def retry_job(store: Store, job_id: int) -> str:
    """Re-queue a FAILED job, or the DEAD deliveries of a job; what was done, for the operator.

    Raises LookupError for an unknown job and ValueError when there is nothing to retry.
    """
    now = utcnow()
    with store.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.state == JobState.FAILED:
            job.state = JobState.QUEUED
            job.attempts = 0
            job.updated_at = now
            job.finished_at = None
            log.info("job %d re-queued by the operator (was: %s)", job_id, job.error)
            return f"job {job_id} re-queued"
        dead = s.scalars(
            select(Delivery.id).where(Delivery.job_id == job_id, Delivery.state == DeliveryState.DEAD)
        ).all()
        state = job.state
    if requeued := retry_deliveries(store, dead):
        return f"job {job_id}: {len(requeued)} dead deliveries re-queued"
    raise ValueError(f"job {job_id} is {state} and has no dead deliveries: nothing to retry")
