"""The docs a newcomer reads stay true.

- Every `fasc …` command in a fenced block of README.md and docs/cli.md runs, in order, on the demo model:
  `--model smollm2` becomes `--model demo`, token budgets, document limits and fact counts are capped so the
  whole page runs in minutes, `~` is a temporary home and the working folder a temporary one, so nothing is
  written into the repository. Commands that need a GPU are skipped (and counted).
- README.md's Python block (loading the export with plain transformers) runs on the export those commands made,
  and docs/library.md's script runs as written.
- README.md is at most 200 lines, and every relative link (and #anchor) in README.md, docs/ and
  BENCHMARKS.md points to something that exists.
- The dashboard screenshot the README shows (docs/dashboard.png) exists and is small; `test_dashboard_screenshot`
  re-takes it in Chromium on the demo's ρ map page (tests/artifacts/dashboard.png; with
  FASC_UPDATE_SCREENSHOT=1 it also replaces docs/dashboard.png).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
SCREENSHOT = ROOT / "docs" / "dashboard.png"
MAX_README_LINES = 200
MAX_SCREENSHOT_BYTES = 150_000

# caps that keep every documented command to seconds on the demo model (the option keeps its meaning)
CAPS = {"--tokens": 4096, "--heal-tokens": 1024, "--limit": 3, "--max-tokens": 2048, "--max-facts": 100,
        "--new-tokens": 8, "--anchor-tokens": 512}
CALIBRATING = {"calibrate", "report", "compress"}


# ---------------------------------------------------------------- reading the docs

def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.M | re.S)]


def fasc_commands(text: str) -> list[str]:
    """Every `fasc …` command line of the fenced blocks (a `$ ` prompt stripped, `\\` continuations joined)."""
    out = []
    for lang, body in fenced_blocks(text):
        if lang in ("python", "py"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:].strip()
            if line.startswith("fasc "):
                out.append(line)
    return out


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in fenced_blocks(text) if lang in ("python", "py")]


# ---------------------------------------------------------------- running a command on the demo model

def for_demo(line: str, home: Path) -> tuple[list[str] | None, str | None, str]:
    """(argv for fasc.cli.main, file stdout is redirected to or None, why it is skipped or '').

    `smollm2` → `demo`; `~` / `$HOME` → `home`; the caps of CAPS; `--quiet`."""
    words = shlex.split(line, comments=True)
    assert words[0] == "fasc", line
    words = words[1:]
    redirect = None
    if ">" in words:
        i = words.index(">")
        redirect, words = words[i + 1], words[:i]
    if any("cuda" in w for w in words):
        return None, None, "needs a GPU"
    argv: list[str] = []
    for w in words:
        if w.startswith("~/") or w.startswith("$HOME/"):
            w = str(home / w.split("/", 1)[1])
        w = re.sub(r"pretrained=\$HOME/", f"pretrained={home}/", w)
        argv.append("demo" if w == "smollm2" else w)
    for i, w in enumerate(argv[:-1]):
        if w in CAPS and argv[i + 1].isdigit():
            argv[i + 1] = str(min(int(argv[i + 1]), CAPS[w]))
    cmd = argv[0]
    if cmd in CALIBRATING and "--tokens" not in argv:
        argv += ["--tokens", str(CAPS["--tokens"])]
    if "--knowledge-map" in argv and "--max-facts" not in argv:
        argv += ["--max-facts", str(CAPS["--max-facts"])]
    if "--tasks" in argv and "--limit" not in argv:
        argv += ["--limit", str(CAPS["--limit"])]
    if "--quiet" not in argv:
        argv.append("--quiet")
    return argv, redirect, ""


def run_fasc(argv: list[str]) -> tuple[int, str, str]:
    from fasc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One calibration cache for every documented command (the demo is calibrated once)."""
    return tmp_path_factory.mktemp("docs-cache")


@pytest.fixture()
def workspace(tmp_path, demo_cache, monkeypatch):
    """A private working folder and home; the module's shared cache."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FASC_CACHE", str(demo_cache))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return tmp_path, home


def run_page(path: Path, workspace) -> tuple[list[str], list[str]]:
    """Run every documented command of `path` in order; returns (ran, skipped) as lines."""
    work, home = workspace
    lines = fasc_commands(path.read_text())
    assert lines, f"no fasc commands found in {path.name}"
    ran, skipped = [], []
    for line in lines:
        argv, redirect, why = for_demo(line, home)
        if argv is None:
            skipped.append(f"{line}  ({why})")
            continue
        t0 = time.time()
        code, out, err = run_fasc(argv)
        assert code == 0, f"`{line}` (run as `fasc {shlex.join(argv)}`) failed with {code}:\n{err[-2000:]}"
        if "--json" in argv:
            json.loads(out)
        if redirect:
            (work / redirect).write_text(out)
        ran.append(f"{line}  ({time.time() - t0:.0f} s)")
    print("\n".join(["ran:", *ran, "skipped:", *skipped]))
    return ran, skipped


# ---------------------------------------------------------------- the tests

def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it ≤ {MAX_README_LINES} and move details to docs/"


def test_command_extraction_and_rewriting(tmp_path):
    text = ("```bash\nfasc compress --model smollm2 --param-ratio 0.8 \\\n    --out ~/x/y   # note\n"
            "lm_eval --tasks x\n```\n```\n$ fasc eval --model ~/x/y --tasks zeroshot --limit 500\nperplexity 1\n"
            "$ fasc report --json > r.json\n```\n```python\nfasc = 1\n```\n")
    lines = fasc_commands(text)
    assert lines == ["fasc compress --model smollm2 --param-ratio 0.8      --out ~/x/y   # note",
                     "fasc eval --model ~/x/y --tasks zeroshot --limit 500", "fasc report --json > r.json"]
    argv, red, _ = for_demo(lines[0], tmp_path)
    assert argv == ["compress", "--model", "demo", "--param-ratio", "0.8", "--out", str(tmp_path / "x/y"),
                    "--tokens", "4096", "--quiet"] and red is None
    argv, _, _ = for_demo(lines[1], tmp_path)
    assert argv[argv.index("--limit") + 1] == "3"
    argv, red, _ = for_demo(lines[2], tmp_path)
    assert red == "r.json" and ">" not in argv
    assert for_demo("fasc compress --device cuda --out x", tmp_path)[0] is None


@pytest.mark.slow
def test_readme_commands_run_on_the_demo(workspace):
    ran, skipped = run_page(README, workspace)
    text = " ".join(ran)
    assert "--tasks zeroshot" in text and "--merge" in text and not skipped
    # the Python block of workflow 3: plain transformers on the export the commands above wrote
    blocks = python_blocks(README.read_text())
    assert blocks and any("trust_remote_code=True" in b for b in blocks)
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
        assert out.getvalue().strip()


@pytest.mark.slow
def test_library_example_runs(workspace):
    """docs/library.md's script: the pipeline in Python on the demo model, its export under the temporary home."""
    blocks = python_blocks((ROOT / "docs" / "library.md").read_text())
    assert blocks
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "docs/library.md", "exec"), {"__name__": "library_md"})
    ppl, recall = map(float, out.getvalue().split())
    assert ppl > 1 and 0 <= recall <= 1
    assert (workspace[1] / "fasc-exports" / "lib-d50" / "fasc_config.json").is_file()


@pytest.mark.slow
def test_cli_reference_commands_run_on_the_demo(workspace):
    ran, skipped = run_page(CLI_DOC, workspace)
    assert len(ran) >= 15 and len(skipped) <= 2, skipped


# ---------------------------------------------------------------- links

DOC_FILES = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces → hyphens."""
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    s = re.sub(r"[`*]", "", s).strip().lower()
    return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) for m in LINK.finditer(text)]


def test_slug_follows_github():
    assert slug("Where facts live, measured (`bench.knowledge_map`)") == "where-facts-live-measured-benchknowledge_map"
    assert slug("fasc eval") == "fasc-eval" and slug("Speed of an export") == "speed-of-an-export"
    assert slug("The field's suite and knowledge in generation (SmolLM2)") == \
        "the-fields-suite-and-knowledge-in-generation-smollm2"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert doc.is_file(), doc
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.is_relative_to(ROOT) and not dest.parent.is_dir():
            continue  # outside this checkout (../shared/ beside it) and not here: nothing to check
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def test_docs_folder_has_the_promised_pages():
    for name in ("dashboard", "cli", "library", "method", "scale", "benchmarks"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


# ---------------------------------------------------------------- the screenshot

def test_screenshot_is_committed_and_small():
    assert SCREENSHOT.is_file(), "docs/dashboard.png is missing: FASC_UPDATE_SCREENSHOT=1 pytest tests/test_docs.py -k screenshot"
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= MAX_SCREENSHOT_BYTES, len(data)
    width = int.from_bytes(data[16:20], "big")
    assert 1000 <= width <= 1600, width


CHROMIUM = os.environ.get("FASC_CHROMIUM", "/usr/bin/chromium")


def _wait_idle(page, timeout_ms: int) -> None:
    page.wait_for_timeout(300)
    page.wait_for_function(
        "() => { const app = document.querySelector('[data-testid=\"stApp\"]');"
        " const state = app ? app.getAttribute('data-test-script-state') : 'initial';"
        " return state !== 'initial' && state !== 'running' && state !== 'rerunRequested'"
        " && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }", timeout=timeout_ms)
    page.wait_for_timeout(300)


def _small_png(src: Path, dest: Path) -> None:
    """A 256-colour PNG of `src` (the heatmap and text survive; a 1280 px page stays well under 150 KB)."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)


@pytest.mark.slow
def test_dashboard_screenshot(tmp_path):
    """`make run`'s first view after calibration: the demo model's ρ map at 1280 px, in Chromium."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (run .ci/install-browser.sh)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FASC_APP_MODEL="demo", FASC_APP_DEVICE="cpu", FASC_CACHE=str(tmp_path / "cache"),
               FASC_APP_OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--global.developmentMode", "false"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
                    raise RuntimeError("streamlit did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.5)
            timeout = 300_000
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=["--no-sandbox", "--headless", "--disable-gpu"])
                page = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1).new_page()
                page.set_default_timeout(timeout)
                page.goto(url)
                page.get_by_role("heading", name="Model & calibration").first.wait_for()
                _wait_idle(page, timeout)
                run = page.get_by_role("button", name="Run calibration")
                if run.count():
                    run.first.click()
                    page.get_by_text("stored in the cache").first.wait_for()
                    _wait_idle(page, timeout)
                page.get_by_role("link", name="ρ map").first.click()
                page.get_by_role("heading", name="ρ map").first.wait_for()
                _wait_idle(page, timeout)
                page.locator(".js-plotly-plot").first.wait_for()
                page.wait_for_timeout(1500)  # the heatmap's first paint
                assert page.locator("[data-testid='stException']").count() == 0
                raw = tmp_path / "raw.png"
                page.screenshot(path=str(raw))
                browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    _small_png(raw, artifacts / "dashboard.png")
    size = (artifacts / "dashboard.png").stat().st_size
    assert size <= MAX_SCREENSHOT_BYTES, size
    if os.environ.get("FASC_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(artifacts / "dashboard.png", SCREENSHOT)
