"""Ranks: the rank plan — allocated automatically under a parameter budget (spec §6) or edited per
module / per layer — with live totals, an evaluation against the uncompressed model and a
variance baseline at the same budget, and save / load as JSON."""

import streamlit as st

from fasc import app_state as S
from fasc import app_ui as ui
from fasc.allocate import allocate
from fasc.config import ALLOCATIONS, METHODS
from fasc.pipeline import default_data
from fasc.plots import eval_figure

ALLOCATION_LABEL = {"greedy": "greedy (predicted ΔL)", "anchored": "anchored (measured)",
                    "uniform": "uniform (same share per module)"}
ALLOCATION_HELP = ("**greedy**: ranks chosen by predicted ΔL per parameter, free. **anchored**: each module's "
                   "predicted curve scaled by one measured loss (only that module compressed at half its "
                   "parameters): {n} forward passes over {t} held-out calibration tokens, cached. **uniform**: "
                   "every module keeps the same share of its parameters, the baseline SVD-LLM / LEMS report, free.")
METHOD_HELP = {"svd": "SVD of W (data-blind)", "asvd": "activation-whitened SVD (variance)",
               "pca": "PCA of activations (variance)", "fwsvd": "diagonal-Fisher weighted SVD",
               "fasc": "Fisher-aligned (this project)", "hybrid": "fasc where ρ ≥ τ, else asvd"}


def main() -> None:
    st.title("Ranks")
    ctx = ui.require_analysis()
    an0 = ctx.an
    totals_box = st.container()

    # ---------------------------------------------------------------- automatic allocation
    with st.container(border=True):
        st.markdown("**Allocate automatically** — a parameter budget spread over the modules (spec §6)")
        c = st.columns([2, 3, 2, 3, 2], vertical_alignment="bottom")
        method = c[0].selectbox("Method", METHODS, help=" · ".join(f"**{m}**: {h}" for m, h in METHOD_HELP.items()),
                                **ui.bind("alloc_method", "fasc"))
        ui.commit("alloc_method", method)
        ratio = c[1].slider("Parameter budget (share kept)", 0.05, 1.0, step=0.05, **ui.bind("alloc_ratio", 0.5))
        ui.commit("alloc_ratio", float(ratio))
        scope = c[2].selectbox("Modules", ["all", "mlp", "attention"], **ui.bind("alloc_scope", "all"))
        ui.commit("alloc_scope", scope)
        tau = c[3].slider("Hybrid threshold τ on ρ", 0.0, 1.0, step=0.01, disabled=method != "hybrid",
                          help="hybrid uses fasc on modules with ρ ≥ τ and asvd elsewhere",
                          **ui.bind("tau", float(an0.cfg.tau)))
        ui.commit("tau", float(tau))
        an = S.with_tau(an0, float(tau))
        alloc = st.radio("Allocation", ALLOCATIONS, horizontal=True, format_func=ALLOCATION_LABEL.get,
                         help=ALLOCATION_HELP.format(n=len(an.modules), t=ui.ANCHOR_TOKENS), **ui.bind("alloc_kind", "greedy"))
        ui.commit("alloc_kind", alloc)
        if c[4].button("Allocate", type="primary", key="w.allocate", icon=":material/auto_fix_high:"):
            if method not in ("pca", "fasc"):
                ui.get_analysis(ctx.lm, ctx.calib["key"], methods=("asvd",) if method == "hybrid" else (method,))
            anchors = ui.get_anchors(ctx, an, method).scales if alloc == "anchored" else None
            plan = allocate(an, method, param_ratio=float(ratio), modules=scope, model_fp=ctx.lm.fingerprint,
                            allocation=alloc, anchors=anchors)
            plan.note["tau"] = float(tau) if method == "hybrid" else None
            ui.set_plan(ctx, plan)
        if method == "hybrid":
            n_f = sum(an.rho(i.fqn)[0] >= tau for i in an.modules)
            st.caption(f"τ = {tau:.2f}: fasc on {n_f} of {len(an.modules)} modules, asvd on the rest.")

    plan = ui.current_plan(ctx)
    pending = st.session_state.pop("pending_layer", None)  # a layer slider moved (see on_layer)
    if pending is not None:
        plan = S.set_layer_ratio(plan, an, *pending)
        ui.set_plan(ctx, plan)
    ver = st.session_state.get("plan_ver", 0)

    # ---------------------------------------------------------------- per-layer sliders
    def on_layer(layer: int, key: str) -> None:
        st.session_state["pending_layer"] = (layer, float(st.session_state[key]))

    with st.expander("Per-layer rank ratio", expanded=False):
        ratios = S.layer_ratios(plan, an)
        cols = st.columns(min(6, max(1, len(ratios))))
        for j, (layer, r) in enumerate(ratios.items()):
            key = f"w.layer.{layer}.{ver}"  # a new plan version redraws every slider from the plan
            if key not in st.session_state:
                st.session_state[key] = max(0.01, round(r, 2))
            cols[j % len(cols)].slider(f"Layer {layer}", 0.01, 1.0, step=0.01, key=key, on_change=on_layer,
                                       args=(layer, key))
        st.caption("A slider sets every planned module of its layer to rank round(ratio · min(m, n)).")

    # ---------------------------------------------------------------- editable table
    st.markdown("**Per-module ranks and methods** — edit the rank or method cells")
    table = S.plan_table(plan, an)
    edited = st.data_editor(
        table, key=f"w.editor.{ver}", width="stretch", hide_index=True, height=min(420, 36 + 35 * len(table)),
        disabled=[c for c in S.TABLE_COLUMNS if c not in ("rank", "method")],
        column_config={
            "module": st.column_config.TextColumn("module", width="medium"),
            "max_rank": st.column_config.NumberColumn("max k"),
            "rank": st.column_config.NumberColumn("rank k", min_value=1, step=1, required=True),
            "method": st.column_config.SelectboxColumn("method", options=list(METHODS), required=True),
            "rho": st.column_config.NumberColumn("ρ", format="%.3f"),
            "kept": st.column_config.ProgressColumn("params kept", format="percent", min_value=0, max_value=1),
            "dl": st.column_config.NumberColumn("ΔL (nats/tok)", format="%.2e"),
        })
    new, errors = S.apply_table(plan, an, edited)
    for e in errors:
        st.error(e, icon=":material/error:")
    if S.plan_key(new) != S.plan_key(plan):
        ui.set_plan(ctx, new)  # a new version: the editor and the sliders are redrawn from the plan
        st.rerun()

    # ---------------------------------------------------------------- live totals (top of the page)
    t = S.plan_totals(plan, an)
    with totals_box:
        c = st.columns(4)
        c[0].metric("Parameters kept", f"{t.ratio:.1%}", help=f"{t.kept:,} of {t.original:,} in the planned modules")
        c[1].metric("Predicted ΔL", f"{t.predicted:.4g}", help="Σ over modules, nats/token (spec §3)")
        c[2].metric("Modules factored", f"{t.factored} / {t.modules}",
                    help="the others keep a dense weight: rank ≥ mn/(m+n) would not save parameters")
        label = plan.note.get("method", "custom") + (" (edited)" if plan.note.get("edited") else "")
        c[3].metric("Plan", label)

    # ---------------------------------------------------------------- evaluation
    st.subheader("Evaluate")
    data = default_data(ctx.lm.spec)
    c = st.columns([2, 2, 2, 3], vertical_alignment="bottom")
    baseline = c[0].selectbox("Variance baseline", ["asvd", "pca"], **ui.bind("eval_baseline", "asvd"))
    ui.commit("eval_baseline", baseline)
    max_tok = c[1].number_input("Perplexity tokens", 64, 1_000_000, step=1024, **ui.bind("eval_tokens", 4096))
    ui.commit("eval_tokens", int(max_tok))
    go = c[2].button("Evaluate", key="w.evaluate", icon=":material/play_arrow:")
    c[3].caption(f"Perplexity on {data.heldout.name}, fact recall on {data.probe.name}.")
    plan_alloc = plan.note.get("allocation") or "greedy"   # the baseline is spread the same way
    ekey = (ctx.lm.spec, ctx.calib["key"], an.cfg.gamma, S.plan_key(plan), baseline, int(max_tok), plan_alloc)
    store = ui.eval_store()
    if go and ekey not in store:
        base_anchors = ui.get_anchors(ctx, an, baseline).scales if plan_alloc == "anchored" else None
        bar = ui.Progress("Evaluating", unit="models")
        try:
            store[ekey] = S.evaluate_plan(ctx.lm.model, ctx.lm.tok, an, plan, data.heldout, data.probe,
                                          baseline=baseline, max_tokens=int(max_tok), progress=bar,
                                          allocation=plan_alloc, baseline_anchors=base_anchors)
        finally:
            bar.clear()
    if ekey in store:
        rows = store[ekey]
        st.dataframe([{"model": r["model"], "params kept": f"{r['params_kept']:.1%}",
                       "predicted ΔL": f"{r['predicted_dl']:.3g}", "perplexity": round(r["perplexity"], 3),
                       "fact recall": f"{r['recall']:.1%}", "exact match": f"{r['exact_match']:.1%}",
                       "facts": r["n_facts"]} for r in rows], hide_index=True, width="stretch")
        st.plotly_chart(eval_figure(rows), width="stretch", key="eval_fig")
    else:
        st.caption("Evaluation compresses copies of the model (the plan and the baseline); results are cached per plan.")

    # ---------------------------------------------------------------- save / load
    st.subheader("Save / load the plan")
    c = st.columns(2)
    c[0].download_button("Download plan JSON", S.plan_json(plan), file_name="plan.json", mime="application/json",
                         icon=":material/download:", key="w.plan_dl")
    c[0].caption("Use it with `fasc compress --ranks plan.json`.")
    up = c[1].file_uploader("Load a plan JSON", type=["json"], key="w.plan_up")
    if up is not None and st.session_state.get("plan_loaded_id") != up.file_id:
        loaded = S.load_plan_bytes(up.getvalue(), up.name, an, ctx.lm.fingerprint)
        st.session_state["plan_loaded_id"] = up.file_id
        ui.set_plan(ctx, loaded)
        st.rerun()


ui.run_page(main)
