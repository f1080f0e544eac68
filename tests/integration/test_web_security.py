"""The web console's gate over a real server and store: login, sessions, CSRF, roles, tokens, audit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.web import Console, login, web_node

from plugin.web import audit


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with web_node(tmp_path_factory.mktemp("web")) as running:
        yield running


def _actions(console: Console) -> list[tuple[str | None, str, str]]:
    return [(e.actor, e.action, e.outcome) for e in audit.events(console.store, studies=False)]


def test_login_opens_a_session_and_logout_ends_it(console: Console) -> None:
    with console.client() as client:
        login(client, "viewer")
        me = client.get("/api/me").json()
        assert (me["name"], me["role"], me["via"]) == ("viewer", "viewer", "session")
        cookie = client.cookies.get("radgate_session")
        assert cookie
        assert client.post("/logout").status_code == 303
        client.cookies.set("radgate_session", cookie)  # the old cookie is dead on the server
        assert client.get("/api/me").status_code == 401
    assert ("viewer", "logout", "ok") in _actions(console)


def test_a_wrong_password_is_401_and_audited_without_the_password(console: Console) -> None:
    with console.client() as client:
        answer = client.post("/login", data={"username": "admin", "password": "not-the-password"})
        assert answer.status_code == 401
        assert "Wrong user name or password" in answer.text
        assert "radgate_session" not in client.cookies
    trail = audit.events(console.store, studies=False)
    failed = [e for e in trail if e.action == "login" and e.outcome != "ok"]
    assert failed and failed[-1].actor == "admin"
    assert "not-the-password" not in repr(failed)


def test_forged_csrf_token_is_403_and_audited(console: Console) -> None:
    with console.client() as client:
        login(client, "admin")
        client.headers["X-CSRF-Token"] = "forged"
        assert client.post("/logout").status_code == 403
        del client.headers["X-CSRF-Token"]
        assert client.post("/logout").status_code == 403  # none at all
        assert client.get("/api/me").status_code == 200  # still logged in
    assert ("admin", "csrf.rejected", "failure") in _actions(console)


def test_pages_redirect_to_login_and_the_api_answers_401(console: Console) -> None:
    with console.client() as client:
        page = client.get("/account?x=1")
        assert page.status_code == 303
        assert page.headers["location"] == "/login?next=%2Faccount%3Fx%3D1"
        assert client.get("/api/me").status_code == 401
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/login").status_code == 200
        assert client.get("/static/htmx.min.js").status_code == 200


def test_a_role_too_low_is_403_and_audited(console: Console) -> None:
    with console.client() as client:
        login(client, "operator")
        assert client.get("/api/audit").status_code == 403
    assert ("operator", "access.denied", "failure") in _actions(console)


def test_base_page_carries_the_csrf_token_for_htmx(console: Console) -> None:
    with console.client() as client:
        token = login(client, "viewer")
        page = client.get("/account").text
        assert f'<meta name="csrf-token" content="{token}">' in page
        assert "hx-headers" in page and token in page
        assert "/static/htmx.min.js" in page
