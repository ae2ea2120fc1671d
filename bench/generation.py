"""Why generated knowledge breaks (issue 28, item 3): closed-book few-shot QA on compressed models, with
what each lost answer became and where in the answer it went wrong.

For each model (dense, then compressed exports) and each QA set (`qa_facts`: the probe as questions;
`jeopardy`: the package's clues) at k examples: exact match of the greedy answer; of the items the dense
model answers right at the same k, how many the compressed model keeps; the lost ones by kind (copied an
example, a loop, the answer inside a longer reply, another answer, nothing) and by depth (first gold token
still the argmax; every gold token still the argmax teacher-forced — then only the generation around it
failed); the gold answer's log-likelihood change (nats). Comparing k = 0 with k = 5 separates the
in-context part (reading the examples) from the fact itself; compressing only the attention or only the
MLP modules separates the two kinds, and `--make "fasc plan, attention part" "fasc plan, MLP part"` splits
the default plan itself (its ranks of one group, the other dense).

    python -m bench.generation --model smollm2 --budget 0.8              # exports made here (defaults)
    python -m bench.generation --exports fasc=/tmp/ex/fasc80 asvd=/tmp/ex/asvd80
Writes bench/out/generation-<model>.{json,md}; rows already in the JSON are not re-run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# name → fasc compress flags (beyond --model / --param-ratio / --out)
EXPORTS = {"fasc": [], "asvd": ["--method", "asvd"], "asvd-uniform": ["--method", "asvd", "--allocation", "uniform"],
           "fasc attention only": ["--modules", "attention"], "fasc mlp only": ["--modules", "mlp"],
           "fasc attention share 0.8": ["--attention-share", "0.8"],
           # the default plan's ranks of one group only (the other group stays dense): which part of the
           # plan the lost answers come from
           "fasc plan, attention part": ["PART", "attention"], "fasc plan, MLP part": ["PART", "mlp"]}


def plan_part(plan_path: Path, part: str, out: Path) -> Path:
    """The saved plan restricted to its attention or MLP modules (written to `out`)."""
    from fasc.modules import MLP_KINDS, _kind

    plan = json.loads(plan_path.read_text())
    keep = lambda f: (_kind(f) in MLP_KINDS) == (part == "mlp")  # noqa: E731
    plan["ranks"] = {f: k for f, k in plan["ranks"].items() if keep(f)}
    plan["methods"] = {f: m for f, m in plan.get("methods", {}).items() if keep(f)}
    out.write_text(json.dumps(plan))
    return out


def qa_run(model, tok, name: str, k: int, limit: int | None, probe) -> dict:
    from fasc.qa import qa_set, run_qa

    t = time.perf_counter()
    r = run_qa(model, tok, qa_set(name, probe), k=k, limit=limit, batch_size=32).to_dict()
    r["seconds"] = round(time.perf_counter() - t, 1)
    return r


def main(argv=None) -> int:
    import fasc
    from fasc.pipeline import model_defaults

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--exports", nargs="*", default=[], help="NAME=FOLDER of exports made already")
    p.add_argument("--make", nargs="*", default=[e for e in EXPORTS if "plan," not in e and "share" not in e],
                   choices=list(EXPORTS),
                   help="exports to make here (those not given with --exports)")
    p.add_argument("--sets", nargs="+", default=["qa_facts", "jeopardy"])
    p.add_argument("--shots", nargs="+", type=int, default=[5, 0])
    p.add_argument("--shots-for", nargs="*", default=["fasc", "asvd"],
                   help="models also run at the other --shots values (all run at the first)")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--work", default="/tmp/fasc-bench-generation")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"generation-{args.model}.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    probe = model_defaults(args.model).probe
    given = dict(e.split("=", 1) for e in args.exports)
    for name in args.make:
        if name in given:
            continue
        out = str(Path(args.work) / name.replace(" ", "_").replace(",", ""))
        if not (Path(out) / "fasc_config.json").is_file():
            flags = EXPORTS[name]
            if flags[0] == "PART":  # the plan comes from making the "fasc" row's export (reused by that row)
                whole = Path(args.work) / "fasc-plan.json"
                if not whole.is_file():
                    subprocess.run([sys.executable, "-m", "fasc", "compress", "--model", args.model, "--param-ratio",
                                    str(args.budget), "--heal-tokens", "0", "--out", str(Path(args.work) / "fasc"),
                                    "--overwrite", "--quiet", "--save-plan", str(whole)], check=True)
                flags = ["--ranks", str(plan_part(whole, flags[1], Path(args.work) / f"plan-{flags[1]}.json"))]
            else:
                flags = ["--param-ratio", str(args.budget), *flags]
            subprocess.run([sys.executable, "-m", "fasc", "compress", "--model", args.model, "--heal-tokens", "0",
                            "--out", out, "--overwrite", "--quiet", *flags], check=True)
        given[name] = out
    models = {"dense": args.model, **given}
    _, tok = fasc.load_model(args.model)
    for mname, spec in models.items():
        model = None
        shots = args.shots if mname == "dense" or mname in args.shots_for else args.shots[:1]
        for k in shots:
            for s in args.sets:
                key = f"{mname} | {s} | k={k}"
                if key in res:
                    continue
                if model is None:
                    model, _ = fasc.load_model(spec)
                res[key] = qa_run(model, tok, s, k, args.limit, probe)
                path.write_text(json.dumps(res))
                print(key, sum(res[key]["correct"]), len(res[key]["correct"]), res[key]["seconds"], flush=True)
    md = table(res)
    path.with_suffix(".md").write_text(md)
    print(md)
    return 0


def table(res: dict) -> str:
    from fasc.qa import known_kept

    head = ["model", "set", "k", "exact match", "dense right", "kept", "known kept", "lost: copied / loop / longer / "
            "other / empty", "lost with 1st token right", "lost with every token right", "Δ log P(gold) on known"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in res.items():
        mname, s, k = key.split(" | ")
        dense = res.get(f"dense | {s} | {k}")
        em = f"{sum(r['correct'])}/{len(r['correct'])}"
        if dense is None or mname == "dense":
            lines.append(f"| {mname} | {s} | {k[2:]} | {em} | | | | | | | |")
            continue
        kk = known_kept(dense, r)
        kinds = kk["lost_kinds"]
        lines.append(f"| {mname} | {s} | {k[2:]} | {em} | {kk['dense_correct']} | {kk['kept']} | "
                     f"{100 * kk['share']:.0f} % | {kinds.get('copied', 0)} / {kinds.get('repeated', 0)} / "
                     f"{kinds.get('contains', 0)} / {kinds.get('other', 0)} / {kinds.get('empty', 0)} | "
                     f"{kk['lost_first_token_right']} | {kk['lost_all_tokens_right']} | {kk['delta_logp_known']:+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
