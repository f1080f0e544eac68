"""The console's HTML pages: overview, studies, one study, rules, fetch; Jinja2 templates, htmx, no SPA.

Each page renders the objects the JSON API returns (`plugin.web.api`), built by the same functions.
The parts that change while work runs (the overview's figures, a study's timeline) are fragments
the page fetches again every 2 s with htmx (``hx-trigger="every 2s"``) and right after an action;
the actions themselves are POSTs to the API (`static/console.js`), carrying the session's CSRF token.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from plugin.fetch import list_fetches
from plugin.store.reports import StudyFilterState
from plugin.web.api import (
    UID_PATTERN,
    StudySearch,
    StudyUid,
    config_of,
    fetch_sources,
    installed_pipelines,
    overview_answer,
    routing_report,
    rules_answer,
    rules_of,
    store_of,
    studies_answer,
    study_answer,
)
from plugin.web.security import Principal, Role, page_context, require

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


def _render(
    request: Request, principal: Principal, template: str, status: int = 200, **context: Any
) -> Response:
    templates: Jinja2Templates = request.app.state.templates
    full = page_context(request, principal) | context
    return templates.TemplateResponse(request, template, full, status_code=status)


@router.get("/")
def overview_page(request: Request, principal: Viewer) -> Response:
    answer = overview_answer(store_of(request), config_of(request))
    return _render(request, principal, "overview.html", answer=answer)


@router.get("/fragments/overview")
def overview_fragment(request: Request, principal: Viewer) -> Response:
    answer = overview_answer(store_of(request), config_of(request))
    return _render(request, principal, "_overview.html", answer=answer)


@router.get("/studies")
def studies_page(request: Request, principal: Viewer, search: Annotated[StudySearch, Query()]) -> Response:
    """The search form and one page of matching studies; a bad date answers 400 with the form."""
    try:
        page, error = studies_answer(request, search), None
    except HTTPException as err:  # audited
        page, error = None, str(err.detail)
    return _render(
        request,
        principal,
        "studies.html",
        status=200 if error is None else 400,
        search=search,
        page=page,
        error=error,
        states=list(StudyFilterState),
    )


@router.get("/studies/{study_uid}")
def study_page(request: Request, principal: Viewer, study_uid: StudyUid) -> Response:
    try:
        answer = study_answer(request, study_uid)
    except HTTPException as err:  # audited
        return _render(request, principal, "missing.html", status=err.status_code, message=err.detail)
    return _render(request, principal, "study.html", answer=answer, study_uid=study_uid)


@router.get("/studies/{study_uid}/timeline")
def timeline_fragment(request: Request, principal: Viewer, study_uid: StudyUid) -> Response:
    """The part of the study page that changes while work runs: timeline, jobs, deliveries, results."""
    answer = study_answer(request, study_uid, with_routing=False)
    return _render(request, principal, "_timeline.html", answer=answer, study_uid=study_uid)


@router.get("/rules")
def rules_page(request: Request, principal: Viewer) -> Response:
    answer = rules_answer(store_of(request), config_of(request), rules_of(request))
    return _render(request, principal, "rules.html", answer=answer)


@router.get("/fragments/rules")
def rules_fragment(request: Request, principal: Viewer) -> Response:
    """The rules and destinations tables, fetched again after an action on them."""
    answer = rules_answer(store_of(request), config_of(request), rules_of(request))
    return _render(request, principal, "_rules.html", answer=answer)


@router.get("/rules/dry-run")
def dry_run_fragment(
    request: Request,
    principal: Viewer,
    study_uid: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    """The dry run's report for the rules page (the API's POST /api/rules/dry-run answer as HTML)."""
    uid = study_uid.strip()
    if not re.fullmatch(UID_PATTERN, uid) or len(uid) > 64:
        return _render(
            request, principal, "_dry_run.html", status=400, report=None, error="not a Study Instance UID"
        )
    report = routing_report(store_of(request), config_of(request), rules_of(request), uid)
    if report is None:
        return _render(
            request,
            principal,
            "_dry_run.html",
            status=404,
            report=None,
            error=f"no study {uid} has been received",
        )
    return _render(request, principal, "_dry_run.html", report=report, error=None)


@router.get("/fetch")
def fetch_page(request: Request, principal: Viewer) -> Response:
    """The fetch requests and, for an operator, the form that asks a source for a study."""
    config = config_of(request)
    return _render(
        request,
        principal,
        "fetch.html",
        fetches=list_fetches(store_of(request)),
        sources=fetch_sources(config),
        pipelines=installed_pipelines(config) if principal.role >= Role.OPERATOR else [],
    )


@router.get("/fragments/fetch")
def fetch_fragment(request: Request, principal: Viewer) -> Response:
    """The fetch requests table, fetched again every 2 s and after an action."""
    return _render(request, principal, "_fetch.html", fetches=list_fetches(store_of(request)))
