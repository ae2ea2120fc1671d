"""Calibration data on real text (issue 28, item 4): which calibration mix generalises to text and tasks the
project did not write, chosen on a selection set that is never reported as a result.

For each variant (calibration data, method, γ …) at one parameter budget: `fasc compress`, then
- perplexity (standard protocol, 2,048-token windows, first `--ppl-tokens` tokens) on `real_heldout` (the
  fifth of the package's SQuAD/DROP/CoQA passages that no variant calibrates on) — the selection text —
  and, for the report, on `lambada` (novels) and the project's `general_en_heldout.txt`;
- the selection slice of the suite: documents `--offset` … `--offset + --limit` of HellaSwag, PIQA,
  WinoGrande, BoolQ and LAMBADA (the reported tables score the first 500, which this never reads);
- nothing of the fact probe, Jeopardy or the reserved sets.

    python -m bench.real_text --model smollm2 --budget 0.8                 # every variant
    python -m bench.real_text --model smollm2 --variants default real      # some
Writes bench/out/real_text-<model>-<budget>.{json,md}; variants already in the JSON are not re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
FASC = [sys.executable, "-m", "fasc"]
SELECT_TASKS = "hellaswag,piqa,winogrande,lambada_openai"   # BoolQ: SmolLM2 answers "no" below chance
GENERAL = "fasc/data/general_en.txt"
KNOWLEDGE = "fasc/data/knowledge_en.txt"

# name → fasc compress flags (beyond --model / --param-ratio / --out); "default" = the project's defaults
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "asvd": ["--method", "asvd"],
    "real": ["--data", GENERAL, KNOWLEDGE, "real"],
    "real+qa": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa"],
    "real-only": ["--data", "real", "real_qa"],
    "real+qa 64k": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa", "--tokens", "65536"],
    "asvd real+qa": ["--method", "asvd", "--data", GENERAL, KNOWLEDGE, "real", "real_qa"],
    "real+qa seq1024": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa", "--seq-len", "1024"],
    "real+qa γ0.5": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa", "--gamma", "0.5"],
    "real+qa γ1": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa", "--gamma", "1"],
    "real+qa T2": ["--data", GENERAL, KNOWLEDGE, "real", "real_qa", "--temperature", "2"],
}


def run(cmd: list[str]) -> dict:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    obj = json.loads(out.stdout)
    obj["_seconds"] = round(time.perf_counter() - t, 1)
    return obj


def evaluate(model: str, args) -> dict:
    row = {}
    for text in args.texts:
        proto = ["--ppl-protocol", "standard", "--max-tokens", str(args.ppl_tokens)] if "/" not in text else []
        r = run([*FASC, "eval", "--model", model, "--text", text, *proto, "--json", "--quiet"])
        row[f"ppl {Path(text).stem}"] = r["perplexity"]
    r = run([*FASC, "eval", "--model", model, "--tasks", SELECT_TASKS, "--offset", str(args.offset),
             "--limit", str(args.limit), "--json", "--quiet"])
    row["select"] = {t: m.get("acc") for t, m in r["lm_eval"].items()}
    row["select_samples"] = {t: s.get("acc") for t, s in r["samples"].items()}
    row["select ppl lambada_openai"] = r["lm_eval"]["lambada_openai"]["perplexity"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--offset", type=int, default=500)
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--texts", nargs="+", default=["real_heldout", "lambada"],
                   help="perplexity texts (the first is the selection text); e.g. add fasc/data/general_en_heldout.txt")
    p.add_argument("--work", default="/tmp/fasc-bench-real-text", help="exports go here (deleted after)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"real_text-{args.model}-{args.budget}.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    if "dense" not in res:
        res["dense"] = evaluate(args.model, args)
        path.write_text(json.dumps(res, indent=1))
    for name in args.variants:
        if name in res:
            continue
        out = str(Path(args.work) / name.replace(" ", "_").replace("+", "_"))
        t = time.perf_counter()
        c = run([*FASC, "compress", "--model", args.model, "--param-ratio", str(args.budget), "--out", out,
                 "--overwrite", "--heal-tokens", "0", *cache, *VARIANTS[name], "--json", "--quiet"])
        row = {"flags": VARIANTS[name], "compress_seconds": round(time.perf_counter() - t, 1),
               "predicted_delta_loss": c["predicted_delta_loss"], **evaluate(out, args)}
        res[name] = row
        path.write_text(json.dumps(res, indent=1))
        print(name, {k: v for k, v in row.items() if k.startswith("ppl") or k == "select"}, flush=True)
    path.with_suffix(".md").write_text(table(res, args))
    print(table(res, args))
    return 0


def table(res: dict, args) -> str:
    from fasc.retention import paired_difference

    tasks = [t for t in res["dense"]["select"] if all(t in r["select"] for r in res.values())]
    texts = [k for k in res["dense"] if k.startswith("ppl ") and all(k in r for r in res.values())]
    head = ["variant", *texts, *tasks, "Δ acc vs default (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = res.get("default")
    for name, row in res.items():
        cells = [name, *(f"{row[t]:.2f}" for t in texts), *(f"{100 * row['select'][t]:.1f}" for t in tasks)]
        if base is not None and name not in ("dense", "default"):
            a = [v for t in tasks for v in row["select_samples"][t]]
            b = [v for t in tasks for v in base["select_samples"][t]]
            d, se = paired_difference(a, b)
            cells.append(f"{100 * d:+.1f} ± {100 * se:.1f}")
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Selection set: {args.model} at {args.budget:.0%} of parameters; suite documents {args.offset}–"
            f"{args.offset + args.limit} (never reported); perplexity over the first {args.ppl_tokens} tokens.\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
