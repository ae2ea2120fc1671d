"""Time to the first ρ map after calibration, as a new user gets it in the dashboard.

Runs the app under Streamlit's AppTest: page 1 with the model chosen and its calibration found in
the cache (the statistics already on disk; with `--tokens N` the calibration of N tokens is run on
page 1 first when the cache lacks it, untimed), then the ρ map page; reports the seconds of that
first ρ map run (model loading and reading the statistics are on page 1, before the clock starts).
The eigen-decompositions the old page ran first do not depend on the token budget.

    FASC_CACHE=/work/cache-shared python -m bench.first_view --model smollm2
    python -m bench.first_view --model smollm2 --tokens 2048 --app /old/checkout/app.py   # before/after
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_view", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="FASC_APP_MODEL: demo, SmolLM2 or a folder")
    p.add_argument("--app", default=str(APP), help="app.py of the checkout to time")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--tokens", type=int, help="calibration token budget (default: the app's)")
    args = p.parse_args(argv)
    os.environ["FASC_APP_MODEL"] = args.model
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.testing.v1 import AppTest

    orig = PagesManager.__init__

    def init(self, *a, **k):  # run app.py (navigation + sidebar) on every rerun, as a real server does
        orig(self, *a, **k)
        PagesManager.uses_pages_directory = False

    PagesManager.__init__ = init
    at = AppTest.from_file(args.app, default_timeout=args.timeout)
    spec = args.model.lower() if args.model.lower() in ("demo", "smollm2") else args.model
    if args.tokens:
        at.session_state[f"set.tokens@{spec}"] = args.tokens
    t0 = time.perf_counter()
    at.run()
    page1 = time.perf_counter() - t0
    calibrated_s = None
    if args.tokens and [b for b in at.button if b.key == "w.run"]:
        t0 = time.perf_counter()
        at.button(key="w.run").click().run()
        calibrated_s = round(time.perf_counter() - t0, 2)
        at.run()  # a fresh run of page 1, as after a page switch: "Loaded from cache"
    errs = [e.value for e in at.exception] + [e.value for e in at.error]
    calib = at.session_state["calib"] if "calib" in at.session_state else {}   # keyed by "spec · device · dtype"
    if errs or not any(k.split(" · ")[0] == spec for k in calib):
        raise SystemExit(f"error: page 1 did not find the calibration in the cache ({errs or 'not calibrated'}); "
                         f"run `fasc calibrate --model {args.model}` with the same FASC_CACHE first")
    t0, c0 = time.perf_counter(), time.process_time()
    at.switch_page("pages/2_rho_map.py").run()
    rho, rho_cpu = time.perf_counter() - t0, time.process_time() - c0
    errs = [e.value for e in at.exception] + [e.value for e in at.error]
    if errs or not at.get("plotly_chart"):
        raise SystemExit(f"error: the ρ map page did not draw its map: {errs}")
    print(json.dumps({"model": args.model, "app": args.app, "page1_s": round(page1, 2), "calibration_s": calibrated_s,
                      "first_rho_map_s": round(rho, 2), "first_rho_map_cpu_s": round(rho_cpu, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
