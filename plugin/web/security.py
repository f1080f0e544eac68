"""Who is asking, and may they: roles, the logged-in principal, and the `require` dependency.

A request is authenticated by an API token (``Authorization: Bearer ...``) or by the session
cookie a login sets. `require(role)` is the one gate every console route goes through: without a
login it answers 401 (``/api/...``) or redirects to the login page; with a role too low, 403; and
a session-authenticated unsafe request (POST, PUT, PATCH, DELETE) without the session's CSRF token
(header ``X-CSRF-Token`` or form field ``csrf_token``), 403. Every 401 and 403 is an audit line.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import URL

from plugin.store.db import Store
from plugin.web.audit import record

SESSION_COOKIE = "radgate_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Role(enum.IntEnum):
    """What a user may do; each role may do what the ones below it may."""

    VIEWER = 1  # look
    OPERATOR = 2  # act on studies, jobs, deliveries, rules and destinations
    ADMIN = 3  # users and the audit trail

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        """``viewer``, ``operator`` or ``admin`` (any case); ValueError otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}: use viewer, operator or admin") from None


@dataclass(frozen=True)
class Principal:
    """A logged-in user: their name, role and how they came in (``session`` or ``token``)."""

    name: str
    role: Role
    via: str


@dataclass(frozen=True)
class Identity:
    """What a request's credentials resolved to: the principal and, for a session, its CSRF token."""

    principal: Principal
    csrf_token: str | None


class LoginRequired(Exception):
    """A page asked for without a login; answered with a redirect to the login page
    (`login_redirect`)."""


def secret_hash(secret: str) -> str:
    """The SHA-256 (hex) a session id or an API token is stored and looked up as."""
    return hashlib.sha256(secret.encode()).hexdigest()


def remote_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def is_api(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def login_redirect(request: Request) -> Response:
    """To the login page, and back to this page after it: a 303, or for an htmx request (a part of
    a page) a 401 whose ``HX-Redirect`` sends the whole page there, back to the page it was on."""
    url = request.url
    if request.headers.get("HX-Request") == "true":
        url = URL(request.headers.get("HX-Current-URL", "/"))
    target = "/login?next=" + quote(url.path + (f"?{url.query}" if url.query else ""), safe="")
    if request.headers.get("HX-Request") == "true":
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _audit(request: Request, actor: str | None, action: str, **detail: Any) -> None:
    store: Store = request.app.state.store
    detail = {"method": request.method, "path": request.url.path, **detail}
    record(
        store,
        actor,
        action,
        target=request.url.path,
        outcome="failure",
        detail=detail,
        remote=remote_address(request),
    )


async def identify(request: Request) -> Identity | None:
    """The request's identity, looked up once per request (kept on ``request.state``); None when it
    carries no valid credentials. An unknown API token is refused at once: 401 and an audit line."""
    if hasattr(request.state, "identity"):
        cached: Identity | None = request.state.identity
        return cached
    from plugin.web import users

    store: Store = request.app.state.store
    token = _bearer(request)
    if token is not None:
        identity = await run_in_threadpool(users.token_identity, store, token)
        if identity is None:
            await run_in_threadpool(_audit, request, None, "auth.rejected", reason="unknown API token")
            raise HTTPException(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        minutes = request.app.state.config.web.session_minutes
        identity = (
            None
            if cookie is None
            else await run_in_threadpool(users.session_identity, store, cookie, minutes)
        )
    request.state.identity = identity
    return identity


async def _csrf_token_sent(request: Request) -> str | None:
    sent = request.headers.get(CSRF_HEADER)
    if sent is not None:
        return sent
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def require(role: Role) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the logged-in `Principal` when it has ``role`` or a higher one.

    Raises HTTPException 401 (``/api/...``, no or unknown credentials), `LoginRequired` (pages, no
    login), HTTPException 403 (role too low; a session's unsafe request without its CSRF token).
    Every 401 and 403 is recorded in the audit trail.
    """

    async def dependency(request: Request) -> Principal:
        identity = await identify(request)
        if identity is None:
            if not is_api(request):
                raise LoginRequired
            reason = "session expired" if SESSION_COOKIE in request.cookies else "not logged in"
            await run_in_threadpool(_audit, request, None, "auth.rejected", reason=reason)
            raise HTTPException(
                401, f"{reason}: log in or send an API token", headers={"WWW-Authenticate": "Bearer"}
            )
        principal = identity.principal
        if identity.csrf_token is not None and request.method not in SAFE_METHODS:
            sent = await _csrf_token_sent(request)
            if sent is None or not hmac.compare_digest(sent.encode(), identity.csrf_token.encode()):
                await run_in_threadpool(_audit, request, principal.name, "csrf.rejected")
                raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        if principal.role < role:
            await run_in_threadpool(
                _audit, request, principal.name, "access.denied", needs=role.label, has=principal.role.label
            )
            raise HTTPException(403, f"this needs the {role.label} role; you are {principal.role.label}")
        return principal

    return dependency


def page_context(request: Request, principal: Principal | None) -> dict[str, Any]:
    """What every page template gets: the request, the principal and the session's CSRF token."""
    identity: Identity | None = getattr(request.state, "identity", None)
    csrf = identity.csrf_token if identity is not None and identity.csrf_token is not None else ""
    return {"request": request, "principal": principal, "csrf_token": csrf}
