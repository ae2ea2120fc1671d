"""A rank plan measured beside the uncompressed model and a variance baseline at the same budget
(the Ranks page's *Evaluate*): held-out perplexity and fact recall of each, on deep copies."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .allocate import Plan, allocate, validate_plan
from .analysis import Analysis
from .data import load_probe, read_text
from .evaluate import fact_recall, perplexity
from .pipeline import compressed_copy


def evaluate_model(model, tok, heldout: str | Path, probe: str | Path, max_tokens: int | None = 4096,
                   seq_len: int = 256) -> dict:
    """Held-out perplexity and fact recall (first token, exact match) of one model."""
    ppl = perplexity(model, tok, read_text(heldout), seq_len=seq_len, max_tokens=max_tokens)
    rec = fact_recall(model, tok, load_probe(probe))
    return {"perplexity": ppl, "recall": rec.first_token, "exact_match": rec.exact, "n_facts": rec.n}


def evaluate_plan(model, tok, an: Analysis, plan: Plan, heldout: str | Path, probe: str | Path, *,
                  baseline: str = "asvd", max_tokens: int | None = 4096,
                  progress: Callable[[int, int], None] | None = None, allocation: str = "greedy",
                  baseline_anchors: dict[str, float] | None = None, batches=None,
                  sequential: bool | str = False, heal_tokens: int = 0, heal_heldout=None) -> list[dict]:
    """Rows for: the uncompressed model, the plan, and `baseline` allocated at the plan's budget with
    the same `allocation` (`baseline_anchors`: its measured anchor scales, for 'anchored').

    `sequential` and `heal_tokens` (on the calibration `batches`, `pipeline.compressed_copy`) apply
    to both compressed copies alike; the rows carry them ("sequential", "heal"). Every compression
    happens on a deep copy; `model` is left untouched.
    """
    validate_plan(plan, an)
    tot = plan.totals(an)
    steps = 3
    rows = []
    if progress:
        progress(0, steps)
    r = evaluate_model(model, tok, heldout, probe, max_tokens)
    rows.append({"model": "uncompressed", "params_kept": 1.0, "predicted_dl": 0.0, "sequential": False, "heal": None,
                 **r})
    if progress:
        progress(1, steps)
    extra = {"batches": batches, "sequential": sequential, "heal_tokens": heal_tokens, "heal_heldout": heal_heldout}
    work, healed = compressed_copy(model, an, plan, **extra)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    label = plan.note.get("method", "plan") if isinstance(plan.note, dict) else "plan"
    rows.append({"model": f"plan ({label})", "params_kept": tot.ratio, "predicted_dl": tot.predicted,
                 "sequential": sequential, "heal": healed, **r})
    del work
    if progress:
        progress(2, steps)
    base = allocate(an, baseline, param_ratio=min(1.0, max(tot.ratio, 1e-6)), modules=list(plan.ranks),
                    allocation=allocation, anchors=baseline_anchors)
    bt = base.totals(an)
    work, healed = compressed_copy(model, an, base, **extra)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    rows.append({"model": f"{baseline} (same budget, {allocation})", "params_kept": bt.ratio, "predicted_dl": bt.predicted,
                 "sequential": sequential, "heal": healed, **r})
    if progress:
        progress(3, steps)
    return rows
