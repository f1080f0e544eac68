"""webcore's routes: login and logout, the account page, the audit trail, /healthz, the OpenAPI document.

`public` answers without a login (``/login``, ``/healthz``); `router` is mounted behind
`require(Role.VIEWER)` by `plugin.web.app.create_app`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BeforeValidator

from plugin.store.engine import Store
from plugin.web import audit, users
from plugin.web.security import (
    SESSION_COOKIE,
    Principal,
    Role,
    audit_request,
    page_context,
    remote_address,
    require,
)

public = APIRouter()
router = APIRouter()


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.app.state.templates
    return templates


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never another host (``//evil``, ``https://...``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@public.get("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    """Alive: the web server answers (no login needed, nothing about the node's data)."""
    return {"status": "ok"}


def _login_page(request: Request, next_url: str, error: str | None, status: int) -> Response:
    context = page_context(request, None) | {
        "next": _safe_next(next_url),
        "error": error,
        "no_users": not users.list_users(_store(request)),
    }
    return _templates(request).TemplateResponse(request, "login.html", context, status_code=status)


@public.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(request: Request, next: str = "/") -> Response:
    return _login_page(request, next, None, 200)


@public.post("/login", response_class=HTMLResponse, include_in_schema=False)
def login(
    request: Request,
    username: Annotated[str, Form(max_length=200)],
    password: Annotated[str, Form(max_length=1000)],
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    """A session for a right name and password (303 to ``next``); 401 and the form again otherwise;
    429 while the name or the address is locked after too many failures (`users.login_locked`)."""
    store = _store(request)
    web = request.app.state.config.web
    if users.login_locked(
        store, username, remote_address(request), web.login_failures, web.login_lockout_minutes
    ):
        audit_request(request, username, "login", outcome="locked")
        page = _login_page(request, next, "Too many failed logins: try again later.", 429)
        page.headers["Retry-After"] = str(web.login_lockout_minutes * 60)
        return page
    principal = users.verify_login(store, username, password)
    if principal is None:
        audit_request(request, username, "login", outcome="failure")
        return _login_page(request, next, "Wrong user name or password.", 401)
    earlier = request.cookies.get(SESSION_COOKIE)
    if earlier is not None:  # a new id at every login: a cookie planted before it is worth nothing
        users.close_session(store, earlier)
    session = users.open_session(store, principal, request.app.state.config.web.session_minutes)
    audit_request(request, principal.name, "login")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, session.session_id, httponly=True, samesite="strict", path="/")
    return response


@router.post("/logout", include_in_schema=False)
def logout(request: Request, principal: Annotated[Principal, Depends(require(Role.VIEWER))]) -> Response:
    """End this session (a form with the CSRF token, or htmx); 303 to the login page."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie is not None:
        users.close_session(_store(request), cookie)
    audit_request(request, principal.name, "logout")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/api/me")
def me(request: Request, principal: Annotated[Principal, Depends(require(Role.VIEWER))]) -> dict[str, str]:
    """Who is logged in: name, role, ``session`` or ``token``, and the session's CSRF token (for
    scripts that log in with a password and then post)."""
    return {
        "name": principal.name,
        "role": principal.role.label,
        "via": principal.via,
        "csrf_token": page_context(request, principal)["csrf_token"],
    }


@router.get("/api/openapi.json", include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    """The OpenAPI document of the whole API."""
    return JSONResponse(request.app.openapi())


@router.get("/account", response_class=HTMLResponse, include_in_schema=False)
def account(request: Request, principal: Annotated[Principal, Depends(require(Role.VIEWER))]) -> Response:
    """Who you are logged in as, and the logout button."""
    return _templates(request).TemplateResponse(request, "account.html", page_context(request, principal))


def _blank_is_none(value: object) -> object:
    return None if value == "" else value  # a form's empty date field


Since = Annotated[
    datetime | None,
    BeforeValidator(_blank_is_none),
    Query(description="ISO 8601 (UTC unless a zone is given); events at or after this time"),
]
Until = Annotated[datetime | None, Query(description="ISO 8601; events before this time")]
Limit = Annotated[int, Query(ge=1, le=10000, description="the newest this many events")]


def _trail(
    store: Store, since: datetime | None, until: datetime | None, studies: bool, limit: int
) -> list[Any]:
    return audit.events(store, since, until, studies)[-limit:]


@router.get("/api/audit")
async def audit_json(
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.ADMIN))],
    since: Since = None,
    until: Until = None,
    studies: Annotated[bool, Query(description="include each study's life, read from the store")] = True,
    limit: Limit = 500,
) -> list[dict[str, Any]]:
    """The audit trail, oldest first: recorded events and (``studies``) each study's life."""
    trail = await run_in_threadpool(_trail, _store(request), since, until, studies, limit)
    return [event.to_json() for event in trail]


@router.get("/audit", response_class=HTMLResponse, include_in_schema=False)
def audit_page(
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.ADMIN))],
    since: Since = None,
    studies: bool = True,
    limit: Limit = 500,
) -> Response:
    """The audit trail as a table, newest first."""
    trail = _trail(_store(request), since, None, studies, limit)
    context = page_context(request, principal) | {
        "events": list(reversed(trail)),
        "since": since,
        "studies": studies,
        "limit": limit,
    }
    return _templates(request).TemplateResponse(request, "audit.html", context)
