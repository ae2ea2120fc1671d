"""Does ρ say where facts live? The knowledge map, fast and exact, against the statistics that claim to —
and what the map costs.

    python -m bench.knowledge_map --model demo                       # every fact of the probe
    python -m bench.knowledge_map --model smollm2 --max-facts 120     # 120 facts, evenly spaced
    python -m bench.knowledge_map --model smollm2 --max-facts 120 --timing --old-every 5

Without --timing: runs `fasc report --knowledge-map --rho-fisher --json` (the fast map, the exact map and
the probe calibration are cached beside the statistics, so a re-run only re-reads them) and prints the
Spearman table as Markdown, the modules that lose most, and ends with `spearman_rho_knowledge_loss=<value>`.
The JSON lands in bench/out/knowledge_map-<model>-<method>-<share>.json.

With --timing (nothing read from or written to the map cache): where the time goes, before and after, in
one run. The exact map's modules are measured in turn, each by the new path (layers from the module's on,
head at the answer positions, factors decomposed once beforehand) and — for every `--old-every`-th module,
alternating with it — by the code before (a fresh decomposition, then a full padded forward of the probe);
the old total is that per-module mean × modules (its cost does not depend on the layer). Also: the fast
map (decompositions + one forward/backward pass), the FLOPs of the exact map (its floor) and of the old
loop, the achieved GFLOP/s of a dense forward, and the Spearman of each fast predictor with the exact map.
Ends with `fast_seconds=… exact_seconds=… old_exact_seconds=…`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from fasc.cli import main as fasc_main

OUT = Path(__file__).resolve().parent / "out"


def _report(a) -> int:
    args = ["report", "--model", a.model, "--knowledge-map", "--rho-fisher", "--share", str(a.share),
            "--map-method", a.method, "--tokens", str(a.tokens), "--json"]
    if a.max_facts:
        args += ["--max-facts", str(a.max_facts)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = fasc_main(args)
    if code != 0:
        return code
    rep = json.loads(buf.getvalue())
    km = rep["knowledge_map"]
    OUT.mkdir(exist_ok=True)
    (OUT / f"knowledge_map-{a.model}-{a.method}-{a.share:g}.json").write_text(json.dumps(rep, indent=1))
    print(f"{a.model}: {len(rep['modules'])} modules, {km['n_facts']} facts, {a.method} at {a.share:.0%} of each "
          f"module's parameters, dense recall {km['dense_recall']:.3f}")
    print("| statistic | Spearman with knowledge loss | with recall drop | modules |\n|---|---|---|---|")
    for c in km["fast"]["vs_exact"]:
        print(f"| fast map: {c['what']}{' (default)' if c['default'] else ''} | {c['spearman_knowledge_loss']:+.2f} | "
              f"{c['spearman_recall_drop']:+.2f} | {c['n_modules']} |")
    for c in km["correlations"]:
        print(f"| {c['statistic']} | {c['spearman_knowledge_loss']:+.2f} | {c['spearman_recall_drop']:+.2f} | "
              f"{c['n_modules']} |")
    top = sorted(rep["modules"], key=lambda m: -m["knowledge_loss"])[:5]
    print("top modules: " + ", ".join(f"{m['fqn']} ({m['knowledge_loss']:.3f} nats, recall −{m['recall_drop']:.3f}, "
                                      f"ρ {m['rho']:.2f})" for m in top))
    by_kind: dict[str, list[float]] = {}
    for m in rep["modules"]:
        by_kind.setdefault(m["kind"], []).append(m["knowledge_loss"])
    print("mean knowledge loss by kind: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in by_kind.items()))
    foc = sorted(rep["modules"], key=lambda m: -m["answers_over_general_share"])
    print("facts/general Fisher energy share, highest: " + ", ".join(
        f"{m['fqn']} {m['answers_over_general_share']:.2f}" for m in foc[:5]) + "; lowest: " + ", ".join(
        f"{m['fqn']} {m['answers_over_general_share']:.2f}" for m in foc[-3:]))
    print(f"spearman_rho_knowledge_loss={km['correlations'][0]['spearman_knowledge_loss']:.3f}")
    return 0


def _timing(a) -> int:
    from fasc.analysis import Analysis
    from fasc.config import CalibConfig, CompressConfig
    from fasc.data import load_probe
    from fasc.evaluate import answer_scores
    from fasc.knowledge_map import (FAST_PREDICTORS, _Replay, _targets, encode_probe, exact_flops, fast_map,
                                    fast_vs_exact, forward_flops, map_factors, measure_gflops,
                                    probe_subset, spearman)
    from fasc.loading import load_model
    from fasc.pipeline import analysis_cached, batches_from_files, calibrate_cached, model_defaults
    from fasc.surgery import dense_module, replace_module

    def load() -> str:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())

    model, tok = load_model(a.model)
    d = model_defaults(a.model)
    cfg = CalibConfig(n_tokens=d.tokens, seq_len=d.seq_len, temperature=d.temperature)
    stats, _ = calibrate_cached(model, batches_from_files(tok, [str(p) for p in d.calib_files], cfg), cfg)
    an, _ = analysis_cached(model, stats, CompressConfig(gamma=d.gamma))          # pca/fasc summaries, cached
    old_an = Analysis(model, stats, CompressConfig(gamma=d.gamma))               # the old path's own bases
    old_an.load_summary_tensors(an.summary_tensors())
    examples = probe_subset(load_probe(d.probe), a.max_facts)
    enc = encode_probe(tok, examples)
    fqns, ranks, methods = _targets(an, None, a.share, a.method)
    print(f"{a.model}: {len(fqns)} modules × {len(enc)} facts ({sum(len(i) - 1 for i, _ in enc)} input tokens), "
          f"{a.method} at {a.share:.0%}; torch threads {torch.get_num_threads()}; {load()}")
    gf = measure_gflops(model, enc, fqns, 10**9)
    print(f"dense forward of the probe: {forward_flops(model, enc, fqns) / 1e9:.1f} GFLOP at {gf:.1f} GFLOP/s achieved")

    t, c = time.perf_counter(), time.process_time()
    factors = map_factors(an, fqns, methods, ranks)
    t_fac, c_fac = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    fm = fast_map(model, tok, an, examples, share=a.share, method=a.method, factors=factors)
    t_pass, c_pass = time.perf_counter() - t, time.process_time() - c
    print(f"fast map: decompositions {t_fac:.1f} s + one forward/backward pass {t_pass:.1f} s = {t_fac + t_pass:.1f} s "
          f"wall, {c_fac + c_pass:.1f} s CPU ({c_fac:.1f} + {c_pass:.1f}) ({load()})")
    if a.fast_only:
        print(f"fast_seconds={t_fac + t_pass:.1f}")
        return 0

    mods = dict(model.named_modules())
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        rep = _Replay(model, enc, fqns)
    t_cap = time.perf_counter() - t
    new_s, old_s, n_old = t_cap, 0.0, 0
    new_c, old_c = time.process_time() - c, 0.0
    rows = []
    for j, (f, k, m) in enumerate(zip(fqns, ranks, methods)):
        if a.old_every and j % a.old_every == 0:       # the code before: decompose now, full padded forward
            t, c = time.perf_counter(), time.process_time()
            U, V = old_an.factors(f, m, k)
            old = mods[f]
            with torch.no_grad():
                replace_module(model, f, dense_module(old, U @ V.T))
            try:
                answer_scores(model, enc, 32)
            finally:
                replace_module(model, f, old)
            old_s += time.perf_counter() - t
            old_c += time.process_time() - c
            n_old += 1
        t, c = time.perf_counter(), time.process_time()
        U, V = factors[f]
        old = mods[f]
        replace_module(model, f, dense_module(old, U @ V.T))
        try:
            with torch.no_grad():
                rows.append(rep.gather(rep.scores(rep.layer_of(f)), len(enc)))
        finally:
            replace_module(model, f, old)
        new_s += time.perf_counter() - t
        new_c += time.process_time() - c
    from fasc.knowledge_map import KnowledgeMap

    base = rep.gather(rep.base, len(enc))
    km = KnowledgeMap(fqns, ranks, methods, base[0], base[1], torch.stack([r[0] for r in rows]),
                      torch.stack([r[1] for r in rows]))
    flops_new = exact_flops(model, enc, fqns, fqns)
    flops_old = exact_flops(model, enc, fqns, fqns, engine="loop")
    old_total = old_s / max(n_old, 1) * len(fqns) if n_old else float("nan")
    old_cpu = old_c / max(n_old, 1) * len(fqns) if n_old else float("nan")
    print(f"exact map, new: {new_s + t_fac:.1f} s = decompositions {t_fac:.1f} s (shared with the fast map) + "
          f"capture {t_cap:.1f} s + {len(fqns)} modules re-run from their layer {new_s - t_cap:.1f} s wall "
          f"({new_c + c_fac:.1f} s CPU); "
          f"{flops_new / 1e12:.2f} TFLOP → floor {flops_new / gf / 1e9:.0f} s at {gf:.1f} GFLOP/s ({load()})")
    print(f"exact map, old (decompose + full padded forward per module): {n_old} of {len(fqns)} modules measured in "
          f"{old_s:.1f} s, alternating with the new → {old_total:.0f} s wall ({old_cpu:.0f} s CPU) for all; "
          f"≥ {flops_old / 1e12:.2f} TFLOP "
          f"(unpadded, logits everywhere)")
    print("| fast predictor | Spearman with knowledge loss | with recall drop |\n|---|---|---|")
    for r in fast_vs_exact(fm, km):
        print(f"| {r['predictor']}: {FAST_PREDICTORS[r['predictor']]}{' (default)' if r['default'] else ''} | "
              f"{r['spearman_knowledge_loss']:+.3f} | {r['spearman_recall_drop']:+.3f} |")
    pred = [an.predicted(f, m, k) for f, m, k in zip(fqns, methods, ranks)]
    print(f"| predicted ΔL at the map's ranks (general calibration) | {spearman(pred, km.knowledge_loss().tolist()):+.3f} "
          f"| {spearman(pred, km.recall_drop().tolist()):+.3f} |")
    print(f"fast_seconds={t_fac + t_pass:.1f} exact_seconds={new_s + t_fac:.1f} old_exact_seconds={old_total:.0f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.knowledge_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--max-facts", type=int)
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--method", default="asvd")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing", action="store_true", help="time the fast, the exact and the old map (see above)")
    p.add_argument("--fast-only", action="store_true", help="with --timing: time the fast map only")
    p.add_argument("--old-every", type=int, default=5, help="with --timing: the old path on every N-th module "
                                                            "(0 = never)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    return _timing(a) if a.timing else _report(a)


if __name__ == "__main__":
    sys.exit(main())
