"""The web console's gate over a real store and a real uvicorn: login, sessions, CSRF, roles,
API tokens, bad input, and the audit line each refusal leaves."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Annotated

import httpx
import pytest
from fastapi import Depends
from sqlalchemy import select, update
from support.web import CHEAP_HASHER, Console, login, routes, web_node

from plugin.store.accounts import AuditEvent, WebSession
from plugin.store.models import utcnow
from plugin.web import audit
from plugin.web.security import Principal, Role, require, secret_hash
from plugin.web.users import add_user, create_token

PUBLIC = {"/login", "/healthz", "/metrics", "/static"}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with web_node(tmp_path_factory.mktemp("web")) as running:

        @running.server.app.post("/api/probe")
        def probe(principal: Annotated[Principal, Depends(require(Role.OPERATOR))]) -> dict[str, str]:
            return {"by": principal.name, "via": principal.via}

        yield running


def _trail(console: Console) -> list[tuple[str | None, str, str]]:
    return [(e.actor, e.action, e.outcome) for e in audit.events(console.store, studies=False)]


def _last(console: Console, action: str) -> audit.Event:
    return [e for e in audit.events(console.store, studies=False) if e.action == action][-1]


def test_login_opens_a_session_and_logout_ends_it(console: Console) -> None:
    with console.client() as client:
        answer = client.post("/login", data={"username": "viewer", "password": "pw-viewer-secret"})
        assert answer.status_code == 303 and answer.headers["location"] == "/"
        cookie_attributes = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie_attributes and "samesite=strict" in cookie_attributes
        first = client.cookies["radgate_session"]
        login(client, "viewer")
        me = client.get("/api/me").json()
        assert (me["name"], me["role"], me["via"]) == ("viewer", "viewer", "session")
        cookie = client.cookies["radgate_session"]
        assert cookie != first
        replaced = httpx.get(f"{console.url}/api/me", headers={"Cookie": f"radgate_session={first}"})
        assert replaced.status_code == 401
        assert client.post("/logout").status_code == 303
        client.cookies.set("radgate_session", cookie)  # the old cookie is dead on the server
        assert client.get("/api/me").status_code == 401
    assert ("viewer", "login", "ok") in _trail(console)
    assert ("viewer", "logout", "ok") in _trail(console)


def test_a_wrong_password_is_401_and_audited_with_the_name_never_the_password(console: Console) -> None:
    with console.client() as client:
        for name in ("admin", "nobody"):
            answer = client.post("/login", data={"username": name, "password": "not-the-password"})
            assert answer.status_code == 401
            assert "Wrong user name or password" in answer.text
            assert "radgate_session" not in client.cookies
            failed = _last(console, "login")
            assert (failed.actor, failed.outcome, failed.remote) == (name, "failure", "127.0.0.1")
    exported = [e.to_json() for e in audit.events(console.store)]
    assert "not-the-password" not in repr(exported)
    assert "$argon2" not in repr(exported)


def test_repeated_failures_lock_the_name_and_the_right_password_waits(console: Console) -> None:
    add_user(console.store, "lockme", "pw-lockme-secret", Role.VIEWER, CHEAP_HASHER)
    with console.client() as client:
        for _ in range(console.config.web.login_failures):
            assert client.post("/login", data={"username": "lockme", "password": "wrong"}).status_code == 401
        locked = client.post("/login", data={"username": "lockme", "password": "pw-lockme-secret"})
        assert locked.status_code == 429 and "radgate_session" not in client.cookies
        assert locked.headers["retry-after"] == str(console.config.web.login_lockout_minutes * 60)
        assert (_last(console, "login").actor, _last(console, "login").outcome) == ("lockme", "locked")
        assert login(client, "viewer")  # another name from the same address still logs in
    with console.store.session() as s:  # the failures age out of the window: the lock ends
        s.execute(
            update(AuditEvent)
            .where(AuditEvent.actor == "lockme")
            .values(at=utcnow() - timedelta(minutes=console.config.web.login_lockout_minutes + 1))
        )
    with console.client() as client:
        answer = client.post("/login", data={"username": "lockme", "password": "pw-lockme-secret"})
        assert answer.status_code == 303


def test_a_login_goes_back_only_to_a_page_of_this_site(console: Console) -> None:
    with console.client() as client:
        for target, landing in (
            ("/account?a=1", "/account?a=1"),
            ("//evil.example/x", "/"),
            ("https://e.x", "/"),
        ):
            answer = client.post(
                "/login", data={"username": "viewer", "password": "pw-viewer-secret", "next": target}
            )
            assert answer.headers["location"] == landing


def test_forged_or_missing_csrf_token_is_403_and_audited(console: Console) -> None:
    with console.client() as client:
        token = login(client, "operator")
        client.headers["X-CSRF-Token"] = "forged"
        assert client.post("/api/probe").status_code == 403
        assert _last(console, "csrf.rejected").actor == "operator"
        del client.headers["X-CSRF-Token"]
        refused = client.post("/api/probe")
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        assert client.post("/api/probe", data={"csrf_token": token}).json() == {
            "by": "operator",
            "via": "session",
        }
        assert client.post("/api/probe", headers={"X-CSRF-Token": token}).status_code == 200


def test_an_action_without_the_role_is_403_and_audited(console: Console) -> None:
    with console.client() as client:
        login(client, "viewer")
        answer = client.post("/api/probe")
        assert answer.status_code == 403
        assert "operator" in answer.json()["detail"]
        assert client.get("/api/audit").status_code == 403
    denied = _last(console, "access.denied")
    assert denied.actor == "viewer" and denied.detail == {
        "method": "GET",
        "path": "/api/audit",
        "needs": "admin",
        "has": "viewer",
    }


def test_an_api_token_needs_no_csrf_and_an_unknown_one_is_401_and_audited(console: Console) -> None:
    token = create_token(console.store, "operator")
    with console.client() as client:
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.post("/api/probe", headers=bearer).json() == {"by": "operator", "via": "token"}
        wrong = client.post("/api/probe", headers={"Authorization": "Bearer rgt_forged"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert _last(console, "auth.rejected").detail == {
        "method": "POST",
        "path": "/api/probe",
        "reason": "unknown API token",
    }


def test_an_expired_session_redirects_pages_and_is_401_on_the_api(console: Console) -> None:
    with console.client() as client:
        login(client, "admin")
        mine = WebSession.token_hash == secret_hash(client.cookies["radgate_session"])
        with console.store.session() as s:
            s.execute(update(WebSession).where(mine).values(expires_at=utcnow() - timedelta(seconds=1)))
        page = client.get("/account")
        assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
        api = client.get("/api/me")
        assert api.status_code == 401 and "session expired" in api.json()["detail"]
    assert _last(console, "auth.rejected").detail == {
        "method": "GET",
        "path": "/api/me",
        "reason": "session expired",
    }


def test_a_session_in_use_is_extended_past_half_its_time(console: Console) -> None:
    with console.client() as client:
        login(client, "viewer")
        mine = WebSession.token_hash == secret_hash(client.cookies["radgate_session"])
        with console.store.session() as s:
            s.execute(update(WebSession).where(mine).values(expires_at=utcnow() + timedelta(minutes=1)))
        assert client.get("/api/me").status_code == 200
        with console.store.session() as s:
            expires = s.scalars(select(WebSession.expires_at).where(mine)).one()
    assert expires - utcnow() > timedelta(minutes=console.config.web.session_minutes - 1)


def test_a_malformed_query_string_is_422_naming_the_parameter_and_audited(console: Console) -> None:
    with console.client() as client:
        login(client, "admin")
        for query in ("limit=many", "limit=0", "since=yesterday"):
            answer = client.get(f"/api/audit?{query}")
            assert answer.status_code == 422
            assert answer.json()["detail"][0]["loc"] == ["query", query.split("=")[0]]
        invalid = _last(console, "request.invalid")
        assert (invalid.actor, invalid.detail) == (
            "admin",
            {"method": "GET", "path": "/api/audit", "invalid": ["query.since"]},
        )


def test_nothing_but_login_health_metrics_and_static_answers_without_a_login(console: Console) -> None:
    """Every route of the app, the console's own included, is asked for by an anonymous client."""
    found = routes(console.server.app)
    assert {"/login", "/healthz", "/account", "/audit", "/api/audit", "/api/me", "/logout"} <= {
        p for p, _ in found
    }
    with console.client() as client:
        for path, methods in found:
            if "/" + path.split("/")[1] in PUBLIC:
                continue
            concrete = re.sub(r"\{[^}]*\}", "1", path)
            for method in methods - {"HEAD"}:
                answer = client.request(method, concrete)
                assert answer.status_code in (303, 401), f"{method} {path}: {answer.status_code}"
                if answer.status_code == 303:
                    assert answer.headers["location"].startswith("/login?next=")
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/login").status_code == 200
        assert client.get("/static/htmx.min.js").status_code == 200


def test_an_htmx_request_without_a_login_sends_the_whole_page_to_the_login(console: Console) -> None:
    with console.client() as client:
        headers = {"HX-Request": "true", "HX-Current-URL": f"{console.url}/studies?state=FAILED"}
        answer = client.get("/account", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["hx-redirect"] == "/login?next=%2Fstudies%3Fstate%3DFAILED"


def test_the_openapi_document_is_behind_the_login_and_lists_the_api(console: Console) -> None:
    with console.client() as client:
        assert client.get("/api/openapi.json").status_code == 401
        login(client, "viewer")
        document = client.get("/api/openapi.json").json()
    assert "/api/audit" in document["paths"] and "/api/me" in document["paths"]


def test_the_base_page_carries_the_csrf_token_for_htmx_and_no_secret(console: Console) -> None:
    with console.client() as client:
        token = login(client, "viewer")
        page = client.get("/account").text
        cookie = client.cookies["radgate_session"]
    assert f'<meta name="csrf-token" content="{token}">' in page
    assert f'hx-headers=\'{{"X-CSRF-Token": "{token}"}}\'' in page
    assert "/static/htmx.min.js" in page
    assert cookie not in page and "pw-viewer-secret" not in page


def test_the_audit_page_and_api_show_the_trail_to_an_admin(console: Console) -> None:
    with console.client() as client:
        client.post("/login", data={"username": "<b>x</b>", "password": "whatever-it-is"})
        login(client, "admin")
        page = client.get("/audit")
        assert page.status_code == 200 and "<h1>Audit trail</h1>" in page.text
        assert "login" in page.text
        assert "&lt;b&gt;x&lt;/b&gt;" in page.text and "<b>x</b>" not in page.text  # a name tried, escaped
        form = client.get("/audit", params=[("since", ""), ("studies", "false"), ("limit", "5")])  # as sent
        assert form.status_code == 200 and 'name="studies" value="true" >' in form.text  # unchecked
        trail = client.get("/api/audit", params={"studies": "false", "limit": 3}).json()
    assert len(trail) == 3
    assert {"at", "actor", "action", "target", "outcome", "detail", "remote", "source"} == set(trail[0])


def test_a_busy_port_is_a_clear_start_error(
    console: Console, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from plugin.web.app import WebServer, WebStartError

    taken = console.config.model_copy(
        update={"web": console.config.web.model_copy(update={"port": console.server.port})}
    )
    with pytest.raises(WebStartError, match=f"cannot listen on 127.0.0.1:{console.server.port}"):
        WebServer(taken, console.store).start()
    assert httpx.get(f"{console.url}/healthz").status_code == 200  # the running one is untouched
