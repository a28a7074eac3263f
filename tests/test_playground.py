"""The web playground at ``/``: Debian's Chromium, driven by playwright, edits a real photo through the service.

One pass through the page as a user would: token, upload, a positive and a negative point on the canvas, Run edit,
the before/after and the lineage, Copy as spec (a valid EditSpec), and an API error shown in the status line.
A screenshot of the finished page goes to ``test-artifacts/playground.png``.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from promptpaint.config import EditSpec, build_spec
from promptpaint.samples import make_photos

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Playwright's own browser download cannot work here (no network): Debian's Chromium, kept off the network.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EDIT_TIMEOUT_MS = 600_000  # the whole pipeline on CPU, first request loads the models


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) to run the playground test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


# Chromium does not show a multipart body holding a file to playwright, so a spy records the text fields of every
# form the page posts (window.__posted: [{url, fields}]) and passes the call on unchanged.
FETCH_SPY = """
const realFetch = window.fetch;
window.__posted = [];
window.fetch = (url, init) => {
  if (init && init.body instanceof FormData) {
    const fields = {};
    for (const [k, v] of init.body.entries()) fields[k] = typeof v === "string" ? v : `<file ${v.size} bytes>`;
    window.__posted.push({ url: String(url), fields });
  }
  return realFetch(url, init);
};
"""


def _decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))


def drive_playground(browser, url: str, token: str, tmp_path: Path, screenshot: Path) -> None:
    """The whole user session; a plain function so it can also be pointed at a stand-in server while developing."""
    from playwright.sync_api import expect

    photo = make_photos(tmp_path / "photos", 1, (0.05, 0.1), seed=1)[0]
    with Image.open(photo) as im:
        width, height = im.size

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    page.add_init_script(FETCH_SPY)
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    try:
        # 1. The page and its assets load from the service itself (no CDN).
        page.goto(url + "/")
        expect(page).to_have_title(re.compile("promptpaint"))
        expect(page.locator("#status")).to_contain_text("token")

        # 2. The token: kept for the session, and /v1/models fills the LoRA select and the defaults.
        page.fill("#token", token)
        with page.expect_response("**/v1/models") as models_info:
            page.press("#token", "Tab")
        expect(page.locator("#status")).to_have_class("ok", timeout=60_000)
        served = models_info.value.json()
        assert page.evaluate("sessionStorage.getItem('promptpaint.token')") == token
        assert page.locator("#lora option").all_inner_texts() == ["none", *served["loras"]]
        defaults = served["defaults"]
        assert page.input_value("#prompt") == defaults["prompt"]
        assert int(page.input_value("#steps")) == defaults["steps"]

        # 3. Upload: the canvas holds the image at full resolution.
        page.set_input_files("#file", str(photo))
        expect(page.locator("#status")).to_contain_text(f"{width}×{height}")
        assert page.evaluate(
            "(() => { const c = document.getElementById('canvas'); return [c.width, c.height]; })()"
        ) == [width, height]

        # 4. One positive point (click) and one negative point (shift-click), in CSS pixels of the scaled canvas.
        box = page.locator("#canvas").bounding_box()
        assert box and box["width"] > 50, box
        clicks = [(0.45, 0.55, []), (0.8, 0.2, ["Shift"])]
        for fx, fy, modifiers in clicks:
            page.click("#canvas", position={"x": box["width"] * fx, "y": box["height"] * fy}, modifiers=modifiers)
        expect(page.locator("#prompt-count")).to_contain_text("1 positive, 1 negative")

        # 5. Run edit: the request carries the points in image pixels; the result replaces nothing silently.
        with page.expect_response("**/v1/edit", timeout=EDIT_TIMEOUT_MS) as edit_info:
            page.click("#run-edit")
        posted = page.evaluate("window.__posted")
        assert [p["url"] for p in posted] == ["/v1/edit"], posted
        fields = posted[0]["fields"]
        points = json.loads(fields["points"])
        assert [p[2] for p in points] == [1, 0]
        for (x, y, _), (fx, fy, _) in zip(points, clicks, strict=True):
            assert abs(x - fx * width) <= 2 + width / box["width"], (x, fx * width)
            assert abs(y - fy * height) <= 2 + height / box["height"], (y, fy * height)
        assert fields["format"] == "json" and fields["image"].startswith("<file ")
        assert edit_info.value.ok, edit_info.value.text()
        edited = edit_info.value.json()
        expect(page.locator("#result-img")).to_have_attribute("src", re.compile("^data:image/png"))
        expect(page.locator("#status")).to_have_class("ok")
        src = page.get_attribute("#result-img", "src") or ""
        assert src == "data:image/png;base64," + edited["image_b64"], "the page must show the image it was sent"
        assert _decode_png(src).size == (width, height), "the edited image must keep the input's size"
        expect(page.locator("#before-img")).to_be_visible()
        # The lineage as sent, digit for digit (its 63-bit seed does not fit a JavaScript number).
        lineage = json.loads(page.inner_text("#lineage"))
        assert lineage == edited["lineage"]
        # The clicked points prompted SAM; the detector was not asked.
        assert {"segment", "inpaint"} <= set(lineage["models"]) and "detect" not in lineage["models"], lineage

        # 6. Copy as spec: the YAML is a valid EditSpec with the page's settings, also on the clipboard.
        page.fill("#seed", "1234")
        page.click("#copy-spec")
        expect(page.locator("#spec-yaml")).to_be_visible()
        text = page.inner_text("#spec-yaml")
        spec = build_spec(EditSpec, yaml.safe_load(text), source="playground spec")
        queries = [q.strip() for q in page.input_value("#queries").split(",") if q.strip()]
        assert spec.detect.texts == queries
        assert spec.inpaint.seed == 1234
        assert spec.inpaint.prompt == page.input_value("#prompt")
        assert spec.inpaint.steps == int(page.input_value("#steps"))
        assert not spec.inpaint.lora
        if served["loras"]:  # a chosen LoRA goes into the spec as <store>/<id>
            page.select_option("#lora", served["loras"][0])
            page.click("#copy-spec")
            expect(page.locator("#spec-yaml")).to_contain_text("lora:")
            text = page.inner_text("#spec-yaml")
            (ref,) = yaml.safe_load(text)["inpaint"]["lora"]
            assert ref["path"].endswith("/" + served["loras"][0]) and ref["scale"] == 1.0, ref
        assert page.evaluate("navigator.clipboard.readText()") == text

        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        assert errors == [], errors

        # 7. An API error is shown, not swallowed: steps=0 fails validation (422) before any model runs.
        page.fill("#steps", "0")
        page.click("#run-edit")
        expect(page.locator("#status")).to_have_class("error", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("422")
        expect(page.locator("#status")).to_contain_text("steps")
        # Chromium logs the failed request itself; nothing else may have gone wrong.
        assert all("status of 422" in e for e in errors), errors
    finally:
        context.close()


@pytest.mark.heavy
def test_playground_edits_a_photo(browser, serve_url, tmp_path: Path) -> None:
    drive_playground(browser, serve_url.url, serve_url.token, tmp_path, ARTIFACTS / "playground.png")
