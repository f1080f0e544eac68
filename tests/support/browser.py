"""A real headless Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright, for pages people see.

`chromium_browser()` starts one, which the tests share (the session fixture `chromium`);
`chromium_page()` yields a fresh Playwright page of it in a fresh browser context. The browser is
started with the flags a closed network needs (no background networking, no component updates) and
SwiftShader for WebGL (the OHIF viewer). Tests that need it skip with a clear reason where Chromium
or Playwright is missing, and are counted by the real-data summary like the others.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=swiftshader",
    "--enable-unsafe-swiftshader",
)


def chromium_path() -> Path:
    """Debian's Chromium, or RADGATE_CHROMIUM; skips the test where there is none."""
    found = os.environ.get("RADGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(found).is_file():
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    return Path(found)


@contextmanager
def chromium_browser() -> Iterator[Browser]:
    """A new headless Chromium (and its Playwright driver), closed on exit."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(executable), headless=True, args=list(CHROMIUM_FLAGS)
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def chromium_page(browser: Browser, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A page of `browser` in a new browser context (no cookies, storage or cache from another page),
    closed on exit."""
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        yield context.new_page()
    finally:
        context.close()
