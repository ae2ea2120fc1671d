"""Check that the demo model's knowledge is sensitive to low-rank compression.

``python -m fasc.demo.check`` loads the shipped model and reports fact recall
after plain truncated SVD of all decoder linear modules at several rank
ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasc.data import pad_rows
from fasc.model_state import eval_mode
from fasc.demo.world import Fact

__all__ = ["fact_recall", "load_facts", "main", "svd_recall_drop", "svd_report", "svd_truncate_"]

DEMO_ROOT = Path(__file__).resolve().parent  # fasc/demo: model/, data/ (= train.DEFAULT_OUT)


def load_facts(path: str | Path) -> list[Fact]:
    """Read facts from a ``facts.jsonl`` file."""
    facts = []
    with open(path) as fh:
        for line in fh:
            d = json.loads(line)
            facts.append(Fact(d["subject"], d["relation"], d["prompt"], d["answer"]))
    return facts


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _encode_prompts(tokenizer, facts: Sequence[Fact]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt ids, index of each prompt's last token, answer ids."""
    prompts = [tokenizer(f.prompt).input_ids for f in facts]
    answers = []
    for f in facts:
        ids = tokenizer(" " + f.answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"answer {f.answer!r} is not a single token: {ids}")
        answers.append(ids[0])
    ids, _ = pad_rows(prompts, tokenizer.pad_token_id)
    last = torch.tensor([len(p) - 1 for p in prompts])
    return ids, last, torch.tensor(answers)


@torch.no_grad()
def fact_recall(
    model,
    tokenizer,
    facts: Sequence[Fact],
    batch_size: int = 512,
    _encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Fraction of facts whose answer is the top-1 next token after the prompt.

    Prompts are encoded with ``tokenizer(prompt)`` (with ``<bos>``) and the
    answer with ``tokenizer(" " + answer, add_special_tokens=False)``.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        facts: The facts to probe.
        batch_size: Prompts per forward pass.

    Returns:
        Recall in ``[0, 1]``.
    """
    if not facts:
        return 0.0
    ids, last, answers = _encoded if _encoded is not None else _encode_prompts(tokenizer, facts)
    hits = 0
    with eval_mode(model):
        for start in range(0, len(facts), batch_size):
            sl = slice(start, start + batch_size)
            # Right padding + causal attention: the prompt positions never see pads.
            logits = model(input_ids=ids[sl]).logits
            pred = logits[torch.arange(logits.shape[0]), last[sl]].argmax(-1)
            hits += int((pred == answers[sl]).sum())
    return hits / len(facts)


_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def svd_truncate_(model, ratio: float, names: Sequence[str] = _LINEAR_NAMES) -> int:
    """Replace decoder linear weights by their truncated SVD, in place.

    Keeps ``k = round(ratio * min(m, n))`` singular values of every
    ``nn.Linear`` in the decoder layers whose name ends with one of ``names``
    (embeddings and ``lm_head`` untouched).

    Args:
        model: A Llama-style causal LM.
        ratio: Fraction of the full rank to keep.
        names: Module name suffixes to truncate.

    Returns:
        Number of truncated matrices.
    """
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in f".{name}":
            continue
        if not name.split(".")[-1] in names:
            continue
        w = module.weight.data.float()
        k = round(ratio * min(w.shape))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        module.weight.data.copy_((u[:, :k] * s[:k]) @ vh[:k])
        count += 1
    return count


def svd_recall_drop(model, tokenizer, facts: Sequence[Fact], ratio: float) -> dict[str, float]:
    """Recall before and after plain truncated SVD of all decoder linears.

    The model is not modified (a deep copy is truncated).

    Args:
        model: A Llama-style causal LM.
        tokenizer: Its tokenizer.
        facts: Facts to probe.
        ratio: Rank ratio kept, e.g. ``0.5``.

    Returns:
        ``{"ratio", "recall", "recall_svd", "drop"}`` (recalls in ``[0, 1]``).
    """
    base = fact_recall(model, tokenizer, facts)
    low = copy.deepcopy(model)
    svd_truncate_(low, ratio)
    comp = fact_recall(low, tokenizer, facts)
    return {"ratio": ratio, "recall": base, "recall_svd": comp, "drop": base - comp}




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
    p.add_argument("--model", type=Path, default=DEMO_ROOT / "model", help="model folder")
    p.add_argument("--facts", type=Path, default=DEMO_ROOT / "data" / "facts.jsonl", help="facts.jsonl")
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
