"""The web page's own features in Chromium (headless), against the server with the fake pipeline (solid-colour
images whose red channel is the seed mod 256; `FakePipe(gate=...)` holds a job mid-run without sleeps), or the
tiny random LCM where image-to-image runs:

- no sideways scroll at 320 and 360 px with a long unbroken prompt, a long model name and a full gallery;
- the gallery survives a reload (IndexedDB), shows each image's seed, keeps the last 24, and can be cleared;
  without storage (none, or full) it still works for the page's lifetime and says so;
- "send to img2img" from the result and from a gallery item, random/reuse seed, the CLI's strength default;
- the result scrolls into view on a phone;
- the cancel button stops a running job and a queued one (POST /sdapi/v1/interrupt?id_task=...).

Every page must make no request beyond the test server and raise no script error.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import TIMEOUT_MS, Watched, chromium
from server_fakes import FakePipe, live_server, tiny_pipe

from lcmkit.cli import build_parser
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

LONG_MODEL = "/home/someone/models/" + "dreamshaper-lcm-" * 6 + "fp16.safetensors"
PHONE = {"device_scale_factor": 2, "is_mobile": True, "has_touch": True}
GALLERY_MAX = 24


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def fake_url():
    with live_server(create_app(FakePipe(), Settings(model_name=LONG_MODEL))) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_url():
    """The tiny random LCM (the fake pipeline does text-to-image only)."""
    with live_server(create_app(tiny_pipe(), Settings(model_name=LONG_MODEL))) as url:
        yield url


def open_page(browser: Any, url: str, **context_options: Any) -> Watched:
    context = browser.new_context(**context_options)
    watched = Watched(context)
    watched.page.goto(url + "/")
    watched.page.wait_for_selector("#model:has-text('fp16')")
    return watched


def generate(page: Any, prompt: str, *, seed: int | None = None, count: int = 1) -> None:
    page.fill("#prompt", prompt)
    if seed is not None:
        page.fill("#seed", str(seed))
    page.fill("#count", str(count))
    page.click("#generate")
    page.wait_for_function(
        """() => /^done/.test(document.getElementById('status-text').textContent)
                 || document.getElementById('status').classList.contains('error')"""
    )
    status = page.inner_text("#status-text")
    assert status.startswith("done"), f"the page says: {status}"


def gallery_seeds(page: Any) -> list[str]:
    return page.locator("#gallery li .seed").all_inner_texts()


def result_seed(page: Any) -> int:
    info = page.inner_text("#result-info")
    return int(info.split("Seed: ")[1].split(",")[0])


@pytest.mark.parametrize("width", [320, 360])
def test_no_sideways_scroll_on_narrow_phones(browser, fake_url: str, width: int, tmp_path: Path) -> None:
    w = open_page(browser, fake_url, viewport={"width": width, "height": 740}, **PHONE)
    page = w.page
    unbroken = "a" * 400  # no space to wrap at: the infotext and the prompt must still wrap
    page.fill("#negative", "n" * 300)
    generate(page, unbroken, seed=4_000_000_000, count=4)
    generate(page, unbroken, seed=1_234_567_890, count=4)
    page.click("#result-to-img2img")  # the img2img preview is part of the page too
    page.wait_for_selector("#init-options:not([hidden])")
    assert page.locator("#gallery li").count() == 8
    assert unbroken in page.inner_text("#result-info")

    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert widths[0] <= width and widths[1] <= width and widths[2] == width, widths
    wide = page.evaluate(
        """(w) => [...document.querySelectorAll('body *')].filter((e) => e.getClientRects().length)
                 .filter((e) => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > w + 0.5; })
                 .map((e) => e.id || e.className || e.tagName)""",
        width,
    )
    assert wide == [], f"elements beyond the {width} px screen: {wide}"
    # each gallery item shows its whole seed (not cut off by an ellipsis)
    assert gallery_seeds(page)[:2] == ["seed 1234567890", "seed 1234567891"]
    cut = page.evaluate(
        "[...document.querySelectorAll('#gallery .seed')].some((e) => e.scrollWidth > e.clientWidth)"
    )
    assert not cut
    assert page.input_value("#seed") == "1234567890"  # a 10-digit seed is shown whole in its field
    assert page.evaluate("(e => e.scrollWidth <= e.clientWidth)(document.getElementById('seed'))")
    for selector in ("#generate", "#seed-random", "#seed-reuse", "#model"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if width == 360:
        shutil.copyfile(tmp_path / "page.png", "/tmp/lcmkit_page_360.png")
    w.assert_clean()
    page.context.close()


def test_gallery_survives_reload_with_seeds_and_clears(browser, fake_url: str) -> None:
    w = open_page(browser, fake_url, viewport={"width": 1200, "height": 900})
    page = w.page
    generate(page, "first", seed=1234)
    generate(page, "second", seed=99, count=2)
    before = page.evaluate("[...document.querySelectorAll('#gallery li img')].map((i) => i.src)")
    assert gallery_seeds(page) == ["seed 99", "seed 100", "seed 1234"]

    page.reload()
    page.wait_for_selector("#gallery li")
    assert gallery_seeds(page) == ["seed 99", "seed 100", "seed 1234"]
    after = page.evaluate("[...document.querySelectorAll('#gallery li img')].map((i) => i.src)")
    assert after == before and all(src.startswith("data:image/png;base64,") for src in after)
    assert page.locator("#result").is_hidden()

    page.click("#gallery li:nth-child(3)")  # a stored item shows again with its parameters
    assert page.locator("#result").is_visible()
    assert "Seed: 1234" in page.inner_text("#result-info")
    assert page.input_value("#prompt") == "first" and page.input_value("#seed") == "1234"

    page.once("dialog", lambda d: d.accept())  # "Remove all 3 images ...?"
    page.click("#gallery-clear")
    page.wait_for_function("() => document.querySelectorAll('#gallery li').length === 0")
    assert page.locator("#gallery-clear").is_hidden()
    page.reload()
    page.wait_for_selector("#gallery-note:has-text('kept in this browser')")
    assert page.locator("#gallery li").count() == 0
    w.assert_clean()
    page.context.close()


def test_gallery_keeps_the_newest_images(browser, fake_url: str) -> None:
    w = open_page(browser, fake_url, viewport={"width": 1200, "height": 900})
    page = w.page
    for k in range(7):  # 28 images, seeds 1000..1027
        generate(page, f"batch {k}", seed=1000 + 4 * k, count=4)
    assert page.locator("#gallery li").count() == GALLERY_MAX
    page.reload()
    page.wait_for_selector("#gallery li")
    seeds = gallery_seeds(page)
    assert len(seeds) == GALLERY_MAX
    assert seeds[:4] == ["seed 1024", "seed 1025", "seed 1026", "seed 1027"]  # newest batch first, in order
    assert seeds[-4:] == [
        "seed 1004",
        "seed 1005",
        "seed 1006",
        "seed 1007",
    ]  # the oldest batch (1000..) went
    stored = page.evaluate(
        """() => new Promise((ok, bad) => { const r = indexedDB.open('lcmkit');
             r.onsuccess = () => { const c = r.result.transaction('gallery').objectStore('gallery').count();
                                   c.onsuccess = () => ok(c.result); c.onerror = () => bad(c.error); };
             r.onerror = () => bad(r.error); })"""
    )
    assert stored == GALLERY_MAX
    w.assert_clean()
    page.context.close()


@pytest.mark.parametrize(
    ("script", "note", "note_after_reload"),
    [
        ("Object.defineProperty(window, 'indexedDB', {value: undefined})", "no storage", "no storage"),
        (  # the browser refuses every write, as when the disk quota is used up
            "IDBObjectStore.prototype.add = function () { throw new DOMException('full', 'QuotaExceededError'); }",
            "storage is full",
            "the last 24 are kept",
        ),
    ],
    ids=["no-indexeddb", "quota-exceeded"],
)
def test_gallery_without_storage_still_works_and_says_so(
    browser, fake_url: str, script: str, note: str, note_after_reload: str
) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.add_init_script(script)
    w = Watched(context)
    page = w.page
    page.goto(fake_url + "/")
    generate(page, "not kept", seed=21)
    assert gallery_seeds(page) == ["seed 21"] and page.locator("#result").is_visible()
    assert note in page.inner_text("#gallery-note")
    page.reload()
    page.wait_for_selector(f"#gallery-note:has-text('{note_after_reload}')")
    assert page.locator("#gallery li").count() == 0  # nothing was kept, as the note said
    w.assert_clean()
    context.close()


def test_send_to_img2img_seed_controls_and_strength_default(browser, tiny_url: str) -> None:
    cli_strength = build_parser().parse_args(["img2img", "in.png", "a prompt"]).strength
    w = open_page(browser, tiny_url, viewport={"width": 1200, "height": 900})
    page = w.page
    assert page.input_value("#strength") == str(cli_strength)
    assert page.inner_text("#strength-value") == str(cli_strength)
    assert page.locator("#seed-reuse").is_disabled()  # no image yet
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")

    # random seed: -1 is sent, the server picks one
    page.fill("#seed", "5")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page, "a random one")
    assert sent.value.post_data_json["seed"] == -1
    first_seed = result_seed(page)
    assert first_seed >= 0

    # reuse: the last image's seed goes into the field and is sent
    page.click("#seed-reuse")
    assert page.input_value("#seed") == str(first_seed)
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        generate(page, "the same seed again")
    assert sent.value.post_data_json["seed"] == first_seed
    assert result_seed(page) == first_seed

    # send the result to img2img: preview shown, and the next request is img2img from exactly that image
    generate(page, "seven", seed=7)
    seven_src = page.get_attribute("#result-image", "src")
    page.click("#result-to-img2img")
    page.wait_for_selector("#init-options:not([hidden])")
    assert page.get_attribute("#init-preview", "src") == seven_src
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, "from the result", seed=8)
    body = sent.value.post_data_json
    assert body["init_images"] == [seven_src]
    assert body["denoising_strength"] == cli_strength
    assert f"Denoising strength: {cli_strength}" in page.inner_text("#result-info")

    # a gallery item's own button: its image (seed 7, not the seed-8 result shown) becomes the input
    page.click("#init-clear")
    assert page.locator("#init-options").is_hidden()
    item = page.locator("#gallery li", has_text="seed 7")
    item.locator("button.to-img2img").click()
    assert page.get_attribute("#init-preview", "src") == seven_src
    assert "Seed: 8" in page.inner_text("#result-info")  # the button did not also open the item as the result
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, "from the gallery", seed=9)
    assert sent.value.post_data_json["init_images"] == [seven_src]
    assert seven_src != page.get_attribute("#result-image", "src")  # seeds 7 and 9: different images

    page.click("#init-clear")
    with page.expect_request("**/sdapi/v1/txt2img"):
        generate(page, "text only again", seed=10)
    w.assert_clean()
    page.context.close()


def test_result_scrolls_into_view_on_a_phone(browser, fake_url: str) -> None:
    w = open_page(browser, fake_url, viewport={"width": 360, "height": 640}, **PHONE)
    page = w.page
    page.fill("#width", "64")
    page.fill("#height", "64")
    generate(page, "a small red boat", seed=3)
    page.wait_for_function(
        """() => { const r = document.getElementById('result-image').getBoundingClientRect();
                   return r.height > 100 && r.top >= 0 && r.bottom <= innerHeight; }""",
        timeout=TIMEOUT_MS,
    )
    assert page.evaluate("scrollY") > 0  # it was below the form: the page scrolled to it
    w.assert_clean()
    page.context.close()


@pytest.fixture
def gated():
    """A server whose fake pipeline stops after step 1 until `gate` is set; yields (url, fake, gate)."""
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with live_server(create_app(fake, Settings(model_name=LONG_MODEL))) as url:
        try:
            yield url, fake, gate
        finally:
            gate.set()


def test_cancel_stops_the_running_job(browser, gated) -> None:
    url, fake, gate = gated
    w = open_page(browser, url, viewport={"width": 390, "height": 844}, **PHONE)
    page = w.page
    assert page.locator("#cancel").is_hidden()
    page.fill("#steps", "4")
    page.fill("#prompt", "stop me")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.click("#generate")
    task_id = sent.value.post_data_json["force_task_id"]
    page.wait_for_selector("#status-text:has-text('step 1 / 4')")
    assert page.locator("#generate").is_disabled()
    with page.expect_response("**/sdapi/v1/interrupt?id_task=*") as answer:
        page.click("#cancel")
    assert answer.value.request.method == "POST"
    reply = answer.value.json()
    assert reply["id_task"] == task_id and reply["state"] == "running"
    assert page.inner_text("#status-text") == "cancelling…"
    gate.set()  # the fake goes on to step 2, whose callback finds the cancel flag
    page.wait_for_selector("#status-text:text-is('cancelled')")
    assert not page.locator("#status").evaluate("e => e.classList.contains('error')")
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_hidden()
    assert page.locator("#gallery li").count() == 0 and page.locator("#result").is_hidden()
    assert [c["prompt"] for c in fake.calls] == ["stop me"]

    generate(page, "after the cancel", seed=11)  # the page and the worker both carry on
    assert gallery_seeds(page) == ["seed 11"]
    w.assert_clean()
    page.context.close()


def test_cancel_drops_a_queued_job(browser, gated) -> None:
    url, fake, gate = gated
    first: dict[str, Any] = {}

    def other_client() -> None:
        first["response"] = httpx.post(
            url + "/sdapi/v1/txt2img", json={"prompt": "occupies the worker"}, timeout=60
        )

    blocker = threading.Thread(target=other_client)
    blocker.start()
    try:
        assert fake.started.wait(30), "the first job never started"
        w = open_page(browser, url, viewport={"width": 1200, "height": 900})
        page = w.page
        page.fill("#prompt", "never runs")
        page.click("#generate")
        page.wait_for_selector("#status-text:has-text('queued: position 1')")
        with page.expect_response("**/sdapi/v1/interrupt?id_task=*") as answer:
            page.click("#cancel")
        assert answer.value.json()["state"] == "queued"
        page.wait_for_selector("#status-text:text-is('cancelled')")  # while the worker is still held
        assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_hidden()
    finally:
        gate.set()
        blocker.join(60)
    assert first["response"].status_code == 200
    assert [c["prompt"] for c in fake.calls] == ["occupies the worker"]  # the cancelled job never ran
    w.assert_clean()
    page.context.close()


def test_cancel_before_the_server_has_the_job(browser, fake_url: str) -> None:
    """Cancel while the request is still on its way (held here by the browser): the server does not know the id
    yet (interrupt answers 404), so the page closes its request instead; it never reaches the server."""
    w = open_page(browser, fake_url, viewport={"width": 1200, "height": 900})
    page = w.page
    held: list[Any] = []
    page.route("**/sdapi/v1/txt2img", lambda route: held.append(route))  # left unanswered: the request hangs
    page.fill("#prompt", "too early")
    page.click("#generate")
    page.wait_for_function("() => !document.getElementById('cancel').hidden")
    with page.expect_response("**/sdapi/v1/interrupt?id_task=*") as answer:
        page.click("#cancel")
    assert answer.value.status == 404
    page.wait_for_selector("#status-text:text-is('cancelled')")
    assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_hidden()
    assert len(held) == 1
    page.unroute("**/sdapi/v1/txt2img")
    generate(page, "sent normally", seed=5)
    assert gallery_seeds(page) == ["seed 5"]
    w.assert_clean()
    page.context.close()
