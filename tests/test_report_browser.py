"""Open the rendered report in headless Chromium: tables present, every image loaded, a screenshot saved.

Needs the Debian packages chromium + chromium-driver and the PyPI package selenium (.ci/install-browser.sh).
Skipped when they are missing on a developer machine; in CI (env CI set) a missing browser is a failure.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from report_fixtures import make_run

from mmla.tasks import DATASETS
from mmla.report import build_report

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1300,1000",
)


def _require(found, what: str):
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI (see .ci/install-browser.sh)")
        pytest.skip(f"{what} not installed")
    return found


@pytest.fixture
def browser(tmp_path):
    chromium = _require(shutil.which("chromium") or shutil.which("chromium-browser"), "chromium")
    chromedriver = _require(shutil.which("chromedriver"), "chromedriver (Debian chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require(None, "the selenium Python package")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # A fresh profile per test: no state from earlier runs, nothing written to the home directory.
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-profile-')}")
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _save_screenshot(driver, tmp_path: Path) -> Path:
    # Grow the window to the page height (Chromium caps textures near 16k px) to capture the whole report.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1300, min(int(height) + 100, 16000))
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot))
    if os.environ.get("MMLA_SCREENSHOT_DIR"):
        target = Path(os.environ["MMLA_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "report.png")
    return shot


def test_report_renders_in_chromium(browser, tmp_path):
    runs = tmp_path / "runs"
    zero = make_run(runs, "Qwen2-1.5B zero-shot", datasets=DATASETS, skill=0.4, seed=0)
    sft = make_run(runs, "Qwen2-1.5B SFT", setting="sft", datasets=DATASETS, skill=0.7, seed=1, train_log=True)
    html = build_report([zero, sft], tmp_path / "report")

    browser.get(html.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"

    # Tables: overview, comparison, one per run; the run table shows our MELD ACC from metrics.json.
    tables = browser.find_elements("css selector", "section.run table:not(.kv)")
    assert len(tables) == 2
    assert len(browser.find_elements("css selector", "table")) >= 4
    meld_acc = json.loads((zero / "metrics.json").read_text())["per_dataset"]["MELD"]["ACC"]
    meld_row = browser.find_element("xpath", "//section[1]//tr[td[1]='MELD']")
    assert f"{meld_acc:.2f}" in meld_row.text
    assert "43.56" in meld_row.text  # the paper's Qwen2-1.5B zero-shot MELD ACC

    # Every image decoded: comparison + per run (ACC, dimensions, [training], 12 confusion matrices) + the two
    # runs' confusion matrices side by side (12 datasets x 2).
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    assert len(images) == 1 + (2 + 12) + (3 + 12) + 2 * 12
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, f"images that did not load: {broken}"

    # Intervals: a 95% CI column holding metrics.json's interval, whiskers on the ACC figure (its legend says so
    # only when they are drawn: checked on the PNG's size is not enough, so the figure's caption names them).
    ci = json.loads((zero / "metrics.json").read_text())["per_dataset"]["MELD"]["ci95"]["ACC"]
    assert f"{ci[0]:.2f}–{ci[1]:.2f}" in meld_row.text
    assert "whiskers" in browser.find_element("xpath", "//section[contains(@class,'run')]//figcaption").text
    # The paper mark: a paper figure outside our interval carries it, with the caveat beside the table.
    metrics = json.loads((zero / "metrics.json").read_text())["per_dataset"]
    mosi = metrics["MOSI"]
    assert not mosi["ci95"]["ACC"][0] <= 80.17 <= mosi["ci95"]["ACC"][1]  # the paper's MOSI ACC, far above ours
    mosi_row = browser.find_element("xpath", "//section[contains(@class,'run')][1]//tr[td[1]='MOSI']")
    assert "80.17 ◆" in mosi_row.text
    assert browser.find_elements("css selector", "section.run td.paper.mark")
    notes = browser.find_element("css selector", "section.run .notes").text
    assert "outside this run's 95% interval" in notes and "checkpoint revision or hardware" in notes
    assert "not a proof of error" in notes
    # Where the two runs differ: per-class F1 differences with intervals, confusion matrices side by side.
    pair = browser.find_element("css selector", "section.pair")
    assert "Qwen2-1.5B SFT (B) vs Qwen2-1.5B zero-shot (A)" in pair.text
    classes = pair.find_elements("css selector", "table.perclass tbody tr")
    assert len(classes) > 12
    first = [td.text for td in classes[0].find_elements("tag name", "td")]
    assert first[0] == "MIntRec" and first[6].startswith("[") and first[5][0] in "+-"
    sides = pair.find_elements("css selector", ".figures.sidebyside")
    assert len(sides) == 12 and all(len(s.find_elements("tag name", "img")) == 2 for s in sides)
    left, right = (img.rect for img in sides[0].find_elements("tag name", "img"))
    assert right["x"] > left["x"] + left["width"] - 1 and abs(right["y"] - left["y"]) < 40  # beside, not below

    shot = _save_screenshot(browser, tmp_path)
    assert shot.stat().st_size > 10_000


def test_report_of_a_real_run_in_chromium(browser, tmp_path, data_root):
    """A real `mmla predict` run with the embedded model (score mode, a few rows of 4 datasets)."""
    from mmla.inference import PredictConfig, predict

    run = tmp_path / "smollm2"
    datasets = ["MELD", "MOSI", "MUStARD", "AnnoMi-client"]
    predict(PredictConfig(model="smollm2-135m", data=str(data_root), datasets=datasets, limit=6, mode="score",
                          paper_model="Qwen2-1.5B", out=str(run)), progress=False)
    html = build_report([run], tmp_path / "report")

    browser.get(html.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    ours = json.loads((run / "metrics.json").read_text())["per_dataset"]
    for ds in datasets:
        row = browser.find_element("xpath", f"//section[contains(@class,'run')]//tr[td[1]='{ds}']")
        assert f"{ours[ds]['ACC']:.2f}" in row.text
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    # ACC vs paper, dimensions, the reliability diagram (score mode keeps candidate probabilities), one confusion
    # matrix per dataset
    assert len(images) == 3 + len(datasets)
    assert all(complete and width > 0 for _, complete, width in images), images
    assert any(alt.startswith("reliability diagram") for alt, _, _ in images)
    calibration = browser.find_element("xpath", "//h3[text()='Calibration of the candidate probabilities']/"
                                                "following-sibling::div[1]")
    meld = calibration.find_element("xpath", ".//tr[td[1]='MELD']").text
    assert f"{ours['MELD']['calibration']['ECE']:.2f}" in meld and "equal-width bins" in calibration.text
    _save_screenshot(browser, tmp_path)
