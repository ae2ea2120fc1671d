"""ρ across training: `fasc report` on every checkpoint of the demo model, beside its fact recall.

    python -m bench.training

For each checkpoint (0, 10, 25, 50, 100 % of training): calibration on the demo's calibration text
(cached), mean |ρ| per layer × module kind, the signed mean, and fact recall over all 5200 facts
(measured here, not read from the training log). Ends with `rho_rise=<mean ρ at 100 % − at 0 %>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fasc
from fasc.loading import DEMO_CHECKPOINTS
from fasc.modules import kinds_in_order
from fasc.pipeline import model_defaults

OUT = Path(__file__).resolve().parent / "out"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--temperature", type=float, default=model_defaults("demo").temperature)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    paths = model_defaults("demo")
    facts = fasc.load_probe(paths.probe)
    cfg = fasc.CalibConfig(n_tokens=a.tokens, seq_len=paths.seq_len, temperature=a.temperature)
    rows, kinds = [], None
    for ck in sorted(DEMO_CHECKPOINTS.glob("ckpt-*")):
        model, tok = fasc.load_model(str(ck))
        batches = fasc.batches_from_files(tok, [paths.calib], cfg)
        stats, _ = fasc.calibrate_cached(model, batches, cfg)
        an, _ = fasc.analysis_cached(model, stats)
        rep = an.report(0.5)
        kinds = kinds or kinds_in_order(rep)
        rec = fasc.fact_recall(model, tok, facts).first_token
        cell = {(r.layer, r.kind): (r.rho, r.rho_signed) for r in rep}
        rows.append({"checkpoint": ck.name, "recall": rec, "mean_rho": sum(r.rho for r in rep) / len(rep),
                     "mean_rho_signed": sum(r.rho_signed for r in rep) / len(rep),
                     "cells": {f"L{l}.{k}": v for (l, k), v in cell.items()}})
        print(f"{ck.name}: recall {rec:.3f}, mean ρ {rows[-1]['mean_rho']:.3f}", file=sys.stderr)
    OUT.mkdir(exist_ok=True)
    (OUT / "training.json").write_text(json.dumps(rows, indent=1))
    cols = list(rows[0]["cells"])
    lines = ["| checkpoint | fact recall | mean ρ | mean signed ρ | " + " | ".join(cols) + " |",
             "|---" * (4 + len(cols)) + "|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['recall']:.3f} | {r['mean_rho']:.3f} | {r['mean_rho_signed']:+.3f} | "
                     + " | ".join(f"{r['cells'][c][0]:.2f} ({r['cells'][c][1]:+.2f})" for c in cols) + " |")
    print("\n".join(lines))
    print(f"rho_rise={rows[-1]['mean_rho'] - rows[0]['mean_rho']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
