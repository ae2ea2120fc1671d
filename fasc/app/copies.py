"""The dashboard's compressed copies, built once per plan and options and shared by Evaluate, Generate,
Compare and Export (`fasc.copies.CopyCache`, one per server process: copies are read-only, like
the model they come from). Builds show a progress bar; their cost is estimated beforehand from
this model's measured build speed (`build_seconds`)."""

from __future__ import annotations

import json
import time

import streamlit as st

from . import ui
from ..allocate import Plan
from ..copies import CopyCache, copy_key
from ..pipeline import compressed_copy


@st.cache_resource(show_spinner=False)
def cache() -> CopyCache:
    """The process' copy cache (see `fasc.copies` for its memory bound)."""
    return CopyCache()


@st.cache_resource(show_spinner=False)
def _speeds() -> dict:
    """{(model ident, method): measured seconds per planned module of a copy build}."""
    return {}


def key(ctx, plan: Plan, merge: bool = False, sequential: bool | str = False, heal_tokens: int = 0,
        heal_mode: str = "global") -> str:
    return copy_key(f"{ctx.lm.ident}#{ctx.lm.fingerprint}", ctx.calib["key"], ctx.an.cfg.gamma, plan.key(),
                    merge=merge, sequential=sequential, heal_tokens=heal_tokens, heal_mode=heal_mode)


def ready(ctx, plan: Plan, **opts) -> bool:
    """True when the copy for `plan` (and options) is already built."""
    return key(ctx, plan, **opts) in cache()


def get_copy(ctx, plan: Plan, *, merge: bool = False, sequential: bool | str = False, heal_tokens: int = 0,
             heal_mode: str = "global", label: str = "plan") -> tuple:
    """(compressed copy of the model with `plan`, what healing did or None): from the cache, else built
    with a progress bar (and healing's), on the calibration batches when sequential or healed. Read-only."""
    def build() -> tuple:
        batches = ui.calibration_batches(ctx)[0] if sequential or heal_tokens else None
        held = ui.heldout_tail(ctx, ui.HEAL_CHECK_TOKENS) if heal_tokens else None
        bar = ui.ProgressBar(f"Compressing a copy ({label})" + (f", sequential {sequential}" if sequential else ""),
                             unit="layers" if sequential else "modules")
        hbar = ui.ProgressBar(f"Healing ({label}, {heal_mode})", unit="tokens") if heal_tokens else None
        t0 = time.perf_counter()
        try:
            out = compressed_copy(ctx.lm.model, ctx.an, plan, merge=merge, progress=bar, batches=batches,
                                  sequential=sequential, heal_tokens=heal_tokens, heal_progress=hbar,
                                  heal_heldout=held, heal_mode=heal_mode)
        finally:
            bar.clear()
            if hbar:
                hbar.clear()
        if not (sequential or heal_tokens):   # a plain build: its speed estimates the next ones
            for m in _method_counts(plan):
                _speeds()[(ctx.lm.ident, m)] = (time.perf_counter() - t0) / len(plan.ranks)
        return out

    return cache().get(key(ctx, plan, merge=merge, sequential=sequential, heal_tokens=heal_tokens,
                           heal_mode=heal_mode), build)


def provider(ctx, *, merge: bool = False, sequential: bool | str = False, heal_tokens: int = 0,
             heal_mode: str = "global"):
    """`copies(plan)` for `fasc.comparison` / `fasc.pipeline.compress_and_save`: the cached copy."""
    def copies(plan: Plan) -> tuple:
        return get_copy(ctx, plan, merge=merge, sequential=sequential, heal_tokens=heal_tokens,
                        heal_mode=heal_mode, label=str((plan.note or {}).get("method") or "plan"))
    return copies


@st.cache_resource(show_spinner=False)
def _baselines() -> dict:
    """{(plan copy key, baseline): the baseline's plan} allocated so far (small)."""
    return {}


def baseline_plan(ctx, plan: Plan, baseline: str) -> Plan:
    """`baseline` at the plan's budget over its modules, spread with the plan's allocation — the
    baseline Evaluate measures, so Generate, Compare and Evaluate share its copy. The first time for a
    plan it may decompose every module for `baseline` and measure its anchors (progress bars): call it
    when the work is asked for; `known_baseline` does not compute."""
    from ..comparison import baseline_plan as allocate_baseline

    k = json.dumps([key(ctx, plan), baseline])
    memo = _baselines()
    if k not in memo:
        ui.get_analysis(ctx.lm, ctx.calib["key"], ctx.an.cfg.gamma, methods=(baseline,))   # with a progress bar
        alloc = plan.note.get("allocation") or "greedy"
        memo[k] = allocate_baseline(ctx.an, plan, baseline, alloc, baseline_anchors(ctx, plan, baseline))
        while len(memo) > 64:
            memo.pop(next(iter(memo)))
    return memo[k]


def known_baseline(ctx, plan: Plan, baseline: str) -> Plan | None:
    """The baseline of `plan` if it was allocated already (never computes)."""
    return _baselines().get(json.dumps([key(ctx, plan), baseline]))


def pair_cost(ctx, plan: Plan, baseline: str) -> tuple[int, float]:
    """(copies still to build, ≈ seconds) for the plan's and its baseline's copies (plain ones),
    never computing: an unallocated baseline whose decompositions are not done counts twice (its
    allocation decomposes every module, the build again)."""
    todo, seconds = 0, 0.0
    if not ready(ctx, plan):
        todo, seconds = 1, build_seconds(ctx, plan)
    base = known_baseline(ctx, plan, baseline)
    if base is not None:
        if not ready(ctx, base):
            todo, seconds = todo + 1, seconds + build_seconds(ctx, base)
        return todo, seconds
    per = _speeds().get((ctx.lm.ident, baseline))
    if per is None:
        per = _prior(ctx, Plan(ranks=plan.ranks, methods={f: baseline for f in plan.ranks}), baseline)
    n = len(plan.ranks) * (1 if ctx.an.decomposed((baseline,)) else 2)
    return todo + 1, seconds + n * per


def baseline_anchors(ctx, plan: Plan, baseline: str) -> dict[str, float] | None:
    """The baseline's measured anchor scales when the plan was allocated 'anchored' (cached on disk), else None."""
    if (plan.note.get("allocation") or "greedy") != "anchored":
        return None
    return ui.get_anchors(ctx, ctx.an, baseline, 0.0).scales


def _method_counts(plan: Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in plan.methods.values():
        out[m] = out.get(m, 0) + 1
    return out


def build_seconds(ctx, plan: Plan, **opts) -> float:
    """≈ seconds to build the copy of `plan` (with `opts`: merge …) here, 0 when cached: planned modules ×
    this model's measured build seconds per module (of a plain copy built earlier in this process),
    else `_prior`."""
    return 0.0 if ready(ctx, plan, **opts) else fresh_build_seconds(ctx, plan)


def fresh_build_seconds(ctx, plan: Plan) -> float:
    """≈ seconds to build a copy of `plan` that is not cached (see `build_seconds`)."""
    speeds = _speeds()
    total = 0.0
    for m, n in _method_counts(plan).items():
        s = speeds.get((ctx.lm.ident, m))
        total += n * (s if s is not None else _prior(ctx, plan, m))
    return total


def _prior(ctx, plan: Plan, method: str) -> float:
    """Seconds per module of a first build of `method`: this analysis' measured decomposition speed when
    it ran in this process (a build decomposes each module again), else a one-layer sample (timed on one
    thread; a build shares the layers out over `Analysis.default_workers` threads)."""
    s = ui.decompose_speed().get((ctx.lm.ident, ctx.calib["key"], ctx.an.cfg.gamma))
    if s is not None:
        return s
    return (_sample_seconds(ctx.lm.ident, ctx.calib["key"], ctx.an.cfg.gamma, method, ctx.an, _sample(plan, method))
            / max(1, ctx.an.default_workers()))


def _sample(plan: Plan, method: str) -> dict[str, int]:
    """The planned modules of `method` in the first layer that has some (whole input groups, so their
    shared whitening is counted as in a full build)."""
    import re

    fqns = [f for f, m in plan.methods.items() if m == method]
    layer = lambda f: (re.findall(r"\.(\d+)\.", f) or ["-"])[0]   # noqa: E731
    first = layer(fqns[0])
    return {f: plan.ranks[f] for f in fqns if layer(f) == first}


@st.cache_data(show_spinner=False, max_entries=32)
def _sample_seconds(ident: str, calib_key: str, gamma: float, method: str, _an, _ranks: dict[str, int]) -> float:
    """Seconds per module of computing `method`'s factors for a sample of modules (one layer's), timed
    once per model, calibration, γ and method: the prior before any copy was built here."""
    from ..surgery import compute_factors

    t0 = time.perf_counter()
    compute_factors(_an, Plan(ranks=dict(_ranks), methods={f: method for f in _ranks}))
    return (time.perf_counter() - t0) / len(_ranks)


def three_models(ctx, plan: Plan, baseline: str) -> dict:
    """{"uncompressed": model, "plan": copy, "<baseline> (same budget)": copy}, copies from the cache
    (built with progress bars the first time)."""
    base = baseline_plan(ctx, plan, baseline)
    return {"uncompressed": ctx.lm.model, "plan": get_copy(ctx, plan, label="plan")[0],
            f"{baseline} (same budget)": get_copy(ctx, base, label=f"{baseline} baseline")[0]}
