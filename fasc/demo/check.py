"""Check that the demo model's knowledge is sensitive to low-rank compression.

``python -m fasc.demo.check`` loads the shipped model and reports fact recall
after plain truncated SVD of all decoder linear modules at several rank
ratios.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasc.demo.train import DEFAULT_OUT, load_facts, svd_recall_drop

__all__ = ["main", "svd_report"]


def svd_report(model_dir: str | Path, facts_path: str | Path, ratios: Sequence[float]) -> list[dict]:
    """Recall of a saved model before and after truncated SVD.

    Args:
        model_dir: Hugging Face model folder (with tokenizer files).
        facts_path: ``facts.jsonl``.
        ratios: Rank ratios to test.

    Returns:
        One ``svd_recall_drop`` dict per ratio.
    """
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    facts = load_facts(facts_path)
    return [svd_recall_drop(model, tok, facts, r) for r in ratios]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m fasc.demo.check", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_OUT / "model", help="model folder")
    p.add_argument("--facts", type=Path, default=DEFAULT_OUT / "data" / "facts.jsonl", help="facts.jsonl")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="rank ratios")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = svd_report(args.model, args.facts, args.ratios)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"svd rank {r['ratio']:.0%}: recall {r['recall']:.3f} -> {r['recall_svd']:.3f} "
                  f"(drop {100 * r['drop']:.1f} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
