"""Real speed of factored exports: prefill and decode latency, tokens/s and weight memory, dense vs
factored at 90 / 80 / 60 % of the compressed modules' parameters.

    python -m bench.speed                          # SmolLM2-135M and a Llama-shaped model, CPU, 1 thread
    python -m bench.speed --models llama --device cuda

Each factored model is written with `fasc.save_compressed` and read back with plain
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` — the model other tools get.
Ranks are uniform (every linear layer but the LM head keeps share p: k(m+n−k) = p·mn pivoted, the
default; k = ⌊p·mn/(m+n)⌋ with `--factors uv`) and the factors come
from the weights' SVD: speed depends on shapes only, not on how the ranks were chosen. Variants are
timed in interleaved rounds (median of `--reps`), so ratios come from one run under the same load.
Prefill: one forward over a `--prompt`-token prompt. Decode: `--new` single-token steps with the KV
cache, per token. Prints a table, one JSON line per variant, and `decode_speedup_80=…` last (SmolLM2,
or the last model measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.selection import comma_choices
from fasc.config import DEFAULT_FACTORS, FACTORS
from fasc.errors import FascError

RATIOS = (0.9, 0.8, 0.6)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def load_dense(name: str, args):
    import fasc

    if name == "smollm2":
        return fasc.load_model("smollm2")
    from bench.calibration import llama_shaped

    return llama_shaped(args.hidden, args.intermediate, args.layers, args.heads, args.vocab, 2048), None


def uniform_rank(m: int, n: int, p: float, factors: str = DEFAULT_FACTORS) -> int:
    """⌊k⌋ keeping share p of an m×n weight's parameters (`fasc.allocate.uniform_rank`, rounded down)."""
    from fasc.allocate import uniform_rank as exact

    return max(1, int(exact(m, n, p, factors)))


def factored_copies(model, tok, ratios, folder: Path, factors=(DEFAULT_FACTORS,)) -> dict[str, tuple[object, float]]:
    """{variant: (model loaded by transformers with trust_remote_code, predicted speed-up)}, a variant per
    ratio and storage ("80%" the default storage, "80% uv" the other)."""
    import copy

    from transformers import AutoModelForCausalLM

    import fasc
    from fasc.layers import LowRankLinear
    from fasc.modules import find_linears
    from fasc.speed import predicted_speedup
    from fasc.surgery import replace_module

    infos = find_linears(model)
    svd = {}
    for i in infos:
        W = model.get_submodule(i.fqn).weight.detach().float()
        W = W.T if i.transposed else W  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        svd[i.fqn] = (U * S, Vh.T)
    out = {}
    for p, f in [(p, f) for p in ratios for f in factors]:
        ranks = {i.fqn: uniform_rank(i.out_features, i.in_features, p, f) for i in infos}
        work = copy.deepcopy(model)
        for i in infos:
            US, V = svd[i.fqn]
            k = ranks[i.fqn]
            bias = work.get_submodule(i.fqn).bias
            replace_module(work, i.fqn, LowRankLinear.from_factors(
                US[:, :k].contiguous(), V[:, :k].contiguous(), None if bias is None else bias.detach()))
        name = f"{int(p * 100)}%" + ("" if f == DEFAULT_FACTORS else f" {f}")
        path = fasc.save_compressed(work, tok, folder / name.replace("%", "").replace(" ", "-"), factors=f)
        del work
        hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        shapes = {i.fqn: (i.out_features, i.in_features) for i in infos}
        out[name] = (hf, predicted_speedup(model, shapes, ranks, factors=f))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_once(model, ids: torch.Tensor, new: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one prompt."""
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync(device)
    t1 = time.perf_counter()
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / new


def measure(name: str, args, folder: Path) -> list[dict]:
    dense, tok = load_dense(name, args)
    variants = {"dense": (dense, 1.0)}
    variants.update(factored_copies(dense, tok, args.ratios, folder, args.factors))
    for m, _ in variants.values():
        m.to(args.device)
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, args.prompt), generator=g).to(args.device)
    for m, _ in variants.values():  # warm-up
        time_once(m, ids[:, :16], 2, args.device)
    times = {k: ([], []) for k in variants}
    for _ in range(args.reps):  # interleaved rounds: every variant sees the same load
        for k, (m, _) in variants.items():
            pre, dec = time_once(m, ids, args.new, args.device)
            times[k][0].append(pre)
            times[k][1].append(dec)
    rows = []
    base_pre = statistics.median(times["dense"][0])
    base_dec = statistics.median(times["dense"][1])
    base_mem = weight_bytes(dense)
    for k, (m, pred) in variants.items():
        pre, dec = statistics.median(times[k][0]), statistics.median(times[k][1])
        rows.append({"model": name, "variant": k, "params": sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()),
                     "weight_mb": round(weight_bytes(m) / 2**20, 1), "memory_ratio": round(weight_bytes(m) / base_mem, 3),
                     "prefill_ms": round(pre * 1e3, 2), "prefill_tok_s": round(args.prompt / pre, 1),
                     "decode_ms_per_tok": round(dec * 1e3, 3), "decode_tok_s": round(1 / dec, 1),
                     "prefill_speedup": round(base_pre / pre, 3), "decode_speedup": round(base_dec / dec, 3),
                     "predicted_speedup": round(pred, 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,smollm2", help="comma-separated: smollm2, llama (Llama-shaped, random)")
    p.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",")), default=RATIOS)
    p.add_argument("--prompt", type=int, default=128, help="prefill length (tokens)")
    p.add_argument("--new", type=int, default=32, help="decode steps (tokens)")
    p.add_argument("--factors", default=DEFAULT_FACTORS,
                   help=f"comma-separated factor storages to time at each ratio (`fasc compress --factors`): "
                        f"pivoted, uv (default {DEFAULT_FACTORS})")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    args = p.parse_args(argv)
    try:
        args.factors = comma_choices(args.factors, FACTORS, "storage")
    except FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    all_rows = []
    with tempfile.TemporaryDirectory(prefix="fasc-speed-") as tmp:
        for name in names:
            rows = measure(name, args, Path(tmp) / name)
            all_rows += rows
            print(f"\n{name} ({args.device}, {args.threads} thread(s), prompt {args.prompt}, {args.new} decode steps, "
                  f"median of {args.reps} interleaved rounds)")
            print(f"{'variant':<12} {'params':>12} {'weights MB':>10} {'prefill ms':>10} {'prefill tok/s':>13} "
                  f"{'decode ms/tok':>13} {'decode tok/s':>12} {'prefill ×':>9} {'decode ×':>8} {'predicted ×':>11}")
            for r in rows:
                print(f"{r['variant']:<12} {r['params']:>12,} {r['weight_mb']:>10.1f} {r['prefill_ms']:>10.2f} "
                      f"{r['prefill_tok_s']:>13.1f} {r['decode_ms_per_tok']:>13.3f} {r['decode_tok_s']:>12.1f} "
                      f"{r['prefill_speedup']:>9.3f} {r['decode_speedup']:>8.3f} {r['predicted_speedup']:>11.3f}")
    for r in all_rows:
        print(json.dumps(r))
    last = "smollm2" if "smollm2" in names else names[-1]
    at80 = next((r for r in all_rows if r["model"] == last and r["variant"] == "80%"), None)
    print(f"decode_speedup_80={at80['decode_speedup'] if at80 else 'n/a'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
