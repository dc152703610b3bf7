"""The web page in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, headless) against
uvicorn on loopback serving the tiny random LCM, with an API key set.

Proves that the page loads with no key and no network, sends the key it is given, generates text-to-image and
image-to-image (an uploaded file, sent as a data: URL), shows live step progress, shows the result and adds it to
the gallery with its parameters, and fits a 390 px phone screen without sideways scrolling (320 and 360 px, the
gallery, cancel and /docs: test_server_page.py and test_server_docs.py). Screenshots go to
tmp_path, and once to /tmp/lcmkit_page.png and /tmp/lcmkit_page_phone.png for people to look at.
Chromium missing is a failure, not a skip: CI installs it with scripts/install_browser.sh.
"""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import PIL.Image
import pytest
from browser_support import TIMEOUT_MS, chromium
from server_fakes import FakePipe, live_server, tiny_pipe

from lcmkit.cli import build_parser
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

KEY = "browser-key"


@pytest.fixture(scope="module")
def base_url():
    app = create_app(tiny_pipe(), Settings(api_key=KEY, model_name="tiny-lcm"))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def generate(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#generate")
    page.wait_for_selector("#status-text:has-text('done')", timeout=TIMEOUT_MS)


def test_page_generates_and_fills_gallery(browser, base_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    outside: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(base_url) or r.url.startswith("data:") else outside.append(r.url),
    )
    page.goto(base_url + "/")
    page.wait_for_selector("#model:has-text('tiny-lcm')")
    assert page.locator("#key-box").get_attribute("open") is not None  # the server asks for a key: box opened

    # without the key the server refuses, and the page says so
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "3")
    page.fill("#prompt", "a lighthouse")
    page.click("#generate")
    page.wait_for_selector("#status.error", timeout=TIMEOUT_MS)
    assert "API key" in page.inner_text("#status-text")

    page.fill("#apikey", KEY)
    page.fill("#seed", "1234")
    generate(page, "a lighthouse at dusk")
    src = page.get_attribute("#result-image", "src")
    assert src.startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('result-image').naturalWidth") == 64
    assert "Seed: 1234" in page.inner_text("#result-info")
    assert page.locator("#gallery li").count() == 1
    assert "seed 1234" in page.inner_text("#gallery li .params")

    # image to image from an uploaded file
    upload = tmp_path / "input.png"
    PIL.Image.new("RGB", (70, 68), (30, 120, 200)).save(upload)
    page.set_input_files("#init", str(upload))
    page.wait_for_selector("#init-options:not([hidden])")
    page.fill("#width", "")
    page.fill("#height", "")
    generate(page, "a blue square")
    assert page.locator("#gallery li").count() == 2
    cli_strength = build_parser().parse_args(["img2img", "in.png", "a prompt"]).strength  # the page's default
    assert f"Denoising strength: {cli_strength}" in page.inner_text("#result-info")
    assert page.inner_text("#gallery li:first-child .params:not(.seed)").startswith("64×64")  # 70x68 floored
    assert page.evaluate("document.getElementById('result-image').naturalWidth") == 64

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    shutil.copyfile(tmp_path / "page.png", "/tmp/lcmkit_page.png")
    assert errors == [] and outside == []
    page.close()


def test_progress_is_shown_while_generating(browser) -> None:
    """Against a fake pipeline held after step 1 of 4 by an event: the page must show "step 1 / 4" from its
    polling before the test lets the job finish. No timing involved."""
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with live_server(create_app(fake, Settings())) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#steps", "4")
        page.fill("#prompt", "watch the steps")
        page.click("#generate")
        try:
            page.wait_for_selector("#status-text:has-text('step 1 / 4')", timeout=TIMEOUT_MS)
            assert page.locator("#progress").is_visible()
            assert page.evaluate("document.getElementById('progress').value") == 0.25
        finally:
            gate.set()
        page.wait_for_selector("#status-text:has-text('done')", timeout=TIMEOUT_MS)
        assert page.locator("#progress").is_hidden()
        page.close()


def test_phone_width_has_no_sideways_scroll(browser, base_url: str, tmp_path: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    page = context.new_page()
    page.goto(base_url + "/")
    page.fill("#apikey", KEY)
    page.fill("#width", "64")
    page.fill("#height", "64")
    generate(page, "a small red boat")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#generate").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    shutil.copyfile(tmp_path / "phone.png", "/tmp/lcmkit_page_phone.png")
    with PIL.Image.open(io.BytesIO((tmp_path / "phone.png").read_bytes())) as shot:
        assert shot.width == 390 * 2
    context.close()
