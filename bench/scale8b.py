"""A Llama-3-8B-shaped model end to end without a download: calibrate, analyse, compress at 80 %, export.

    python -m bench.scale8b                      # 1/8 width, 1 and 2 layers in memory: a few minutes (quiet CPU)
    python -m bench.scale8b --width-scale 0.0625 --tokens 512 --seq-len 128 --heal-tokens 512   # + healing (block)
    python -m bench.scale8b --width-scale 1 --tokens 512 --seq-len 256        # the real layer shape
        # (≈ 17 GB RAM; one layer ≈ 8 min on one CPU thread with --layers 1 --whole, no eigh of 14336²;
        #  --diagnostics adds it: tens of minutes)
    python -m bench.scale8b --width-scale 1 --layers 32 --tokens 524288 --seq-len 2048 \\
        --device cuda --linalg-device cuda   # the whole model on one GPU (256 × 2048 tokens)

The model is the Llama-3-8B config (32 × 4096 / 14336, 32 heads of 128, 8 KV heads, vocab 128256,
untied embeddings) with hidden and intermediate widths and head counts multiplied by --width-scale
(head size 128 kept) and only --layers decoder layers in memory, random seeded weights in --dtype
(float32 on the CPU: calibrating 256 tokens at 1/16 width took 818 s in bf16 against 28 s in float32
on this shared 2-core machine — CPU bf16 matmuls are slow).
Calibration is a real forward+backward over random tokens (fasc.calibrate, all statistics);
analysis is the fasc summaries every module needs for a budget (Analysis.precompute(("fasc",))
on --linalg-device, as `fasc compress` runs it: whitened by Cholesky, no eigh of C_x; --diagnostics
adds the misalignment curves the dashboard draws, i.e. an eigh of every C_x); compression allocates
80 % of the modules' parameters greedily and swaps the layers in place; export writes the factored folder.

Times are CPU seconds of the process (time.process_time; with --threads 1 that is the work done,
steadier than wall time on a shared machine; wall times are in the JSON). Everything runs twice,
with L and L+1 layers, so that per-layer costs are measured as differences
(the embedding and the 128256-wide lm_head are a fixed cost, large at reduced width). The
whole-model figures for 32 layers are EXTRAPOLATED (fixed cost + 32 × per-layer), scaled linearly
to --target-tokens for calibration, and labelled so. Prints `layer_seconds=…` (one decoder layer,
all four steps, at the measured width and tokens) and `peak_rss_mb=…` as its last figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, head_dim=128)


def shape(scale: float) -> dict:
    s = dict(LLAMA3_8B)
    heads = max(1, round(s["heads"] * scale))
    kv = max(1, round(s["kv_heads"] * scale))
    while heads % kv:
        kv -= 1
    return dict(s, hidden=heads * s["head_dim"], intermediate=int(round(s["intermediate"] * scale / 64) * 64),
                heads=heads, kv_heads=kv)


def stats_bytes_per_layer(hidden: int, inter: int, kv: int, head_dim: int, bytes_per: int, s: int = 64) -> int:
    """The README formula 8·(Σ_groups n_g² + Σ_modules (n² + m + 3s)) for one Llama decoder layer:
    groups qkv (n = hidden), o (hidden), gate/up (hidden), down (inter)."""
    kvd = kv * head_dim
    mods = [(hidden, hidden), (kvd, hidden), (kvd, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
            (hidden, inter)]  # (m, n)
    groups = [hidden, hidden, hidden, inter]
    return bytes_per * (sum(n * n for n in groups) + sum(n * n + m + 3 * s for m, n in mods))


def build(sh: dict, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=sh["hidden"], intermediate_size=sh["intermediate"], num_hidden_layers=layers,
                      num_attention_heads=sh["heads"], num_key_value_heads=sh["kv_heads"], head_dim=sh["head_dim"],
                      vocab_size=sh["vocab"], max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    # sdpa, what `fasc.load_model` gives a real Llama (transformers' default): eager attention would keep
    # every layer's softmax (float32 and bf16) for the backward, ≈ 3 GB per layer at 4 × 2048 tokens
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of the weights on the way
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _progress(res: dict, step: str, dev: torch.device) -> None:
    """One line per finished step on stderr, at once: a run stopped by a time limit (a lent GPU's
    minutes are few) still leaves the steps it finished in its log."""
    gpu = f", peak GPU {torch.cuda.max_memory_allocated(dev) / 2 ** 20:.0f} MB" if dev.type == "cuda" else ""
    print(f"[{res['layers']} layers] {step}: {res[step + '_wall_s']:.1f} s wall, {res[step + '_s']:.1f} s CPU, "
          f"peak RSS {rss_mb():.0f} MB{gpu}", file=sys.stderr, flush=True)


def child(a) -> dict:
    import fasc
    from fasc.data import Batch
    from fasc.export import save_compressed
    from fasc.linalg_device import LinalgConfig

    torch.set_num_threads(a.threads)
    sh = shape(a.width_scale)
    dev = torch.device(a.device)
    t = time.perf_counter()
    with dev:   # weights initialised where they run: on a GPU, no 16 GB detour through the CPU
        model = build(sh, a.child_layers, getattr(torch, a.dtype))
    res = {"layers": a.child_layers, "shape": sh, "build_s": time.perf_counter() - t}
    g = torch.Generator().manual_seed(0)
    n_seq = max(1, a.tokens // a.seq_len)
    batches = []
    for i in range(0, n_seq, a.batch_size):
        ids = torch.randint(0, sh["vocab"], (min(a.batch_size, n_seq - i), a.seq_len), generator=g)
        tm = torch.ones_like(ids, dtype=torch.bool)
        tm[:, -1] = False
        batches.append(Batch(ids, torch.ones_like(ids), tm))
    cfg = fasc.CalibConfig(n_tokens=a.tokens, seq_len=a.seq_len, batch_size=a.batch_size,
                           device=a.stats_device)
    t, c = time.perf_counter(), time.process_time()
    stats = fasc.calibrate(model, batches, cfg, model_fp="scale8b")
    _sync(dev)
    res["calibrate_s"], res["calibrate_wall_s"] = time.process_time() - c, time.perf_counter() - t
    _progress(res, "calibrate", dev)
    res["tokens"] = stats.n_tokens
    res["stats_bytes"] = stats.nbytes()
    res["rss_after_calibration_mb"] = rss_mb()
    t, c = time.perf_counter(), time.process_time()
    an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=1.0),
                       linalg=LinalgConfig(device=a.linalg_device, dtype=a.linalg_dtype))
    an.precompute(("fasc",), diagnostics=a.diagnostics)
    _sync(dev)
    res["analysis_s"], res["analysis_wall_s"] = time.process_time() - c, time.perf_counter() - t
    _progress(res, "analysis", dev)
    res["precision_checks"] = {str(k): v for k, v in an.precision_checks.items()}
    t, c = time.perf_counter(), time.process_time()
    plan = fasc.allocate(an, "fasc", param_ratio=a.param_ratio)
    dense = copy.deepcopy(model) if a.heal_tokens else None   # healing's teacher
    fasc.compress_(model, an, plan)  # in place: without healing the dense original is not needed afterwards
    _sync(dev)
    res["compress_s"], res["compress_wall_s"] = time.process_time() - c, time.perf_counter() - t
    _progress(res, "compress", dev)
    kept, orig = plan.params(an)
    res["param_ratio"] = kept / orig
    del an, stats
    if a.heal_tokens:
        heal_step(a, res, model, dense, batches, dev)
        del dense
    t, c = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        save_compressed(model, None, Path(d) / "export", meta={"method": "fasc", "bench": "scale8b"})
    res["export_s"], res["export_wall_s"] = time.process_time() - c, time.perf_counter() - t
    _progress(res, "export", dev)
    res["peak_rss_mb"] = rss_mb()
    if dev.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    print(json.dumps(res))
    return res


def heal_step(a, res: dict, model, dense, batches, dev: torch.device) -> None:
    """`heal_` for --heal-tokens tokens in --heal-mode (no held-out checks): CPU and wall seconds, the FLOPs
    counted by torch's FlopCounterMode, and the peak memory healing adds (a GPU's allocator peak; on the
    CPU the torch profiler's peak of tensor bytes, which also holds the factors' saved copy) beside each
    mode's formula (`heal_memory_bytes`, `heal_block_memory_bytes`) for this model."""
    from torch.utils.flop_counter import FlopCounterMode

    from fasc.heal import heal_, heal_block_memory_bytes, heal_memory_bytes, used_batches
    from fasc.layers import LowRankLinear

    low = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    fac = {n: m.U.numel() + m.V.numel() for n, m in low.items()}
    replaced = sum(m.in_features * m.out_features for m in low.values())
    used = used_batches(batches, a.heal_tokens)
    positions = sum(b.input_ids.numel() for b in used)
    copy_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["heal_formula_global_bytes"] = heal_memory_bytes(dense, sum(fac.values()), replaced, a.seq_len,
                                                         a.batch_size) - copy_bytes
    res["heal_formula_block_bytes"] = heal_block_memory_bytes(dense, fac, replaced, positions, a.seq_len,
                                                              a.batch_size) - copy_bytes
    flops = FlopCounterMode(display=False)
    t, c = time.perf_counter(), time.process_time()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        with flops:
            h = heal_(model, dense, batches, tokens=a.heal_tokens, mode=a.heal_mode, micro_batch=a.batch_size)
        _sync(dev)
        res["heal_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, flops:
            h = heal_(model, dense, batches, tokens=a.heal_tokens, mode=a.heal_mode, micro_batch=a.batch_size)
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        cur = peak = 0
        for _, n in events:
            cur += n
            peak = max(peak, cur)
        res["heal_peak_bytes"] = peak - 4 * sum(fac.values())   # less the factors' saved copy (host memory on a GPU)
    res["heal_s"], res["heal_wall_s"] = time.process_time() - c, time.perf_counter() - t
    res["heal_flops"] = flops.get_total_flops()
    res["heal_tokens"], res["heal_mode"] = h.tokens, h.mode
    _progress(res, "heal", dev)


STEPS = ("calibrate_s", "analysis_s", "compress_s", "export_s")


def run_child(args: list[str], layers: int) -> dict | None:
    # the child's stderr (its progress lines, or its error) goes straight to ours
    r = subprocess.run([sys.executable, "-m", "bench.scale8b", *args, "--child-layers", str(layers)],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def whole_model(a, args: list[str], steps: tuple[str, ...], unit: str) -> int:
    """One run with all `--layers` in memory: every step measured, nothing extrapolated but calibration,
    which is scaled linearly from the tokens run to `--target-tokens` when fewer were run (labelled)."""
    r = run_child(args, a.layers)
    if r is None:
        return 1
    scale = a.target_tokens / r["tokens"]
    OUT.mkdir(exist_ok=True)
    (OUT / f"scale8b-whole-w{a.width_scale:g}-L{a.layers}.json").write_text(json.dumps({"args": vars(a), "run": r}, indent=1))
    sh = r["shape"]
    print(f"Llama-3-8B-shaped ({sh['hidden']} / {sh['intermediate']}, {sh['heads']} heads, {sh['kv_heads']} KV, "
          f"vocab {sh['vocab']}), {a.layers} layers, {a.dtype} weights on {a.device}, linear algebra on "
          f"{a.linalg_device}; {r['tokens']} calibration tokens, kept {r['param_ratio']:.1%} of the modules' parameters")
    print(f"| step ({unit}) | measured | at {a.target_tokens} calibration tokens |")
    print("|---|---|---|")
    total = 0.0
    for k in steps:
        at = r[k] * (scale if k.startswith("calibrate") else 1.0)
        total += at
        label = " (calibration scaled linearly: EXTRAPOLATED)" if k.startswith("calibrate") and scale != 1 else ""
        print(f"| {k.split('_')[0]} | {r[k]:.1f} s | {at:.1f} s{label} |")
    print(f"| total | {sum(r[k] for k in steps):.1f} s | {total / 60:.1f} min |")
    print(f"whole_model_minutes={total / 60:.1f}")
    if "peak_gpu_mb" in r:
        print(f"peak_gpu_mb={r['peak_gpu_mb']:.0f}")
    print(f"peak_rss_mb={r['peak_rss_mb']:.0f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale8b", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width-scale", type=float, default=0.125, help="multiply widths and heads (1 = the real shape)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers in memory (measured with L and L+1)")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens per run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--target-tokens", type=int, default=256 * 2048, help="tokens of the extrapolated run")
    p.add_argument("--param-ratio", type=float, default=0.8)
    p.add_argument("--diagnostics", action="store_true",
                   help="also the misalignment curves (an eigh of every C_x; `fasc compress` skips them)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="weights' dtype (default: bfloat16 on a GPU; float32 on the CPU, whose bf16 matmuls are slow)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stats-device", default="auto")
    p.add_argument("--linalg-device", default="auto")
    p.add_argument("--linalg-dtype", default="auto", choices=("auto", "float64", "float32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None, help="folder for the temporary export")
    p.add_argument("--whole", action="store_true",
                   help="one run with --layers layers (e.g. 32: the whole model on a GPU), every step measured")
    p.add_argument("--heal-tokens", type=int, default=0, help="also heal the compressed layers for this many tokens "
                   "(per block in block mode; 0 = no healing step) and extrapolate to --heal-target-tokens")
    p.add_argument("--heal-mode", default="block", choices=("block", "global"))
    p.add_argument("--heal-target-tokens", type=int, default=65536, help="healing tokens of the extrapolated run")
    p.add_argument("--child-layers", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.child_layers:
        child(a)
        return 0
    args = sys.argv[1:] if argv is None else list(argv)
    gpu = a.device.startswith("cuda")
    # the CPU's work is its process time (steady on a shared machine); a GPU's is wall time (synchronized)
    all_steps = STEPS + (("heal_s",) if a.heal_tokens else ())
    steps = tuple(k.replace("_s", "_wall_s") for k in all_steps) if gpu else all_steps
    unit = "wall seconds" if gpu else "CPU seconds"
    if a.whole:
        return whole_model(a, args, steps, unit)
    runs = {}
    for L in (a.layers, a.layers + 1):  # fresh processes: each peak RSS is its own
        runs[L] = run_child(args, L)
        if runs[L] is None:
            return 1
        print(f"{L} layer(s): " + ", ".join(f"{k.split('_')[0]} {runs[L][k]:.1f} s" for k in steps)
              + f", peak RSS {runs[L]['peak_rss_mb']:.0f} MB"
              + (f", peak GPU {runs[L]['peak_gpu_mb']:.0f} MB" if gpu else ""), file=sys.stderr)
    lo, hi = runs[a.layers], runs[a.layers + 1]
    sh = lo["shape"]
    per_layer = {k: max(hi[k] - lo[k], 0.0) for k in steps}
    fixed = {k: max(lo[k] - a.layers * per_layer[k], 0.0) for k in steps}
    tok_scale = a.target_tokens / lo["tokens"]
    L_full = LLAMA3_8B["layers"]
    heal_scale = a.heal_target_tokens / a.heal_tokens if a.heal_tokens else 1.0
    whole = {k: (fixed[k] + L_full * per_layer[k]) * (tok_scale if k.startswith("calibrate") else
                                                       heal_scale if k.startswith("heal") else 1.0) for k in steps}
    rss_layer = hi["peak_rss_mb"] - lo["peak_rss_mb"]
    f64 = stats_bytes_per_layer(sh["hidden"], sh["intermediate"], sh["kv_heads"], sh["head_dim"], 8)
    full = LLAMA3_8B
    f64_full = stats_bytes_per_layer(full["hidden"], full["intermediate"], full["kv_heads"], full["head_dim"], 8)
    measured_layer = hi["stats_bytes"] - lo["stats_bytes"]
    res = {"args": vars(a), "runs": runs, "per_layer_s": per_layer, "fixed_s": fixed,
           "whole_model_extrapolated_s": whole, "stats_bytes_per_layer": measured_layer,
           "stats_formula_bytes_per_layer": f64, "stats_formula_bytes_per_layer_8b_float64": f64_full}
    OUT.mkdir(exist_ok=True)
    (OUT / f"scale8b-w{a.width_scale:g}{'-' + a.device.replace(':', '') if gpu else ''}.json").write_text(
        json.dumps(res, indent=1))
    w = f"width ×{a.width_scale:g}: {sh['hidden']} / {sh['intermediate']}, {sh['heads']} heads, {sh['kv_heads']} KV"
    print(f"Llama-3-8B-shaped ({w}, vocab {sh['vocab']}), {a.dtype} weights on {a.device}, "
          f"linear algebra on {a.linalg_device}; measured with {a.layers} and {a.layers + 1} layers, "
          f"{lo['tokens']} calibration tokens")
    print(f"| step ({unit}) | per decoder layer (measured) | fixed: embeddings, lm_head (measured) | "
          f"whole model, {L_full} layers, {a.target_tokens} calibration tokens (EXTRAPOLATED) |")
    print("|---|---|---|---|")
    for k in steps:
        print(f"| {k.split('_')[0]} | {per_layer[k]:.2f} s | {fixed[k]:.2f} s | {whole[k] / 60:.1f} min |")
    print(f"| total | {sum(per_layer.values()):.2f} s | {sum(fixed.values()):.2f} s | "
          f"{sum(whole.values()) / 60:.1f} min (extrapolated) |")
    print(f"statistics per layer: {measured_layer / 2**20:.0f} MB measured, {f64 / 2**20:.0f} MB by the formula "
          f"(float64); the real 8B layer: {f64_full / 2**30:.2f} GiB float64, {f64_full / 2 / 2**30:.2f} GiB float32; "
          f"peak RSS {lo['peak_rss_mb']:.0f} MB ({a.layers} layer) / {hi['peak_rss_mb']:.0f} MB ({a.layers + 1}), "
          f"+{rss_layer:.0f} MB per layer" + (f"; peak GPU {hi['peak_gpu_mb']:.0f} MB" if gpu else ""))
    if a.heal_tokens:
        res["heal"] = heal_figures(a, lo, hi)
        (OUT / f"scale8b-w{a.width_scale:g}{'-' + a.device.replace(':', '') if gpu else ''}.json").write_text(
            json.dumps(res, indent=1))
    print(f"layer_seconds={sum(per_layer.values()):.2f}")
    print(f"peak_rss_mb={hi['peak_rss_mb']:.0f}")
    return 0


H100_BF16_PEAK = 989e12   # FLOP/s, dense bf16 tensor cores (H100 SXM datasheet)
H100_MFU = 0.4            # the share of that peak assumed for healing's small matmuls (not measured)


def heal_figures(a, lo: dict, hi: dict) -> dict:
    """Healing per decoder layer (measured: L+1 minus L layers) and Llama-3-8B at 80 % with
    --heal-target-tokens (EXTRAPOLATED): FLOPs per healed token scaled to the real width (a layer's
    matmuls as width², the lm_head as width), time at `H100_MFU` of the H100's bf16 peak, and both
    modes' memory by the formula for the real shape in bf16 (uniform 80 % of every module's parameters)."""
    from fasc.heal import heal_block_memory_bytes, heal_memory_bytes
    from fasc.modules import find_linears

    n = lo["heal_tokens"]
    flops_layer = (hi["heal_flops"] - lo["heal_flops"]) / n           # per healed token, one layer
    flops_fixed = max(lo["heal_flops"] / n - a.layers * flops_layer, 0.0)
    w = 1 / a.width_scale
    flops_8b = (flops_fixed * w + LLAMA3_8B["layers"] * flops_layer * w * w) * a.heal_target_tokens
    with torch.device("meta"):
        full = build(shape(1.0), LLAMA3_8B["layers"], torch.bfloat16)
    fac = {i.fqn: int(a.param_ratio * i.params) for i in find_linears(full)}
    replaced = sum(i.params for i in find_linears(full))
    seq = 2048
    positions = -(-a.heal_target_tokens // (2 * seq)) * 2 * seq
    mem = {"global": heal_memory_bytes(full, sum(fac.values()), replaced, seq),
           "block": heal_block_memory_bytes(full, fac, replaced, positions, seq)}
    dense = sum(p.numel() * p.element_size() for p in full.parameters())
    out = {"mode": a.heal_mode, "tokens_measured": n, "layer_cpu_s": hi["heal_s"] - lo["heal_s"],
           "layer_peak_bytes": hi["heal_peak_bytes"] - lo["heal_peak_bytes"],
           "layer_formula_bytes": hi[f"heal_formula_{a.heal_mode}_bytes"] - lo[f"heal_formula_{a.heal_mode}_bytes"],
           "peak_bytes": {"lo": lo["heal_peak_bytes"], "hi": hi["heal_peak_bytes"]},
           "formula_bytes": {"lo": lo[f"heal_formula_{a.heal_mode}_bytes"],
                             "hi": hi[f"heal_formula_{a.heal_mode}_bytes"]},
           "flops_per_token_layer": flops_layer, "flops_per_token_fixed": flops_fixed,
           "llama3_8b_flops_EXTRAPOLATED": flops_8b,
           "llama3_8b_h100_minutes_EXTRAPOLATED": flops_8b / (H100_BF16_PEAK * H100_MFU) / 60,
           "llama3_8b_dense_bf16_bytes": dense, "llama3_8b_formula_bytes": mem}
    print(f"healing ({a.heal_mode}, {n} tokens measured): per decoder layer {out['layer_cpu_s']:.2f} CPU s, "
          f"{flops_layer / 1e9:.3f} GFLOP per token; peak memory healing adds {lo['heal_peak_bytes'] / 2**20:.1f} MB "
          f"({a.layers} layer) / {hi['heal_peak_bytes'] / 2**20:.1f} MB ({a.layers + 1}), by the formula "
          f"{out['formula_bytes']['lo'] / 2**20:.1f} / {out['formula_bytes']['hi'] / 2**20:.1f} MB")
    print(f"Llama-3-8B at {a.param_ratio:.0%}, {a.heal_target_tokens} healing tokens ({a.heal_mode}; EXTRAPOLATED): "
          f"{flops_8b / 1e15:.1f} PFLOP, {out['llama3_8b_h100_minutes_EXTRAPOLATED']:.1f} min on one H100 at "
          f"{H100_MFU:.0%} of its {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak; memory by the formula beside the "
          f"{dense / 2**30:.1f} GiB dense model: global {mem['global'] / 2**30:.1f} GiB, block "
          f"{mem['block'] / 2**30:.1f} GiB (bf16, micro-batches of 2 × {seq})")
    print(f"heal_h100_minutes={out['llama3_8b_h100_minutes_EXTRAPOLATED']:.1f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
