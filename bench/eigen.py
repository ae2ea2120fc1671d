"""Post-processing cost: the one-time eigen-decompositions per module, by module width.

    python -m bench.eigen                      # widths 576 1024 1536 2816 4096, float64, 2 threads
    python -m bench.eigen --widths 576 --wide 1536:576 2816:1024 --reps 1     # the small-side table only
    python -m bench.eigen --widths 576 --wide 11008:4096 14336:4096 --reps 1  # Llama-7B / -3-8B down (long)

For one module of input width n (output width m = n, random SPD statistics): the whitening of its
input group (Cholesky of C_x; shared by q/k/v and by gate/up), the eigen-decomposition of C_x that pca,
the variance spectrum and misalignment need (not asvd or fasc), the pca basis, and the fasc
basis (γ = 0 and γ = 1) and the two diagnostics the dashboard draws (misalignment curve, unshrunk
Fisher spectrum; computed for reports, skipped when a basis is only compressed with). These run
once per (statistics, damping, γ) and are then cached beside the statistics (`fasc.analysis_cached`). Ends with `eigen_seconds_4096=<fasc basis>`.

`--wide n:m …` times a wide module (n inputs > m outputs: down_proj, GQA k/v; C_h = Wᵀ C_g W as
autograd gives it) both ways: the n×n solve and the small-side m×m solve (spec §3), for fasc (γ = 1,
the shared products B C_h B and (WB)ᵀWB included) and asvd; the whitening of the input, shared by
both, is not in either. Ends with `wide_speedup_<n>x<m>=<fasc n×n / fasc small side>` for the last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fasc.spectra import (basis_asvd, basis_asvd_wide, basis_fasc, basis_fasc_wide, basis_pca, fisher_spectrum,
                          misalignment_curve, whitening, wide_side)

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
    p.add_argument("--wide", nargs="*", default=[], metavar="N:M", help="wide module shapes n:m (n > m)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in a.widths:
        Cx, Ch = spd(n, g), spd(n, g)
        W = torch.randn(n, n, generator=g, dtype=torch.float64)
        wh = whitening(Cx, 1e-4)
        wh.V  # the eigenpairs, computed on first use, are timed apart (cx_eigh_s)
        r = {"n": n,
             "whitening_s": timed(lambda: whitening(Cx, 1e-4), a.reps),
             "cx_eigh_s": timed(lambda: whitening(Cx, 1e-4).V, a.reps),
             "pca_s": timed(lambda: basis_pca(wh.mu, wh.V, Ch), a.reps),
             "fasc_gamma0_s": timed(lambda: basis_fasc(W, Ch, wh.B, wh.B_inv, 0.0), a.reps),
             "fasc_gamma1_s": timed(lambda: basis_fasc(W, Ch, wh.B, wh.B_inv, 1.0), a.reps)}
        b = basis_fasc(W, Ch, wh.B, wh.B_inv, 1.0)
        r["misalignment_s"] = timed(lambda: misalignment_curve(wh.V, b), a.reps)
        r["fisher_spectrum_s"] = timed(lambda: fisher_spectrum(Ch, wh.B), a.reps)
        rows.append(r)
        r["cx_eigh_s"] = max(0.0, r["cx_eigh_s"] - r["whitening_s"])
        print(f"n={n}: whitening {r['whitening_s']:.2f}s, eigh of C_x {r['cx_eigh_s']:.2f}s, pca {r['pca_s']:.2f}s, fasc γ=0 {r['fasc_gamma0_s']:.2f}s, "
              f"γ=1 {r['fasc_gamma1_s']:.2f}s, misalignment {r['misalignment_s']:.2f}s, "
              f"Fisher spectrum {r['fisher_spectrum_s']:.2f}s", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    (OUT / "eigen.json").write_text(json.dumps(rows, indent=1))
    print("| width n | whitening (Cholesky, per input group) | eigh of C_x (pca, misalignment) | pca basis | fasc γ=0 "
          "| fasc γ=1 | misalignment | Fisher spectrum |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['whitening_s']:.2f} s | {r['cx_eigh_s']:.2f} s | {r['pca_s']:.2f} s | {r['fasc_gamma0_s']:.2f} s | "
              f"{r['fasc_gamma1_s']:.2f} s | {r['misalignment_s']:.2f} s | {r['fisher_spectrum_s']:.2f} s |")
    print(f"eigen_seconds_{rows[-1]['n']}={rows[-1]['fasc_gamma1_s']:.2f}")
    if a.wide:
        wide_rows = [wide(int(x.split(":")[0]), int(x.split(":")[1]), g, a.reps) for x in a.wide]
        (OUT / "eigen-wide.json").write_text(json.dumps(wide_rows, indent=1))
        print("\n| module n → m | fasc γ=1, n×n | fasc γ=1, small side | speed-up | asvd, n×n | asvd, small side | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for r in wide_rows:
            print(f"| {r['n']} → {r['m']} | {r['fasc_full_s']:.2f} s | {r['fasc_small_s']:.2f} s | "
                  f"**{r['fasc_full_s'] / r['fasc_small_s']:.1f}×** | {r['asvd_full_s']:.2f} s | "
                  f"{r['asvd_small_s']:.2f} s | {r['asvd_full_s'] / r['asvd_small_s']:.1f}× |")
        r = wide_rows[-1]
        print(f"wide_speedup_{r['n']}x{r['m']}={r['fasc_full_s'] / r['fasc_small_s']:.2f}")
    return 0


def wide(n: int, m: int, g: torch.Generator, reps: int) -> dict:
    """Full vs small-side bases of one wide module (n > m); the whitening is shared, not timed."""
    if m >= n:
        raise SystemExit(f"--wide {n}:{m}: needs n > m")
    Cx = spd(n, g)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / n ** 0.5
    Gm = torch.randn(2 * n, m, generator=g, dtype=torch.float64)
    H = Gm @ W
    Ch = H.T @ H / (2 * n)
    wh = whitening(Cx, 1e-4)
    B = wh.B

    def fasc_full():
        S = B.T @ Ch @ B
        WB = W @ B
        return basis_fasc(W, Ch, B, None, 1.0, S, WB.T @ WB)

    def fasc_small():
        return basis_fasc_wide(wide_side(W, Ch, B, wh.Cx_d), Ch, W, B, None, 1.0, n)

    r = {"n": n, "m": m, "fasc_full_s": timed(fasc_full, reps), "fasc_small_s": timed(fasc_small, reps),
         "asvd_full_s": timed(lambda: basis_asvd(W, Ch, B, None), reps),
         "asvd_small_s": timed(lambda: basis_asvd_wide(wide_side(W, Ch, B, wh.Cx_d), B, None, n), reps)}
    f, s = fasc_full(), fasc_small()
    r["max_curve_diff"] = float((f.curve - s.curve).abs().max() / f.curve[0])
    print(f"{n}→{m}: fasc {r['fasc_full_s']:.2f}s vs {r['fasc_small_s']:.2f}s, asvd {r['asvd_full_s']:.2f}s vs "
          f"{r['asvd_small_s']:.2f}s, curve difference {r['max_curve_diff']:.1e}", file=sys.stderr)
    return r


if __name__ == "__main__":
    sys.exit(main())
