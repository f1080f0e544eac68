"""A real headless Chromium logs in through the login form, sees the base page, and logs out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from support.browser import chromium_page
from support.web import login_page, password, web_node

from plugin.web import audit

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def test_a_browser_logs_in_sees_the_console_and_logs_out(chromium: Browser, tmp_path: Path) -> None:
    with web_node(tmp_path) as console, chromium_page(chromium) as page:
        page.goto(f"{console.url}/account")  # not logged in: sent to the login form, and back after it
        assert page.url == f"{console.url}/login?next=%2Faccount"
        page.fill("input[name=username]", "operator")
        page.fill("input[name=password]", "not-it")
        page.click("button[type=submit]")
        assert page.locator("p.error").inner_text() == "Wrong user name or password."
        page.fill("input[name=username]", "operator")
        page.fill("input[name=password]", password("operator"))
        page.click("button[type=submit]")
        page.wait_for_url(f"{console.url}/account")
        assert page.locator("#user-name").inner_text() == "operator"
        assert page.locator("#user-role").inner_text() == "operator"
        nav = page.locator("header nav a").all_inner_texts()
        assert nav == ["Overview", "Studies", "Rules", "Fetch"]  # no Audit for an operator
        assert page.evaluate("typeof htmx") == "object"  # the vendored htmx loaded from the node
        cookies = page.context.cookies()
        assert [c["httpOnly"] for c in cookies] == [True] and cookies[0]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # the session is out of scripts' reach
        page.click("#logout")
        page.wait_for_url(f"{console.url}/login")
        page.goto(f"{console.url}/account")
        assert page.url.startswith(f"{console.url}/login?next=")
        login_page(page, console, "admin", "/audit")
        assert page.locator("header nav a", has_text="Audit").count() == 1
        rows = page.locator("#audit tbody tr").all_inner_texts()
        assert any("logout" in row and "operator" in row for row in rows)
        assert any("login" in row and "failure" in row for row in rows)
    actions = [(e.actor, e.action, e.outcome) for e in audit.events(console.store, studies=False)]
    assert actions[:3] == [
        ("operator", "login", "failure"),
        ("operator", "login", "ok"),
        ("operator", "logout", "ok"),
    ]
