"""The app in a real browser: Debian's chromium driven by Playwright (never a downloaded browser).

Loads the page, fills it from the examples, uploads an image, trains (reloading the page mid-training to
check it re-attaches to the same job), merges, generates and compares, and saves a screenshot of each tab
to `test-artifacts/` (look at them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# A step can take minutes on a loaded 2-core machine (the browser, the server and its jobs share the cores): a
# wait fails only when the page is really stuck.
TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def url(launched_app):
    return launched_app[0]


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: apt-get install -y chromium"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(url)
        yield pg
        browser.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"tab-{name}.png"), full_page=True)


def gallery_images(page, elem_id: str):
    return page.locator(f"#{elem_id} img")


def test_every_tab_upload_train_reload_merge_generate(page, url, tmp_path):
    page.get_by_text("ZipQDoRA Studio").first.wait_for()
    assert "Base model" in page.content() and "mini" in page.content()
    tabs = [t.inner_text().strip() for t in page.get_by_role("tab").all()]
    assert tabs[:6] == ["Subject", "Style", "Train", "Merge", "Generate", "Compare"], tabs

    # A bad upload: the reason reaches the page as a message, never a traceback.
    (tmp_path / "notes.png").write_text("not an image")
    page.locator("#subject_files input[type=file]").set_input_files([str(tmp_path / "notes.png")])
    page.locator("#subject_files").get_by_text("notes").first.wait_for()
    page.get_by_role("button", name="Use these subject images").click()
    page.locator("#subject_notes").get_by_text("No usable images").wait_for()
    assert "not an image file" in page.content() and "Traceback" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "bad-upload.png"), full_page=True)

    # One click fills Subject and Style from the bundled examples.
    page.get_by_role("button", name="Load examples").click()
    gallery_images(page, "subject_gallery").nth(4).wait_for()
    shot(page, "subject")

    # Upload images by hand in the Style tab (two example files plus one that is not an image).
    open_tab(page, "Style")
    (tmp_path / "readme.png").write_text("not an image")
    uploads = [str(p) for p in sorted((ROOT / "assets/examples/styles/grid").glob("*.png"))[:2]]
    page.locator("#style_files input[type=file]").set_input_files(uploads + [str(tmp_path / "readme.png")])
    page.locator("#style_files").get_by_text("readme").first.wait_for()  # the upload landed in the file list
    page.get_by_role("button", name="Use these style images").click()
    page.get_by_text("2 images ready").wait_for()
    assert "readme.png" in page.content() and "Traceback" not in page.content()
    shot(page, "style")

    # Train both, reload mid-training, and find the same jobs' progress on the fresh page.
    open_tab(page, "Train")
    # Enough subject steps (≈ 15 s on one core) that the reload surely lands mid-training; the style comes after.
    page.locator("#steps input").fill("120")
    page.locator("#style_steps input").fill("30")
    page.get_by_role("button", name="Train", exact=True).click()
    page.locator("#train_status").get_by_text(re.compile(r"Subject\*?\*? · running")).wait_for()
    page.reload()
    open_tab(page, "Train")
    status = page.locator("#train_status")
    status.get_by_text(re.compile(r"step \d+/120")).first.wait_for()
    status.get_by_text(re.compile(r"Style\*?\*? · done")).wait_for()
    assert "Subject · done" in status.inner_text()
    page.wait_for_timeout(1500)  # let the plot and previews draw
    shot(page, "train")

    open_tab(page, "Merge")
    page.locator("#merge_steps input").fill("10")
    page.get_by_role("button", name="Merge", exact=True).click()
    page.locator("#merge_status").get_by_text(re.compile(r"Merge\*?\*? · done")).wait_for()
    page.wait_for_timeout(1000)
    shot(page, "merge")

    open_tab(page, "Generate")
    assert page.get_by_label("Prompt").first.input_value() == "a photo of sks heart in zkz style"
    page.get_by_role("button", name="Generate", exact=True).click()
    gallery_images(page, "gen_gallery").first.wait_for()
    page.locator("#gen_note").get_by_text("merged adapter").wait_for()
    shot(page, "generate")

    open_tab(page, "Compare")
    page.get_by_role("button", name="Compare", exact=True).click()
    page.locator("#cmp_scores").get_by_text("direct merge").first.wait_for()
    page.wait_for_timeout(500)
    shot(page, "compare")
    assert "Traceback" not in page.content()

    # The one-click flow (on this session's images): train both, merge, generate; the result shows up top.
    # It takes its step counts from the Train and Merge tabs: keep them short here.
    open_tab(page, "Train")
    page.locator("#steps input").fill("40")
    page.locator("#style_steps input").fill("40")
    page.get_by_role("button", name="Run whole flow").click()
    page.locator("#flow_status").get_by_text("Whole flow done").wait_for()
    gallery_images(page, "flow_gallery").nth(3).wait_for()
    page.screenshot(path=str(ARTIFACTS / "flow-done.png"), full_page=True)
    assert len(list(ARTIFACTS.glob("tab-*.png"))) >= 6
