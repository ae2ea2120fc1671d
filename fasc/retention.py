"""Retention tables in the form of the peers' (SVD-LLM, LEMS): each task's accuracy for every model, the
compressed/dense ratio, averages, and paired differences between models on the same documents.

Pure functions over `fasc.harness.run_tasks` outputs (one per model, same tasks and `--limit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .lm_tasks.standard import LEMS_SEVEN

# chance accuracy of each task's headline metric: 1 / number of choices, and for BoolQ the share of its
# majority answer ("yes", 62.2 % of the validation split), the score of a model that always says yes
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5, "boolq": 0.622,
          "winogrande": 0.5, "openbookqa": 0.25, "mmlu": 0.25, "lambada_openai": 0.0}
HEADLINE = "acc"  # LEMS reports acc (not acc_norm) on every task


@dataclass
class TaskRow:
    task: str
    n: int
    values: dict[str, float]                 # model → headline metric
    stderr: dict[str, float]
    retention: dict[str, float]              # model → value / reference's value
    paired: dict[str, tuple[float, float]]   # "A − B" → (mean difference, its stderr) on the same documents
    above_chance: bool
    extra: dict[str, dict[str, float]] = field(default_factory=dict)   # e.g. LAMBADA perplexity per model
    known_kept: dict[str, float] = field(default_factory=dict)         # model → share of the reference's right
    qa: dict[str, dict] = field(default_factory=dict)                  # generated QA: model → fasc.qa.known_kept


@dataclass
class RetentionTable:
    reference: str
    models: list[str]
    rows: list[TaskRow]
    headline_tasks: list[str]                # LEMS's seven present and above chance for the reference
    average: dict[str, float]                # model → mean headline metric over headline_tasks
    retention: dict[str, float]              # model → average / reference's average (LEMS's form)
    paired_average: dict[str, tuple[float, float]]

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a − b over the same documents and its standard error (sample sd / √n)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1)
    return m, math.sqrt(var / len(d))


def _known_kept(ref: list[float], other: list[float]) -> float:
    """Share of the documents the reference gets right (value 1) that `other` also gets right."""
    known = [i for i, v in enumerate(ref) if v == 1]
    return sum(1 for i in known if other[i] == 1) / len(known) if known and len(other) == len(ref) else float("nan")


def retention_table(runs: dict[str, dict], reference: str) -> RetentionTable:
    """The table for `runs` = {model name: run_tasks output} against `reference` (the dense model).

    A task enters the headline average when it is one of LEMS's seven and the reference is above chance
    on it by more than two standard errors (a model at chance carries no retention to measure)."""
    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not among the runs {list(runs)}")
    models = [reference, *[m for m in runs if m != reference]]
    ref = runs[reference]
    tasks = [t for t in ref["results"] if all(t in r["results"] for r in runs.values())]
    rows = []
    for t in tasks:
        if HEADLINE not in ref["results"][t]:
            continue
        vals = {m: runs[m]["results"][t][HEADLINE] for m in models}
        se = {m: runs[m].get("stderr", {}).get(t, {}).get(HEADLINE, float("nan")) for m in models}
        ret = {m: (vals[m] / vals[reference] if vals[reference] else float("nan")) for m in models}
        paired = {}
        docs = {m: runs[m].get("samples", {}).get(t, {}).get(HEADLINE) for m in models}
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                if docs[a] and docs[b] and len(docs[a]) == len(docs[b]):
                    paired[f"{b} − {a}"] = paired_difference(docs[b], docs[a])
        extra = {}
        for metric in ("perplexity", "gold_logp"):
            if metric in ref["results"][t]:
                extra[metric] = {m: runs[m]["results"][t][metric] for m in models}
        above = vals[reference] - CHANCE.get(t, 0.0) > 2 * (se[reference] if se[reference] == se[reference] else 0)
        kept = {m: _known_kept(docs[reference], docs[m]) for m in models[1:] if docs[reference] and docs[m]}
        qa = {}
        if t in ref.get("qa", {}):
            from .qa import known_kept

            qa = {m: known_kept(ref["qa"][t], runs[m]["qa"][t]) for m in models[1:] if t in runs[m].get("qa", {})}
        rows.append(TaskRow(t, int(ref["n_samples"].get(t) or 0), vals, se, ret, paired, above, extra, kept, qa))
    head = [r.task for r in rows if r.task in LEMS_SEVEN and r.above_chance]
    by = {r.task: r for r in rows}
    avg = {m: (sum(by[t].values[m] for t in head) / len(head) if head else float("nan")) for m in models}
    ret = {m: (avg[m] / avg[reference] if head and avg[reference] else float("nan")) for m in models}
    paired_avg = {}
    for key in (rows[0].paired if rows else {}):
        parts = [by[t].paired[key] for t in head if key in by[t].paired]
        if head and len(parts) == len(head):
            paired_avg[key] = (sum(p[0] for p in parts) / len(parts),
                               math.sqrt(sum(p[1] ** 2 for p in parts)) / len(parts))
    return RetentionTable(reference, models, rows, head, avg, ret, paired_avg)


def format_table(tab: RetentionTable) -> str:
    """The table as text: per task each model's accuracy (%) and retention, then the headline average."""
    names = tab.models
    w = max(12, *(len(n) for n in names))
    lines = [f"{'task':<16}{'n':>6}  " + "  ".join(f"{n[-w:]:>{w}}" for n in names)]
    for r in tab.rows:
        cells = []
        for m in names:
            c = f"{100 * r.values[m]:.1f}"
            if m != tab.reference:
                c += f" ({100 * r.retention[m]:.0f}%)"
            cells.append(f"{c:>{w}}")
        mark = "" if r.above_chance else "  (dense at chance: not in the average)"
        lines.append(f"{r.task:<16}{r.n:>6}  " + "  ".join(cells) + mark)
        for metric, per in r.extra.items():
            lines.append(f"{'  ' + metric:<16}{'':>6}  " + "  ".join(f"{per[m]:>{w}.2f}" for m in names))
        if r.known_kept:
            lines.append(f"{'  known kept':<16}{'':>6}  " + "  ".join(
                f"{'':>{w}}" if m == tab.reference else f"{100 * r.known_kept.get(m, float('nan')):>{w}.1f}"
                for m in names))
        for m, k in r.qa.items():
            kinds = ", ".join(f"{v} {kind}" for kind, v in sorted(k["lost_kinds"].items(), key=lambda x: -x[1]))
            lines.append(f"  {m}: keeps {k['kept']} of the {k['dense_correct']} answers {tab.reference} gets right "
                         f"(lost: {kinds or 'none'}; {k['lost_first_token_right']} of them with the first token "
                         f"right); gold answer log-likelihood {k['delta_logp_known']:+.2f} nats on those, "
                         f"{k['delta_logp_all']:+.2f} on all")
    cells = [f"{100 * tab.average[m]:.1f}" + (f" ({100 * tab.retention[m]:.1f}%)" if m != tab.reference else "")
             for m in names]
    lines.append(f"{'average':<16}{'':>6}  " + "  ".join(f"{c:>{w}}" for c in cells)
                 + f"   over {', '.join(tab.headline_tasks) or 'no task above chance'}")
    for key, (d, se) in tab.paired_average.items():
        lines.append(f"paired {key}: {100 * d:+.1f} ± {100 * se:.1f} points (average over the same documents)")
    return "\n".join(lines)
