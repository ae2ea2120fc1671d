"""Progressive compression from the Export page: the plan's budget reached in the stages `fasc compress
--stages auto` takes (`fasc.pipeline.compress_stages`), each stage model calibrated on the page's calibration
text and settings, with progress bars. The export is bit for bit what the CLI writes for the same request."""

from __future__ import annotations

import time
from pathlib import Path

from . import copies as CP
from . import ui
from ..allocate import Plan, allocate, base_methods
from ..config import HYBRID_FALLBACK, HYBRID_TAU
from ..modules import model_fingerprint
from ..pipeline import (add_stages, analysis_cached, calibrate_cached, compress_and_save, compress_stages,
                        default_stages, stage_budgets, stages_record)


def stages_for(ctx, plan: Plan, sequential: bool | str = False) -> int:
    """The stages the CLI takes for the plan's request (`fasc.pipeline.default_stages`); one for a plan edited
    or loaded by hand, whose ranks no budget re-allocates."""
    note = plan.note if isinstance(plan.note, dict) else {}
    if note.get("edited") or note.get("loaded_from"):
        return 1
    return default_stages(ctx.lm.spec, note.get("param_ratio"), note.get("allocation") or "greedy",
                          note.get("attention_share"), sequential)


# A calibration token (forward, backward, the statistics' hooks) costs ≈ this many batched forward tokens:
# SmolLM2 on one CPU thread, 1,015 tokens in 14.9 s against 2.29 ms a forward token (2026-12-07)
CALIBRATION_FORWARDS = 6.4


def stages_seconds(ctx, plan: Plan, stages: int) -> float:
    """≈ seconds of a staged export here: each stage before the last calibrates its model (at the page's own
    calibration speed when it ran in this process, else `CALIBRATION_FORWARDS` forward tokens a token) and
    decomposes it (≈ one copy's build), and every stage builds its copy (this model's measured build speed)."""
    n_tok = int(ctx.calib.get("n_tokens") or ctx.calib["cfg"].get("n_tokens") or 0)
    ran = not ctx.calib.get("from_cache") and ctx.calib.get("seconds")
    per_token = ctx.calib["seconds"] / n_tok if ran and n_tok else CALIBRATION_FORWARDS * ui.seconds_per_token(ctx)
    build = CP.fresh_build_seconds(ctx, plan)
    return (stages - 1) * (n_tok * per_token + build) + stages * build


def _methods(plan: Plan) -> tuple[str, ...]:
    note = plan.note if isinstance(plan.note, dict) else {}
    return base_methods(note.get("method") or "fasc", note.get("fallback") or HYBRID_FALLBACK, note.get("qk_method"))


def staged_export(ctx, plan: Plan, stages: int, target: Path, *, merge: bool, overwrite: bool,
                  ref: ui.Refinement) -> dict:
    """Export `plan`'s budget in `stages` stages: stage 1's plan is allocated on the page's calibration at the
    first stage's budget, each later one on the stage model it truncates, all with the plan's method,
    allocation and modules (the plan on screen itself is not exported). Returns `compress_and_save`'s summary
    with the stages, their predicted ΔL, the last plan (JSON) and the seconds of the whole export."""
    t0 = time.perf_counter()
    note = plan.note
    method = note.get("method") or "fasc"
    batches, _ = ui.calibration_batches(ctx)   # fails when the settings no longer match the calibration

    def stage_plan(model, budget: float):
        if model is ctx.lm.model:   # the dense model: the page's own calibration and analysis
            an = ui.get_analysis(ctx.lm, ctx.calib["key"], methods=_methods(plan))
            key, fp = ctx.calib["key"], ctx.lm.fingerprint
        else:
            bar = ui.ProgressBar(f"Calibrating the stage model for the {budget:.0%} plan")
            try:
                stats, _ = calibrate_cached(model, batches, ui.calib_request(ctx.lm.spec).cfg, progress=bar)
            finally:
                bar.clear()
            bar = ui.ProgressBar("Eigen-decompositions of the stage model", unit="bases", lazy=0.3)
            try:
                an, _ = analysis_cached(model, stats, ctx.an.cfg, _methods(plan), progress=bar, diagnostics=False)
            finally:
                bar.clear()
            key, fp = stats.key, stats.model_fingerprint or model_fingerprint(model)
        return an, allocate(an, method, param_ratio=budget, modules=sorted(plan.ranks), model_fp=fp,
                            allocation=note.get("allocation") or "greedy", qk_method=note.get("qk_method"),
                            tau=note.get("tau", HYBRID_TAU), fallback=note.get("fallback") or HYBRID_FALLBACK,
                            factors=plan.factors), key

    budgets = stage_budgets(note["param_ratio"], stages)
    model, done = compress_stages(ctx.lm.model, budgets[:-1], stage_plan, lambda i, b: ui.ProgressBar(
        f"Stage {i} of {stages}: compressing to {b:.0%} of the parameters (merged)", unit="modules"))
    an, last, key = stage_plan(model, budgets[-1])
    bar = ui.ProgressBar(f"Stage {stages} of {stages}: compressing to {budgets[-1]:.0%}", unit="modules")
    hbar = ui.ProgressBar("Healing", unit="tokens") if ref.heal_tokens else None
    try:
        res = compress_and_save(model, ctx.lm.tok, an, last, target, merge=merge, overwrite=overwrite, method=method,
                                source_model=ctx.lm.spec, calibration=key, model_fp=last.model_fingerprint,
                                progress=bar, batches=batches, heal_progress=hbar, teacher=ctx.lm.model,
                                heal_heldout=ui.heldout_tail(ctx, ui.HEAL_CHECK_TOKENS) if ref.heal_tokens else None,
                                meta_extra=stages_record(ctx.lm.model, done), in_place=True, **ref.opts())
    finally:
        bar.clear()
        if hbar is not None:
            hbar.clear()
    add_stages(res, done)
    res["staged_plan"] = last.to_json()
    res["seconds"] = round(time.perf_counter() - t0, 2)   # every stage, not only the last one's export
    return res
