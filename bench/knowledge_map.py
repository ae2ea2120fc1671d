"""Does ρ say where facts live? The measured knowledge map against the statistics that claim to.

    python -m bench.knowledge_map --model demo                       # every fact of the probe
    python -m bench.knowledge_map --model smollm2 --max-facts 120     # 120 facts, evenly spaced

Runs `fasc report --knowledge-map --rho-fisher --json` (the map and the probe calibration are cached
beside the statistics, so a re-run only re-reads them) and prints the Spearman table as Markdown,
the modules that lose most, and ends with `spearman_rho_knowledge_loss=<value>`. The JSON lands in
bench/out/knowledge_map-<model>-<method>-<share>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from fasc.cli import main as fasc_main

OUT = Path(__file__).resolve().parent / "out"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.knowledge_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--max-facts", type=int)
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--method", default="asvd")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    args = ["report", "--model", a.model, "--knowledge-map", "--rho-fisher", "--share", str(a.share),
            "--map-method", a.method, "--tokens", str(a.tokens), "--json"]
    if a.max_facts:
        args += ["--max-facts", str(a.max_facts)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = fasc_main(args)
    if code != 0:
        return code
    rep = json.loads(buf.getvalue())
    km = rep["knowledge_map"]
    OUT.mkdir(exist_ok=True)
    (OUT / f"knowledge_map-{a.model}-{a.method}-{a.share:g}.json").write_text(json.dumps(rep, indent=1))
    print(f"{a.model}: {len(rep['modules'])} modules, {km['n_facts']} facts, {a.method} at {a.share:.0%} of each "
          f"module's parameters, dense recall {km['dense_recall']:.3f}")
    print("| statistic | Spearman with knowledge loss | with recall drop | modules |\n|---|---|---|---|")
    for c in km["correlations"]:
        print(f"| {c['statistic']} | {c['spearman_knowledge_loss']:+.2f} | {c['spearman_recall_drop']:+.2f} | "
              f"{c['n_modules']} |")
    top = sorted(rep["modules"], key=lambda m: -m["knowledge_loss"])[:5]
    print("top modules: " + ", ".join(f"{m['fqn']} ({m['knowledge_loss']:.3f} nats, recall −{m['recall_drop']:.3f}, "
                                      f"ρ {m['rho']:.2f})" for m in top))
    by_kind: dict[str, list[float]] = {}
    for m in rep["modules"]:
        by_kind.setdefault(m["kind"], []).append(m["knowledge_loss"])
    print("mean knowledge loss by kind: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in by_kind.items()))
    foc = sorted(rep["modules"], key=lambda m: -m["answers_over_general_share"])
    print("facts/general Fisher energy share, highest: " + ", ".join(
        f"{m['fqn']} {m['answers_over_general_share']:.2f}" for m in foc[:5]) + "; lowest: " + ", ".join(
        f"{m['fqn']} {m['answers_over_general_share']:.2f}" for m in foc[-3:]))
    print(f"spearman_rho_knowledge_loss={km['correlations'][0]['spearman_knowledge_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
