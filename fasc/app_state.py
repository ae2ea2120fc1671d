"""The dashboard's logic without the UI: model choice, data sources, heatmap selection, rank-plan
editing, evaluation and export. Pure functions over the library (no Streamlit import), so the pages
stay thin and every rule here is unit-tested. Export goes through `fasc.export.compress_and_save`,
the same function `fasc compress` uses.

Environment (all optional; tests use them to point the app at tiny models):
    FASC_APP_MODEL        model spec preselected in the sidebar (default: demo)
    FASC_APP_CHECKPOINTS  folder of training checkpoints `ckpt-*` (default: fasc/demo/checkpoints)
    FASC_APP_OUT          parent folder proposed for exports (default: out)
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .allocate import Plan, allocate, is_factored, module_params, validate_plan
from .analysis import Analysis
from .config import METHODS
from .data import Example, decode_text, load_probe, parse_jsonl, read_text, rows_to_examples
from .errors import FascError
from .export import compress_and_save  # noqa: F401 - the Export page's entry point
from .loading import DEMO_CHECKPOINTS, DEMO_DIR

# ------------------------------------------------------------------------------------------ models
MODEL_CHOICES = {
    "demo": "Embedded demo model",
    "smollm2": "SmolLM2-135M-Instruct (real, bundled)",
    "folder": "Local folder",
    "hub": "Hugging Face hub id",
}
DEMO_MISSING = "The embedded demo model is not built yet; train it with `python -m fasc.demo.train` (a few minutes on CPU)."


def demo_available() -> bool:
    return (DEMO_DIR / "config.json").is_file()


def initial_model_choice(env: dict | None = None) -> tuple[str, str]:
    """(choice, text) preselected in the sidebar: `FASC_APP_MODEL` if set, else the demo model."""
    spec = (env if env is not None else os.environ).get("FASC_APP_MODEL", "").strip()
    low = spec.lower()
    if not spec or low == "demo":
        return "demo", ""
    if low in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return "smollm2", ""
    if spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists():
        return "folder", spec
    return "hub", spec


def model_spec(choice: str, text: str = "") -> str:
    """The `fasc.load_model` spec of a sidebar choice."""
    if choice in ("demo", "smollm2"):
        return choice
    s = (text or "").strip()
    if not s:
        what = "a local model folder (with config.json)" if choice == "folder" else "a hub id such as HuggingFaceTB/SmolLM2-135M"
        raise FascError(f"No model given; enter {what} in the sidebar, or pick the embedded demo model.")
    return s


def default_tokens(spec: str) -> int:
    """A calibration budget that runs in seconds to a minute on a laptop CPU for this model."""
    if spec == "demo":
        return 16384  # the CLI default: `fasc calibrate --model demo` shares the cache entry
    if spec == "smollm2":
        return 2048
    return 4096


def model_label(spec: str) -> str:
    if spec in ("demo", "smollm2"):
        return MODEL_CHOICES[spec]
    return Path(spec).name or spec


# ------------------------------------------------------------------------------------------ data
def source_from_upload(name: str, raw: bytes) -> str | list[Example]:
    """An uploaded .txt / .jsonl file as text or prompt/answer examples (like `fasc.load_source`)."""
    text = decode_text(raw, name)
    if Path(name).suffix.lower() not in (".jsonl", ".json"):
        return text
    rows = parse_jsonl(text, name)
    if all("text" in r for r in rows):
        return "\n\n".join(str(r["text"]) for r in rows)
    return rows_to_examples(rows, name)


# ------------------------------------------------------------------------------------------ selection
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


# ------------------------------------------------------------------------------------------ plans
def with_tau(an: Analysis, tau: float) -> Analysis:
    """A view of `an` with another hybrid threshold τ that shares every cached decomposition
    (τ only decides which base method a module uses, never a basis)."""
    if an.cfg.tau == tau:
        return an
    view = copy.copy(an)  # shallow: the basis / whitening caches are shared dicts
    view.cfg = replace(an.cfg, tau=float(tau))
    return view


def plan_key(plan: Plan) -> str:
    """A canonical JSON of the plan (for caches and change detection)."""
    return json.dumps({"ranks": plan.ranks, "methods": plan.methods}, sort_keys=True)


def plan_from_state(d: dict | None) -> Plan | None:
    return None if d is None else Plan.from_dict(d)


def plan_fits(plan: Plan | None, an: Analysis) -> bool:
    """True when `plan` names only modules of this analysis and every rank is in range."""
    if plan is None:
        return False
    try:
        validate_plan(plan, an)
    except FascError:
        return False
    return True


def default_plan(an: Analysis, model_fp: str = "") -> Plan:
    """The plan shown before the user allocates: fasc at half the parameters of every module."""
    return allocate(an, "fasc", param_ratio=0.5, model_fp=model_fp)


@dataclass
class Totals:
    kept: int
    original: int
    predicted: float
    modules: int
    factored: int

    @property
    def ratio(self) -> float:
        return self.kept / self.original if self.original else 1.0


def plan_totals(plan: Plan, an: Analysis) -> Totals:
    """Parameters kept / original over the planned modules and Σ predicted ΔL: O(modules) lookups."""
    kept, orig = plan.params(an)
    n_fac = sum(is_factored(an.info(f), k) for f, k in plan.ranks.items())
    return Totals(kept, orig, plan.predicted(an), len(plan.ranks), n_fac)


def plan_values(plan: Plan, an: Analysis) -> dict[str, float]:
    """Predicted ΔL of every planned module at its planned rank (for the heatmap)."""
    return {f: an.predicted(f, plan.methods[f], k) for f, k in plan.ranks.items()}


TABLE_COLUMNS = ["module", "layer", "kind", "shape", "max_rank", "rank", "method", "rho", "kept", "dl"]


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
                     "kept": module_params(info, k) / info.params if f in plan.ranks else 1.0,
                     "dl": an.predicted(f, m, k) if f in plan.ranks else 0.0})
    return pd.DataFrame(recs, columns=TABLE_COLUMNS).set_index("module", drop=False)


def apply_table(plan: Plan, an: Analysis, table) -> tuple[Plan, list[str]]:
    """The plan with the table's ranks and methods; invalid cells are reported and left unchanged.

    Returns (new plan, one-line error messages). `hybrid` in a cell is resolved with `an.cfg.tau`.
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
        methods[f] = an.resolve(f, m)
    new = Plan(ranks=ranks, methods=methods, model_fingerprint=plan.model_fingerprint, note=dict(plan.note))
    if new.ranks != plan.ranks or new.methods != plan.methods:
        new.note["edited"] = True
    return new, errors


def layer_ratios(plan: Plan, an: Analysis) -> dict[int, float]:
    """Mean k / max_rank of the planned modules per layer."""
    acc: dict[int, list[float]] = {}
    for f, k in plan.ranks.items():
        info = an.info(f)
        acc.setdefault(info.layer, []).append(k / info.max_rank)
    return {l: float(np.mean(v)) for l, v in sorted(acc.items())}


def set_layer_ratio(plan: Plan, an: Analysis, layer: int, ratio: float) -> Plan:
    """Every planned module of `layer` at rank round(ratio · min(m, n)) (at least 1)."""
    if not 0 < ratio <= 1:
        raise FascError(f"A layer's rank ratio must be in (0, 1], got {ratio}; e.g. 0.5 keeps half the rank.")
    ranks = dict(plan.ranks)
    for f in plan.ranks:
        info = an.info(f)
        if info.layer == layer:
            ranks[f] = max(1, min(info.max_rank, round(ratio * info.max_rank)))
    note = dict(plan.note, edited=True)
    return Plan(ranks=ranks, methods=dict(plan.methods), model_fingerprint=plan.model_fingerprint, note=note)


def set_rank(plan: Plan, an: Analysis, fqn: str, k: int) -> Plan:
    info = an.info(fqn)
    if not 1 <= int(k) <= info.max_rank:
        raise FascError(f"Rank {k} for {fqn} is out of range; it must be in [1, {info.max_rank}].")
    ranks = dict(plan.ranks, **{fqn: int(k)})
    methods = dict(plan.methods)
    methods.setdefault(fqn, "fasc")
    return Plan(ranks=ranks, methods=methods, model_fingerprint=plan.model_fingerprint,
                note=dict(plan.note, edited=True))


def load_plan_bytes(raw: bytes, name: str, an: Analysis, model_fp: str = "") -> Plan:
    """A plan JSON (from this page or `fasc compress --save-plan`) checked against this analysis."""
    try:
        d = json.loads(decode_text(raw, name))
    except ValueError:
        raise FascError(f"{name} is not valid JSON; a plan looks like {{\"ranks\": {{\"model.layers.0.mlp."
                        f"down_proj\": 64}}, \"method\": \"fasc\"}}.") from None
    loaded = Plan.from_dict(d, name)
    if model_fp and loaded.model_fingerprint and loaded.model_fingerprint != model_fp:
        raise FascError(f"{name} was made for another model (fingerprint differs); allocate a new plan here.")
    method = loaded.note.get("method") if isinstance(loaded.note, dict) else None
    plan = allocate(an, method if method in METHODS else "fasc", ranks=loaded.ranks, model_fp=model_fp)
    if loaded.methods:
        plan.methods.update({f: an.resolve(f, m) for f, m in loaded.methods.items() if f in plan.ranks})
    plan.note = dict(loaded.note or {}, loaded_from=name)
    validate_plan(plan, an)
    return plan


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=1)


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_model(model, tok, heldout: str | Path, probe: str | Path, max_tokens: int | None = 4096,
                   seq_len: int = 256) -> dict:
    """Held-out perplexity and fact recall (first token, exact match) of one model."""
    from .evaluate import fact_recall, perplexity

    ppl = perplexity(model, tok, read_text(heldout), seq_len=seq_len, max_tokens=max_tokens)
    rec = fact_recall(model, tok, load_probe(probe))
    return {"perplexity": ppl, "recall": rec.first_token, "exact_match": rec.exact, "n_facts": rec.n}


def evaluate_plan(model, tok, an: Analysis, plan: Plan, heldout: str | Path, probe: str | Path, *,
                  baseline: str = "asvd", max_tokens: int | None = 4096,
                  progress: Callable[[int, int], None] | None = None, allocation: str = "greedy",
                  baseline_anchors: dict[str, float] | None = None) -> list[dict]:
    """Rows for: the uncompressed model, the plan, and `baseline` allocated at the plan's budget with
    the same `allocation` (`baseline_anchors`: its measured anchor scales, for 'anchored').

    Every compression happens on a deep copy; `model` is left untouched.
    """
    from .surgery import compress_

    validate_plan(plan, an)
    tot = plan_totals(plan, an)
    steps = 3
    rows = []
    if progress:
        progress(0, steps)
    r = evaluate_model(model, tok, heldout, probe, max_tokens)
    rows.append({"model": "uncompressed", "params_kept": 1.0, "predicted_dl": 0.0, **r})
    if progress:
        progress(1, steps)
    work = copy.deepcopy(model)
    compress_(work, an, plan)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    label = plan.note.get("method", "plan") if isinstance(plan.note, dict) else "plan"
    rows.append({"model": f"plan ({label})", "params_kept": tot.ratio, "predicted_dl": tot.predicted, **r})
    del work
    if progress:
        progress(2, steps)
    base = allocate(an, baseline, param_ratio=min(1.0, max(tot.ratio, 1e-6)), modules=list(plan.ranks),
                    allocation=allocation, anchors=baseline_anchors)
    bt = plan_totals(base, an)
    work = copy.deepcopy(model)
    compress_(work, an, base)
    r = evaluate_model(work, tok, heldout, probe, max_tokens)
    rows.append({"model": f"{baseline} (same budget, {allocation})", "params_kept": bt.ratio, "predicted_dl": bt.predicted, **r})
    if progress:
        progress(3, steps)
    return rows


# ------------------------------------------------------------------------------------------ export
def default_export_dir(spec: str, method: str, ratio: float, merged: bool, env: dict | None = None) -> str:
    root = (env if env is not None else os.environ).get("FASC_APP_OUT", "out")
    base = spec if spec in ("demo", "smollm2") else (Path(spec).name or "model")
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in base.lower())
    return str(Path(root) / f"{name}-{method}{round(100 * ratio)}{'-merged' if merged else ''}")


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoints_root(env: dict | None = None) -> Path:
    env = env if env is not None else os.environ
    return Path(env.get("FASC_APP_CHECKPOINTS") or DEMO_CHECKPOINTS)


def list_checkpoints(root: str | Path) -> list[Path]:
    """`ckpt-*` model folders under root, in training order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("ckpt-*") if (p / "config.json").is_file())


def training_log(root: str | Path) -> dict | None:
    """The demo's `training_log.json` (beside the checkpoints folder, or inside it), if readable."""
    root = Path(root)
    for p in (root.parent / "training_log.json", root / "training_log.json"):
        if p.is_file():
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return d if isinstance(d, dict) else None
    return None


def checkpoint_entries(log: dict | None) -> dict[str, dict]:
    """name → {percent, step, loss, recall} from a training log."""
    out = {}
    for c in (log or {}).get("checkpoints", []) or []:
        if isinstance(c, dict) and "name" in c:
            out[str(c["name"])] = c
    return out


def checkpoint_label(path: Path, entry: dict | None) -> str:
    if entry and entry.get("percent") is not None:
        return f"{path.name} ({entry['percent']}%, step {entry.get('step', '?')})"
    return path.name


def mean_rho(rows) -> float:
    vals = [r.rho for r in rows if r.rho is not None and math.isfinite(r.rho)]
    return float(np.mean(vals)) if vals else float("nan")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def eta_text(done: int, total: int, elapsed: float, unit: str = "tokens") -> str:
    """'1,024 / 4,096 tokens · 3 s left' (no ETA before the first step)."""
    s = f"{done:,} / {total:,} {unit}"
    if done > 0 and total > done and elapsed > 0:
        left = elapsed * (total - done) / done
        s += f" · {left:.0f} s left" if left < 120 else f" · {left / 60:.1f} min left"
    elif total and done >= total:
        s += f" · done in {elapsed:.1f} s"
    return s

