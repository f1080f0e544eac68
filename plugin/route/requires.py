"""What a rule requires before its job runs: a series it names, the patient's prior study.

A job whose rule has `requires` is queued WAITING (`start_waiting`, at routing) with what it waits
for in ``Job.needs``; `RequirementsWorker` moves it on, a step per poll, each step a note on the
study's timeline and a log line (UIDs and accession numbers only):

* series: the study completed without a series that passes ``requires.series.match``. With
  ``pull_from`` the source is asked for the study's series (C-FIND or QIDO-RS) and those whose
  modality, description and number pass are pulled (only those attributes are in the answer).
  Whatever brings the series (the pull, or the sender) makes a new revision of the study, whose
  routing supersedes the WAITING job. After ``wait_minutes`` without it, ``after_wait: run`` runs
  on the series there are and ``skip`` CANCELs the job with the reason.
* prior: the patient's studies at ``requires.prior.source`` dated before this one (within
  ``max_age_days``, sharing ``same``) are looked up; the most recent is the prior. When radgate
  already has the pipeline's result for it, that result is used; else it is pulled and the same
  pipeline runs on it (a job of rule `PRIOR_RULE`, whose results stay local unless ``deliver``),
  in place of the rules (`queue_prior_jobs`). No prior, a source that does not answer, a pull or
  a run that fails, or ``wait_minutes`` gone by: the job runs without a comparison and its SR says
  why (``needs["prior"]["why"]``; in the SR ``said``, which names no UID).

The job is QUEUED once every requirement is settled; the runner gives the pipeline the prior's
result (`prior_result`). The archive is reached through `Archive` (`plugin.fetch` on the node).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_io.results.prior import Prior
from dicom_io.results.reading import read_prior
from plugin.config import PriorRequirement, Requirements
from plugin.route.rules import RuleSet, SeriesInfo, describe_required, meets
from plugin.store.engine import Store
from plugin.store.models import Instance, Job, JobState, Series, Study, utcnow

log = logging.getLogger(__name__)

PRIOR_RULE = "prior"
"""The rule name of a job that runs a pipeline on a prior study for a waiting job."""

_FIND_KEYWORDS = ("Modality", "SeriesDescription", "SeriesNumber")
"""What a series-level C-FIND answer tells about a series, as rule keywords."""


class ArchiveUnavailable(Exception):
    """The source could not be asked (down, refused, timed out); the message says how."""


class FoundStudy(Protocol):
    """A study a source holds (`plugin.fetch.StudyMatch`)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def accession(self) -> str | None: ...
    @property
    def study_date(self) -> _dt.date | None: ...
    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def description(self) -> str | None: ...


class FoundSeries(Protocol):
    """A series a source holds (`plugin.fetch.SeriesMatch`)."""

    @property
    def series_uid(self) -> str: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...
    @property
    def number(self) -> int | None: ...


class Archive(Protocol):
    """The sources as requirements use them; each call raises `ArchiveUnavailable`, or ValueError
    for a source that is not configured."""

    def studies(
        self, source: str, patient_id: str, modality: str | None, before: _dt.date
    ) -> Sequence[FoundStudy]: ...

    def series(self, source: str, study_uid: str) -> Sequence[FoundSeries]: ...

    def pull(self, source: str, study_uid: str, series_uids: Sequence[str], reason: str) -> int:
        """Ask the node to pull a study (or only ``series_uids``); the fetch request's id."""
        ...

    def pull_failed(self, request_id: int) -> str | None:
        """Why the fetch request failed; None while it is under way or when it is done."""
        ...


# --- at routing ------------------------------------------------------------------------------------


def _note(needs: dict[str, Any], text: str, now: _dt.datetime) -> None:
    needs.setdefault("notes", []).append({"at": now.isoformat(), "text": text})


def start_waiting(
    job: Job,
    requires: Requirements,
    series: Sequence[SeriesInfo],
    now: _dt.datetime,
    superseded: Sequence[Job] = (),
) -> str | None:
    """Make a just-queued job WAITING for what its rule requires and is not there yet (a series
    missing from ``series``, a prior); what it waits for in words, None when nothing is missing.

    A prior that a ``superseded`` WAITING job of the same rule found (or is pulling, or found none
    of) is this job's, with its deadline.
    """
    needs: dict[str, Any] = {}
    waits: list[str] = []
    until = now
    required = requires.series
    if required is not None and not any(meets(s.header, required) for s in series):
        deadline = now + _dt.timedelta(minutes=required.wait_minutes)
        wanted = describe_required(required)
        needs["series"] = {"state": "waiting", "until": deadline.isoformat()}
        pulled = f", asking {required.pull_from} for it" if required.pull_from else ""
        waits.append(f"{wanted} (up to {required.wait_minutes:g} min{pulled})")
        until = max(until, deadline)
    carried = next(
        (
            dict(j.needs["prior"])
            for j in superseded
            if j.needs and j.needs.get("prior", {}).get("state", "find") != "find"
        ),
        None,
    )
    if requires.prior is not None and carried is not None:
        needs["prior"] = carried
        waits.append(f"the prior study (carried over from the superseded job: {carried['state']})")
        until = max(until, _dt.datetime.fromisoformat(carried["until"]))
    elif requires.prior is not None:
        deadline = now + _dt.timedelta(minutes=requires.prior.wait_minutes)
        needs["prior"] = {"state": "find", "until": deadline.isoformat()}
        waits.append(
            f"the prior study from {requires.prior.source} (up to {requires.prior.wait_minutes:g} min)"
        )
        until = max(until, deadline)
    if not waits:
        return None
    text = "waiting for " + " and ".join(waits)
    _note(needs, text, now)
    job.state = JobState.WAITING
    job.needs = needs
    job.wait_until = until
    return text


def queue_prior_jobs(session: Session, study: Study, rules: RuleSet, spool_dir: Path) -> list[Job] | None:
    """When ``study`` was pulled as the prior of WAITING jobs: queue each of their pipelines once on
    it (rule `PRIOR_RULE`, results kept locally unless the requirement says ``deliver``) instead of
    routing it; None when no job waits for it. In the caller's transaction."""
    from plugin.jobs.queue import NoUsableSeries, queue_named_job  # queue imports this module

    waiters = [
        job
        for job in session.scalars(select(Job).where(Job.state == JobState.WAITING))
        if (job.needs or {}).get("prior", {}).get("study_uid") == study.study_uid
        and job.needs is not None
        and job.needs["prior"]["state"] == "fetching"
    ]
    if not waiters:
        return None
    queued: list[Job] = []
    for pipeline in sorted({job.pipeline for job in waiters if job.pipeline}):
        mine = [job for job in waiters if job.pipeline == pipeline]
        deliver = [
            d
            for job in mine
            if (requires := rules.requirements(job.rule)) is not None
            and requires.prior is not None
            and requires.prior.deliver
            for d in job.destinations or ()
        ]
        try:
            queued.append(
                queue_named_job(
                    session, study, pipeline, rules, spool_dir, sorted(set(deliver)), rule=PRIOR_RULE
                )
            )
        except NoUsableSeries as err:
            log.info("study %s: pulled as a prior, but %s", study.study_uid, err)
            for job in mine:
                _settle_prior(job, f"{pipeline} can use no series of the prior", utcnow())
    return queued


# --- the worker ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waiting:
    id: int
    study_uid: str
    patient_id: str | None
    study_date: str | None
    pipeline: str
    rule: str | None
    series_uid: str | None
    updated_at: _dt.datetime
    needs: dict[str, Any]


def _date(text: str | None) -> _dt.date | None:
    try:
        return _dt.datetime.strptime(text or "", "%Y%m%d").date()
    except ValueError:
        return None


def _settle_prior(job: Job, why: str, now: _dt.datetime) -> None:
    """No comparison for this job: the prior requirement is settled, with the reason."""
    needs = dict(job.needs or {})
    needs["prior"] = {**needs.get("prior", {}), "state": "none", "why": why}
    _note(needs, f"no comparison: {why}", now)
    job.needs = needs


def choose_prior(
    found: Sequence[FoundStudy],
    study_uid: str,
    study_date: _dt.date,
    requirement: PriorRequirement,
    modality: str | None,
    description: str | None,
) -> FoundStudy | None:
    """The most recent of ``found`` dated before ``study_date`` (within ``max_age_days``) that is
    not this study and shares what ``requirement.same`` names; None when none does."""
    oldest = study_date - _dt.timedelta(days=requirement.max_age_days)
    candidates = [
        s
        for s in found
        if s.study_uid != study_uid
        and s.study_date is not None
        and oldest <= s.study_date < study_date
        and ("modality" not in requirement.same or (modality or "") in s.modalities)
        and (
            "study_description" not in requirement.same
            or (s.description or "").strip().casefold() == (description or "").strip().casefold()
        )
    ]
    return max(candidates, key=lambda s: s.study_date or _dt.date.min, default=None)


class RequirementsWorker:
    """Moves WAITING jobs on (`step`), in a thread of the node (`start`, `stop`)."""

    def __init__(
        self, store: Store, rules: RuleSet, archive: Archive, spool_dir: Path, poll_s: float = 1.0
    ) -> None:
        self.store = store
        self.rules = rules
        self.archive = archive
        self.spool_dir = spool_dir
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="radgate-requires", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the store went away, or a bug: keep the thread alive
                log.exception("requirements: unexpected error; trying again")
            self._stop.wait(self.poll_s)

    def step(self, now: _dt.datetime | None = None) -> None:
        """One step for every WAITING job: look, pull, settle or give up; QUEUE those settled."""
        with self.store.session() as s:
            rows = s.execute(
                select(Job, Study.study_uid, Study.patient_id, Study.study_date)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.WAITING)
                .order_by(Job.id)
            ).all()
            waiting = [
                _Waiting(
                    j.id,
                    uid,
                    pid,
                    date,
                    j.pipeline or "",
                    j.rule,
                    j.series_uid,
                    j.updated_at,
                    dict(j.needs or {}),
                )
                for j, uid, pid, date in rows
            ]
        for job in waiting:
            self._advance(job, now or utcnow())

    def _advance(self, job: _Waiting, now: _dt.datetime) -> None:
        requires = self.rules.requirements(job.rule)
        needs = copy.deepcopy(job.needs)
        notes_before = len(needs.get("notes", []))
        skipped: str | None = None
        if "series" in needs and requires is not None and requires.series is not None:
            skipped = self._series_step(job, needs, requires, now)
        series_settled = "series" not in needs or needs["series"]["state"] == "given up"
        if "prior" in needs and requires is not None and requires.prior is not None:
            if series_settled:  # the series first: its arrival supersedes this job (start_waiting)
                self._prior_step(job, needs, requires.prior, now)
        elif "prior" in needs and needs["prior"]["state"] not in ("found", "none"):
            needs["prior"].update(state="none", why="the rule no longer asks for a prior")
        settled = all(
            needs[k]["state"] in ("given up", "found", "none") for k in ("series", "prior") if k in needs
        )
        values: dict[str, Any] = {"needs": needs, "updated_at": now}
        if skipped is not None:
            values.update(state=JobState.CANCELLED, error=skipped, finished_at=now, wait_until=None)
        elif settled:
            _note(needs, "requirements settled: queued", now)
            values.update(state=JobState.QUEUED, wait_until=None)
        elif len(needs.get("notes", [])) == notes_before and needs == job.needs:
            return  # nothing new
        with self.store.session() as s:
            done = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.WAITING, Job.updated_at == job.updated_at)
                .values(**values)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]  # superseded, or another node moved it
                return
        for note in needs.get("notes", [])[notes_before:]:
            log.info("job %d (study %s): %s", job.id, job.study_uid, note["text"])

    # ------------------------------------------------------------------ series

    def _series_step(
        self, job: _Waiting, needs: dict[str, Any], requires: Requirements, now: _dt.datetime
    ) -> str | None:
        """Pull the series once (with ``pull_from``), give up after the wait; the reason to skip the job."""
        required = requires.series
        assert required is not None
        state = needs["series"]
        wanted = describe_required(required)
        if state["state"] == "waiting" and required.pull_from and "asked" not in state:
            try:
                there = self.archive.series(required.pull_from, job.study_uid)
            except ArchiveUnavailable as err:
                if state.get("error") != str(err):
                    state["error"] = str(err)
                    _note(needs, f"{required.pull_from} did not answer ({err}); asking again", now)
            else:
                state["asked"] = True
                fitting = [
                    s.series_uid
                    for s in there
                    if meets(
                        {
                            "Modality": s.modality,
                            "SeriesDescription": s.description,
                            "SeriesNumber": s.number,
                        },
                        required,
                        only=_FIND_KEYWORDS,
                    )
                ]
                if fitting:
                    state["fetch"] = self.archive.pull(
                        required.pull_from, job.study_uid, fitting, f"{wanted} for job {job.id}"
                    )
                    _note(
                        needs,
                        f"pulling {len(fitting)} series from {required.pull_from} (fetch {state['fetch']})",
                        now,
                    )
                else:
                    _note(needs, f"{required.pull_from} has no series that may be {wanted}", now)
        if state["state"] == "waiting" and now >= _dt.datetime.fromisoformat(state["until"]):
            waited = f"{wanted} did not arrive within {required.wait_minutes:g} min"
            if required.after_wait == "skip":
                _note(needs, f"{waited}: skipped", now)
                return f"skipped: {waited}"
            state["state"] = "given up"
            _note(needs, f"{waited}: running on series {job.series_uid}", now)
        return None

    # ------------------------------------------------------------------ prior

    def _prior_step(
        self, job: _Waiting, needs: dict[str, Any], requirement: PriorRequirement, now: _dt.datetime
    ) -> None:
        state = needs["prior"]

        def none(why: str, said: str | None = None) -> None:
            """No comparison: ``why`` on the timeline, ``said`` (no UIDs: the SR's text leaves in
            de-identified exports) in the report, when ``why`` may name one."""
            state.update(state="none", why=why, said=said or why)
            _note(needs, f"no comparison: {why}", now)

        if state["state"] == "find":
            self._find_prior(job, needs, requirement, now, none)
        if state["state"] == "fetching":
            outcome = self._prior_result(state["study_uid"], job.pipeline)
            failed = self.archive.pull_failed(state["fetch"]) if "fetch" in state else None
            if isinstance(outcome, int):
                state.update(state="found", job=outcome)
                _note(needs, f"the prior's {job.pipeline} result is ready (job {outcome})", now)
            elif outcome is not None:
                none(outcome, f"the prior's {job.pipeline} run failed")
            elif failed is not None:
                none(
                    f"pulling the prior from {requirement.source} failed: {failed}",
                    f"the prior could not be pulled from {requirement.source}",
                )
        if state["state"] in ("find", "fetching") and now >= _dt.datetime.fromisoformat(state["until"]):
            none(f"the prior was not ready within {requirement.wait_minutes:g} min")

    def _find_prior(
        self,
        job: _Waiting,
        needs: dict[str, Any],
        requirement: PriorRequirement,
        now: _dt.datetime,
        none: Any,
    ) -> None:
        state = needs["prior"]
        date = _date(job.study_date)
        if not job.patient_id or date is None:
            none("this study has no Patient ID or Study Date to look for a prior with")
            return
        header = self._header(job)
        modality = str(header.get("Modality") or "") or None
        description = str(header.get("StudyDescription") or "") or None
        try:
            found = self.archive.studies(
                requirement.source, job.patient_id, modality if "modality" in requirement.same else None, date
            )
        except ArchiveUnavailable as err:
            if state.get("error") != str(err):
                state["error"] = str(err)
                _note(needs, f"{requirement.source} did not answer ({err}); asking again", now)
            return
        prior = choose_prior(found, job.study_uid, date, requirement, modality, description)
        if prior is None:
            kind = ", ".join(requirement.same)
            within = f"within {requirement.max_age_days} days on {requirement.source}"
            none(f"no earlier study of the same kind ({kind}) {within}")
            return
        state.update(
            study_uid=prior.study_uid,
            study_date=prior.study_date.strftime("%Y%m%d") if prior.study_date else "",
            accession=prior.accession or "",
        )
        what = f"study {prior.study_uid}" + (f" (accession {prior.accession})" if prior.accession else "")
        earlier = self._prior_result(prior.study_uid, job.pipeline)
        if isinstance(earlier, int):
            state.update(state="found", job=earlier)
            _note(
                needs,
                f"prior: {what}, of {prior.study_date}; its {job.pipeline} result is here (job {earlier})",
                now,
            )
            return
        state["state"] = "fetching"
        state["fetch"] = self.archive.pull(
            requirement.source, prior.study_uid, (), f"the prior of study {job.study_uid} (job {job.id})"
        )
        _note(
            needs,
            f"prior: {what}, of {prior.study_date}; pulling it from {requirement.source}"
            f" (fetch {state['fetch']}) to run {job.pipeline} on it",
            now,
        )

    def _header(self, job: _Waiting) -> Dataset:
        """The header of the job's series (one spool file), for its modality and description."""
        with self.store.session() as s:
            path = s.scalar(
                select(Instance.spool_path)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_uid == job.series_uid)
                .limit(1)
            )
        try:
            return pydicom.dcmread(self.spool_dir / path, stop_before_pixels=True) if path else Dataset()
        except (OSError, InvalidDicomError) as err:  # a spool file gone bad: look without it
            log.warning("job %d: series %s: header not read: %s", job.id, job.series_uid, err)
            return Dataset()

    def _prior_result(self, study_uid: str, pipeline: str) -> int | str | None:
        """The job id of ``pipeline``'s latest result on the study when it SUCCEEDED; why not when
        that job ended otherwise; None when there is none (yet)."""
        with self.store.session() as s:
            latest = s.scalars(
                select(Job)
                .join(Study, Study.id == Job.study_id)
                .where(
                    Study.study_uid == study_uid, Job.pipeline == pipeline, Job.state != JobState.CANCELLED
                )
                .order_by(Job.id.desc())
                .limit(1)
            ).first()
            if latest is None:
                return None
            if latest.state == JobState.SUCCEEDED:
                return latest.id
            if latest.state == JobState.FAILED:
                return f"the prior's {pipeline} job {latest.id} failed: {latest.error}"
            return None


# --- at run time -----------------------------------------------------------------------------------


def prior_result(needs: dict[str, Any] | None, results_dir: Path) -> tuple[Prior | None, str | None]:
    """The prior's result for a job that asked for one (read from its SR in ``results_dir``), or
    why there is none; (None, None) when the job asked for no prior."""
    prior = (needs or {}).get("prior")
    if prior is None:
        return None, None
    if prior.get("state") != "found":
        return None, f"No comparison with a prior study: {prior.get('said') or prior.get('why')}."
    try:
        [sr] = sorted((results_dir / str(prior["job"])).glob("SR-*.dcm"))  # dicom_io.results' names
        return read_prior(pydicom.dcmread(sr)), None
    except (OSError, ValueError, IndexError, AttributeError) as err:  # gone, or not an SR we wrote
        log.warning("the prior's result (job %s) could not be read: %s", prior["job"], err)
        return None, "No comparison with a prior study: its result could not be read."
