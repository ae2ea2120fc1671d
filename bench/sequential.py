"""Sequential (error-aware) compression and healing against the one-shot pipeline (issue 12, items 3, 5).

Same statistics, same greedy allocation (`fasc.allocate(an, method, param_ratio=P)`), same plan;
variants differ only in how the factors are fitted:
    oneshot  `fasc.compress_` (every module from the dense model's statistics)
    refit    `compress_sequential_(rebasis=False)`: dense V, U refitted on the compressed model's inputs
    seq      `compress_sequential_(rebasis=True)`: V recomputed on C_x̃x̃ as well, then U refitted
    restat   `compress_sequential_(refit=False)`: U and V of the method on C_x̃x̃ (no refit to W x)
    +heal    `heal_` (KL to the dense model on the calibration text, factors only) after a variant
Scored on held-out text (perplexity) and on facts never in the calibration text (recall = top-1 of
the answer's first token, exact = greedy exact match). SmolLM2: built-in general English calibration,
all 210 modules, real_facts.jsonl; demo: filler text + half of the facts (every other per relation),
scored on the other half.

    python -m bench.sequential --model smollm2 --ratios 0.8
    python -m bench.sequential --model demo --ratios 0.9 0.8 0.6 --heal-tokens 16384

Writes bench/out/sequential-<model>.json (after every row) and ends with one line
`seq_minus_oneshot_fasc_recall=<points>` at the first ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import fasc
from fasc.data import make_batches, read_text
from fasc.heal import heal_
from fasc.sequential import compress_sequential_

OUT = Path(__file__).resolve().parent / "out"


def evaluate(model, tok, facts, heldout, ppl_tokens) -> dict:
    r = fasc.fact_recall(model, tok, facts)
    return {"perplexity": fasc.perplexity(model, tok, heldout, seq_len=256, max_tokens=ppl_tokens),
            "recall": r.first_token, "exact": r.exact, "n_facts": r.n, "correct": r.correct}


def setup(model_name: str, tokens: int):
    """(model, tok, batches, calib cfg, facts scored, held-out text, data description)."""
    from bench.knowledge import split_facts

    model, tok = fasc.load_model(model_name)
    paths = fasc.model_defaults(model_name)
    cfg = fasc.CalibConfig(n_tokens=tokens, seq_len=paths.seq_len, temperature=paths.temperature)
    if model_name == "demo":
        calib_facts, facts = split_facts(fasc.load_probe(paths.probe))
        batches = make_batches(tok, [calib_facts, read_text(paths.text)], cfg, name="facts + filler")
        data = "demo: filler + half the facts; scored on the other half"
    else:
        facts = fasc.load_probe(paths.probe)
        batches = fasc.batches_from_files(tok, [paths.calib], cfg)
        data = f"{paths.calib.name}; scored on {paths.probe.name}"
    return model, tok, batches, cfg, facts, read_text(paths.heldout), data


def run(args, log=print) -> dict:
    torch.set_num_threads(args.threads)
    model, tok, batches, cfg, facts, heldout, data = setup(args.model, args.tokens)
    out_path = OUT / f"sequential-{args.model}{'-' + args.tag if args.tag else ''}.json"
    OUT.mkdir(exist_ok=True)
    res = {"config": vars(args), "data": data, "rows": []}

    def add(row):
        dense_ok = res["rows"][0]["correct"] if res["rows"] else None
        if dense_ok is not None and "correct" in row:
            kept = [c for c, d in zip(row["correct"], dense_ok) if d]
            row["kept_of_dense"] = sum(kept) / max(1, len(kept))
        res["rows"].append(row)
        out_path.write_text(json.dumps(res, indent=1))
        log(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)

    if args.dense_from:  # the dense row of an earlier run with the same data (saves one evaluation)
        add(next(r for r in json.loads(Path(args.dense_from).read_text())["rows"] if r["variant"] == "dense"))
    else:
        add({"variant": "dense", "method": None, "ratio": 1.0, **evaluate(model, tok, facts, heldout, args.ppl_tokens)})
    t = time.perf_counter()
    stats, hit = fasc.calibrate_cached(model, batches, cfg)
    res["calibration_seconds"], res["calibration_cached"] = time.perf_counter() - t, hit
    for method in args.methods:
        an, _ = fasc.analysis_cached(model, stats, fasc.CompressConfig(gamma=args.gamma), (method,))
        an.max_cached_bases = len(an.modules) + 8
        for P in args.ratios:
            plan = fasc.allocate(an, method, param_ratio=P)
            for variant in args.variants:
                work = copy.deepcopy(model)
                t = time.perf_counter()
                if variant == "oneshot":
                    fasc.compress_(work, an, plan)
                else:
                    compress_sequential_(work, an, plan, batches, rebasis=variant != "refit",
                                         refit=variant != "restat")
                sec = time.perf_counter() - t
                add({"variant": variant, "method": method, "ratio": P, "seconds": sec,
                     **evaluate(work, tok, facts, heldout, args.ppl_tokens)})
                if variant in args.heal_on:
                    for n in args.heal_tokens:
                        healed = copy.deepcopy(work)
                        h = heal_(healed, model, batches, tokens=n, lr=args.heal_lr)
                        add({"variant": f"{variant}+heal", "method": method, "ratio": P, "heal": h.to_dict(),
                             "seconds": h.seconds, **evaluate(healed, tok, facts, heldout, args.ppl_tokens)})
                        del healed
                del work
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8])
    p.add_argument("--methods", nargs="+", default=["asvd", "fasc"])
    p.add_argument("--variants", nargs="+", default=["oneshot", "refit", "seq"])
    p.add_argument("--heal-on", nargs="*", default=["seq"])
    p.add_argument("--heal-tokens", type=int, nargs="*", default=[])
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--dense-from", help="take the dense row from this earlier output JSON (same data)")
    args = p.parse_args(argv)
    res = run(args)
    rows = res["rows"]
    get = lambda v: next((r["recall"] for r in rows if r["variant"] == v and r["method"] == "fasc"
                          and r["ratio"] == args.ratios[0]), float("nan"))
    print(f"seq_minus_oneshot_fasc_recall={100 * (get('seq') - get('oneshot')):.1f}")


if __name__ == "__main__":
    main()
