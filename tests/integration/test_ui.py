"""The Gradio UI in a real headless Chromium (Debian's, driven by Playwright; no browser download),
and its generate event through gradio_client, with api_token set: the browser logs in through
/login, gradio_client sends the token in a header."""

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.helpers import REPO, wait_for
from tests.lora_files import make_lora

pytestmark = [pytest.mark.integration, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "ui-test-token-5f1c"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def app(start_app):
    def lora_dir(tmp):
        make_lora(tmp / "loras", "ink", seed=1, magnitude=0.2)
        make_lora(tmp / "loras", "film", seed=2, magnitude=0.2)
        return tmp / "loras"

    return start_app(
        "ui",
        api_token=TOKEN,
        gradio_temp_dir=lambda tmp: tmp / "gradio",
        fault_injection="true",
        lora_dir=lora_dir,
    )


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (install.sh installs it as root)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def log_in(page, url: str, token: str = TOKEN) -> None:
    """Open the UI as a new visitor: sent to /login, type the token, land on the UI."""
    page.goto(url + "/")
    page.wait_for_selector("#token")
    assert "/login?next=" in page.url
    page.fill("#token", token)
    page.click("#login")


def test_the_ui_needs_a_login_and_a_wrong_token_is_told(app, browser):
    page = browser.new_page()
    log_in(page, app.url, "not-the-token")
    page.wait_for_selector("text=That token is not right.")
    assert page.locator("#demo-banner").count() == 0
    context_cookies = page.context.cookies()
    assert not any(c["name"] == "zimage_session" for c in context_cookies)
    page.close()


def test_generate_in_the_browser(app, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    problems = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)
    log_in(page, app.url)
    page.wait_for_selector("#demo-banner")
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    page.fill("#prompt textarea", "一只红狐狸 in fresh snow, soft light")
    page.click("#preset-768x768")
    page.wait_for_function("document.querySelector('#width input[type=number]').value === '768'")
    page.click("#preset-1024x576")
    page.wait_for_function("document.querySelector('#height input[type=number]').value === '576'")
    page.click("#generate-btn")
    page.wait_for_selector("#gallery img", timeout=60000)
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    sizes = page.eval_on_selector_all(
        "#gallery img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    assert sizes == [[1024, 576]]
    info = page.inner_text("#generation-info")
    assert "1024×576" in info and "Seed" in info and "denoise" in info  # the stage split is shown
    # The download button hands the PNG itself to the user.
    page.locator("#gallery button.thumbnail-item").first.click(force=True)  # open the preview
    with page.expect_download(timeout=15000) as download_info:
        page.locator("#gallery button[aria-label='Download']").first.click()
    saved = tmp_path / "download.png"
    download_info.value.save_as(saved)
    assert Image.open(saved).size == (1024, 576)
    # A validation problem is a readable message, not a stack trace.
    page.fill("#prompt textarea", "   ")
    page.click("#generate-btn")
    toast = page.wait_for_selector("text=prompt is empty", timeout=15000)
    assert toast is not None
    page.get_by_role("tab", name="Advanced").click()
    page.wait_for_selector("text=attention_backend", timeout=10000)
    assert problems == [], problems
    page.close()


def start_a_slow_generation(app, browser, prompt: str):
    """A new, logged-in page whose 512² generation of `prompt` runs at 0.5 s a step (the slow fault:
    the caller clears it)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    log_in(page, app.url)
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    app.fault("slow", seconds=0.5)
    page.fill("#prompt textarea", prompt)
    page.click("#preset-512x512")
    page.click("#generate-btn")
    return page


def engine_idle(app) -> bool:
    return not httpx.get(app.url + "/healthz").json()["heartbeat"]["busy"]


def test_a_closed_tab_cancels_its_generation(app, browser):
    """Gradio only stops sending a closed tab its events; the generation ran all its steps for
    nobody. Its unload (the heartbeat connection dropping) now cancels it like the Cancel button."""
    api = {"authorization": f"Bearer {TOKEN}"}
    try:
        page = start_a_slow_generation(app, browser, "a closed tab")
        page.wait_for_function("() => /[1-9]\\/8 steps/.test(document.body.innerText)", timeout=30000)
        page.close()
        # 6 more steps would take 3 s
        wait_for(lambda: engine_idle(app), 2.0, 0.1, "engine free after the tab closed")
    finally:
        app.fault("clear")
    items = httpx.get(app.url + "/api/history?limit=5", headers=api).json()["items"]
    assert "a closed tab" not in [item["parameters"]["prompt"] for item in items]


def test_progress_moves_cancel_stops_and_history_restores(app, browser, tmp_path):
    api = {"authorization": f"Bearer {TOKEN}"}
    try:
        page = start_a_slow_generation(app, browser, "cancel me")
        seen = []
        for _ in range(2):  # the bar moves: two different step counts, a step apart
            page.wait_for_function(
                "(prev) => { const m = document.body.innerText.match(/(\\d+)\\/8 steps/);"
                " return m && m[1] !== prev && m[1] !== '0'; }",
                arg=seen[-1] if seen else "",
                timeout=30000,
            )
            seen.append(re.search(r"(\d+)/8 steps", page.inner_text("body")).group(1))
        assert len(set(seen)) == 2
        page.click("#cancel-btn")

        # the engine stops at the next step: it is free well before the 8 steps would have ended
        wait_for(lambda: engine_idle(app), 2.0, 0.1, "engine free after cancel")
        assert page.locator("#gallery img").count() == 0
    finally:
        app.fault("clear")
    page.fill("#prompt textarea", "history: a blue boat on a lake")
    page.click("#generate-btn")
    page.wait_for_selector("#gallery img", timeout=60000)
    made = httpx.get(app.url + "/api/history?limit=1", headers=api).json()["items"][0]
    assert made["parameters"]["prompt"] == "history: a blue boat on a lake"
    page.fill("#prompt textarea", "something else")
    page.get_by_role("tab", name="History").click()
    page.wait_for_selector("#history-gallery img", timeout=15000)
    page.locator("#history-gallery button.thumbnail-item").first.click(force=True)
    page.wait_for_selector("text=Restored", timeout=10000)
    assert page.input_value("#prompt textarea") == "history: a blue boat on a lake"
    assert made["request_id"] in page.inner_text("#history-info")

    # PNG info: a PNG made here, dropped on the History tab, restores what it was made with
    png = tmp_path / "made-here.png"
    png.write_bytes(httpx.get(app.url + made["image_urls"][0], headers=api).content)
    page.get_by_role("tab", name="Generate").click()
    page.fill("#prompt textarea", "something else again")
    page.get_by_role("tab", name="History").click()
    page.locator("#png-info input[type=file]").set_input_files(str(png))
    page.wait_for_selector("text=Restored from the PNG", timeout=15000)
    assert page.input_value("#prompt textarea") == "history: a blue boat on a lake"
    assert f"seed {made['seed']}" in page.inner_text("#history-info")
    # and a PNG from elsewhere is told, not half-restored
    other = tmp_path / "elsewhere.png"
    Image.new("RGB", (16, 16)).save(other)
    page.locator("#png-info input[type=file]").set_input_files(str(other))
    page.wait_for_selector("text=carries no zimage-serve parameters", timeout=15000)
    assert page.input_value("#prompt textarea") == "history: a blue boat on a lake"
    page.close()


def test_screenshot_of_the_generate_tab(app, browser, tmp_path):
    """A full-page screenshot; with UPDATE_SCREENSHOTS=1 it refreshes docs/ui-generate.png (README)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    log_in(page, app.url)
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    page.fill("#prompt textarea", "A lighthouse on a cliff at dusk, waves, cinematic light")
    page.click("#preset-512x512")
    page.click("#generate-btn")
    page.wait_for_selector("#gallery img", timeout=60000)
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    out = REPO / "docs" / "ui-generate.png" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / "ui.png"
    box = page.locator("#gallery img").first.bounding_box()
    page.screenshot(path=str(out), full_page=True)
    page.close()
    # The generated image is in the picture (not a blank or a spinner): the gallery's cell holds
    # the many colours of a random-weight model's output, a blank region holds a handful.
    shot = Image.open(out).convert("RGB")
    cell = shot.crop(
        (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
    )
    assert box["width"] > 50 and len(cell.getcolors(maxcolors=2**20) or []) > 500


def test_gradio_client_calls_the_generate_event(app):
    from gradio_client import Client

    client = Client(app.url + "/", verbose=False, headers={"authorization": f"Bearer {TOKEN}"})
    # (the last-seed State is UI-only; API clients get the gallery and the info text)
    gallery, info = client.predict("a lighthouse", "", 256, 320, 2, 0, 7, False, 2, api_name="/generate")
    assert "`7`" in info and len(gallery) == 2
    assert Image.open(gallery[0]["image"]).size == (256, 320)
    assert "256×320" in info


def test_image_to_image_from_the_ui(app, browser, tmp_path):
    """The "Start from an image" tabs send the API's own fields: an upload in Image to image makes
    an img2img generation (the PNG and the history say so); Inpaint without a picture is told."""
    api = {"authorization": f"Bearer {TOKEN}"}
    start = tmp_path / "start.png"
    Image.new("RGB", (300, 200), (200, 60, 20)).save(start)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    log_in(page, app.url)
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    page.fill("#prompt textarea", "img2img: the same scene at night")
    page.click("#preset-512x512")
    page.get_by_text("Start from an image").click()
    page.locator("#init-image input[type=file]").set_input_files(str(start))
    page.wait_for_selector("#init-image img", timeout=15000)
    page.locator("#mode").get_by_text("Image to image").click()
    page.click("#generate-btn")
    page.wait_for_selector("#gallery img", timeout=60000)
    made = httpx.get(app.url + "/api/history?limit=1", headers=api).json()["items"][0]
    assert made["parameters"]["prompt"] == "img2img: the same scene at night"
    assert made["parameters"]["mode"] == "img2img" and made["parameters"]["strength"] == 0.6
    # Inpaint with nothing to paint on: the user is told what to do, nothing is queued (the mask
    # from the editor's strokes is tests/app/test_png.py's; inpainting itself, the API tests')
    page.get_by_role("tab", name="Inpaint").click()
    page.locator("#mode").get_by_text("Inpaint").click()
    page.click("#generate-btn")
    page.wait_for_selector("text=Upload the image to paint on", timeout=15000)
    page.close()


def test_loras_picked_in_the_ui_are_in_the_request_each_at_its_own_scale(app, browser, tmp_path):
    """The LoRA rows list lora_dir's files; the ones picked go into the request (the info line and
    the PNG's parameters say so), each at the scale of its own row; a PNG restores both rows."""
    api = {"authorization": f"Bearer {TOKEN}"}
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    log_in(page, app.url)
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    page.fill("#prompt textarea", "lora: a paper boat")
    page.click("#preset-512x512")
    page.locator("#lora-section").get_by_text("LoRA").first.click()
    for row, name in enumerate(("ink", "film")):
        page.locator(f"#lora-picker-{row} input").click()
        page.locator(f"#lora-picker-{row}").get_by_role("option", name=name, exact=True).click()
    scale = page.locator("#lora-scale-1 input[type=number]")
    scale.fill("0.5")
    scale.press("Enter")
    page.click("#generate-btn")
    page.wait_for_selector("#generation-info >> text=film ×0.5", timeout=60000)
    assert "ink ×1" in page.inner_text("#generation-info")
    made = httpx.get(app.url + "/api/history?limit=1", headers=api).json()["items"][0]
    assert made["parameters"]["prompt"] == "lora: a paper boat"
    assert made["parameters"]["loras"] == [{"name": "ink", "scale": 1.0}, {"name": "film", "scale": 0.5}]
    # a new visit (nothing picked): the PNG dropped on PNG info restores the LoRAs with the rest
    png = tmp_path / "lora.png"
    png.write_bytes(httpx.get(app.url + made["image_urls"][0], headers=api).content)
    page.goto(app.url + "/")
    page.wait_for_selector("#generate-btn:not([disabled])", timeout=30000)
    page.locator("#lora-section").get_by_text("LoRA").first.click()
    assert "ink" not in page.input_value("#lora-picker-0 input")
    page.get_by_role("tab", name="History").click()
    page.locator("#png-info input[type=file]").set_input_files(str(png))
    page.wait_for_selector("text=Restored from the PNG", timeout=15000)
    page.get_by_role("tab", name="Generate").click()
    assert page.input_value("#prompt textarea") == "lora: a paper boat"
    assert page.input_value("#lora-picker-0 input") == "ink"
    assert page.input_value("#lora-picker-1 input") == "film"
    assert float(page.input_value("#lora-scale-1 input[type=number]")) == 0.5
    assert page.input_value("#lora-picker-2 input") in ("", "(none)")
    page.close()
