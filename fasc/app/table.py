"""The Ranks page's editable table and the ρ map's cell selection, without Streamlit."""

from __future__ import annotations

from ..allocate import Plan, base_method, module_params
from ..analysis import Analysis
from ..config import HYBRID_FALLBACK, HYBRID_TAU, METHODS

TABLE_COLUMNS = ["module", "layer", "kind", "shape", "max_rank", "rank", "method", "rho", "kept", "dl"]


def selected_fqn(event, rows) -> str | None:
    """The module a Plotly selection event on the layer × kind heatmap points at (None if none).

    Accepts the `st.plotly_chart(on_select=...)` state (dict-like with `selection.points`); a point
    carries the cell's fqn as `customdata`, or its (x = kind, y = layer) coordinates.
    """
    if not event:
        return None
    sel = event.get("selection") if hasattr(event, "get") else getattr(event, "selection", None)
    points = (sel.get("points") if hasattr(sel, "get") else getattr(sel, "points", None)) or []
    by_cell = {(r.kind, int(r.layer)): r.fqn for r in rows}
    names = {r.fqn for r in rows}
    for p in points:
        cd = p.get("customdata")
        if isinstance(cd, (list, tuple)) and cd:
            cd = cd[0]
        if isinstance(cd, str) and cd in names:
            return cd
        x, y = p.get("x"), p.get("y")
        try:
            hit = by_cell.get((str(x), int(y)))
        except (TypeError, ValueError):
            hit = None
        if hit:
            return hit
    return None


def plan_values(plan: Plan, an: Analysis) -> dict[str, float]:
    """Predicted ΔL of every planned module at its planned rank (for the heatmap)."""
    return {f: an.predicted(f, plan.methods[f], k) for f, k in plan.ranks.items()}


def plan_table(plan: Plan, an: Analysis):
    """One row per module (pandas DataFrame, index = fqn): rank and method are the editable columns."""
    import pandas as pd

    recs = []
    for info in an.modules:
        f = info.fqn
        k = plan.ranks.get(f, info.max_rank)
        m = plan.methods.get(f, "fasc") if f in plan.ranks else "—"
        recs.append({"module": f, "layer": info.layer, "kind": info.kind,
                     "shape": f"{info.out_features}×{info.in_features}", "max_rank": info.max_rank,
                     "rank": int(k), "method": m, "rho": round(an.rho(f)[0], 4),
                     "kept": module_params(info, k, plan.factors) / info.params if f in plan.ranks else 1.0,
                     "dl": an.predicted(f, m, k) if f in plan.ranks else 0.0})
    return pd.DataFrame(recs, columns=TABLE_COLUMNS).set_index("module", drop=False)


def apply_table(plan: Plan, an: Analysis, table, tau: float = HYBRID_TAU,
                fallback: str = HYBRID_FALLBACK) -> tuple[Plan, list[str]]:
    """The plan with the table's ranks and methods; invalid cells are reported and left unchanged.

    Returns (new plan, one-line error messages). `hybrid` in a cell is resolved with τ and `fallback`.
    """
    ranks, methods, errors = dict(plan.ranks), dict(plan.methods), []
    for f, row in table.iterrows():
        if f not in plan.ranks:
            continue
        info = an.info(f)
        try:
            k = int(row["rank"])
            if k != row["rank"]:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            errors.append(f"Rank {row['rank']!r} for {f} is not a whole number; type an integer in "
                          f"[1, {info.max_rank}].")
            continue
        if not 1 <= k <= info.max_rank:
            errors.append(f"Rank {k} for {f} is out of range; it must be in [1, {info.max_rank}].")
            continue
        m = str(row["method"])
        if m not in METHODS:
            errors.append(f"Unknown method {m!r} for {f}; choose one of {', '.join(METHODS)}.")
            continue
        ranks[f] = k
        methods[f] = base_method(an, f, m, tau, fallback)
    new = Plan(ranks=ranks, methods=methods, model_fingerprint=plan.model_fingerprint, note=dict(plan.note),
                factors=plan.factors)
    if new.ranks != plan.ranks or new.methods != plan.methods:
        new.note["edited"] = True
    return new, errors


def plan_label(plan: Plan, an: Analysis, default: bool = False) -> str:
    """The plan in words, for the pages that use it: 'fasc (greedy, edited) · 50.0 % of 14 modules'
    parameters kept'; the session's own default plan says that nobody made it."""
    note = plan.note if isinstance(plan.note, dict) else {}
    how = [note.get("allocation"), "edited" if note.get("edited") else None,
           f"loaded from {note['loaded_from']}" if note.get("loaded_from") else None]
    how = ", ".join(a for a in how if a)
    t = plan.totals(an)
    s = (f"{note.get('method') or 'custom'}{f' ({how})' if how else ''} · {t.ratio:.1%} of {t.modules} modules' "
         f"parameters kept")
    return s + (" — the default plan (no plan made yet for this model)" if default else "")


def _heal_kl(h: dict | None) -> str:
    """'before → kept' held-out KL of a healed row ('' when not healed or not checked)."""
    if not h or h.get("heldout_kl_before") is None:
        return ""
    kept = h.get("kept_blocks") if h.get("mode") == "block" else h.get("kept_tokens")
    return f"{h['heldout_kl_before']:.3g} → {h['heldout_kl_after']:.3g}" + ("" if kept else " (unhealed kept)")


REFINEMENT_COLUMNS = {"sequential": "off", "healed tokens": 0, "healing mode": "", "held-out KL (healing)": ""}


def eval_table(rows: list[dict]) -> list[dict]:
    """The Evaluate table: one row per model (`fasc.comparison.evaluate_plan` rows); the sequential and
    healing columns only when some row used them, so the table fits the page."""
    out = [{"model": r["model"], "params kept": f"{r['params_kept']:.1%}",
            "sequential": r.get("sequential") or "off", "healed tokens": (r.get("heal") or {}).get("tokens", 0),
            "healing mode": (r.get("heal") or {}).get("mode", ""), "held-out KL (healing)": _heal_kl(r.get("heal")),
            "predicted ΔL": f"{r['predicted_dl']:.3g}", "perplexity": round(r["perplexity"], 3),
            "fact recall": f"{r['recall']:.1%}", "exact match": f"{r['exact_match']:.1%}",
            "facts": r["n_facts"]} for r in rows]
    unused = [c for c, v in REFINEMENT_COLUMNS.items() if all(t[c] == v for t in out)]
    return [{k: v for k, v in t.items() if k not in unused} for t in out]
