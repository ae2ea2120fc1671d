"""Export: compress a copy of the model with the current plan and write it as a Hugging Face folder
plus `fasc_config.json` (spec §7) — the same export `fasc compress` makes."""

import json
from pathlib import Path

import streamlit as st

from fasc.app import copies as CP
from fasc.app import stages as ST
from fasc.app import state, ui
from fasc.app.choices import default_export_dir
from fasc.app.format import human_bytes
from fasc.app.table import plan_label
from fasc.errors import FascError
from fasc.export import FASC_CONFIG
from fasc.pipeline import compress_and_save
from fasc.speed import plan_speed


def show_result(res: dict) -> None:
    """The last export of this session: sizes, files and downloads."""
    st.success(f"Wrote {res['out']} ({'merged' if res['merged'] else 'factored'}) in {res['seconds']:.1f} s.",
               icon=":material/check_circle:")
    c = st.columns(4)
    c[0].metric("Export size", human_bytes(res["export_bytes"]))
    c[1].metric("Model parameters", f"{res['model_params_after'] / 1e6:.3f} M",
                delta=f"{res['model_params_after'] - res['model_params_before']:+,}", delta_color="inverse")
    c[2].metric("Kept in compressed modules", f"{res['param_ratio']:.1%}")
    c[3].metric("Predicted ΔL", f"{res['predicted_delta_loss']:.4g}")
    st.dataframe([{"file": k, "size": human_bytes(v)} for k, v in res["files"].items()], hide_index=True)
    c = st.columns(2)
    c[0].download_button("Download plan.json", res["plan"], file_name="plan.json", mime="application/json",
                         icon=":material/download:", key="w.dl_plan")
    cfg_path = Path(res["out"]) / FASC_CONFIG
    if cfg_path.is_file():
        c[1].download_button("Download fasc_config.json", cfg_path.read_text(), file_name=FASC_CONFIG,
                             mime="application/json", icon=":material/download:", key="w.dl_cfg")
        with st.expander(FASC_CONFIG):
            st.json(json.loads(cfg_path.read_text()), expanded=1)
    if res.get("stages"):
        st.caption(f"Progressive: {len(res['stages']) + 1} stages ("
                   + ", ".join(f"{s['param_ratio']:.0%}" for s in res["stages"]) + f", {res['param_ratio']:.0%}), "
                   f"predicted ΔL " + " + ".join(f"{d:.4f}" for d in res["predicted_delta_loss_stages"])
                   + "; the last plan, allocated on the stage model, is the plan.json below.")
    if res.get("sequential"):
        st.caption(f"Sequential ({res['sequential']}): each module was fitted to the partly compressed model's inputs.")
    if res.get("heal"):
        st.caption(f"Healing: {res['heal']['summary']}.")
    st.caption(f"Evaluate it: `fasc eval --model {res['out']}` (or `--tasks fasc_facts`, lm-eval) · load it: "
               f"`fasc.load_model({res['out']!r})`"
               + ("" if res["merged"] else f" or `AutoModelForCausalLM.from_pretrained({res['out']!r}, "
                                           f"trust_remote_code=True)`") + ".")


def export(ctx, plan, target: Path, merged: bool, overwrite: bool, method: str, ref: ui.Refinement,
           stages: int = 1) -> dict:
    """Compress a copy (or take the one Evaluate, Generate or Compare built with the same options), or the
    plan's budget in `stages` stages, and write it, with progress bars; a click on Cancel (or anywhere)
    interrupts it before anything is written."""
    cancel = st.empty()   # cleared when the work ends: no Cancel left on screen
    cancel.button("Cancel", key="w.export_cancel", icon=":material/cancel:")
    try:
        if stages > 1:
            return ST.staged_export(ctx, plan, stages, target, merge=merged, overwrite=overwrite, ref=ref)
        return compress_and_save(ctx.lm.model, ctx.lm.tok, ctx.an, plan, target, merge=merged, overwrite=overwrite,
                                 method=method, source_model=ctx.lm.spec, calibration=ctx.calib["key"],
                                 model_fp=ctx.lm.fingerprint, **ref.opts(),
                                 copies=CP.provider(ctx, merge=merged, **ref.opts()))
    finally:
        cancel.empty()


def export_cost(ctx, plan, merged: bool, ref: ui.Refinement) -> str:
    """What Export will do and ≈ how long, before it starts."""
    opts = {"merge": merged, **ref.opts()}
    if CP.ready(ctx, plan, **opts):
        return "The compressed copy is already built (by Evaluate, Generate, Compare or an earlier export): " \
               "Export only writes it."
    if ref.sequential or ref.heal_tokens:
        return "Export builds the compressed copy (sequential / healing: their cost is in their help), then writes it."
    return f"≈ {ui.minutes(CP.build_seconds(ctx, plan, **opts))} to build the compressed copy, then it is written."


def main() -> None:
    st.title("Export")
    ctx = ui.require_analysis()
    an = ctx.an
    plan = ctx.plan()
    t = plan.totals(an)
    method = plan.note.get("method") or "fasc"
    st.markdown(f"Plan: **{plan_label(plan, an, ctx.plans.is_default)}** · predicted ΔL **{t.predicted:.4g}** "
                f"nats/token — change it on the Ranks page.")

    c = st.columns([2, 5, 2], vertical_alignment="bottom")
    fmt = c[0].radio("Format", ["factored", "merged"], horizontal=True, **ui.bind("export_format", "factored"),
                     help="factored: each module as the plan stores it — R, P pivoted or U, V (the Ranks page's "
                          "*Pivoted factors*) — smaller; `fasc.load_model` and transformers with "
                          "`trust_remote_code=True` load it. merged: dense W′ that any tool loads, dense size.")
    ui.commit("export_format", fmt)
    merged = fmt == "merged"
    speedup, slow = plan_speed(ctx.lm.model, an, plan, merge=merged)
    if slow:
        st.warning(slow.replace("--merge", "merged").replace("(e.g. --param-ratio 0.6)", "on the Ranks page"),
                   icon=":material/speed:")
    default_dir = default_export_dir(ctx.lm.spec, method, t.ratio, merged)
    out = c[1].text_input("Target folder", **ui.bind(f"export_dir.{default_dir}", default_dir),
                          help="Written atomically (a temporary folder renamed into place). Proposed under "
                               "~/fasc-exports, outside the repository; FASC_APP_OUT sets another parent folder.")
    ui.commit(f"export_dir.{default_dir}", out)
    overwrite = c[2].checkbox("Overwrite", **ui.bind("export_overwrite", False),
                              help="Replace an earlier export in the target folder. A folder holding anything "
                                   "else (no fasc_config.json) is refused, never deleted.")
    ui.commit("export_overwrite", overwrite)
    if st.session_state.get("w.export_cancel"):
        st.warning("Export cancelled; nothing was written.", icon=":material/cancel:")
    ref = ui.refinement_options("export", ctx, plan, merged)

    n = ST.stages_for(ctx, plan, ref.sequential)
    stages = 1
    if n > 1:
        pick = st.radio("Stages", [1, n], horizontal=True, **ui.bind(f"export_stages.{n}", 1),
                        format_func=lambda k: "1: the plan on screen" if k == 1 else
                        f"{k}: progressive, as `fasc compress --param-ratio {plan.note['param_ratio']:g}`",
                        help="Progressive compression reaches the budget in steps, each merged and calibrated "
                             "again on the page's calibration text, so each stage's plan is priced on the model it "
                             "truncates (the last plan is not the one on screen); bit for bit what `fasc compress` "
                             "writes from the same calibration settings. One calibration and decomposition more per "
                             "stage. On SmolLM2 it helped on the CLI's 32,768 calibration tokens and not on 8,192 "
                             "(BENCHMARKS.md, *Progressive compression*).")
        stages = int(ui.commit(f"export_stages.{n}", pick))
    if stages > 1:
        more = "1 more calibration of the stage model" if stages == 2 else \
            f"{stages - 1} more calibrations of the stage models"
        st.caption(f"≈ {ui.minutes(ST.stages_seconds(ctx, plan, stages))}: {more} (less when an earlier export "
                   f"left it in the cache) and {stages} compressions, then it is written"
                   f"{' (healing: see its help for the cost)' if ref.heal_tokens else ''}.")
    else:
        st.caption(export_cost(ctx, plan, merged, ref))
    if st.button("Export", type="primary", key="w.export", icon=":material/save:"):
        if not out.strip():
            raise FascError(f"No target folder given; enter a folder such as {default_dir}.")
        target = Path(out.strip()).expanduser()
        if target.parent == Path(default_dir).expanduser().parent:  # the proposed export root is created on demand
            target.parent.mkdir(parents=True, exist_ok=True)
        res = export(ctx, plan, target, merged, overwrite, method, ref, stages)
        res["plan"] = res.pop("staged_plan", None) or plan.to_json()
        res["plan_key"] = plan.key()
        state.put_export_result(ctx.lm.ident, res)

    res = state.export_result(ctx.lm.ident)   # this model's last export, never another model's
    if res:
        if res.get("plan_key") != plan.key():
            st.caption("This export was made from an earlier plan of this model; export again for the current one.")
        show_result(res)

ui.run_page(main)
