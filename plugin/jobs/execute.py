"""The executor loop of the node: lease a job, run it on an executor slot, record what happened.

One thread per executor slot: claim the oldest runnable job (`plugin.jobs.queue.claim_job`), hand the
task to the executor, renew the lease while it runs, then record in one transaction either
SUCCEEDED with its deliveries queued (`plugin.dispatch.outbox.enqueue_deliveries`), or the failure: a
reason the operator can act on (the PipelineError/SeriesError message; the traceback is in the
log). Input errors fail at once; a timeout, a dead worker or an unexpected error is re-queued
until ``max_attempts``. If this node dies, its leases expire and any node takes the jobs over.
On stop, running tasks are killed and their jobs go back to the queue without using an attempt;
so is a job the executor could not take (its Ray cluster is unreachable), and the slot waits.
Where each attempt runs is recorded on the job as the executor reports it (`Placement`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from plugin.config import Config
from plugin.dispatch.outbox import enqueue_deliveries
from plugin.jobs.executor.base import (
    Executor,
    ExecutorUnavailable,
    Placement,
    Stopped,
    Task,
    TaskTimeout,
    WorkerLost,
)
from plugin.jobs.queue import (
    ClaimedJob,
    Enqueue,
    claim_job,
    fail_job,
    finish_job,
    placement_text,
    record_placement,
    record_steps,
    release_job,
    renew_lease,
)
from plugin.route.requires import prior_result
from plugin.store.engine import Store
from plugin.wakeup import Wakeup

log = logging.getLogger(__name__)


class _Lease:
    """The `Watch` of one running job: renews its lease every third of the lease time."""

    def __init__(
        self, store: Store, job: ClaimedJob, owner: str, lease_s: float, stop: threading.Event
    ) -> None:
        self._store = store
        self._job = job
        self._owner = owner
        self._lease_s = lease_s
        self._stop = stop
        self._next_renewal = time.monotonic() + lease_s / 3
        self._steps: dict[str, float] = {}
        self.lost = False

    def keep_going(self) -> bool:
        if self._stop.is_set():
            return False
        if time.monotonic() < self._next_renewal:
            return True
        try:
            self.lost = not renew_lease(self._store, self._job.id, self._owner, self._lease_s)
        except SQLAlchemyError as err:  # the store is busy or down: try again at the next tick
            log.warning("job %d: lease not renewed: %s", self._job.id, err)
            return True
        self._next_renewal = time.monotonic() + self._lease_s / 3
        return not self.lost

    def step_done(self, step: str, seconds: float) -> None:
        log.info("job %d: %s %.2f", self._job.id, step, seconds)
        self._steps[step] = seconds
        try:
            record_steps(self._store, self._job.id, self._owner, self._steps)
        except SQLAlchemyError as err:  # progress only: the outcome records every step again
            log.warning("job %d: step %s not recorded: %s", self._job.id, step, err)

    def placed(self, placement: Placement) -> None:
        log.info("job %d: runs on %s", self._job.id, placement_text(placement.as_record()))
        try:
            record_placement(self._store, self._job.id, self._owner, placement.as_record())
        except SQLAlchemyError as err:  # shown to operators only; the run goes on
            log.warning("job %d: placement not recorded: %s", self._job.id, err)


class JobRunner:
    """Runs the store's jobs on ``executor``: ``start`` one thread per slot, ``stop`` to end them."""

    def __init__(
        self,
        store: Store,
        config: Config,
        executor: Executor,
        enqueue: Enqueue = enqueue_deliveries,
        delivered: Callable[[], None] = lambda: None,
    ) -> None:
        """``delivered`` is called after a job's deliveries were queued (the node wakes its dispatcher)."""
        self._store = store
        self._config = config.executor
        self._pipeline_options = config.pipeline_options
        self._spool_dir = config.spool_dir
        self._results_dir = config.results_dir
        self._executor = executor
        self._enqueue = enqueue
        self._delivered = delivered
        self._source_destinations = {
            name
            for name, destination in config.destinations.items()
            if destination.deidentify is not None and destination.deidentify.include_source
        }
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._wakeup = Wakeup()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._results_dir.mkdir(parents=True, exist_ok=True)
        self._executor.start()
        for slot in range(self._executor.slots):
            thread = threading.Thread(target=self._loop, args=(slot,), name=f"radgate-slot-{slot}")
            thread.start()
            self._threads.append(thread)
        log.info("executor: %d slot(s), results in %s", self._executor.slots, self._results_dir.resolve())

    def wake(self) -> None:
        """A job may have been queued: idle slots look for it now, not at their next poll."""
        self._wakeup.wake()

    def stop(self) -> None:
        """Kill running tasks, give their jobs back to the queue, stop the workers."""
        self._wakeup.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._executor.close()

    def _loop(self, slot: int) -> None:
        def round_() -> bool:
            try:
                return self.run_one(slot) is not None
            except Exception:  # the store went away, or a bug: keep the slot alive
                log.exception("executor slot %d: unexpected error; trying again", slot)
                return False

        self._wakeup.loop(self._config.poll_s, round_)

    def run_one(self, slot: int = 0) -> int | None:
        """Claim one job and run it to its next recorded state; its id, or None if none was queued."""
        owner = f"{self._owner}:{slot}"
        cfg = self._config
        job = claim_job(self._store, owner, self._spool_dir, cfg.lease_s, cfg.max_attempts)
        if job is None:
            return None
        log.info(
            "job %d: %s on series %s of study %s revision %d (attempt %d of %d)",
            *(
                job.id,
                job.pipeline,
                job.series_uid,
                job.study_uid,
                job.revision,
                job.attempts,
                cfg.max_attempts,
            ),
        )
        if not job.files:
            self._fail(job, owner, f"series {job.series_uid} has no instances in the store", {}, retry=False)
            return job.id
        if missing := sum(1 for f in job.files if not f.is_file()):
            reason = (
                f"{missing} of {len(job.files)} instances of series {job.series_uid} are not in the spool "
                f"{self._spool_dir} (received by another node? nodes sharing a store need cluster.shared_dir)"
            )
            self._fail(job, owner, reason, {}, retry=True)
            return job.id
        base, options = self._pipeline_options(job.pipeline)
        prior, comparison_note = prior_result(job.needs, self._results_dir)
        if prior is not None:
            log.info("job %d: compared with the %s", job.id, prior.describe())
        task = Task(
            job_id=job.id,
            pipeline=job.pipeline,
            study_uid=job.study_uid,
            series_uid=job.series_uid,
            revision=job.revision,
            files=tuple(str(f) for f in job.files),
            out_dir=str(self._results_dir / str(job.id)),
            supersedes=job.supersedes,
            base=base,
            options=options,
            prior=prior,
            comparison_note=comparison_note,
        )
        lease = _Lease(self._store, job, owner, cfg.lease_s, self._wakeup.stopping)
        try:
            result = self._executor.run(slot, task, cfg.job_timeout_s, lease)
        except (TaskTimeout, WorkerLost) as err:
            self._fail(job, owner, str(err), err.timings, retry=True)
            return job.id
        except ExecutorUnavailable as err:
            if release_job(self._store, job, owner):
                log.warning("job %d: back in the queue, the executor cannot take it now: %s", job.id, err)
            self._wakeup.stopping.wait(cfg.poll_s)
            return job.id
        except Stopped:
            if lease.lost:
                log.warning("job %d: lease lost to another worker; this run was stopped", job.id)
            elif release_job(self._store, job, owner):
                log.info("job %d: returned to the queue (stopping)", job.id)
            return job.id
        if result.error is not None:
            self._fail(job, owner, result.error, result.timings, retry=result.retry)
        elif finish_job(
            self._store,
            job,
            owner,
            [(uid, Path(p)) for uid, p in result.results],
            result.timings,
            self._enqueue_for(job),
        ):
            log.info(
                "job %d: SUCCEEDED, %d result objects%s -> %s",
                *(job.id, len(result.results), " (re-used)" if result.reused else ""),
                ", ".join(job.destinations) or "kept locally",
            )
            if job.destinations:
                self._delivered()
        else:
            log.warning("job %d: finished, but its lease was lost; the new owner records it", job.id)
        return job.id

    def _enqueue_for(self, job: ClaimedJob) -> Enqueue:
        """The results to every destination, and the job's source series to those whose
        ``deidentify.include_source`` asks for it (de-identified when sent, so references resolve)."""
        sources = list(zip(job.sop_uids, job.files, strict=True))
        wanting = [name for name in job.destinations if name in self._source_destinations]

        def enqueue(s: Session, job_id: int, results: Sequence[tuple[str, Path]], to: Sequence[str]) -> int:
            added = self._enqueue(s, job_id, results, to)
            return added + (self._enqueue(s, job_id, sources, wanting) if wanting and sources else 0)

        return enqueue

    def _fail(
        self, job: ClaimedJob, owner: str, reason: str, timings: dict[str, float], *, retry: bool
    ) -> None:
        state = fail_job(
            self._store, job, owner, reason, timings, retry=retry, max_attempts=self._config.max_attempts
        )
        log.warning("job %d: %s: %s", job.id, state or "lease lost", reason)
