"""The real server: a headless Chromium drives the web page, then a bounded load test.

Both start ``busdx serve`` in a subprocess on a free loopback port. The browser test needs
Debian's Chromium (``.ci/run`` installs it): it is skipped where Chromium is missing, except
in CI, where that is a failure. ``BUSDX_WEB_RUN`` serves another run (e.g. from ``busdx demo``)
and ``BUSDX_SCREENSHOT_DIR`` keeps the screenshot (docs/figures/web-app.png was made so).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import BENCHMARKS, FAST, train_run

sys.path.insert(0, str(BENCHMARKS))
from load_test import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(synthetic_data, tmp_path_factory):
    if os.environ.get("BUSDX_WEB_RUN"):
        return Path(os.environ["BUSDX_WEB_RUN"])
    options = [arg for arg in FAST if arg not in {"--image-size", "32"}] + ["--image-size", "64"]
    return train_run(synthetic_data, tmp_path_factory.mktemp("web") / "run", *options, epochs=1)


@pytest.fixture
def screenshot_dir(tmp_path):
    return Path(os.environ.get("BUSDX_SCREENSHOT_DIR", tmp_path))


def test_browser_upload_shows_probability_and_overlay(run, synthetic_data, screenshot_dir):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    images = sorted((synthetic_data / "malignant").glob("*.png"))[:2]
    with running_server(run) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url)
        expect(page.locator("#status")).to_have_text("Ready.")
        expect(page.locator("#notice")).to_contain_text("not a medical device")
        page.check("#explain")
        page.set_input_files("#files", [str(path) for path in images])
        rows = page.locator("tr.result")
        expect(rows).to_have_count(2)
        expect(page.locator("#status")).to_contain_text("Done: 2 image(s)", timeout=60_000)
        shown = float(rows.nth(0).locator(".prob").inner_text())
        overlays = page.locator("img.overlay")
        expect(overlays).to_have_count(2)
        assert page.evaluate(
            "() => [...document.querySelectorAll('img.overlay')].every(i => i.naturalWidth > 0)"
        )
        label = rows.nth(0).locator("td").nth(3).inner_text()
        screenshot = screenshot_dir / "web-app.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
        with images[0].open("rb") as handle:
            api = httpx.post(
                f"{server.url}/predict", files={"files": (images[0].name, handle)}
            ).json()
    expected = api["predictions"][0]
    assert shown == pytest.approx(expected["probability_malignant"], abs=1e-3)
    assert label == expected["label"]
    assert screenshot.stat().st_size > 10_000
    assert server.exit_code == 0  # clean shutdown on SIGINT


def test_bounded_load_test_has_no_errors(run, tmp_path):
    out = tmp_path / "load.json"
    command = [sys.executable, str(BENCHMARKS / "load_test.py"), "--run", str(run),
               "--requests", "200", "--concurrency", "8", "--time-limit", "300",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["requests"] == 200 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["server_exit_code"] == 0


def test_browser_box_drawing_sends_the_box_and_shows_the_result(
    roi_run, masked_data, screenshot_dir
):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    image = masked_data / "malignant" / "malignant (3).png"  # 256 x 256, shown at 256 x 256
    with running_server(roi_run) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url)
        expect(page.locator("#status")).to_have_text("Ready.")
        page.set_input_files("#files", [str(image)])
        expect(page.locator("#boxer")).to_be_visible()
        expect(page.locator("#classify")).to_be_disabled()
        source = page.locator("#boxsrc")
        expect(source).to_have_js_property("complete", True)
        frame = source.bounding_box()
        scale = frame["width"] / 256
        page.mouse.move(frame["x"] + 60 * scale, frame["y"] + 70 * scale)
        page.mouse.down()
        page.mouse.move(frame["x"] + 120 * scale, frame["y"] + 110 * scale, steps=5)
        page.mouse.move(frame["x"] + 180 * scale, frame["y"] + 160 * scale, steps=5)
        page.mouse.up()
        expect(page.locator("#boxtext")).to_contain_text("x,y,w,h = ")
        box = page.locator("#boxtext").inner_text().split("= ")[1].split(" ")[0]
        page.click("#classify")
        expect(page.locator("#status")).to_contain_text("Done: 1 image(s)", timeout=60_000)
        row = page.locator("tr.result")  # the box shown is the one the server echoes back
        expect(row.locator(".box-used")).to_have_text(f"lesion box {box}")
        shown = float(row.locator(".prob").inner_text())
        screenshot = screenshot_dir / "web-roi.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
        with image.open("rb") as handle:
            api = httpx.post(f"{server.url}/predict", files={"files": (image.name, handle)},
                             data={"box": box}).json()  # fmt: skip
    x, y, w, h = map(int, box.split(","))
    assert abs(x - 60) <= 2 and abs(y - 70) <= 2 and abs(w - 120) <= 2 and abs(h - 90) <= 2
    assert shown == pytest.approx(api["predictions"][0]["probability_malignant"], abs=1e-3)
    assert screenshot.stat().st_size > 10_000
    assert server.exit_code == 0


def test_browser_outlines_the_lesion_and_labels_nothing_out_of_scope(
    mask_run, masked_data, tmp_path, screenshot_dir
):
    """A mask-head model: the scan's row shows the outline over the image, the lesion's
    descriptors and the likelihood category; a 1x1 PNG gets its probability and the reason it
    is out of scope, but no label; the footer states the training counts as text."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    scan = masked_data / "malignant" / "malignant (2).png"
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    with running_server(mask_run) as server, sync_playwright() as playwright:
        with scan.open("rb") as a, tiny.open("rb") as b:
            api = httpx.post(
                f"{server.url}/predict",
                files=[("files", (scan.name, a)), ("files", (tiny.name, b))],
            ).json()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server.url)
        expect(page.locator("#status")).to_have_text("Ready.")
        footer = page.locator("#model").inner_text()
        basis = page.locator("#basis").inner_text()  # how the threshold was chosen, as served
        assert basis == httpx.get(f"{server.url}/model").json()["threshold_basis"]
        assert basis == "chosen for sensitivity 0.95 on validation split"
        page.set_input_files("#files", [str(scan), str(tiny)])
        expect(page.locator("#status")).to_contain_text("Done: 2 image(s)", timeout=60_000)
        rows = page.locator("tr.result")
        scan_row, tiny_row = rows.nth(0), rows.nth(1)
        tiny_label = tiny_row.locator("td").nth(3)
        expect(tiny_label).to_contain_text("no label")
        expect(tiny_label).to_contain_text("too small for a scan")
        expect(tiny_label).not_to_contain_text("malignant")
        expect(tiny_label).not_to_contain_text("benign")
        expect(scan_row.locator(".category")).to_contain_text("not a BI-RADS assessment")
        lesion = api["predictions"][0]["lesion"]
        if lesion is not None:  # drawn where the API says, in the image's pixels
            points = scan_row.locator("polygon").get_attribute("points").split()
            drawn = [[float(v) for v in point.split(",")] for point in points]
            assert drawn == lesion["outline"]
            expect(scan_row.locator(".lesion")).to_contain_text(f"shape {lesion['shape']}")
        page.screenshot(path=str(screenshot_dir / "web-outline.png"), full_page=True)
        browser.close()
    assert api["predictions"][1]["label"] is None and api["predictions"][1]["out_of_scope"]
    assert "{" not in footer and re.search(r"images by split: .*train \d+ benign", footer)
    assert server.exit_code == 0
