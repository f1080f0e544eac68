"""The web console over a fresh store, for tests: `web_node` starts it, `login` logs a client in.

`web_node(workdir)` migrates a new SQLite store in ``workdir``, adds one user per role (``viewer``,
``operator``, ``admin``, password ``pw-<role>-secret``, hashed with the cheap `CHEAP_HASHER`),
starts a `WebServer` on a free loopback port and yields a `Console` (its URL, store, config); the
server is stopped and the store disposed on exit. `login` logs an httpx client in through the
login form, like a browser (the client then sends the session's CSRF token on every request);
`login_page` does the same with a Playwright page.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from argon2 import PasswordHasher
from fastapi import FastAPI

from plugin.config import Config
from plugin.store.db import Store
from plugin.web.app import WebServer
from plugin.web.security import CSRF_HEADER, Role
from plugin.web.users import add_user

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROLES = ("viewer", "operator", "admin")
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # argon2id, fast for tests


def password(role: str) -> str:
    """The test password of the user named after ``role``."""
    return f"pw-{role}-secret"


@dataclass(frozen=True)
class Console:
    url: str
    store: Store
    config: Config
    server: WebServer

    def client(self) -> httpx.Client:
        """A new client on the console that does not follow redirects (tests look at them)."""
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30)


def routes(app: FastAPI) -> list[tuple[str, set[str]]]:
    """Every route of ``app`` with its methods (a mount: none), included routers walked.

    FastAPI keeps included routers as private ``_IncludedRouter`` entries; this is the one place
    that knows it."""
    from fastapi.routing import _IncludedRouter

    def walk(entries: list[Any]) -> Iterator[tuple[str, set[str]]]:
        for entry in entries:
            if isinstance(entry, _IncludedRouter):
                yield from walk(list(entry.effective_candidates()))
            else:
                route = getattr(entry, "original_route", entry)
                yield entry.path, set(getattr(route, "methods", None) or ())

    return list(walk(list(app.router.routes)))


def web_config(workdir: Path, **web: Any) -> Config:
    """A configuration with its data dir in ``workdir`` and the console on a free loopback port."""
    return Config.model_validate(
        {"data_dir": str(workdir / "data"), "web": {"host": "127.0.0.1", "port": 0, **web}}
    )


@contextmanager
def web_node(workdir: Path, config: Config | None = None, **web: Any) -> Iterator[Console]:
    """The console over a fresh store with a user per role; ``web`` keys override `web_config`'s."""
    config = config or web_config(workdir, **web)
    store = Store(config.db_url)
    store.migrate()
    for role in ROLES:
        add_user(store, role, password(role), Role.parse(role), CHEAP_HASHER)
    server = WebServer(config, store)
    server.start()
    try:
        yield Console(server.url, store, config, server)
    finally:
        server.stop()
        store.dispose()


def login(client: httpx.Client, role: str, name: str | None = None) -> str:
    """Log ``client`` in as the user ``name`` (default: the one named after ``role``) through the
    login form; the client then carries the session cookie and sends the session's CSRF token
    (returned) in ``X-CSRF-Token``. AssertionError when the login fails."""
    answer = client.post("/login", data={"username": name or role, "password": password(role)})
    assert answer.status_code == 303, f"login as {name or role}: {answer.status_code} {answer.text[:300]}"
    token = str(client.get("/api/me").json()["csrf_token"])
    client.headers[CSRF_HEADER] = token
    return token


def login_page(page: Page, console: Console, role: str, next_path: str = "/") -> None:
    """Log a Playwright page in through the login form, landing on ``next_path``."""
    page.goto(f"{console.url}/login?next={next_path}")
    page.fill("input[name=username]", role)
    page.fill("input[name=password]", password(role))
    page.click("button[type=submit]")
    page.wait_for_url(f"{console.url}{next_path}")
