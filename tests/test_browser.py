"""End to end in a real browser: `streamlit run app.py` on a loopback port, driven by Playwright in
Debian's headless Chromium (no browser download; `.ci/install-browser.sh` installs it).

Calibration → ρ map (click a cell) → spectra → ranks (allocate) → export, on a tiny saved Llama;
screenshots go to tests/artifacts/. Skipped when Chromium or Playwright is missing, except under
CI or FASC_REQUIRE_BROWSER=1, where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fasc.app.state import DEFAULT_SHARE

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("FASC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    required = bool(os.environ.get("CI")) or os.environ.get("FASC_REQUIRE_BROWSER") == "1"
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the playwright Python package is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        problems.append(f"{CHROMIUM} is missing (run .ci/install-browser.sh)")
    if problems:
        msg = "browser test needs " + "; ".join(problems)
        if required:
            pytest.fail(msg + " — required because CI / FASC_REQUIRE_BROWSER is set")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved_llama, tmp_path_factory):
    """A streamlit server on the tiny model; yields (url, tmp folder)."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("browser")
    for name in ("ckpt-000", "ckpt-100"):  # two "training checkpoints" of the tiny model
        shutil.copytree(saved_llama / "model", tmp / "checkpoints" / name)
    (tmp / "training_log.json").write_text(json.dumps({"checkpoints": [
        {"name": "ckpt-000", "percent": 0, "step": 0, "recall": 0.0},
        {"name": "ckpt-100", "percent": 100, "step": 40, "recall": 0.5}]}))
    port = _free_port()
    env = dict(os.environ, FASC_APP_MODEL=str(saved_llama / "model"), FASC_APP_DEVICE="cpu", FASC_CACHE=str(tmp / "cache"),
               FASC_APP_OUT=str(tmp / "out"), FASC_APP_CHECKPOINTS=str(tmp / "checkpoints"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--global.developmentMode", "false"]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("streamlit did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        yield pg
        browser.close()


def _idle(page) -> None:
    """Wait until the script run finished (Streamlit shows a 'Running…' status widget meanwhile)."""
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " const state = app ? app.getAttribute('data-test-script-state') : 'initial';"
        " return state !== 'initial' && state !== 'running' && state !== 'rerunRequested'"
        " && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }", timeout=TIMEOUT_MS)
    page.wait_for_timeout(200)


def _shot(page, name: str) -> None:
    """Screenshot of the whole page: the viewport grows to the height of Streamlit's scrolling main area."""
    vp = page.viewport_size
    h = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                      " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": vp["width"], "height": max(vp["height"], min(int(h) + 40, 6000))})
    page.wait_for_timeout(400)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(vp)


def _no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator(
        "[data-testid='stException']").first.inner_text()


def _wait_text(page, text: str) -> None:
    """Wait for text anywhere in the DOM (also inside SVG charts, which locators' visibility skips)."""
    page.wait_for_function("t => document.body.textContent.includes(t)", arg=text, timeout=TIMEOUT_MS)


def _selected(page) -> str:
    return page.locator("[data-testid='stMarkdown']", has_text="Selected:").first.inner_text()


def _goto(page, title: str) -> None:
    page.get_by_role("link", name=title).first.click()
    page.get_by_role("heading", name=title).first.wait_for()
    _idle(page)


def _views_visible_at(page, width: int) -> None:
    """At `width` px the ρ map's six "Show" options are all on screen, none cut (they wrap in their
    column); a screenshot of the page at that width goes to the artifacts."""
    vp = page.viewport_size
    page.set_viewport_size({"width": width, "height": vp["height"]})
    page.wait_for_timeout(500)
    try:
        _shot(page, f"2_rho_map_{width}")
        group = page.locator("[data-testid='stButtonGroup']").first
        gbox = group.bounding_box()
        buttons = group.locator("button")
        assert buttons.count() == 6
        for i in range(buttons.count()):
            b = buttons.nth(i)
            box = b.bounding_box()
            name = b.inner_text()
            assert box and box["width"] > 0 and 0 <= box["x"] and box["x"] + box["width"] <= width, (name, box)
            assert box["x"] + box["width"] <= gbox["x"] + gbox["width"] + 1, (name, box, gbox)   # inside its column
            assert b.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), f"{name!r} is cut"
    finally:
        page.set_viewport_size(vp)


def test_calibrate_heatmap_ranks_export(server, page):
    url, tmp = server
    page.goto(url)
    page.get_by_role("heading", name="Model & calibration").wait_for()
    _idle(page)
    _no_exception(page)
    page.get_by_text("Not calibrated with these settings yet").wait_for()

    # 1. calibration (progress bar, then the result; stored in the cache)
    page.get_by_role("button", name="Run calibration").click()
    page.get_by_text("stored in the cache").wait_for()
    _idle(page)
    _no_exception(page)
    assert any((tmp / "cache").iterdir())
    assert "LlamaForCausalLM · 2 layers · 14 modules" in page.locator("[data-testid='stSidebar']").inner_text()
    _shot(page, "1_calibration")

    # 2. ρ map: heatmap drawn; clicking a cell selects that module
    _goto(page, "ρ map")
    heat = page.locator(".js-plotly-plot").first
    heat.wait_for()
    _no_exception(page)
    target = "model.layers.0.mlp.down_proj"  # not the default selection (that is the highest-ρ module)
    assert target not in _selected(page)
    box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    # the heatmap is 2 layers × 7 kinds (q k v o gate up down): click the cell of layer 0, down
    page.mouse.click(box["x"] + box["width"] * (6.5 / 7), box["y"] + box["height"] * (0.5 / 2))
    page.wait_for_timeout(500)
    _idle(page)
    assert target in _selected(page)
    _shot(page, "2_rho_map")
    _views_visible_at(page, 1280)

    # switch the view to predicted ΔL at the current ranks
    page.locator("[data-testid='stButtonGroup'] button", has_text="Predicted ΔL at current ranks").click()
    _idle(page)
    assert page.get_by_text("Predicted ΔL per module at the current ranks").first.is_visible()

    # 3. spectra of the selected module
    _goto(page, "Spectra")
    page.locator(".js-plotly-plot").nth(2).wait_for()
    assert target in page.locator(".js-plotly-plot .gtitle").first.text_content()
    _no_exception(page)
    _shot(page, "3_spectra")

    # 4. ranks: allocate automatically at 30 % and see the totals follow
    _goto(page, "Ranks")
    slider = page.get_by_role("slider", name="Parameter budget (share kept)")
    slider.focus()
    for _ in range(round((DEFAULT_SHARE - 0.3) / 0.05)):  # the default budget → 0.30 in steps of 0.05
        page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(1000)  # the slider sends its value after a debounce; on a loaded machine that rerun
    _idle(page)                  # may not have started 300 ms later, and Allocate would then run at the default
    page.get_by_role("button", name="Allocate").click()
    _idle(page)
    kept = page.locator("[data-testid='stMetric']").filter(has_text="Parameters kept").inner_text()
    assert "30." in kept or "29." in kept, kept
    page.get_by_role("button", name="Evaluate").click()
    _wait_text(page, "asvd (same budget, greedy)")  # the evaluation chart's points (the baseline is spread like the plan)
    _idle(page)
    _no_exception(page)
    assert page.get_by_role("button", name="Cancel").count() == 0   # gone once the evaluation ended
    _shot(page, "4_ranks")

    # 5. export (factored) into FASC_APP_OUT
    _goto(page, "Export")
    page.get_by_role("button", name="Export").click()
    page.get_by_text("Wrote ").wait_for()
    _idle(page)
    _no_exception(page)
    assert page.get_by_role("button", name="Cancel").count() == 0   # gone once the export ended
    outs = list((tmp / "out").iterdir())
    assert len(outs) == 1 and (outs[0] / "fasc_config.json").is_file()
    cfg = json.loads((outs[0] / "fasc_config.json").read_text())
    assert cfg["method"] == "fasc" and cfg["calibration"] and not cfg["merged"]
    assert page.get_by_role("button", name="Download fasc_config.json").is_visible()
    _shot(page, "5_export")

    # 6. knowledge over training: ρ map of the last checkpoint beside its recall from the log
    _goto(page, "Knowledge over training")
    page.locator(".js-plotly-plot").nth(1).wait_for()
    _no_exception(page)
    assert "50.0%" in page.locator("[data-testid='stMetric']").filter(has_text="Fact recall").inner_text()
    _wait_text(page, "ckpt-100 (mean ρ")
    _shot(page, "6_training")


def test_knowledge_map_and_generation(server, page):
    """After the click-through above (calibrated, plan allocated): measure the knowledge map on the
    built-in probe, then complete prompts side by side on the Ranks page."""
    url, tmp = server
    _goto(page, "ρ map")
    page.locator("[data-testid='stButtonGroup'] button", has_text="Measured knowledge loss").click()
    _idle(page)
    page.get_by_role("button", name="Measure the knowledge map").click()
    page.get_by_text("Does a statistic say where facts live?").wait_for()
    _idle(page)
    _no_exception(page)
    _wait_text(page, "Measured with only this module compressed")  # the heatmap's title
    assert list((tmp / "cache").glob("*/kmap-*.safetensors"))
    assert page.get_by_text("One fact at a time").first.is_visible()
    _shot(page, "7_knowledge_map")

    _goto(page, "Ranks")
    page.get_by_role("button", name="Generate").click()
    _wait_text(page, "(same budget)")   # the three columns' headers: uncompressed | plan | baseline
    _idle(page)
    _no_exception(page)
    assert page.get_by_role("button", name="Cancel").count() == 0   # the run ended: no Cancel left
    # each column holds a block per prompt: the prompt and a finished continuation (a running one ends in '…')
    first = page.get_by_label("Prompts (one per line)").input_value().splitlines()[0].strip()
    blocks = [t for t in page.locator("[data-testid='stMarkdown']").all_inner_texts() if t.startswith(first)]
    assert len(blocks) == 3 and not any(b.rstrip().endswith("…") for b in blocks), blocks
    _shot(page, "8_generations")
