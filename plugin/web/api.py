"""The console's JSON REST API (mounted under ``/api``): everything the pages show and do.

Reading needs the viewer role (the whole router is behind it, `plugin.web.app`); acting (re-run,
retry, pause, resume, test) needs the operator role and, for a session, the CSRF token; every
action is one line in the audit trail (`plugin.web.audit.record`), refused ones included. Each
action calls the function the CLI or the Orthanc plugin calls for the same thing
(`plugin.jobs.queue.retry_job`, `plugin.dispatch.outbox.retry_deliveries`,
`plugin.jobs.queue.queue_named_job`), so there is one way to do it.

The functions that build the answers (`overview_answer`, `study_answer`, `rules_answer`, ...) are
shared with the HTML pages (`plugin.web.pages`), which render the same objects.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path as FilePath
from typing import Annotated

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from dicom_io.results.reading import picture_png, sr_measurements
from plugin.config import Config, DicomDestination
from plugin.dispatch.outbox import retry_deliveries
from plugin.dispatch.senders import check_destination, destination_where
from plugin.jobs.executor.devices import CpuInfo, cpu_info, executor_slots
from plugin.jobs.executor.manifest import MANIFEST, read_manifest
from plugin.jobs.queue import NoUsableSeries, queue_named_job, read_study_series, retry_job, rules_in_force
from plugin.route.pipelines import known_pipelines, series_lookup
from plugin.route.rules import RuleSet, describe_tests, study_report, usable_pipelines, validate_rules
from plugin.store.engine import Store
from plugin.store.models import Delivery, Study, StudyState
from plugin.store.pauses import PauseKind, paused_names, set_paused
from plugin.store.reports import (
    Overview,
    StudyFilterState,
    StudyPage,
    StudyQuery,
    StudyTimeline,
    job_study_uid,
    overview,
    search_studies,
    study_timeline,
)
from plugin.web.security import Principal, Role, audit_request, require
from plugin.web.system import GpuMemory, disk_free, gpus

router = APIRouter(tags=["console"])

GB = 1024**3
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
StudyUid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="Study Instance UID")]
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]


# --- what the handlers share -----------------------------------------------------------------------


def store_of(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def config_of(request: Request) -> Config:
    config: Config = request.app.state.config
    return config


def rules_of(request: Request) -> RuleSet:
    """The rules in force (as the node checked them at start), built once per app.

    Like the Orthanc plugin, the pipelines the rules name are trusted (workers elsewhere may hold
    them) and their series declarations are read without importing pipelines.
    """
    rules: RuleSet | None = getattr(request.app.state, "console_rules", None)
    if rules is None:
        config = config_of(request)
        lookup = series_lookup(config, import_pipelines=False)
        rules = validate_rules(config, known_pipelines(config), series_lookup=lookup)
        request.app.state.console_rules = rules
    return rules


def installed_pipelines(config: Config) -> list[str]:
    """What a re-run may ask for: the pipelines installed here and the names the config gives them."""
    from ai_models.registry import available_pipelines

    return sorted(usable_pipelines(config, available_pipelines()))


def _audit(
    request: Request,
    principal: Principal,
    action: str,
    target: str,
    outcome: str = "ok",
    **detail: object,
) -> None:
    audit_request(request, principal.name, action, target, outcome, detail or None)


def _refuse(
    request: Request, principal: Principal, action: str, target: str, status: int, message: str
) -> HTTPException:
    """Record a refused action in the audit trail; the HTTPException to raise."""
    _audit(request, principal, action, target, "failure", status=status, reason=message)
    return HTTPException(status, message)


def refuse_request(request: Request, status: int, message: str) -> HTTPException:
    """Record a request for something that is not there (404, ``request.not_found``) or that makes
    no sense (400, ``request.invalid``) in the audit trail; the HTTPException to raise."""
    identity = getattr(request.state, "identity", None)
    actor = identity.principal.name if identity is not None else None
    action = "request.not_found" if status == 404 else "request.invalid"
    detail = {"method": request.method, "path": request.url.path, "status": status, "reason": message}
    audit_request(request, actor, action, request.url.path, "failure", detail)
    return HTTPException(status, message)


# --- the overview ----------------------------------------------------------------------------------


class Disk(BaseModel):
    """Free space on the data dir's disk; ``low`` below ``warning_gb`` (config web.disk_warning_gb)."""

    free_bytes: int
    total_bytes: int
    warning_gb: float
    low: bool


class Workers(BaseModel):
    configured: int = Field(description="executor.workers of this node")
    slots: int = Field(description="jobs this machine runs at once (with CUDA, at most one per GPU)")
    busy: int = Field(description="jobs running now, on any node sharing the store")


class OverviewAnswer(BaseModel):
    figures: Overview
    disk: Disk | None
    disk_error: str | None = None
    workers: Workers
    gpus: list[GpuMemory] = Field(description="each GPU's memory in use (by any process) and in all")
    cpu: CpuInfo
    accelerator: str = Field(description="CUDA and how many GPUs, or that jobs run on the CPU")


def overview_answer(store: Store, config: Config) -> OverviewAnswer:
    with store.session() as s:
        figures = overview(s)
    warning = config.web.disk_warning_gb
    try:
        space = disk_free(config.data_dir)
        disk: Disk | None = Disk(
            free_bytes=space.free_bytes,
            total_bytes=space.total_bytes,
            warning_gb=warning,
            low=space.free_bytes < warning * GB,
        )
        disk_error = None
    except OSError as err:
        disk, disk_error = None, f"data dir unreadable: {err.strerror}"
    found = gpus()
    return OverviewAnswer(
        figures=figures,
        disk=disk,
        disk_error=disk_error,
        workers=Workers(
            configured=config.executor.workers,
            slots=executor_slots(config.executor.workers),
            busy=len(figures.running),
        ),
        gpus=found,
        cpu=cpu_info(),
        accelerator=f"CUDA, {len(found)} GPU(s)" if found else "CPU only: no GPU, jobs run on the CPU",
    )


@router.get("/overview")
def get_overview(request: Request) -> OverviewAnswer:
    """What is happening now and today: received, queue, running jobs, failures, deliveries, disk, devices."""
    return overview_answer(store_of(request), config_of(request))


# --- studies ---------------------------------------------------------------------------------------


class StudySearch(BaseModel):
    """The study search's query string; an unknown parameter or a malformed value is refused (422)."""

    model_config = ConfigDict(extra="forbid")

    accession: str | None = Field(None, max_length=64, description="exact, or with * and ? wildcards")
    patient_id: str | None = Field(None, max_length=64, description="exact, or with * and ? wildcards")
    date_from: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None = Field(
        None, description="Study Date on or after, YYYY-MM-DD"
    )
    date_to: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None = Field(
        None, description="Study Date on or before, YYYY-MM-DD"
    )
    state: StudyFilterState | None = Field(
        None, description="the study's state, or a job or delivery of it in that state"
    )
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0)

    def query(self) -> StudyQuery:
        """The store's query; ValueError for a date that does not exist or dates in the wrong order."""
        try:
            low = date.fromisoformat(self.date_from) if self.date_from else None
            high = date.fromisoformat(self.date_to) if self.date_to else None
        except ValueError as err:
            raise ValueError(f"not a date: {err}") from None
        if low is not None and high is not None and low > high:
            raise ValueError("date_from is after date_to")
        blank = {
            "accession": (self.accession or "").strip() or None,
            "patient_id": (self.patient_id or "").strip() or None,
        }
        return StudyQuery(
            date_from=low, date_to=high, state=self.state, limit=self.limit, offset=self.offset, **blank
        )


def studies_answer(request: Request, search: StudySearch) -> StudyPage:
    """One page of the search; HTTPException 400 (audited) for dates that make no sense."""
    try:
        query = search.query()
    except ValueError as err:
        raise refuse_request(request, 400, str(err)) from None
    with store_of(request).session() as s:
        return search_studies(s, query)


@router.get("/studies", responses={400: {}})
def get_studies(request: Request, search: Annotated[StudySearch, Query()]) -> StudyPage:
    """Studies by accession number, patient ID, Study Date and state, the latest received first."""
    return studies_answer(request, search)


class RouteAction(BaseModel):
    rule: str
    pipeline: str
    destinations: list[str]
    scope: str


class RuleMiss(BaseModel):
    rule: str
    reasons: list[str]


class SeriesRoute(BaseModel):
    series_uid: str
    series_number: int | None
    modality: str
    series_description: str
    instances: int
    action: RouteAction | None = Field(description="the rule that takes the series; null: none")
    not_matched: list[RuleMiss] = Field(description="the rules tried before it, and why each did not match")


class RankedSeries(BaseModel):
    series_uid: str
    place: int | None = Field(description="1: chosen; null: rejected")
    reasons: list[str]


class SelectionReport(BaseModel):
    rule: str
    pipeline: str
    ranking: list[RankedSeries]


class PlannedJob(RouteAction):
    series_uid: str


class RoutingReport(BaseModel):
    """How the rules in force (paused ones skipped) route a received study: `radgate rules check`'s report."""

    study_uid: str
    series: list[SeriesRoute]
    selections: list[SelectionReport]
    jobs: list[PlannedJob]


def routing_report(store: Store, config: Config, rules: RuleSet, study_uid: str) -> RoutingReport | None:
    """The dry run of the rules in force over a study's series in the spool; None for an unknown study."""
    with store.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()
        if study is None:
            return None
        series, _ = read_study_series(s, study, config.spool_dir)
        return RoutingReport.model_validate(study_report(study_uid, series, rules_in_force(s, rules)))


class Measurement(BaseModel):
    group: str = Field(description="the measurement group's tracking identifier (a segment)")
    label: str
    value: float
    unit: str


class ResultObject(BaseModel):
    kind: str = Field(description="SEG, SR, SC or KO")
    sop_instance_uid: str


class ResultImage(BaseModel):
    n: int
    sop_instance_uid: str
    url: str = Field(description="the picture as PNG")


class JobResults(BaseModel):
    """A SUCCEEDED job's result objects, its SC pictures and the SR's measurements."""

    job_id: int
    objects: list[ResultObject]
    images: list[ResultImage]
    findings: list[Measurement]
    error: str | None = Field(None, description="why the results could not be read")


def _result_files(config: Config, job_id: int) -> list[tuple[str, str, FilePath]]:
    """(kind, SOP Instance UID, path) of a job's results, in the order they are sent; none when
    the job wrote none (yet)."""
    out_dir = config.results_dir / str(job_id)
    if not (out_dir / MANIFEST).is_file():
        return []
    return [
        (FilePath(path).name.split("-", 1)[0], uid, FilePath(path)) for uid, path in read_manifest(out_dir)
    ]


def job_results(config: Config, study_uid: str, job_id: int) -> JobResults:
    files = _result_files(config, job_id)
    pictures = [(uid, path) for kind, uid, path in files if kind == "SC"]
    findings: list[Measurement] = []
    error = None
    for kind, _, path in files:
        if kind != "SR":
            continue
        try:
            rows = sr_measurements(pydicom.dcmread(path))
        except Exception as err:  # a result file gone or damaged: the page says so, the rest shows
            error = f"{path.name}: {type(err).__name__}: {err}"
            continue
        findings += [Measurement(group=g, label=label, value=v, unit=u) for g, label, v, u in rows]
    return JobResults(
        job_id=job_id,
        objects=[ResultObject(kind=kind, sop_instance_uid=uid) for kind, uid, _ in files],
        images=[
            ResultImage(
                n=n, sop_instance_uid=uid, url=f"/api/studies/{study_uid}/jobs/{job_id}/images/{n}.png"
            )
            for n, (uid, _) in enumerate(pictures, 1)
        ],
        findings=findings,
        error=error,
    )


class StudyAnswer(BaseModel):
    timeline: StudyTimeline
    results: list[JobResults]
    routing: RoutingReport | None = Field(description="how the rules in force route the study now")
    routing_error: str | None = None
    viewer_url: str | None = Field(description="'open in viewer' (web.viewer_url_template); null: none")
    pipelines: list[str] = Field(description="what a re-run may ask for")


def study_answer(request: Request, study_uid: str, with_routing: bool = True) -> StudyAnswer:
    """Everything the study page shows (``with_routing``: the routing report too, read from the
    spool); HTTPException 404 (audited) for a study never received."""
    store, config, rules = store_of(request), config_of(request), rules_of(request)
    with store.session() as s:
        timeline = study_timeline(s, study_uid)
    if timeline is None:
        raise refuse_request(request, 404, f"no study {study_uid} has been received")
    routing, routing_error = None, None
    try:
        routing = routing_report(store, config, rules, study_uid) if with_routing else None
    except OSError as err:
        routing_error = f"the study's files cannot be read: {err.strerror}"
    return StudyAnswer(
        timeline=timeline,
        results=[job_results(config, study_uid, job.id) for job in timeline.jobs if job.state == "SUCCEEDED"],
        routing=routing,
        routing_error=routing_error,
        viewer_url=config.web.viewer_url(study_uid),
        pipelines=installed_pipelines(config),
    )


@router.get("/studies/{study_uid}", responses={404: {}})
def get_study(request: Request, study_uid: StudyUid) -> StudyAnswer:
    """A study's timeline from its first instance to each delivery, the routing decision, results."""
    return study_answer(request, study_uid)


@router.get(
    "/studies/{study_uid}/jobs/{job_id}/images/{n}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the SC picture as PNG"}},
)
def get_image(request: Request, study_uid: StudyUid, job_id: int, n: Annotated[int, Path(ge=1)]) -> Response:
    """The n-th Secondary Capture of a job (key image or report card), rendered to PNG."""
    store, config = store_of(request), config_of(request)
    with store.session() as s:
        owner = job_study_uid(s, job_id)
    if owner != study_uid:
        raise refuse_request(request, 404, f"study {study_uid} has no job {job_id}")
    pictures = [path for kind, _, path in _result_files(config, job_id) if kind == "SC"]
    if n > len(pictures):
        raise refuse_request(request, 404, f"job {job_id} has {len(pictures)} picture(s), not {n}")
    try:
        png = picture_png(pydicom.dcmread(pictures[n - 1]))
    except (OSError, ValueError) as err:
        raise HTTPException(500, f"picture {n} of job {job_id} cannot be shown: {err}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


# --- actions ---------------------------------------------------------------------------------------


class ActionAnswer(BaseModel):
    message: str
    job_ids: list[int] = []
    delivery_ids: list[int] = []


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(min_length=1, max_length=64, description="an installed pipeline (GET /api/rules)")


@router.post("/studies/{study_uid}/rerun", responses={400: {}, 404: {}, 409: {}})
def rerun(request: Request, principal: Operator, study_uid: StudyUid, body: RerunRequest) -> ActionAnswer:
    """Run a pipeline again on the study, on the series it prefers, whatever the rules say; its
    results go to every configured destination."""
    store, config = store_of(request), config_of(request)
    target = f"study {study_uid}"
    known = installed_pipelines(config)
    if body.pipeline not in known:
        message = f"unknown pipeline {body.pipeline!r}; installed: {', '.join(known) or 'none'}"
        raise _refuse(request, principal, "study.rerun", target, 400, message)
    refusal: tuple[int, str] | None = None
    with store.session() as s:  # the audit line is written after it: SQLite has one writer at a time
        study = s.scalars(select(Study).where(Study.study_uid == study_uid).with_for_update()).one_or_none()
        if study is None:
            refusal = 404, f"no study {study_uid} has been received"
        elif study.state == StudyState.RECEIVING:
            refusal = 409, f"study {study_uid} is still receiving; re-run it once it is complete"
        else:
            try:
                job = queue_named_job(
                    s, study, body.pipeline, rules_of(request), config.spool_dir, tuple(config.destinations)
                )
            except NoUsableSeries as err:
                refusal = 409, str(err)
            else:
                job_id = job.id
    if refusal is not None:
        raise _refuse(request, principal, "study.rerun", target, *refusal)
    _audit(request, principal, "study.rerun", target, pipeline=body.pipeline, job=job_id)
    return ActionAnswer(message=f"job {job_id} queued: {body.pipeline}", job_ids=[job_id])


@router.post("/jobs/{job_id}/retry", responses={404: {}, 409: {}})
def retry(request: Request, principal: Operator, job_id: int) -> ActionAnswer:
    """Re-queue a FAILED job, or else the DEAD deliveries of the job (as `radgate jobs retry`)."""
    target = f"job {job_id}"
    try:
        message = retry_job(store_of(request), job_id)
    except LookupError as err:
        raise _refuse(request, principal, "job.retry", target, 404, str(err)) from None
    except ValueError as err:
        raise _refuse(request, principal, "job.retry", target, 409, str(err)) from None
    _audit(request, principal, "job.retry", target, result=message)
    return ActionAnswer(message=message, job_ids=[job_id])


class DeliveriesRetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] = Field(default_factory=list, max_length=10000, description="DEAD deliveries to re-queue")
    all_dead: bool = Field(False, description="every DEAD delivery")


@router.post("/deliveries/retry", responses={400: {}})
def retry_dead(request: Request, principal: Operator, body: DeliveriesRetryRequest) -> ActionAnswer:
    """Re-queue DEAD deliveries (as `radgate deliveries retry`); rows not DEAD are left as they are."""
    if not body.ids and not body.all_dead:
        raise _refuse(
            request, principal, "deliveries.retry", "deliveries", 400, "name delivery ids or give all_dead"
        )
    requeued = retry_deliveries(store_of(request), body.ids, body.all_dead)
    _audit(
        request, principal, "deliveries.retry", "deliveries", requeued=len(requeued), all_dead=body.all_dead
    )
    return ActionAnswer(message=f"re-queued {len(requeued)} dead deliveries", delivery_ids=requeued)


def _pause(request: Request, principal: Principal, kind: PauseKind, name: str, paused: bool) -> ActionAnswer:
    action = f"{kind}.{'pause' if paused else 'resume'}"
    target = f"{kind} {name}"
    config = config_of(request)
    known = [r.name for r in rules_of(request).rules] if kind == PauseKind.RULE else list(config.destinations)
    if name not in known:
        raise _refuse(
            request,
            principal,
            action,
            target,
            404,
            f"no {kind} {name!r}; known: {', '.join(known) or 'none'}",
        )
    changed = set_paused(store_of(request), kind, name, paused, principal.name)
    word = "paused" if paused else "resumed"
    _audit(request, principal, action, target, changed=changed)
    return ActionAnswer(message=f"{kind} {name} {word}" if changed else f"{kind} {name} was already {word}")


@router.post("/rules/{name}/pause", responses={404: {}})
def pause_rule(request: Request, principal: Operator, name: Name) -> ActionAnswer:
    """Pause a rule: studies completed from now on are routed as if it were disabled (reason "paused")."""
    return _pause(request, principal, PauseKind.RULE, name, True)


@router.post("/rules/{name}/resume", responses={404: {}})
def resume_rule(request: Request, principal: Operator, name: Name) -> ActionAnswer:
    return _pause(request, principal, PauseKind.RULE, name, False)


@router.post("/destinations/{name}/pause", responses={404: {}})
def pause_destination(request: Request, principal: Operator, name: Name) -> ActionAnswer:
    """Pause a destination: its deliveries wait (PENDING, no attempt counted) until it is resumed."""
    return _pause(request, principal, PauseKind.DESTINATION, name, True)


@router.post("/destinations/{name}/resume", responses={404: {}})
def resume_destination(request: Request, principal: Operator, name: Name) -> ActionAnswer:
    return _pause(request, principal, PauseKind.DESTINATION, name, False)


class CheckAnswer(BaseModel):
    destination: str
    ok: bool
    detail: str = Field(description="what answered, or why it did not (no credentials in it)")
    seconds: float


@router.post("/destinations/{name}/test", responses={404: {}})
def test_destination(request: Request, principal: Operator, name: Name) -> CheckAnswer:
    """C-ECHO a DICOM destination, or send an HTTP request to a DICOMweb or Orthanc one."""
    config = config_of(request)
    destination = config.destinations.get(name)
    target = f"destination {name}"
    if destination is None:
        message = f"no destination {name!r}; known: {', '.join(config.destinations) or 'none'}"
        raise _refuse(request, principal, "destination.test", target, 404, message)
    started = time.monotonic()
    reason = check_destination(destination, config.dicom.ae_title, min(config.dispatch.timeout_s, 15.0))
    seconds = round(time.monotonic() - started, 3)
    how = "C-ECHO" if isinstance(destination, DicomDestination) else "HTTP check"
    detail = f"{how}: {destination_where(destination)} answered" if reason is None else f"{how}: {reason}"
    _audit(
        request, principal, "destination.test", target, "ok" if reason is None else "failure", result=detail
    )
    return CheckAnswer(destination=name, ok=reason is None, detail=detail, seconds=seconds)


# --- rules and destinations ------------------------------------------------------------------------


class RuleInfo(BaseModel):
    name: str
    enabled: bool
    paused: bool
    scope: str
    pipeline: str
    destinations: list[str] = Field(
        description="where its results go (every destination when the rule names none)"
    )
    match: list[str] = Field(description="every test must hold")
    any_of: list[list[str]] = Field(description="one of these groups must hold, when there are any")


class DestinationInfo(BaseModel):
    name: str
    kind: str
    where: str
    paused: bool
    deliveries: dict[str, int] = Field(description="deliveries to it by state")


class RulesAnswer(BaseModel):
    rules: list[RuleInfo] = Field(description="in order: the first that matches a series takes it")
    default_rule: RouteAction | None = Field(description="what takes a series no rule matches")
    notes: list[str]
    destinations: list[DestinationInfo]
    pipelines: list[str] = Field(description="installed pipelines")


def rules_answer(store: Store, config: Config, rules: RuleSet) -> RulesAnswer:
    with store.session() as s:
        paused_rules = paused_names(s, PauseKind.RULE)
        paused_destinations = paused_names(s, PauseKind.DESTINATION)
        counts: dict[str, dict[str, int]] = {}
        for name, state, n in s.execute(
            select(Delivery.destination, Delivery.state, func.count(Delivery.id)).group_by(
                Delivery.destination, Delivery.state
            )
        ):
            counts.setdefault(name, {})[state] = int(n)
    default = rules.default_action()
    return RulesAnswer(
        rules=[
            RuleInfo(
                name=rule.name,
                enabled=rule.enabled,
                paused=rule.name in paused_rules,
                scope=rule.scope,
                pipeline=rule.pipeline,
                destinations=list(rules.destinations_for(rule)),
                match=describe_tests(rule.match),
                any_of=[describe_tests(group) for group in rule.any_of],
            )
            for rule in rules.rules
        ],
        default_rule=None
        if default is None
        else RouteAction(
            rule=default.rule,
            pipeline=default.pipeline,
            destinations=list(default.destinations),
            scope=default.scope,
        ),
        notes=list(rules.notes),
        destinations=[
            DestinationInfo(
                name=name,
                kind=destination.kind,
                where=destination_where(destination),
                paused=name in paused_destinations,
                deliveries=counts.get(name, {}),
            )
            for name, destination in config.destinations.items()
        ],
        pipelines=installed_pipelines(config),
    )


@router.get("/rules")
def get_rules(request: Request) -> RulesAnswer:
    """The rules in force, in order, with the paused ones marked; the destinations; the pipelines."""
    return rules_answer(store_of(request), config_of(request), rules_of(request))


class DryRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_uid: str = Field(pattern=UID_PATTERN, max_length=64, description="a study the node received")


@router.post("/rules/dry-run", responses={404: {}})
def dry_run(request: Request, body: DryRunRequest) -> RoutingReport:
    """How the rules in force would route a received study now (nothing is queued)."""
    report = routing_report(store_of(request), config_of(request), rules_of(request), body.study_uid)
    if report is None:
        raise refuse_request(request, 404, f"no study {body.study_uid} has been received")
    return report
