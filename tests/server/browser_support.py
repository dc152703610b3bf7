"""Shared by the browser tests: Debian's Chromium (/usr/bin/chromium, headless) driven by the `playwright` Python
package, and a page wrapper that records script errors and every request that leaves the test server.

Chromium missing is a failure, not a skip: CI installs it with scripts/install_browser.sh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-proxy-server"]  # fmt: skip
TIMEOUT_MS = 30_000


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium for a module's tests (pytest.fail, never skip, when it or playwright is missing)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}; the browser tests need it: run `bash scripts/install_browser.sh` "
            "(apt-get install chromium) as root"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def is_local(url: str) -> bool:
    """A request that stays on this machine: loopback, or a data:/blob: URL that never leaves the page."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or parts.hostname in ("127.0.0.1", "localhost", "::1")


class Watched:
    """A page whose script errors (`errors`) and non-local requests (`outside`, aborted) are recorded."""

    def __init__(self, context: Any) -> None:
        self.errors: list[str] = []
        self.outside: list[str] = []
        context.route("**/*", self._route)
        self.page = context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(TIMEOUT_MS)

    def _route(self, route: Any) -> None:
        if is_local(route.request.url):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort("internetdisconnected")

    def assert_clean(self) -> None:
        assert self.errors == [], f"script errors on the page: {self.errors}"
        assert self.outside == [], f"the page tried to leave the server: {self.outside}"
