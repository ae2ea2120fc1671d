"""Every view of the dashboard on a real model, timed as a user gets it: headless Chromium drives a fresh
`streamlit run app.py` through the pages — open, calibration (from the cache when the statistics are
there), ρ map, Spectra, Ranks (the default plan), *Evaluate*, the benchmarks (the page's default tasks,
`--limit` documents; its own time estimate printed beside the measured time), Generate, Export, and Export in
the stages `fasc compress` takes (its estimate beside the measured time; where the model takes more than one).

    OMP_NUM_THREADS=2 FASC_CACHE=$PWD/cache python -m bench.dashboard_walk --model smollm2

Needs Chromium (`FASC_CHROMIUM`, default /usr/bin/chromium) and playwright, as `tests/test_browser.py`
(whose page helpers it uses). Screenshots of each view go to `--shots`. Prints one JSON line: seconds per
view (or the failure), and the benchmarks' estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """A view this model does not have (e.g. Export in stages for a model that takes one)."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_walk", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="FASC_APP_MODEL: demo, SmolLM2 or a folder")
    p.add_argument("--limit", type=int, default=100, help="documents per benchmark task")
    p.add_argument("--shots", default=str(Path(tempfile.gettempdir()) / "fasc-walk"), help="screenshot folder")
    p.add_argument("--timeout", type=int, default=900, help="seconds one view may take")
    p.add_argument("--only", default="", help="comma-separated views to time (open and calibration always run), "
                                                "e.g. ranks,export,export_stages")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import test_browser as tb
    from playwright.sync_api import sync_playwright

    tb.ARTIFACTS = Path(args.shots)
    tb.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tb.TIMEOUT_MS = args.timeout * 1000
    port = tb._free_port()
    env = dict(os.environ, FASC_APP_MODEL=args.model, FASC_APP_DEVICE="cpu",
               FASC_APP_OUT=tempfile.mkdtemp(prefix="fasc-walk-out-"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.address",
           "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false"]
    log = open(tb.ARTIFACTS / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read().strip() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    out: dict = {"model": args.model, "limit": args.limit, "seconds": {}}

    only = {v.strip() for v in args.only.split(",") if v.strip()}

    def step(name, f) -> None:
        if only and name not in only | {"open", "calibration"}:
            return
        t = time.time()
        try:
            f()
            tb._no_exception(pg)
            tb._shot(pg, name)
            out["seconds"][name] = round(time.time() - t, 1)
        except Skip as e:
            out["seconds"][name] = f"skipped: {e}"
        except Exception as e:   # noqa: BLE001 - a failed view is reported, the walk goes on
            out["seconds"][name] = f"failed after {time.time() - t:.0f} s: {str(e).splitlines()[0][:200]}"
        print(name, out["seconds"][name], file=sys.stderr, flush=True)

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS, headless=True)
            pg = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            pg.set_default_timeout(args.timeout * 1000)

            def calibration():
                button = pg.get_by_role("button", name="Run calibration")
                if button.count():
                    button.click()
                tb._idle(pg)

            def evaluate():
                pg.get_by_role("button", name="Evaluate").click()
                tb._wait_text(pg, "(same budget")
                tb._idle(pg)

            def benchmarks():
                n = pg.get_by_label("Documents per task")
                n.fill(str(args.limit))
                n.press("Enter")
                pg.wait_for_timeout(1500)
                tb._idle(pg)
                out["benchmarks_estimate"] = pg.locator("[data-testid='stCaptionContainer']",
                                                        has_text="for the three models").first.inner_text()
                pg.get_by_role("button", name="Run benchmarks").click()
                tb._wait_text(pg, "average (above chance)")
                tb._idle(pg)

            def export():
                tb._goto(pg, "Export")
                pg.get_by_role("button", name="Export").click()
                pg.get_by_text("Wrote ").wait_for()
                tb._idle(pg)

            def export_stages():
                tb._goto(pg, "Export")
                progressive = pg.get_by_text("progressive, as")
                if not progressive.count():
                    raise Skip("this model's plan takes one stage (no Stages choice on the Export page)")
                progressive.first.click()
                tb._idle(pg)
                out["export_stages_estimate"] = pg.locator("[data-testid='stCaptionContainer']",
                                                           has_text="more calibration").first.inner_text()
                pg.get_by_text("Overwrite").first.click()
                tb._idle(pg)
                pg.get_by_role("button", name="Export").click()
                pg.get_by_text("Progressive: ").wait_for()
                tb._idle(pg)

            step("open", lambda: (pg.goto(url), pg.get_by_role("heading", name="Model & calibration").wait_for(),
                                  tb._idle(pg)))
            step("calibration", calibration)
            step("rho_map", lambda: (tb._goto(pg, "ρ map"), pg.locator(".js-plotly-plot").first.wait_for()))
            step("spectra", lambda: (tb._goto(pg, "Spectra"), pg.locator(".js-plotly-plot").nth(2).wait_for()))
            step("ranks", lambda: tb._goto(pg, "Ranks"))
            step("evaluate", evaluate)
            step("benchmarks", benchmarks)
            step("generate", lambda: (pg.get_by_role("button", name="Generate").click(),
                                      tb._wait_text(pg, "(same budget)"), tb._idle(pg)))
            step("export", export)
            step("export_stages", export_stages)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out))
    return 0 if all(isinstance(v, float) or v.startswith("skipped") for v in out["seconds"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
