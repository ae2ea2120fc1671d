"""Calibration overhead: wall time of a full calibration step vs a bare forward+backward, side by side.

    python -m bench.calibration                    # Llama-shaped: hidden 1024, inter 2816, 8 layers, 16 heads, vocab 8192, seq 512
    python -m bench.calibration --model demo       # the embedded demo model
    python -m bench.calibration --model smollm2    # the real model

Three timings per repetition, interleaved (A, B, C, A, B, C, ...) so that machine noise hits all
three alike; medians are reported:
  A  bare forward+backward as a user runs it: loss.backward() with every parameter requiring grad
  B  forward+backward with activation gradients only (what calibration needs, no hooks)
  C  a full calibration step (fasc.Calibrator: hooks, C_x, C_h, r, ρ sketch)
Ends with `overhead_ratio=<C/A>`; C/B is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fasc
from fasc.data import Batch

OUT = Path(__file__).resolve().parent / "out"


def llama_shaped(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=8192, seq=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=max(seq, 2048))
    return LlamaForCausalLM(cfg).eval()


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The Llama-shaped benchmark model's options (shared with bench.memory)."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    tm = torch.ones_like(ids, dtype=torch.bool)
    tm[:, -1] = False
    return Batch(ids, torch.ones_like(ids), tm)


def bare_step(model, b: Batch, weight_grads: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(weight_grads)
    emb = model.get_input_embeddings()
    h = None if weight_grads else emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
        nxt = torch.cat([b.input_ids[:, 1:], b.input_ids[:, :1]], 1)
        loss = F.cross_entropy(logits[b.target_mask].float(), nxt[b.target_mask], reduction="sum")
        loss.backward()
    finally:
        if h is not None:
            h.remove()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)


def run(model, batch: Batch, reps: int, cfg: fasc.CalibConfig) -> dict:
    times = {"A_bare_fwd_bwd": [], "B_activation_grads_only": [], "C_calibration": []}
    bare_step(model, batch, True)          # warm-up
    with fasc.Calibrator(model, cfg) as cal:
        cal.step(batch)
    for _ in range(reps):
        t = time.perf_counter()
        bare_step(model, batch, True)
        times["A_bare_fwd_bwd"].append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_step(model, batch, False)
        times["B_activation_grads_only"].append(time.perf_counter() - t)
        with fasc.Calibrator(model, cfg) as cal:
            t = time.perf_counter()
            cal.step(batch)
            times["C_calibration"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int(batch.stat_mask.sum())
    return {"median_seconds": med, "all_seconds": times, "tokens_per_step": tokens,
            "calibration_tokens_per_second": tokens / med["C_calibration"],
            "overhead_ratio": med["C_calibration"] / med["A_bare_fwd_bwd"],
            "overhead_ratio_vs_activation_grads": med["C_calibration"] / med["B_activation_grads_only"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-shaped", help="llama-shaped (default), demo, smollm2 or a folder")
    add_shape_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stats-dtype", default="auto", choices=("auto", "float64", "float32"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.model == "llama-shaped":
        model = llama_shaped(a.hidden, a.intermediate, a.layers, a.heads, a.vocab, a.seq)
        vocab, seq = a.vocab, a.seq
    else:
        model, tok = fasc.load_model(a.model)
        vocab = model.config.vocab_size
        seq = min(a.seq, getattr(model.config, "max_position_embeddings", a.seq))
    batch = make_batch(vocab, a.batch, seq)
    cfg = fasc.CalibConfig(n_tokens=10**9, seq_len=seq, stats_dtype=a.stats_dtype)
    res = run(model, batch, a.reps, cfg)
    res.update(model=a.model, threads=a.threads, batch=a.batch, seq=seq, stats_dtype=a.stats_dtype,
               parameters=fasc.modules.parameter_count(model))
    OUT.mkdir(exist_ok=True)
    (OUT / f"calibration-{Path(a.model).name}.json").write_text(json.dumps(res, indent=1))
    m = res["median_seconds"]
    print(f"model {a.model} ({res['parameters']:,} params), {res['tokens_per_step']} tokens/step, {a.threads} threads, "
          f"median of {a.reps}: bare fwd+bwd {m['A_bare_fwd_bwd']:.3f}s, activation-grads fwd+bwd "
          f"{m['B_activation_grads_only']:.3f}s, calibration {m['C_calibration']:.3f}s "
          f"({res['calibration_tokens_per_second']:.0f} tok/s); vs activation-grads-only: "
          f"{res['overhead_ratio_vs_activation_grads']:.2f}x")
    print(f"overhead_ratio={res['overhead_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
