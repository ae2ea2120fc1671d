"""Knowledge benchmark: fact recall and perplexity after low-rank compression.

For each calibration temperature T, method, module set and rank ratio: compress a copy of the model
and measure top-1 fact recall on facts *held out of calibration*, recall on the calibration facts,
and held-out perplexity. Then, per module, predicted vs measured loss increase (Spearman).

    python -m bench.knowledge --model demo
    python -m bench.knowledge --model smollm2 --ratios 0.5 0.75 --temperatures 1 4

Calibration = one half of the probe's facts (prompt/answer lines, every other fact per relation)
+ general text; recall is scored on the other half. Writes bench/out/knowledge-<model>.{json,md}
and ends with one line `fasc_minus_best_variance_recall=<points>` (fasc vs the best of pca/asvd at
50 % rank on all modules, T and γ as given first).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import fasc
from fasc.config import HYBRID_TAU
from fasc.config import METHODS
from fasc.data import Example, make_batches, read_text
from fasc.evaluate import fact_recall, perplexity, target_loss
from fasc.layers import LowRankLinear
from fasc.surgery import replace_module

OUT = Path(__file__).resolve().parent / "out"
VARIANCE_METHODS = ("pca", "asvd")
CALIBRATION_FREE = ("svd",)               # independent of the calibration data
GRADIENT_FREE = ("svd", "asvd", "pca")     # independent of T (activations only)


@dataclass(frozen=True)
class KnowledgeConfig:
    model: str = "demo"
    methods: tuple[str, ...] = METHODS
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    module_sets: tuple[str, ...] = ("mlp", "all")
    temperatures: tuple[float, ...] = (1.0, 4.0)
    gammas: tuple[float, ...] = (fasc.CompressConfig().gamma,)
    targets: str = "all"
    tau: float = HYBRID_TAU
    tokens: int = 16384
    seq_len: int = 0          # 0: the model's default (demo 64, others 256)
    text: str | None = None
    ppl_tokens: int = 8192
    spearman_methods: tuple[str, ...] = ("pca", "asvd", "fasc")
    spearman_ratio: float = 0.5
    spearman_every: int = 1
    spearman_tokens: int = 2048
    threads: int = 2


def split_facts(facts: list[Example]) -> tuple[list[Example], list[Example]]:
    """(calibration half, evaluation half): alternate facts within each relation, deterministic."""
    seen: dict[str, int] = defaultdict(int)
    calib, held = [], []
    for ex in facts:
        (calib if seen[ex.relation] % 2 == 0 else held).append(ex)
        seen[ex.relation] += 1
    return calib, held


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def evaluate(model, tok, calib_facts, eval_facts, heldout, ppl_tokens):
    held = fact_recall(model, tok, eval_facts)
    cal = fact_recall(model, tok, calib_facts)
    ppl = perplexity(model, tok, heldout, seq_len=256, max_tokens=ppl_tokens)
    return {"recall_heldout": held.first_token, "exact_heldout": held.exact, "recall_calib": cal.first_token,
            "perplexity": ppl}


def measured_vs_predicted(model, an, method, ratio, batches, temperature, every) -> dict:
    """Compress one module at a time; measured ΔL of the calibration loss vs predicted ΔL."""
    base = target_loss(model, batches, temperature)
    pred, meas, names = [], [], []
    mods = dict(model.named_modules())
    for i, info in enumerate(an.modules):
        if i % every:
            continue
        k = max(1, round(ratio * info.max_rank))
        U, V = an.factors(info.fqn, method, k)
        old = mods[info.fqn]
        bias = None if getattr(old, "bias", None) is None else old.bias.detach()
        replace_module(model, info.fqn, LowRankLinear.from_factors(U, V, bias, dtype=old.weight.dtype))
        try:
            meas.append(target_loss(model, batches, temperature) - base)
        finally:
            replace_module(model, info.fqn, old)
        pred.append(an.predicted(info.fqn, method, k))
        names.append(info.fqn)
    return {"spearman": spearman(pred, meas), "n_modules": len(pred),
            "per_module": [{"fqn": f, "predicted": p, "measured": m} for f, p, m in zip(names, pred, meas)]}


def run(cfg: KnowledgeConfig, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    model, tok = fasc.load_model(cfg.model)
    paths = fasc.model_defaults(cfg.model)
    facts = fasc.load_probe(paths.probe)
    calib_facts, eval_facts = split_facts(facts)
    text = read_text(cfg.text or paths.text)
    heldout = read_text(paths.heldout)
    result = {"config": asdict(cfg), "n_facts_calib": len(calib_facts), "n_facts_heldout": len(eval_facts),
              "rows": [], "spearman": [], "timing": {}}
    base = evaluate(model, tok, calib_facts, eval_facts, heldout, cfg.ppl_tokens)
    result["rows"].append({"method": "uncompressed", "T": None, "gamma": None, "modules": "-", "ratio": 1.0, **base})
    log(f"uncompressed: {base}")
    first_T, first_g = cfg.temperatures[0], cfg.gammas[0]
    seq_len = cfg.seq_len or paths.seq_len
    result["seq_len"] = seq_len
    for T in cfg.temperatures:
        ccfg = fasc.CalibConfig(n_tokens=cfg.tokens, seq_len=seq_len, temperature=T, targets=cfg.targets)
        batches = make_batches(tok, [calib_facts, text], ccfg, name="facts + text")
        t = time.perf_counter()
        stats, hit = fasc.calibrate_cached(model, batches, ccfg)
        result["timing"][f"calibration_T{T}"] = {"seconds": time.perf_counter() - t, "from_cache": hit,
                                                 "tokens": stats.n_tokens}
        sub, n = [], 0
        for b in batches:
            if n >= cfg.spearman_tokens:
                break
            sub.append(b)
            n += int(b.stat_mask.sum())
        for gamma in cfg.gammas:
            t = time.perf_counter()
            an, _ = fasc.analysis_cached(model, stats, fasc.CompressConfig(gamma=gamma))
            result["timing"][f"eigen_T{T}_g{gamma}"] = time.perf_counter() - t
            for method in cfg.methods:
                if method in GRADIENT_FREE and T != first_T or method not in ("fasc", "hybrid") and gamma != first_g:
                    continue
                an.max_cached_bases = len(an.modules) + 8      # one method's bases serve every plan
                for mods in cfg.module_sets:
                    for r in cfg.ratios:
                        plan = fasc.allocate(an, method, rank_ratio=r, modules=mods, tau=cfg.tau)
                        work = copy.deepcopy(model)
                        fasc.compress_(work, an, plan)
                        kept, orig = plan.params(an)
                        row = {"method": method, "T": None if method in GRADIENT_FREE else T,
                               "gamma": gamma if method in ("fasc", "hybrid") else None, "modules": mods,
                               "ratio": r, "param_ratio": kept / orig, "predicted_dl": plan.predicted(an),
                               "n_fasc_modules": sum(m == "fasc" for m in plan.methods.values()),
                               **evaluate(work, tok, calib_facts, eval_facts, heldout, cfg.ppl_tokens)}
                        del work
                        result["rows"].append(row)
                        log(f"T={T} γ={gamma} {method:6s} {mods:4s} r={r}: heldout recall "
                            f"{row['recall_heldout']:.3f} calib {row['recall_calib']:.3f} ppl {row['perplexity']:.2f}")
                if method in cfg.spearman_methods and gamma == first_g:
                    sp = measured_vs_predicted(model, an, method, cfg.spearman_ratio, sub, T, cfg.spearman_every)
                    for mods in cfg.module_sets:
                        sel = {i.fqn for i in fasc.modules.select(an.modules, mods)}
                        pm = [p for p in sp["per_module"] if p["fqn"] in sel]
                        result["spearman"].append({
                            "method": method, "T": T, "modules": mods, "ratio": cfg.spearman_ratio,
                            "n_modules": len(pm),
                            "spearman": spearman([p["predicted"] for p in pm], [p["measured"] for p in pm])})
                    log(f"T={T} {method}: Spearman(predicted, measured ΔL) = {sp['spearman']:.3f}")
                an.max_cached_bases = 16
                an._bases.clear()
    result["timing"]["total_seconds"] = time.perf_counter() - t0
    return result


def headline(result: dict) -> float:
    """fasc − max(pca, asvd) held-out recall, in points, at 50 % rank on all modules (first T, γ)."""
    cfg = result["config"]
    T, g = cfg["temperatures"][0], cfg["gammas"][0]

    def get(method):
        for r in result["rows"]:
            if r["method"] == method and r["modules"] == "all" and r["ratio"] == 0.5 and \
                    r["T"] in (None, T) and r["gamma"] in (None, g):
                return r["recall_heldout"]
        return float("nan")
    return 100 * (get("fasc") - max(get(m) for m in VARIANCE_METHODS))


def pivot(result: dict) -> str:
    """Compact table: one row per (method, T, γ), one column per (module set, rank ratio);
    cells = held-out recall / perplexity."""
    cols = sorted({(r["modules"], r["ratio"]) for r in result["rows"] if r["method"] != "uncompressed"},
                  key=lambda c: (c[0] != "mlp", c[1]))
    keys = list(dict.fromkeys((r["method"], r["T"], r["gamma"]) for r in result["rows"]))
    cell = {(r["method"], r["T"], r["gamma"], r["modules"], r["ratio"]): r for r in result["rows"]}
    lines = ["| method | T | γ | " + " | ".join(f"{m} {round(100 * q)} %" for m, q in cols) + " |",
             "|---" * (3 + len(cols)) + "|"]
    for m, T, g in keys:
        if m == "uncompressed":
            r = cell[(m, T, g, "-", 1.0)]
            lines.append("| uncompressed | – | – | " + " | ".join(
                f"{r['recall_heldout']:.3f} / {r['perplexity']:.1f}" for _ in cols) + " |")
            continue
        vals = []
        for mods, q in cols:
            r = cell.get((m, T, g, mods, q))
            vals.append("–" if r is None else f"{r['recall_heldout']:.3f} / {r['perplexity']:.1f}")
        lines.append(f"| {m} | {T if T is not None else '–'} | {g if g is not None else '–'} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Model `{cfg['model']}`; calibration: {result['n_facts_calib']} facts (prompt/answer, targets="
             f"{cfg['targets']}) + text, {cfg['tokens']} tokens, seq {result.get('seq_len', cfg['seq_len'])}; recall scored on "
             f"{result['n_facts_heldout']} held-out facts (top-1 of the answer's first token); perplexity on held-out "
             f"text ({cfg['ppl_tokens']} tokens).", "",
             "Held-out fact recall / perplexity (module set, rank ratio):", "", pivot(result), "",
             "All measurements:", "",
             "| method | T | γ | modules | rank ratio | params kept | recall held-out | recall calib. facts | "
             "perplexity | predicted ΔL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['T'] if r['T'] is not None else '–'} | "
                     f"{r['gamma'] if r['gamma'] is not None else '–'} | {r['modules']} | {r['ratio']:.2f} | "
                     f"{r.get('param_ratio', 1.0):.2f} | {r['recall_heldout']:.3f} | {r['recall_calib']:.3f} | "
                     f"{r['perplexity']:.2f} | {r.get('predicted_dl', 0.0):.4f} |")
    if result["spearman"]:
        lines += ["", "Predicted vs measured loss increase, one module compressed at a time "
                      f"(rank ratio {cfg['spearman_ratio']}, calibration loss at the same T):", "",
                  "| method | T | modules | n | Spearman |", "|---|---|---|---|---|"]
        for s in result["spearman"]:
            lines.append(f"| {s['method']} | {s['T']} | {s['modules']} | {s['n_modules']} | {s['spearman']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    d = KnowledgeConfig()
    p = argparse.ArgumentParser(prog="python -m bench.knowledge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=list(d.ratios))
    p.add_argument("--modules", nargs="+", default=list(d.module_sets), help="module sets: mlp, all, attention")
    p.add_argument("--temperatures", nargs="+", type=float, default=list(d.temperatures))
    p.add_argument("--gammas", nargs="+", type=float, default=list(d.gammas), help="Fisher shrinkage values for fasc")
    p.add_argument("--targets", choices=("all", "answers"), default=d.targets)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--tokens", type=int, default=d.tokens)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--text", help="general calibration text (default: the model's built-in text without facts)")
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens)
    p.add_argument("--spearman-methods", nargs="*", default=list(d.spearman_methods))
    p.add_argument("--spearman-every", type=int, default=d.spearman_every, help="measure every k-th module")
    p.add_argument("--spearman-tokens", type=int, default=d.spearman_tokens)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--tag", default="", help="suffix for the output files")
    p.add_argument("--from-json", help="re-render the tables of an earlier run's JSON and exit")
    a = p.parse_args(argv)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        print(markdown(result))
        print(f"fasc_minus_best_variance_recall={headline(result):.1f}")
        return 0
    cfg = KnowledgeConfig(model=a.model, methods=tuple(a.methods), ratios=tuple(a.ratios),
                          module_sets=tuple(a.modules), temperatures=tuple(a.temperatures), gammas=tuple(a.gammas),
                          targets=a.targets, tau=a.tau, tokens=a.tokens, seq_len=a.seq_len, text=a.text,
                          ppl_tokens=a.ppl_tokens, spearman_methods=tuple(a.spearman_methods),
                          spearman_every=a.spearman_every, spearman_tokens=a.spearman_tokens, threads=a.threads)
    try:
        result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except fasc.FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    stem = f"knowledge-{Path(cfg.model).name}{('-' + a.tag) if a.tag else ''}"
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (OUT / f"{stem}.md").write_text("Command: `python -m bench.knowledge " + " ".join(argv or sys.argv[1:]) + "`\n\n" + md + "\n")
    print(md)
    print(f"fasc_minus_best_variance_recall={headline(result):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
