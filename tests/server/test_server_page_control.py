"""The page's control image in Chromium (headless): shown only when the server loaded ControlNets, sent as
`alwayson_scripts.controlnet` with the chosen net, preprocessor and weight, and still no sideways scroll at 320
and 360 px with the control options open. The server runs the tiny random LCM with a tiny random ControlNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from browser_support import Watched, chromium
from server_fakes import FakePipe, live_server, tiny_model_dir
from test_server_controlnet import _controlnet, picture

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

PHONE = {"device_scale_factor": 2, "is_mobile": True, "has_touch": True}


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def control_url(tmp_path_factory: pytest.TempPathFactory):
    folder = _controlnet(tmp_path_factory.mktemp("cn") / "control_v11p_sd15_canny")
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_model_dir(), controlnet=str(folder))
    settings = Settings(model_name="tiny", min_size=16, controlnets=(("canny", str(folder)),))
    with live_server(create_app(pipe, settings)) as url:
        yield url


def open_page(browser: Any, url: str, **options: Any) -> Watched:
    watched = Watched(browser.new_context(**options))
    watched.page.goto(url + "/")
    watched.page.wait_for_selector("#model:has-text('tiny')")
    return watched


@pytest.mark.parametrize("width", [320, 360])
def test_control_image_is_sent_and_fits_narrow_phones(
    browser, control_url: str, width: int, tmp_path: Path
) -> None:
    w = open_page(browser, control_url, viewport={"width": width, "height": 740}, **PHONE)
    page = w.page
    page.wait_for_selector("#control:not([hidden])")
    assert page.locator("#control-model option").all_inner_texts() == ["control_v11p_sd15_canny"]
    assert page.input_value("#control-module") == "canny"  # a canny net: edges by default
    source = tmp_path / "control.png"
    picture((64, 64)).save(source)
    page.set_input_files("#control-file", str(source))
    page.wait_for_selector("#control-options:not([hidden])")
    page.fill("#control-weight", "0.5")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#steps", "2")
    page.fill("#prompt", "a boat")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.click("#generate")
        page.wait_for_function(
            """() => /^done/.test(document.getElementById('status-text').textContent)
                     || document.getElementById('status').classList.contains('error')"""
        )
    assert page.inner_text("#status-text").startswith("done"), page.inner_text("#status-text")
    unit = sent.value.post_data_json["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit["model"] == "control_v11p_sd15_canny" and unit["module"] == "canny" and unit["weight"] == 0.5
    assert unit["image"].startswith("data:image/png;base64,")
    assert 'ControlNet 0: "Module: canny' in page.inner_text("#result-info")
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert widths[0] <= width and widths[1] <= width and widths[2] == width, widths
    wide = page.evaluate(
        """(w) => [...document.querySelectorAll('body *')].filter((e) => e.getClientRects().length)
                 .filter((e) => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > w + 0.5; })
                 .map((e) => e.id || e.className || e.tagName)""",
        width,
    )
    assert wide == [], f"elements beyond the {width} px screen: {wide}"
    page.click("#control-clear")
    assert page.locator("#control-options").is_hidden()
    w.assert_clean()
    page.context.close()


def test_control_input_is_hidden_without_controlnets(browser) -> None:
    with live_server(create_app(FakePipe(), Settings(model_name="tiny"))) as url:
        w = open_page(browser, url, viewport={"width": 360, "height": 740})
        w.page.wait_for_load_state("networkidle")
        assert w.page.locator("#control").is_hidden()
        w.assert_clean()
        w.page.context.close()
