"""Healing modes at the same token budget (issue 30): global KL against block-local healing.

Each row is one `fasc compress --model M --param-ratio P --heal-tokens N --heal-mode MODE` run (a
subprocess, so its wall and CPU time are its own; the statistics and the analysis come from the cache
after the first row), then the export is scored here as `fasc eval` scores it: perplexity on the
model's built-in held-out text (`general_en_heldout.txt` for SmolLM2, paragraphs of 256 tokens) and
recall of the built-in probe facts (never in the calibration text), with `kept` = the share of the
facts the dense model gets right that the compressed one still gets right.

    OMP_NUM_THREADS=1 python -m bench.heal_modes --model smollm2 --ratio 0.8 --tokens 8192 \\
        --modes none global block --threads 1

Writes bench/out/heal_modes-<model>-<ratio>.json after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fasc
from fasc.data import read_text

OUT = Path(__file__).resolve().parent / "out"


def score(model, tok, facts, heldout: str) -> dict:
    r = fasc.fact_recall(model, tok, facts)
    return {"perplexity": fasc.perplexity(model, tok, heldout, seq_len=256), "recall": r.first_token,
            "exact": r.exact, "correct": r.correct}


def compress(args, mode: str, out: Path) -> dict:
    """One `fasc compress` run in a subprocess: its JSON result, wall and CPU seconds."""
    tokens = "0" if mode == "none" else str(args.tokens)
    cmd = [sys.executable, "-m", "fasc", "compress", "--model", args.model, "--param-ratio", str(args.ratio),
           "--heal-tokens", tokens, "--out", str(out), "--overwrite", "--json", "--quiet", *args.extra]
    if mode != "none":
        cmd += ["--heal-mode", mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout)
    return {"result": res, "wall_seconds": wall,
            "cpu_seconds": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "command": " ".join(cmd[2:])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--tokens", type=int, default=8192, help="healing tokens (per block in block mode)")
    p.add_argument("--modes", nargs="+", default=["none", "global", "block"], choices=["none", "global", "block"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `fasc compress` arguments")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"heal_modes-{args.model}-{args.ratio}-{args.tokens}.json"
    res = json.loads(path.read_text()) if path.exists() else {"config": vars(args), "rows": []}
    model, tok = fasc.load_model(args.model)
    paths = fasc.model_defaults(args.model)
    facts, heldout = fasc.load_probe(paths.probe), read_text(paths.heldout)
    dense = next((r for r in res["rows"] if r["mode"] == "dense"), None)
    if dense is None:
        dense = {"mode": "dense", **score(model, tok, facts, heldout)}
        res["rows"].append(dense)
    del model
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            run = compress(args, mode, Path(tmp) / "out")
            work, _ = fasc.load_compressed(run["result"]["out"])
            row = {"mode": mode, "tokens": 0 if mode == "none" else args.tokens, **run, **score(work, tok, facts, heldout)}
        known = [c for c, d in zip(row["correct"], dense["correct"]) if d]
        row["kept"] = sum(known) / max(1, len(known))
        row["ppl_ratio"] = row["perplexity"] / dense["perplexity"]
        res["rows"] = [r for r in res["rows"] if r["mode"] != mode] + [row]
        path.write_text(json.dumps(res, indent=1))
        heal = row["result"].get("heal") or {}
        print(json.dumps({"mode": mode, "ppl_ratio": round(row["ppl_ratio"], 4), "kept": round(row["kept"], 4),
                          "perplexity": round(row["perplexity"], 3), "wall_s": round(row["wall_seconds"], 1),
                          "cpu_s": round(row["cpu_seconds"], 1), "heal_s": heal.get("seconds"),
                          "heal_cpu_s": heal.get("cpu_seconds"), "heal": heal.get("summary")}), flush=True)


if __name__ == "__main__":
    main()
