"""The web application (`create_app`), the server that runs it beside the node (`WebServer`), and
``radgate web`` (`serve_web`), the console alone.

Every console route is behind a login: `create_app` mounts the console's API and pages with
`require(Role.VIEWER)` on the whole router (their routes add a higher role where they act), so a
route cannot be left open by mistake. Only ``/login``, ``/healthz``, ``/metrics`` and ``/static``
answer without one. FastAPI's own docs pages are off (they load scripts from a CDN); the OpenAPI
document is ``/api/openapi.json``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import SQLAlchemyError

from plugin.config import Config
from plugin.ingest.datadir import apply_file_modes
from plugin.logs import setup_logging
from plugin.store.engine import Store
from plugin.web import api, metrics, pages, routes
from plugin.web.audit import attach_syslog, config_loaded
from plugin.web.security import LoginRequired, Role, audit_request, login_redirect, require
from plugin.web.threaded import ThreadedServer

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
START_TIMEOUT_S = 10.0


class WebStartError(OSError):
    """The console cannot listen (the port is taken, the address is not ours)."""


def create_app(config: Config, store: Store) -> FastAPI:
    """The console, API and /metrics over ``store``; ``app.state`` holds config, store, templates."""
    app = FastAPI(
        title="radgate",
        summary="radgate's console API: studies, jobs, deliveries, rules, audit trail",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.config = config
    app.state.store = store
    app.state.templates = Jinja2Templates(directory=TEMPLATES_DIR)
    if config.web.audit.syslog is not None:
        from plugin.web.atna import SyslogSender

        attach_syslog(store, SyslogSender(config.web.audit))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    logged_in = [Depends(require(Role.VIEWER))]
    app.include_router(routes.public)
    app.include_router(routes.router, dependencies=logged_in)
    app.include_router(api.router, prefix="/api", dependencies=logged_in)
    app.include_router(pages.router, dependencies=logged_in)
    app.include_router(metrics.router)

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        return login_redirect(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        identity = getattr(request.state, "identity", None)
        where = [".".join(str(part) for part in error["loc"]) for error in exc.errors()]
        detail = {"method": request.method, "path": request.url.path, "invalid": where}
        actor = identity.principal.name if identity is not None else None
        await run_in_threadpool(
            audit_request, request, actor, "request.invalid", request.url.path, "failure", detail
        )
        return await request_validation_exception_handler(request, exc)

    return app


class WebServer:
    """`create_app` served by uvicorn in a thread of this process; ``port`` 0 picks a free port."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.app = create_app(config, store)
        self._server: ThreadedServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the web server is not started")
        return self._server.port

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the web server is not started")
        return self._server.url

    def start(self) -> None:
        """Listen and serve; WebStartError (nothing left running) when the address cannot be bound or
        the server does not come up within START_TIMEOUT_S."""
        web = self.config.web
        try:
            server = ThreadedServer(self.app, web.host, web.port, "radgate-web")
        except OSError as err:
            raise WebStartError(
                f"web console cannot listen on {web.host}:{web.port}: {err.strerror}"
            ) from None
        try:
            server.start(START_TIMEOUT_S)
        except TimeoutError:
            raise WebStartError(f"web console did not start on {web.host}:{web.port}") from None
        self._server = server
        log.info("web console: %s/", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._server is not None:
            self._server.stop()
        self._server = None


def serve_web(config: Config) -> int:
    """``radgate web``: the console alone (beside the Orthanc plugin or a worker, same data dir and
    store) until SIGTERM or SIGINT; 0 after a clean stop, 1 when it cannot start."""
    setup_logging(config.logging)
    apply_file_modes(config.file_modes)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    store = Store(config.db_url)
    try:
        store.migrate()
        config_loaded(store, config, "web")
        server = WebServer(config, store)
        server.start()
    except (OSError, SQLAlchemyError) as err:
        log.error("cannot start the web console: %s", err)
        store.dispose()
        return 1
    try:
        stop.wait()
    finally:
        server.stop()
        store.dispose()
        log.info("web console stopped")
    return 0
