"""`/docs` (Swagger UI) and `/redoc` work with no internet: in Chromium with every request that leaves loopback
aborted, both render the API from `/openapi.json` and no request leaves this machine (FastAPI's own pages load
their scripts from a CDN and stay blank offline; ReDoc's attribution logo from cdn.redoc.ly is stopped by the
pages' Content-Security-Policy). Also: the asset URLs honour a proxy's root_path, and a missing asset package is a
clear error."""

from __future__ import annotations

import httpx
import pytest
from browser_support import Watched, chromium
from fastapi.testclient import TestClient
from server_fakes import FakePipe, live_server

from lcmkit.server import docs
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def url():
    with live_server(create_app(FakePipe(), Settings(api_key="docs-key"))) as base:
        yield base


def test_swagger_ui_renders_offline(browser, url: str) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    w = Watched(context)  # aborts and records every request that is not to this machine
    requests: list[str] = []
    w.page.on("request", lambda r: requests.append(r.url))
    console: list[str] = []
    w.page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    response = w.page.goto(url + "/docs")
    assert response.headers["content-security-policy"] == docs.CONTENT_SECURITY_POLICY
    w.page.wait_for_selector(".opblock")  # the operations list, built from /openapi.json
    paths = w.page.locator(".opblock-summary-path").all_inner_texts()
    assert "/sdapi/v1/txt2img" in paths and "/v1/images/generations" in paths
    assert w.page.locator(".swagger-ui .info .title").inner_text().startswith("lcmkit")
    # no badge that would send this server's spec URL to validator.swagger.io
    assert w.page.evaluate("ui.getConfigs().validatorUrl") is None
    assert any(r == url + "/openapi.json" for r in requests)
    assert all(r.startswith(url) for r in requests), requests
    assert (
        console == []
    )  # nothing refused by the page's policy either: Swagger UI tried to reach no other host
    w.assert_clean()
    context.close()


def test_redoc_renders_offline(browser, url: str) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    w = Watched(context)
    w.page.goto(url + "/redoc")
    w.page.wait_for_selector("[data-section-id^='tag/a1111']")  # ReDoc's rendered sections
    assert "txt2img" in w.page.inner_text("body")
    w.assert_clean()
    context.close()


def test_openapi_json_and_assets_are_served_without_a_key(url: str) -> None:
    spec = httpx.get(url + "/openapi.json")
    assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.")
    for name in docs.ASSET_FILES:
        r = httpx.get(f"{url}{docs.ASSETS_URL}/{name}")
        assert r.status_code == 200 and len(r.content) > 1000, name
    page = httpx.get(url + "/docs")
    assert page.status_code == 200 and "http" not in page.text.replace(url, "")  # nothing absolute, no CDN


def test_docs_honour_root_path() -> None:
    with TestClient(create_app(FakePipe(), Settings()), root_path="/lcm") as client:
        html = client.get("/docs").text
        assert "/lcm/docs-assets/swagger-ui-bundle.js" in html and "'/lcm/openapi.json'" in html
        assert "/lcm/docs-assets/redoc.standalone.js" in client.get("/redoc").text


def test_missing_asset_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs, "ASSET_PACKAGE", "no_such_swagger_assets_pkg")
    with pytest.raises(RuntimeError, match="pip install fastapi-offline"):
        docs.asset_dir()
