"""The person's page in headless Chromium (Debian's `chromium`, driven by Playwright), as a person
uses it: sign in, see their style, switch an album off and watch the version change, generate an
image and find it in the gallery, make a clip from a picture and play it, allow an application and
revoke it. Screenshots are kept under
test-artifacts/screenshots/ (STYLESTREAM_TEST_ARTIFACTS moves them)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from stylestream.demo.synthetic import make_library
from stylestream.transforms.device import DevicePhoto, contributions
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.pixels import DecodeLimits

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("STYLESTREAM_CHROMIUM", "/usr/bin/chromium"))
# As root Chromium needs --no-sandbox; without the background-networking switches it keeps trying to
# reach Google's hosts, which a closed network refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(os.environ.get("STYLESTREAM_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
                   ) / "screenshots"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make browser` installs Debian's chromium package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def version_of(page: Page) -> int:
    return int(re.search(r"version (\d+)", page.locator("#version").inner_text())[1])


def test_a_person_steers_their_style_on_the_page(api_system, browser):
    page = browser.new_page(viewport=PHONE)
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.set_default_timeout(60_000)
    # 1. Sign in with the token the photo service gave them
    page.goto(api_system.url)
    page.fill("#token", api_system.token("ana"))
    page.click("#sign-in-form button")
    expect(page.locator("#version")).to_contain_text("version")
    expect(page.locator("#palette .swatch")).to_have_count(3)
    expect(page.locator("#album-list input[data-album]")).to_have_count(2)
    expect(page.locator("#chart circle").first).to_be_attached()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    shot(page, "1-signed-in-phone")
    before = version_of(page)

    # 2. Switch the office album off: a consent event, ingestion, a new version on the page
    page.locator("#album-list input[data-album=office]").uncheck()
    expect(page.locator("#message")).to_contain_text("Your style is now version")
    after = version_of(page)
    assert after > before
    expect(page.locator("#album-list input[data-album=office]")).not_to_be_checked()
    shot(page, "2-album-switched-off")

    # 3. Generate with a stronger style; the image appears in the gallery with the version it used
    page.locator("#strength").fill("1.5")
    page.fill("#prompt", "two stars on the left")
    page.click("#generate-button")
    figure = page.locator("#gallery figure").first
    expect(figure.locator("figcaption")).to_contain_text(f"style v{after}")
    expect(figure.locator("img")).to_have_js_property("complete", True)
    assert figure.locator("img").evaluate("img => img.naturalWidth") == 64
    shot(page, "3-generated")

    # 4. Allow an application, use its token, revoke it from the page: it stops working at once
    page.fill("#grant-name", "print shop")
    page.click("#grant-form button[type=submit]")
    expect(page.locator("#new-token")).to_be_visible()
    token = page.locator("#new-token-value").inner_text()
    style = requests.get(f"{api_system.url}/v1/me/style", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert style.status_code == 200 and style.json()["version"] == after
    page.locator("#grant-list li", has_text="print shop").locator("button", has_text="Revoke").click()
    expect(page.locator("#grant-list li", has_text="print shop")).to_contain_text("revoked")
    gone = requests.get(f"{api_system.url}/v1/me/style", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "token_revoked"
    shot(page, "4-grant-revoked")

    # 5. The same page on a wide screen
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, "5-desktop")
    page.close()
    assert errors == []


def test_a_person_makes_a_clip_from_a_picture_and_plays_it_on_the_page(api_system, browser, tmp_path):
    page = browser.new_page(viewport=PHONE)
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.set_default_timeout(90_000)
    page.goto(f"{api_system.url}/#token={api_system.token('cleo')}")
    expect(page.locator("#clips")).to_be_visible()
    start = tmp_path / "harbour.png"
    Image.new("RGB", (120, 80), (30, 90, 160)).save(start)
    page.fill("#clip-prompt", "a harbour at dusk")
    page.select_option("#clip-seconds", "1")
    page.select_option("#clip-motion", "pan_left")
    page.set_input_files("#clip-start", str(start))
    page.click("#clip-button")
    expect(page.locator("#message")).to_contain_text("Done: a 1 s clip")
    player = page.locator("#clip-gallery figure video").first
    # Chromium decodes the H.264 MP4 (from a blob: URL the page's policy allows) and draws its frames
    duration, drawn, width = player.evaluate("""async (v) => {
        if (v.readyState < 2) await new Promise((ok, bad) => { v.onloadeddata = ok; v.onerror = () => bad(v.error); });
        await v.play();
        await new Promise((r) => setTimeout(r, 1500));
        return [v.duration, v.getVideoPlaybackQuality().totalVideoFrames, v.videoWidth]; }""")
    assert duration > 0 and drawn > 0 and width == 64, (duration, drawn, width)
    expect(page.locator("#clip-gallery figcaption").first).to_contain_text("a harbour at dusk · 1 s · style v")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # long facet names too
    shot(page, "7-clip")
    page.close()
    assert errors == []


def test_photos_analysed_on_a_device_are_marked_and_switched_off_like_any_other(api_system, browser, clip, tmp_path):
    photos = make_library(tmp_path / "lib", {"devi": [("trail", "green", 2), ("home", "warm", 2)]})
    handler = OpenClipImageHandler(clip, device="cpu")
    made = contributions([DevicePhoto(p.photo_id, p.album_id, p.path.read_bytes(), p.taken_at) for p in photos],
                         clip, DecodeLimits(), handler, handler.load_model())
    headers = {"Authorization": f"Bearer {api_system.token('devi')}"}
    sent = requests.post(f"{api_system.url}/v1/me/contributions", headers=headers, timeout=30,
                         json={"contributions": [c.model_dump(mode="json") for c in made]})
    assert sent.status_code == 202, sent.text
    deadline = time.monotonic() + 90
    while requests.get(f"{api_system.url}/v1/me/style", headers=headers, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "ingestion never counted the device's contributions"
        time.sleep(0.5)
    page = browser.new_page(viewport=PHONE)
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.set_default_timeout(60_000)
    page.goto(f"{api_system.url}/#token={api_system.token('devi')}")
    trail = page.locator("#album-list li", has_text="trail")
    expect(trail).to_contain_text("2 photos (all analysed on your device)")
    expect(page.locator("#version")).to_contain_text("4 photos")
    trail.locator("input").uncheck()
    expect(page.locator("#message")).to_contain_text("Your style is now version")
    expect(page.locator("#version")).to_contain_text("2 photos")
    shot(page, "8-device-photos")
    page.close()
    assert errors == []


def test_an_applications_token_shows_only_what_its_grant_allows(api_system, browser):
    grant = requests.post(f"{api_system.url}/v1/me/grants", json={"name": "frame", "scopes": ["style:read"]},
                          headers={"Authorization": f"Bearer {api_system.token('ben')}"}, timeout=30).json()
    page = browser.new_page(viewport=PHONE)
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.goto(f"{api_system.url}/#token={grant['token']}")  # the link signs in and leaves the address bar
    expect(page.locator("#palette .swatch")).to_have_count(3)
    expect(page.locator("#chart circle")).to_have_count(1)  # Ben has one version
    for hidden in ("#generate", "#grants", "#data"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.locator("#album-list input[data-album=walks]")).to_be_disabled()
    assert "token" not in page.url
    shot(page, "6-application-token")
    page.close()
    assert errors == []


def test_a_wrong_token_is_refused_on_the_page(api_system, browser):
    page = browser.new_page(viewport=PHONE)
    page.goto(api_system.url)
    page.fill("#token", "not-a-token")
    page.click("#sign-in-form button")
    expect(page.locator("#message")).to_contain_text("Could not sign in")
    expect(page.locator("#signed-in")).to_be_hidden()
    page.close()
