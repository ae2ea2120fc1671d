"""Time of the Ranks page's *Evaluate* (SmolLM2, the default fasc plan, its asvd baseline), before and after.

before = the page decomposes pca and fasc; Evaluate first decomposes every module for asvd (to allocate the
         baseline), then builds both copies with factors whitened by C_x's eigenpairs and measures the
         uncompressed model, the plan and the baseline (perplexity on the held-out text, fact recall).
after  = the page decomposes pca, fasc and asvd together (one whitening per module); the copies' factors are
         whitened by Cholesky (`fasc.surgery.compute_factors`, the same maps up to rounding); a second plan's
         Evaluate reuses the uncompressed model's row.

Both scenarios run in this process, one after the other, from a fresh Analysis on the cached calibration;
"another plan" is the same plan built again (what a new plan costs: its copies and two measured models).

    OMP_NUM_THREADS=2 python -m bench.evaluate_timing --model smollm2 --tokens 8192 --ratio 0.8
"""

from __future__ import annotations

import argparse
import time

import fasc.surgery as surgery


def scenario(model, tok, stats, defaults, ratio: float, after: bool) -> dict:
    from fasc.allocate import allocate
    from fasc.analysis import Analysis
    from fasc.comparison import evaluate_plan
    from fasc.config import CompressConfig

    an = Analysis(model, stats, CompressConfig(gamma=defaults.gamma))
    t = time.perf_counter()
    an.precompute(("pca", "fasc", "asvd") if after else ("pca", "fasc"))
    page = time.perf_counter() - t
    plan = allocate(an, "fasc", param_ratio=ratio)
    own = surgery.compute_factors
    if not after:   # the factors as the page built them before: whitened by C_x's eigenpairs
        surgery.compute_factors = lambda an, plan, progress=None, cholesky=False: own(an, plan, progress, cholesky)
    try:
        t = time.perf_counter()
        if not after:
            an.precompute(("asvd",))
        rows = evaluate_plan(model, tok, an, plan, defaults.heldout, defaults.probe)
        first = time.perf_counter() - t
        t = time.perf_counter()
        again = evaluate_plan(model, tok, an, plan, defaults.heldout, defaults.probe,
                              reference=rows[0] if after else None)
        second = time.perf_counter() - t
    finally:
        surgery.compute_factors = own
    return {"page": page, "first": first, "second": second, "ppl": [round(r["perplexity"], 2) for r in rows],
            "same_again": [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.evaluate_timing", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (the dashboard's default for SmolLM2)")
    p.add_argument("--ratio", type=float, default=0.8, help="share of parameters the plan keeps")
    args = p.parse_args(argv)
    from fasc.config import CalibConfig
    from fasc.loading import load_model
    from fasc.pipeline import batches_from_files, calibrate_cached, model_defaults

    model, tok = load_model(args.model)
    d = model_defaults(args.model)
    cfg = CalibConfig(n_tokens=args.tokens, seq_len=d.seq_len, temperature=d.temperature)
    stats, _ = calibrate_cached(model, batches_from_files(tok, [str(f) for f in d.calib_files], cfg), cfg)
    res = {name: scenario(model, tok, stats, d, args.ratio, name == "after") for name in ("before", "after")}
    for name, r in res.items():
        print(f"{name}: page decomposition {r['page']:.1f} s · Evaluate {r['first']:.1f} s · another plan's "
              f"Evaluate {r['second']:.1f} s · perplexity dense/plan/baseline {r['ppl']}")
    b, a = res["before"], res["after"]
    print(f"ratio after/before: Evaluate {a['first'] / b['first']:.2f}, another plan {a['second'] / b['second']:.2f}, "
          f"page {a['page'] / b['page']:.2f}; same perplexities: {a['ppl'] == b['ppl']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
