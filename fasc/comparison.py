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

Copies = Callable[[Plan], tuple]   # plan -> (compressed copy, what healing did or None), e.g. a cache's


def baseline_plan(an: Analysis, plan: Plan, baseline: str = "asvd", allocation: str = "greedy",
                  anchors: dict[str, float] | None = None) -> Plan:
    """`baseline` allocated at `plan`'s parameter budget over the same modules, spread the same way
    (`allocation`; `anchors`: the baseline's measured anchor scales, for 'anchored')."""
    ratio = plan.totals(an).ratio
    return allocate(an, baseline, param_ratio=min(1.0, max(ratio, 1e-6)), modules=list(plan.ranks),
                    allocation=allocation, anchors=anchors, factors=plan.factors)


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
                  sequential: bool | str = False, heal_tokens: int = 0, heal_heldout=None,
                  heal_mode: str = "global", copies: Copies | None = None,
                  reference: dict | None = None) -> list[dict]:
    """Rows for: the uncompressed model, the plan, and `baseline` allocated at the plan's budget with
    the same `allocation` (`baseline_anchors`: its measured anchor scales, for 'anchored'). `reference`:
    the uncompressed model's row from an earlier call on the same text, probe and `max_tokens` (it does not
    depend on the plan), else measured here.

    `sequential`, `heal_tokens` and `heal_mode` (on the calibration `batches`, `pipeline.compressed_copy`) apply
    to both compressed copies alike; the rows carry them ("sequential", "heal"). Every compression
    happens on a deep copy; `model` is left untouched. `copies(plan)` gives the compressed copy
    (e.g. from a `fasc.copies.CopyCache`, built with the same options); default: built here.
    """
    validate_plan(plan, an)
    tot = plan.totals(an)
    steps = 3
    rows = []
    if progress:
        progress(0, steps)
    if reference is None:
        reference = {"model": "uncompressed", "params_kept": 1.0, "predicted_dl": 0.0, "sequential": False,
                     "heal": None, **evaluate_model(model, tok, heldout, probe, max_tokens)}
    rows.append(reference)
    if progress:
        progress(1, steps)
    extra = {"batches": batches, "sequential": sequential, "heal_tokens": heal_tokens, "heal_heldout": heal_heldout,
             "heal_mode": heal_mode}
    if copies is None:
        def copies(p: Plan) -> tuple:
            return compressed_copy(model, an, p, **extra)
    work, healed = copies(plan)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    label = plan.note.get("method", "plan") if isinstance(plan.note, dict) else "plan"
    rows.append({"model": f"plan ({label})", "params_kept": tot.ratio, "predicted_dl": tot.predicted,
                 "sequential": sequential, "heal": healed, **r})
    del work
    if progress:
        progress(2, steps)
    base = baseline_plan(an, plan, baseline, allocation, baseline_anchors)
    bt = base.totals(an)
    work, healed = copies(base)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    rows.append({"model": f"{baseline} (same budget, {allocation})", "params_kept": bt.ratio, "predicted_dl": bt.predicted,
                 "sequential": sequential, "heal": healed, **r})
    if progress:
        progress(3, steps)
    return rows


def benchmark_plan(model, tok, an: Analysis, plan: Plan, tasks: list[str], *, limit: int | None = 100,
                   probe: str | Path | None = None, baseline: str = "asvd", allocation: str = "greedy",
                   baseline_anchors: dict[str, float] | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, copies: Copies | None = None) -> dict:
    """The field's suite and generated QA (`fasc.suite.run_suite`, the first `limit` documents of each task)
    for the uncompressed model, the plan and `baseline` at the plan's budget and allocation, and their
    retention table (`fasc.retention`, reference: the uncompressed model). Compression on deep copies
    (`copies(plan)`, as in `evaluate_plan`)."""
    from .retention import retention_table
    from .suite import run_suite

    validate_plan(plan, an)
    tot = plan.totals(an)
    base = baseline_plan(an, plan, baseline, allocation, baseline_anchors)
    label = plan.note.get("method", "plan") if isinstance(plan.note, dict) else "plan"
    names = ["uncompressed", f"plan ({label})", f"{baseline} (same budget, {allocation})"]
    runs = {}
    for j, (name, p) in enumerate(zip(names, (None, plan, base))):
        def step(d, n, j=j):
            if progress is not None:
                progress(j * n + d, 3 * n)
        work = model if p is None else (copies or (lambda q: compressed_copy(model, an, q)))(p)[0]
        runs[name] = run_suite(work, tok, tasks, probe=probe, limit=limit, progress=step, should_stop=should_stop)
        del work
    return {"runs": runs, "table": retention_table(runs, reference=names[0]).to_dict(), "limit": limit,
            "tasks": list(tasks), "params_kept": {names[1]: tot.ratio, names[2]: base.totals(an).ratio}}
