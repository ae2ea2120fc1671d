"""Post-processing cost: the one-time eigen-decompositions per module, by module width.

    python -m bench.eigen                      # widths 576 1024 1536 2816 4096, float64, 2 threads

For one module of input width n (output width m = n, random SPD statistics): the whitening of its
input group (eigh of C_x, B, B⁻¹; shared by q/k/v and by gate/up), the pca basis, and the fasc
basis (γ = 0 and γ = 1) and the two diagnostics the dashboard draws (misalignment curve, unshrunk
Fisher spectrum; computed for reports, skipped when a basis is only compressed with). These run
once per (statistics, damping, γ) and are then cached beside the statistics (`fasc.analysis_cached`). Ends with `eigen_seconds_4096=<fasc basis>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fasc.spectra import basis_fasc, basis_pca, fisher_spectrum, misalignment_curve, whitening

OUT = Path(__file__).resolve().parent / "out"


def spd(n: int, g: torch.Generator) -> torch.Tensor:
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return X.T @ X / (2 * n)


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eigen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[576, 1024, 1536, 2816, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in a.widths:
        Cx, Ch = spd(n, g), spd(n, g)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        wh = whitening(Cx, 1e-4)
        r = {"n": n,
             "whitening_s": timed(lambda: whitening(Cx, 1e-4), a.reps),
             "pca_s": timed(lambda: basis_pca(wh.mu, wh.V, Ch), a.reps),
             "fasc_gamma0_s": timed(lambda: basis_fasc(W, Ch, wh.B, wh.B_inv, 0.0), a.reps),
             "fasc_gamma1_s": timed(lambda: basis_fasc(W, Ch, wh.B, wh.B_inv, 1.0), a.reps)}
        b = basis_fasc(W, Ch, wh.B, wh.B_inv, 1.0)
        r["misalignment_s"] = timed(lambda: misalignment_curve(wh.V, b), a.reps)
        r["fisher_spectrum_s"] = timed(lambda: fisher_spectrum(Ch, wh.B), a.reps)
        rows.append(r)
        print(f"n={n}: whitening {r['whitening_s']:.2f}s, pca {r['pca_s']:.2f}s, fasc γ=0 {r['fasc_gamma0_s']:.2f}s, "
              f"γ=1 {r['fasc_gamma1_s']:.2f}s, misalignment {r['misalignment_s']:.2f}s, "
              f"Fisher spectrum {r['fisher_spectrum_s']:.2f}s", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    (OUT / "eigen.json").write_text(json.dumps(rows, indent=1))
    print("| width n | whitening (per input group) | pca basis | fasc γ=0 | fasc γ=1 | misalignment | Fisher spectrum |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['whitening_s']:.2f} s | {r['pca_s']:.2f} s | {r['fasc_gamma0_s']:.2f} s | "
              f"{r['fasc_gamma1_s']:.2f} s | {r['misalignment_s']:.2f} s | {r['fisher_spectrum_s']:.2f} s |")
    print(f"eigen_seconds_{rows[-1]['n']}={rows[-1]['fasc_gamma1_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
