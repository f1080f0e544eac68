"""When is a study complete? After a quiet period, shorter once its senders have hung up.

A study revision is complete ``quiet_period_s`` after its last instance, or ``after_release_s``
after the last instance once every association that brought instances of that revision has been
released, whichever comes first. Every instance counts, a duplicate too (`plugin.store`): a sender
that sends a study again after a crash keeps it open while it goes through what was stored already.
The last instance of a revision is read from its instances rows, the last duplicate from
``Study.resent_at``. Everything is read from the store, so it survives a restart: a study still
RECEIVING when the node starts gets its quiet period counted from ``started_at`` (its sender may be
retrying; the node sets it once its listener is up, see `plugin.node`), unless all its associations
had already been released. Completing a study and queuing its jobs happen in one transaction,
through one hook (``on_complete``); the node routes there (`plugin.fetch.completion_hook`: the rules,
`plugin.jobs.queue.routing_hook`, or what a fetch request asked for), the default queues one job
without a pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from plugin.config import CompletionConfig
from plugin.store.engine import Store
from plugin.store.models import Reception, Study, StudyState, add_queued_job, utcnow
from plugin.store.queries import instance_counts, last_instance_of_revision, latest

log = logging.getLogger(__name__)

CompletionHook = Callable[[Session, Study], None]


def queue_unrouted_job(session: Session, study: Study) -> None:
    """The job for a complete study revision; no pipeline yet (routing fills it in later)."""
    add_queued_job(session, study)


@dataclass(frozen=True)
class _Receiving:
    study_id: int
    revision: int
    last_received_at: datetime
    receptions: int
    open_receptions: int
    last_release: datetime | None


class CompletionMonitor:
    """Declares RECEIVING studies COMPLETE when due; ``run`` loops until its stop event is set."""

    def __init__(
        self,
        store: Store,
        config: CompletionConfig,
        started_at: datetime | None = None,
        on_complete: CompletionHook = queue_unrouted_job,
        completed: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_complete`` runs in the transaction that completes a study (it queues the jobs);
        ``completed`` after a check committed one or more (the node wakes its job slots)."""
        self._store = store
        self._quiet = timedelta(seconds=config.quiet_period_s)
        self._after_release = timedelta(seconds=config.after_release_s)
        self.started_at = started_at or utcnow()
        self._on_complete = on_complete
        self._completed = completed
        shortest = min(config.quiet_period_s, config.after_release_s or config.quiet_period_s)
        self.tick_s = min(1.0, max(0.05, shortest / 4))

    def _receiving(self, session: Session, study_id: int | None = None) -> list[_Receiving]:
        """The RECEIVING study revisions, with when each last received an instance or a duplicate."""
        query = (
            select(
                Study.id,
                Study.revision,
                Study.revision_started_at,
                last_instance_of_revision(),
                Study.resent_at,
                func.count(Reception.id),
                func.count(Reception.id) - func.count(Reception.released_at),
                func.max(Reception.released_at),
            )
            .outerjoin(
                Reception,
                and_(Reception.study_id == Study.id, Reception.study_revision == Study.revision),
            )
            .where(Study.state == StudyState.RECEIVING)
            .group_by(Study.id, Study.revision, Study.revision_started_at, Study.resent_at)
        )
        if study_id is not None:
            query = query.where(Study.id == study_id)
        rows = session.execute(query).all()
        return [
            _Receiving(
                study_id=sid,
                revision=rev,
                last_received_at=latest(started, last, resent),
                receptions=int(n),
                open_receptions=int(n_open),
                last_release=released,
            )
            for sid, rev, started, last, resent, n, n_open, released in rows
        ]

    def deadline(self, r: _Receiving) -> datetime:
        quiet = max(r.last_received_at, self.started_at) + self._quiet
        if r.receptions and not r.open_receptions and r.last_release is not None:
            return min(quiet, max(r.last_received_at, r.last_release) + self._after_release)
        return quiet

    def check(self, now: datetime | None = None) -> list[tuple[str, int]]:
        """Complete every study that is due; returns (Study UID, revision) of those completed."""
        now = now or utcnow()
        with self._store.session() as s:
            due = [r.study_id for r in self._receiving(s) if self.deadline(r) <= now]
        completed = [done for study_id in due if (done := self._complete(study_id, now)) is not None]
        if completed:
            self._completed()
        return completed

    def _complete(self, study_id: int, now: datetime) -> tuple[str, int] | None:
        """Lock the study row (receivers lock it too), then re-check: an instance may have come since."""
        with self._store.session() as s:
            study = s.get(Study, study_id, with_for_update=True)
            current = self._receiving(s, study_id)
            if study is None or not current or self.deadline(current[0]) > now:
                return None
            study.state = StudyState.COMPLETE
            study.completed_at = now
            self._on_complete(s, study)
            count = instance_counts(s, [study.id]).get(study.id, 0)
        log.info("study %s revision %d complete: %d instances", study.study_uid, study.revision, count)
        return study.study_uid, study.revision

    def run(self, stop: threading.Event) -> None:
        """Check every ``tick_s`` until ``stop`` is set; a database error is logged and retried."""
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # keep completing once the database is back
                log.exception("completion check failed; retrying")
            stop.wait(self.tick_s)
