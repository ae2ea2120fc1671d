"""One-time analysis of a real model: old code vs the small-side solve, float64 vs float32.

    FASC_CACHE=/work/cache-shared python -m bench.analysis --model smollm2        # ≈ 5 min, 2 cores
    FASC_CACHE=/work/cache-shared python -m bench.analysis --interleave --sample-layers 3 --threads 1
        # one process, variants in turn per layer, CPU seconds: for a loaded machine
    FASC_CACHE=/work/cache-shared python -m bench.analysis --stage compress --old-rev 1ad2bb0 --threads 1 \
        --variants oldpar64 par64 oldpar64 par64
        # what `fasc compress` recomputes after a summary-cache hit: every module's fasc basis and factors

Each variant runs in a fresh process on the same cached calibration statistics and times
`Analysis.precompute(("pca", "asvd", "fasc"))` — every module's pca, asvd and fasc summaries with
the diagnostics (Fisher spectrum, misalignment) — split by module kind:
  old        the code before this change (git revision --old-rev, extracted to a temporary folder)
  full64     this code, n×n solves only (--no-small-side), float64
  small64    this code, small-side solve for wide modules, float64
  small32    the same in float32, checked against float64 on one module per input width
  par64      small64 through `Analysis.precompute`, layers shared out over one worker thread per core
             (each decomposition single-threaded; the library's default on the CPU)
  par32      the same in float32 (checked; `--linalg-dtype float32`)
  oldpar64   par64 with the code at --old-rev (a revision that already has the linear-algebra device):
             two revisions of the default path side by side, e.g. `--old-rev 418a362 --variants oldpar64
             par64 oldpar64 par64` (alternated, so that drift in the machine's speed hits both)
Wall time and CPU time (both threads; steadier than wall time on a shared machine) are reported;
the split by module kind and method is CPU time. Ends with `analysis_seconds=<par64 wall>` (the default;
else small64) and `speedup=<old / that CPU time>`.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent
OLD_REV = "cb0ab0b"  # the last commit before the small-side solve and the linear-algebra device
VARIANTS = ("old", "full64", "small64", "small32", "par64", "par32", "oldpar64")


def child(a) -> None:
    import importlib

    import torch

    if a.child in ("old", "oldpar64"):  # imported under another name: the editable install would shadow PYTHONPATH
        sys.path.insert(0, a.old_tree)
        fasc = importlib.import_module("fasc_old")
        pipeline = importlib.import_module("fasc_old.pipeline")
        calibrate_cached = pipeline.calibrate_cached
        model_defaults = getattr(pipeline, "model_defaults", None) or pipeline.default_data
    else:
        import fasc
        from fasc.pipeline import calibrate_cached, model_defaults

    torch.set_num_threads(a.threads)
    model, tok = fasc.load_model(a.model)
    cfg = fasc.CalibConfig(n_tokens=a.tokens, seq_len=256)
    batches = fasc.batches_from_files(tok, [str(model_defaults(a.model).calib)], cfg)
    stats, _ = calibrate_cached(model, batches, cfg)
    if a.child == "old":
        an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=a.gamma))
    else:
        LinalgConfig = importlib.import_module(fasc.__name__ + ".linalg_device").LinalgConfig

        lc = LinalgConfig(device="cpu", dtype="float32" if a.child.endswith("32") else "float64",
                          small_side=a.child != "full64")
        an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=a.gamma), linalg=lc)
    by_kind: dict[str, float] = collections.defaultdict(float)
    methods = ("pca", "asvd", "fasc")
    fqns = sorted(stats.fqns, key=lambda f: stats.group[f])  # as Analysis.precompute orders them
    n_layers = len({stats.info(f).layer for f in fqns})
    if a.sample_layers:  # every layer has the same shapes: time the first few, scale up (labelled)
        fqns = [f for f in fqns if stats.info(f).layer < a.sample_layers]
    scale = n_layers / len({stats.info(f).layer for f in fqns})
    t0, c0 = time.perf_counter(), time.process_time()
    if a.stage == "compress":  # what `fasc compress` does after a summary-cache hit: every module's fasc
        for f in fqns:         # basis and rank-k factors (the surgery's an.factors loop), one thread pool
            an.factors(f, "fasc", max(1, stats.info(f).max_rank // 2))
        fqns = []
    elif "par" in a.child:  # the library's own loop: whole layers per worker thread, not split by kind
        import dataclasses

        an.stats = dataclasses.replace(stats, modules=[stats.info(f) for f in fqns])
        an.precompute(methods)
        fqns = []
    for f in fqns:
        kind = stats.info(f).kind
        for m in methods:
            t = time.process_time()
            an._summary(f, m)
            if m == "fasc":
                an.fisher_spectrum(f)
                an.misalignment(f)
            by_kind[f"{kind}/{m}"] += time.process_time() - t
    total = time.perf_counter() - t0
    fqns = sorted(an.stats.fqns, key=lambda f: stats.group[f])
    out = {"variant": a.child, "seconds": total * scale, "workers": an.default_workers() if "par" in a.child else 1, "cpu_seconds": (time.process_time() - c0) * scale,
           "measured_layers": n_layers / scale, "layers": n_layers, "modules": len(fqns),
           "by_kind": dict(by_kind),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "precision_checks": {str(k): v for k, v in getattr(an, "precision_checks", {}).items()},
           "curves": {f"{f}|{m}": an.curve(f, m).tolist() for f in fqns[:: max(1, len(fqns) // 12)]
                      for m in methods}}
    print(json.dumps(out))


def interleaved(a) -> dict:
    """One process, one model load: per sampled layer, old / small64 / small32 in turn (CPU seconds),
    so that the machine's load hits every variant alike. The old code is imported as `fasc_old`."""
    import importlib

    import torch

    import fasc
    from fasc.linalg_device import LinalgConfig
    from fasc.pipeline import calibrate_cached, model_defaults

    torch.set_num_threads(a.threads)
    tree = old_tree(a.old_rev)
    shutil.move(str(tree / "fasc"), str(tree / "fasc_old"))
    sys.path.insert(0, str(tree))
    old = importlib.import_module("fasc_old")
    model, tok = fasc.load_model(a.model)
    cfg = fasc.CalibConfig(n_tokens=a.tokens, seq_len=256)
    batches = fasc.batches_from_files(tok, [str(model_defaults(a.model).calib)], cfg)
    stats, _ = calibrate_cached(model, batches, cfg)
    layers = sorted({i.layer for i in stats.modules})
    sample = layers[:a.sample_layers] if a.sample_layers else layers
    make = {"old": lambda: old.Analysis(model, stats, old.CompressConfig(gamma=a.gamma)),
            "small64": lambda: fasc.Analysis(model, stats, fasc.CompressConfig(gamma=a.gamma),
                                             linalg=LinalgConfig(device="cpu", dtype="float64")),
            "small32": lambda: fasc.Analysis(model, stats, fasc.CompressConfig(gamma=a.gamma),
                                             linalg=LinalgConfig(device="cpu", dtype="float32"))}
    ans = {v: make[v]() for v in a.variants}
    cpu = {v: 0.0 for v in a.variants}
    by_kind = {v: collections.defaultdict(float) for v in a.variants}
    for layer in sample:
        fqns = sorted((f for f in stats.fqns if stats.info(f).layer == layer), key=lambda f: stats.group[f])
        for v in a.variants:
            an = ans[v]
            for f in fqns:
                for m in ("pca", "asvd", "fasc"):
                    t = time.process_time()
                    an._summary(f, m)
                    if m == "fasc":
                        an.fisher_spectrum(f)
                        an.misalignment(f)
                    dt = time.process_time() - t
                    cpu[v] += dt
                    by_kind[v][f"{stats.info(f).kind}/{m}"] += dt
        print(f"layer {layer}: " + ", ".join(f"{v} {cpu[v]:.1f} s" for v in a.variants), file=sys.stderr)
    scale = len(layers) / len(sample)
    res = {}
    for v in a.variants:
        fqns = [f for f in stats.fqns if stats.info(f).layer in sample]
        res[v] = {"variant": v, "cpu_seconds": cpu[v] * scale, "seconds": float("nan"), "layers": len(layers),
                  "measured_layers": len(sample), "by_kind": dict(by_kind[v]), "peak_rss_mb": rss_mb(),
                  "precision_checks": {str(k): x for k, x in getattr(ans[v], "precision_checks", {}).items()},
                  "curves": {f"{f}|{m}": ans[v].curve(f, m).tolist() for f in fqns for m in ("pca", "asvd", "fasc")}}
    return res


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def old_tree(rev: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fasc-old-"))
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fasc"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=arch, check=True)
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (the analysis cost does not "
                                                            "depend on them)")
    p.add_argument("--gamma", type=float, default=None,
                   help="Fisher shrinkage γ (default: the model's, as `fasc report`: 0 for real models, 1 for the demo)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--old-rev", default=OLD_REV)
    p.add_argument("--sample-layers", type=int, default=0, help="time only the first K layers and scale the "
                                                                 "totals to all layers (EXTRAPOLATED; 0 = all)")
    p.add_argument("--interleave", action="store_true", help="one process, variants in turn per layer "
                                                              "(CPU seconds; for a loaded machine)")
    p.add_argument("--stage", choices=("analysis", "compress"), default="analysis",
                   help="analysis: every module's pca, asvd and fasc summaries with diagnostics (the one-time "
                        "analysis); compress: every module's fasc basis and half-rank factors, as `fasc compress` "
                        "after the summaries come from the cache")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--old-tree", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.gamma is None:
        from fasc.pipeline import model_defaults

        a.gamma = model_defaults(a.model).gamma
    if a.child:
        child(a)
        return 0
    if a.interleave:
        if a.stage != "analysis":
            p.error("--interleave times the analysis only; run --stage compress without it")
        a.variants = [v for v in a.variants if v != "full64"]
        res = interleaved(a)
        OUT.mkdir(exist_ok=True)
        (OUT / f"analysis-{a.model}-interleaved.json").write_text(json.dumps(res, indent=1))
        return report(a, res)
    base = [sys.executable, "-m", "bench.analysis", "--model", a.model, "--tokens", str(a.tokens),
            "--gamma", str(a.gamma), "--threads", str(a.threads), "--sample-layers", str(a.sample_layers),
            "--stage", a.stage]
    res = {}
    for v in a.variants:
        extra = []
        if v in ("old", "oldpar64"):
            tree = old_tree(a.old_rev)
            shutil.move(str(tree / "fasc"), str(tree / "fasc_old"))
            extra = ["--old-tree", str(tree)]
        r = subprocess.run(base + ["--child", v, *extra], capture_output=True, text=True, cwd=str(ROOT))
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res[v] = json.loads(r.stdout.strip().splitlines()[-1])
        OUT.mkdir(exist_ok=True)
        (OUT / f"analysis-{a.model}.json").write_text(json.dumps(res, indent=1))  # partial results kept
        print(f"{v}: {res[v]['seconds']:.1f} s wall, {res[v]['cpu_seconds']:.1f} s CPU, peak RSS "
              f"{res[v]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    (OUT / f"analysis-{a.model}.json").write_text(json.dumps(res, indent=1))
    return report(a, res)


def report(a, res: dict) -> int:
    ref = res.get("old") or res.get("full64")
    kinds = sorted({k for r in res.values() for k in r["by_kind"]})
    if a.sample_layers:
        print(f"EXTRAPOLATED: measured on the first {a.sample_layers} layers, totals scaled to all layers; "
              f"the split by kind is the measured CPU seconds")
    print("| variant | wall | CPU | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for v, r in res.items():
        print(f"| {v} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | "
              + " | ".join(f"{r['by_kind'].get(k, 0):.1f}" for k in kinds) + " |")
    for v, r in res.items():
        if ref is not None and r is not ref:
            diff = max(max(abs(x - y) / max(abs(c[0]), 1e-300) for x, y in zip(c, ref["curves"][key]))
                       for key, c in r["curves"].items())
            print(f"{v}: {ref['cpu_seconds'] / r['cpu_seconds']:.2f}× less CPU time, {ref['seconds'] / r['seconds']:.2f}× "
                  f"less wall time (nan: not measured) than {'old' if 'old' in res else 'full64'}; max curve difference {diff:.1e} of "
                  f"ΔL(0); precision checks {r['precision_checks'] or '-'}")
    best = res.get("par64") or res.get("small64") or next(iter(res.values()))
    secs = best["seconds"] if best["seconds"] == best["seconds"] else best["cpu_seconds"]  # interleaved: CPU
    print(f"analysis_seconds={secs:.1f}")
    if ref is not None and ref is not best:
        print(f"speedup={ref['cpu_seconds'] / best['cpu_seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
