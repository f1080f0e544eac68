"""Fetch requests in the job store, and the node's loop that works them.

A request (`request_fetch`) is a row in ``fetch_requests``: QUEUED → RUNNING → DONE / FAILED. The
node's `FetchWorker` claims the oldest due one with a lease (a conditional UPDATE, as jobs are
claimed: two nodes sharing a store never pull the same request twice; a node that died mid-way
loses its claim when the lease runs out), looks the study up when only its accession is known,
retrieves it (`plugin.fetch.retrieve`) and renews the lease at every instance. A source that
cannot be reached (or answers with a failure) puts the request back, QUEUED, after a capped
exponential backoff, until ``fetch.max_attempts``: then FAILED with the reason. A query that
matches nothing fails at once.

After the retrieve the study completes like any received study (`plugin.jobs.completion`); the
completion hook (`completion_hook`) then runs what the request asked for, once: the rules, or only
the named pipeline. While a retrieve is still running, or one that failed part-way waits to try
again, its study's completion queues nothing, so a partial study is never routed. A study that was
complete already (every instance a duplicate) is run at the end of the retrieve. The request is
DONE with its jobs.

`submit_fetch` is what `radgate fetch`, ``POST /api/fetch`` and the console's form call.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from plugin.config import Config, SourceConfig
from plugin.fetch.query import FetchError, NoMatch, find_studies
from plugin.fetch.retrieve import Retrieved, retrieve_study
from plugin.ingest.receive import Receiver
from plugin.jobs.completion import CompletionHook
from plugin.jobs.queue import NoUsableSeries, queue_named_job, queue_routed_jobs
from plugin.route.rules import RuleSet
from plugin.store.engine import Store
from plugin.store.models import FetchRequest, FetchState, Study, StudyState, utcnow

log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

STOP_WAIT_S = 10.0
"""How long `FetchWorker.stop` waits for a retrieve in hand (then its claim runs out; retried)."""


class UnknownSource(ValueError):
    """A fetch names a source that is not configured."""


class SeveralStudies(FetchError):
    """An accession number matches more than one study at the source."""


@dataclass(frozen=True)
class FetchStatus:
    """A fetch request as the CLI, the API and the console show it (no patient data)."""

    id: int
    source: str
    study_uid: str | None
    accession: str | None
    series_uids: tuple[str, ...]
    pipeline: str | None
    reason: str
    state: str
    attempts: int
    error: str | None
    instances: int | None
    jobs: tuple[int, ...]
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: FetchRequest) -> FetchStatus:
        return cls(
            id=row.id,
            source=row.source,
            study_uid=row.study_uid,
            accession=row.accession,
            series_uids=tuple(row.series_uids or ()),
            pipeline=row.pipeline,
            reason=row.reason,
            state=row.state,
            attempts=row.attempts,
            error=row.error,
            instances=row.instances,
            jobs=tuple(row.jobs or ()),
            created_at=row.created_at,
            updated_at=row.updated_at,
            next_attempt_at=row.next_attempt_at,
            finished_at=row.finished_at,
        )


def _what(study_uid: str | None, accession: str | None) -> str:
    return f"study {study_uid}" if study_uid else f"accession {accession}"


# --- recording and reading -------------------------------------------------------------------------


def _check_ids(study_uid: str | None, accession: str | None, series_uids: tuple[str, ...] = ()) -> None:
    """ValueError unless a study UID or an accession is given and every UID and accession is well
    formed (an accession without the wildcards and backslash a C-FIND would read as several)."""
    if not study_uid and not accession:
        raise ValueError("a fetch needs a Study Instance UID or an accession number")
    for uid in (study_uid, *series_uids) if study_uid else series_uids:
        if len(uid) > 64 or not _UID.fullmatch(uid):
            raise ValueError(f"not a DICOM UID: {uid[:70]!r}")
    if accession is not None and (len(accession) > 16 or any(c in accession for c in "*?\\")):
        raise ValueError("an accession number has at most 16 characters, without * ? or \\")


def request_fetch(
    store: Store,
    source_name: str,
    *,
    study_uid: str | None = None,
    accession: str | None = None,
    series_uids: tuple[str, ...] = (),
    pipeline: str | None = None,
    reason: str,
) -> int:
    """Record a QUEUED request to pull a study (``series_uids``: only those series) from source
    ``source_name`` and, once it is complete, run the rules (or only ``pipeline``) on it; the node
    works it. Returns the request's id. Raises ValueError unless a study UID or an accession is
    given, for a malformed UID or an accession longer than 16 characters.
    """
    _check_ids(study_uid, accession, series_uids)
    now = utcnow()
    with store.session() as s:
        row = FetchRequest(
            source=source_name,
            study_uid=study_uid or None,
            accession=accession or None,
            series_uids=list(series_uids) or None,
            pipeline=pipeline,
            reason=reason[:500],
            state=FetchState.QUEUED,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        s.add(row)
        s.flush()
        request_id = row.id
    log.info(
        "fetch request %d queued: %s from %s%s (%s)",
        *(
            request_id,
            _what(study_uid, accession),
            source_name,
            f", {len(series_uids)} series" if series_uids else "",
        ),
        f"pipeline {pipeline}" if pipeline else "the rules",
    )
    return request_id


def list_fetches(store: Store, limit: int = 200) -> list[FetchStatus]:
    """The latest fetch requests, newest first."""
    with store.session() as s:
        rows = s.scalars(select(FetchRequest).order_by(FetchRequest.id.desc()).limit(limit)).all()
        return [FetchStatus.of(row) for row in rows]


def get_fetch(store: Store, request_id: int) -> FetchStatus | None:
    with store.session() as s:
        row = s.get(FetchRequest, request_id)
        return None if row is None else FetchStatus.of(row)


# --- asking: the CLI, the API and the console ------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """A recorded fetch request, and a note when the source could not be asked first."""

    request_id: int
    study_uid: str | None
    note: str | None


def source_named(config: Config, name: str) -> SourceConfig:
    """The configured source ``name``; UnknownSource naming those there are."""
    source = config.sources.get(name)
    if source is None:
        raise UnknownSource(
            f"unknown source {name[:64]!r}; configured: {', '.join(config.sources) or 'none'}"
        )
    return source


def submit_fetch(
    config: Config,
    store: Store,
    source_name: str,
    *,
    study_uid: str | None = None,
    accession: str | None = None,
    pipeline: str | None = None,
    pipelines: Sequence[str] = (),
    reason: str,
) -> Submitted:
    """Ask the source for the study first, then record the request (what `radgate fetch`, ``POST
    /api/fetch`` and the console's form do). ``pipelines``: the names ``pipeline`` may take.

    Raises UnknownSource, ValueError (neither or both of study UID and accession, an unknown
    pipeline), NoMatch when the source holds no such study, FetchError when an accession matches
    several studies. A source that cannot be reached now is no error: the request is recorded
    and the node retries (the note says so).
    """
    source = source_named(config, source_name)
    if study_uid and accession:
        raise ValueError("give a Study Instance UID or an accession number, not both")
    _check_ids(study_uid, accession)
    if pipeline is not None and pipeline not in pipelines:
        raise ValueError(
            f"unknown pipeline {pipeline[:64]!r}; installed: {', '.join(sorted(pipelines)) or 'none'}"
        )
    note = None
    try:
        study_uid = _one_study(source, source_name, study_uid, accession)
    except (NoMatch, SeveralStudies):
        raise
    except FetchError as err:
        note = f"{source_name} cannot be asked now ({err}); the node retries"
    request_id = request_fetch(
        store, source_name, study_uid=study_uid, accession=accession, pipeline=pipeline, reason=reason
    )
    return Submitted(request_id, study_uid, note)


def _one_study(source: SourceConfig, source_name: str, study_uid: str | None, accession: str | None) -> str:
    """The Study Instance UID the source holds for this UID or accession: NoMatch, SeveralStudies."""
    matches = find_studies(source, study_uid=study_uid, accession=accession)
    if not matches:
        raise NoMatch(f"no study at {source_name} matches {_what(study_uid, accession)}")
    if len(matches) > 1:
        raise SeveralStudies(
            f"{_what(study_uid, accession)} matches {len(matches)} studies at {source_name} "
            f"({', '.join(m.study_uid for m in matches[:5])}); fetch one by its Study Instance UID"
        )
    return matches[0].study_uid


# --- running what a request asked for, once its study is complete ----------------------------------


@dataclass(frozen=True)
class Routing:
    """What running a fetched study needs: the rules, the spool, the destinations of a named pipeline."""

    rules: RuleSet
    spool_dir: Path
    destinations: tuple[str, ...]


def _run_requests(session: Session, study: Study, rows: Sequence[FetchRequest], routing: Routing) -> None:
    """Queue what the retrieved requests ask for on their complete study, in the caller's
    transaction: the rules once if any asks for them, each named pipeline once; then DONE (or
    FAILED when the named pipeline can use no series)."""
    now = utcnow()
    routed: list[int] = []
    named: dict[str, int] = {}
    failed: dict[str, str] = {}
    if any(row.pipeline is None for row in rows):
        routed = [job.id for job in queue_routed_jobs(session, study, routing.rules, routing.spool_dir)]
    for pipeline in sorted({row.pipeline for row in rows if row.pipeline is not None}):
        try:
            job = queue_named_job(
                session, study, pipeline, routing.rules, routing.spool_dir, routing.destinations
            )
        except NoUsableSeries as err:
            failed[pipeline] = str(err)
        else:
            named[pipeline] = job.id
    for row in rows:
        if row.pipeline is None:
            error, jobs = None, routed
        else:
            error = failed.get(row.pipeline)
            jobs = [named[row.pipeline]] if row.pipeline in named else []
        row.state = FetchState.FAILED if error else FetchState.DONE
        row.error = error
        row.jobs = jobs
        row.finished_at = row.updated_at = now
        row.lease_owner = row.lease_expires_at = None
        if error:
            log.error("fetch request %d: study %s: %s", row.id, study.study_uid, error)
        else:
            log.info(
                "fetch request %d done: study %s%s complete, jobs %s",
                *(row.id, study.study_uid, f" (accession {row.accession})" if row.accession else ""),
                jobs or "none",
            )


def _settle(session: Session, study: Study, routing: Routing) -> bool:
    """Run the fetch requests that retrieved a complete study (`_run_requests`) once none is still
    retrieving it or waiting to try again; False when no request is about it (the caller routes it
    as usual). A request not tried yet does not hold up a study that is sent meanwhile."""
    rows = session.scalars(
        select(FetchRequest)
        .where(
            FetchRequest.study_uid == study.study_uid,
            FetchRequest.state.in_((FetchState.RUNNING, FetchState.QUEUED)),
        )
        .order_by(FetchRequest.id)
    ).all()
    ready = [row for row in rows if row.state == FetchState.RUNNING and row.retrieved_at is not None]
    waiting = [
        row.id
        for row in rows
        if (row.state == FetchState.RUNNING and row.retrieved_at is None)
        or (row.state == FetchState.QUEUED and row.attempts > 0)
    ]
    if waiting:
        log.info(
            "study %s revision %d: complete; its jobs wait for fetch request(s) %s to end their retrieve",
            *(study.study_uid, study.revision, waiting),
        )
        return True
    if not ready:
        return False
    _run_requests(session, study, ready, routing)
    return True


def completion_hook(routing: Routing) -> CompletionHook:
    """The `CompletionMonitor.on_complete` hook of a node that fetches: a complete study is routed
    as usual, unless fetch requests are waiting for it (`_run_requests`), or one is still retrieving
    it (then nothing is queued yet: the end of that retrieve runs it)."""

    def hook(session: Session, study: Study) -> None:
        if not _settle(session, study, routing):
            queue_routed_jobs(session, study, routing.rules, routing.spool_dir)

    return hook


# --- the node's worker -----------------------------------------------------------------------------


def _due(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(
            FetchRequest.state == FetchState.QUEUED,
            or_(FetchRequest.next_attempt_at.is_(None), FetchRequest.next_attempt_at <= now),
        ),
        and_(
            FetchRequest.state == FetchState.RUNNING,
            FetchRequest.retrieved_at.is_(None),
            FetchRequest.lease_expires_at < now,
        ),
    )


@dataclass(frozen=True)
class _Claimed:
    id: int
    source: str
    study_uid: str | None
    accession: str | None
    series_uids: tuple[str, ...]
    attempts: int


class FetchWorker:
    """Works the due fetch requests one at a time in a thread of the node (`start`, `stop`)."""

    def __init__(self, store: Store, config: Config, receiver: Receiver, routing: Routing) -> None:
        self.store = store
        self.config = config
        self.receiver = receiver
        self.routing = routing
        self.owner = f"{socket.gethostname()}:{os.getpid()}:fetch"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="radgate-fetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request in hand (its claim runs out if a retrieve does not end in time)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_S)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.work_one()
            except Exception:  # the database went away: try again later
                log.exception("fetch worker: cannot work the fetch requests; retrying")
                worked = False
            if not worked:
                self._stop.wait(self.config.fetch.poll_interval_s)

    # ------------------------------------------------------------------ claim and lease

    def claim(self, now: datetime | None = None) -> _Claimed | None:
        """Lease the oldest due request to this node; None when there is none (or others took them)."""
        now = now or utcnow()
        lease = now + timedelta(seconds=self.config.fetch.lease_s)
        with self.store.session() as s:
            candidates = list(
                s.scalars(select(FetchRequest.id).where(_due(now)).order_by(FetchRequest.id).limit(8))
            )
        for request_id in candidates:
            with self.store.session() as s:
                won = s.execute(
                    update(FetchRequest)
                    .where(FetchRequest.id == request_id, _due(now))
                    .values(
                        state=FetchState.RUNNING,
                        lease_owner=self.owner,
                        lease_expires_at=lease,
                        attempts=FetchRequest.attempts + 1,
                        updated_at=now,
                    )
                )
                if won.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                row = s.get(FetchRequest, request_id)
                assert row is not None
                return _Claimed(
                    row.id,
                    row.source,
                    row.study_uid,
                    row.accession,
                    tuple(row.series_uids or ()),
                    row.attempts,
                )
        return None

    def _mine(self, request_id: int) -> ColumnElement[bool]:
        return and_(
            FetchRequest.id == request_id,
            FetchRequest.state == FetchState.RUNNING,
            FetchRequest.lease_owner == self.owner,
        )

    def _update_mine(self, request_id: int, **values: object) -> bool:
        """Change the request while this node holds its claim; False when it lost it."""
        with self.store.session() as s:
            result = s.execute(
                update(FetchRequest).where(self._mine(request_id)).values(updated_at=utcnow(), **values)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def _renewer(self, request_id: int) -> Callable[[], None]:
        """A `progress` callback that renews the lease when a third of it has gone by."""
        lease_s = self.config.fetch.lease_s
        last = [time.monotonic()]

        def renew() -> None:
            if time.monotonic() - last[0] >= lease_s / 3:
                last[0] = time.monotonic()
                self._update_mine(request_id, lease_expires_at=utcnow() + timedelta(seconds=lease_s))

        return renew

    # ------------------------------------------------------------------ one request

    def work_one(self, now: datetime | None = None) -> bool:
        """Claim (`claim`) and work one due request; False when there was none."""
        claimed = self.claim(now)
        if claimed is None:
            return False
        source = self.config.sources.get(claimed.source)
        if source is None:
            self._fail(claimed, f"source {claimed.source!r} is not configured on this node")
        elif claimed.attempts > self.config.fetch.max_attempts:  # taken over from a node that died
            self._fail(claimed, f"node lost (lease expired) and all {claimed.attempts - 1} attempts used")
        else:
            try:
                self._work(claimed, source)
            except Exception as err:  # a bug or a peer pynetdicom cannot handle: this request only
                log.exception("fetch request %d: unexpected error", claimed.id)
                self._retry_or_fail(claimed, f"unexpected error: {type(err).__name__}: {err}")
        return True

    def _work(self, claimed: _Claimed, source: SourceConfig) -> None:
        """Look the study up if need be, retrieve it, and record how that went."""
        what = _what(claimed.study_uid, claimed.accession)
        try:
            study_uid = claimed.study_uid or _one_study(source, claimed.source, None, claimed.accession)
            if claimed.study_uid is None:
                self._update_mine(claimed.id, study_uid=study_uid)
            log.info(
                "fetch request %d: retrieving %s from %s (attempt %d)",
                claimed.id,
                what,
                claimed.source,
                claimed.attempts,
            )
            retrieved = retrieve_study(
                source,
                self.receiver,
                self.config.incoming_dir,
                study_uid,
                claimed.series_uids,
                progress=self._renewer(claimed.id),
            )
        except (NoMatch, SeveralStudies) as err:
            self._fail(claimed, str(err))
        except FetchError as err:
            self._retry_or_fail(claimed, str(err))
        except OSError as err:  # our side: the incoming folder
            self._retry_or_fail(claimed, f"cannot store what {claimed.source} sent: {err}")
        else:
            self._retrieved(claimed, study_uid, retrieved)

    def _fail(self, claimed: _Claimed, reason: str) -> None:
        """FAILED with the reason, while this node holds the claim; other requests that waited for
        this one to retrieve the same complete study run now."""
        now = utcnow()
        with self.store.session() as s:
            study_uid = s.scalar(select(FetchRequest.study_uid).where(FetchRequest.id == claimed.id))
            study = (
                None
                if study_uid is None
                else s.scalars(
                    select(Study).where(Study.study_uid == study_uid).with_for_update()
                ).one_or_none()
            )
            result = s.execute(
                update(FetchRequest)
                .where(self._mine(claimed.id))
                .values(
                    state=FetchState.FAILED,
                    error=reason,
                    finished_at=now,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            failed = bool(result.rowcount == 1)  # type: ignore[attr-defined]
            if failed and study is not None and study.state == StudyState.COMPLETE:
                _settle(s, study, self.routing)
        if failed:
            log.error("fetch request %d failed: %s", claimed.id, reason)

    def _retry_or_fail(self, claimed: _Claimed, reason: str) -> None:
        """Back to QUEUED after a capped exponential backoff, or FAILED after the last attempt."""
        settings = self.config.fetch
        if claimed.attempts >= settings.max_attempts:
            self._fail(claimed, f"{reason} (after {claimed.attempts} attempts)")
            return
        delay = min(settings.retry_max_s, settings.retry_base_s * 2 ** (claimed.attempts - 1))
        if self._update_mine(
            claimed.id,
            state=FetchState.QUEUED,
            error=reason,
            next_attempt_at=utcnow() + timedelta(seconds=delay),
            lease_owner=None,
            lease_expires_at=None,
        ):
            log.warning(
                "fetch request %d: attempt %d of %d failed: %s; next in %.0f s",
                *(claimed.id, claimed.attempts, settings.max_attempts, reason, delay),
            )

    def _retrieved(self, claimed: _Claimed, study_uid: str, retrieved: Retrieved) -> None:
        """The retrieve ended: run the request now if its study is complete already (nothing new
        came), else leave it to the completion hook; FAILED when nothing of the study is here."""
        with self.store.session() as s:  # the study's row first, as completion locks it
            study = s.scalars(
                select(Study).where(Study.study_uid == study_uid).with_for_update()
            ).one_or_none()
            row = s.get(FetchRequest, claimed.id, with_for_update=True)
            if row is None or row.state != FetchState.RUNNING or row.lease_owner != self.owner:
                return  # taken over meanwhile (our lease ran out): the other node finishes it
            now = utcnow()
            row.retrieved_at = row.updated_at = now
            row.instances = retrieved.instances
            row.error = None
            log.info(
                "fetch request %d: retrieved study %s from %s: %d instances, %d failed",
                *(claimed.id, study_uid, claimed.source, retrieved.instances, retrieved.failed),
            )
            if study is None:
                row.state = FetchState.FAILED
                row.finished_at = now
                row.error = f"{claimed.source} sent no instance of study {study_uid}" + (
                    f" ({retrieved.failed} failed sub-operations)" if retrieved.failed else ""
                )
                log.error("fetch request %d failed: %s", claimed.id, row.error)
            elif study.state == StudyState.COMPLETE:
                s.flush()  # this request as retrieved, for `_settle`'s query
                _settle(s, study, self.routing)
