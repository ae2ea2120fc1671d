"""ρ map: layers × module kind of the Dependence Violation Score ρ (spec §4), switchable to the
subspace misalignment (spec §3) and to the predicted ΔL at the current ranks. Clicking a cell
selects that module on every page. ρ needs no eigen-decomposition, so the map appears as soon as
the calibration is there; the decompositions run (with a progress bar) when a view needs them."""

import streamlit as st

from fasc.app import knowledge as K
from fasc.app import ui
from fasc.app.explain import rho_explained, rho_facts
from fasc.app.state import select_module, selected_module
from fasc.app.table import plan_values, selected_fqn
from fasc.plots import rho_heatmap

VIEWS = {
    "rho": "ρ (dependence)",
    "rho_fisher": "ρ along Fisher directions",
    "misalignment": "Misalignment pca ↔ fasc",
    "dl_plan": "Predicted ΔL at current ranks",
    "knowledge": "Measured knowledge loss",
    "fact_focus": "Facts vs general Fisher",
}


def module_panel(ctx: ui.Context, rows: list, sel: str, plan) -> None:
    """The selected module's numbers, a module picker and the highest-ρ modules."""
    an = ctx.an
    r = next(x for x in rows if x.fqn == sel)
    st.markdown(f"**Selected:** {sel}")
    names = [x.fqn for x in rows]
    pick = st.selectbox("Module", names, index=names.index(sel), label_visibility="collapsed",
                        key=f"w.rho_pick.{sel}")
    if pick != sel:
        select_module(pick)
        st.rerun()
    k = plan.ranks.get(sel) if plan else None
    st.metric("ρ (mean |ρ(u)|)", f"{r.rho:.3f}", help=f"signed mean {r.rho_signed:+.3f}")
    if r.rho_fisher is not None:
        st.metric("ρ along Fisher directions", f"{r.rho_fisher:.3f}",
                  help=f"signed mean {r.rho_fisher_signed:+.3f}, over the module's top Fisher directions")
    if r.misalignment is not None:
        st.metric(f"Misalignment at k = {r.rank}", f"{r.misalignment:.1%}")
    if plan is None:
        st.caption("Misalignment and the planned ΔL need the eigen-decompositions of every module; they run "
                   "(with a progress bar) when you pick those views, open Spectra or Ranks, or click below.")
        if st.button("Decompose", key="w.decompose_run", icon=":material/play_arrow:",
                     help="Run the eigen-decompositions of every module (a progress bar shows how far)."):
            ui.decompose(ctx)
            st.rerun()
    if k is not None:
        st.metric(f"Plan: rank {k} / {an.info(sel).max_rank} ({plan.methods[sel]})",
                  f"ΔL {an.predicted(sel, plan.methods[sel], k):.3g}",
                  help="predicted loss increase of this module at its planned rank, nats/token")
    st.page_link(ui.PAGES["spectra"], label="Spectra of this module", icon=":material/ssid_chart:")
    top = sorted(rows, key=lambda x: -x.rho)[:5]
    st.markdown("**Highest ρ**")
    st.dataframe({"module": [f"L{x.layer} {x.kind}" for x in top], "ρ": [round(x.rho, 3) for x in top]},
                 hide_index=True, width="stretch")


def main() -> None:
    st.title("ρ map")
    ctx = ui.require_analysis(decompose=False)
    an = ctx.an
    sel = selected_module(an)
    about = st.container()   # what ρ does and does not tell, in this model's numbers (filled below)

    left, right = st.columns([3, 1], gap="medium")
    with left:
        # six options: they wrap onto a second row in a narrow column instead of scrolling out of sight
        view = st.pills("Show", list(VIEWS), format_func=VIEWS.get, wrap=True, **ui.bind("rho_view", "rho")) or "rho"
        ui.commit("rho_view", view)
        ratio = ui.setting("rho_ratio", 0.5)
        if view == "misalignment":
            ratio = st.slider("Reference rank ratio", 0.05, 1.0, step=0.05, **ui.bind("rho_ratio", 0.5),
                              help="Misalignment is measured at rank round(ratio·min(m, n)) of every module.")
            ui.commit("rho_ratio", float(ratio))
        if view == "rho_fisher" and not ctx.rho_fisher and not an.stats.sketch_fisher:
            st.info("ρ along each module's top Fisher directions — the input directions FASC keeps — needs one "
                    "more forward+backward pass over the calibration text (about as long as the calibration). "
                    "Where it is large, the decoupled ΔL prediction is least trustworthy for the directions "
                    "that matter (spec §4).", icon=":material/info:")
            if st.button("Measure ρ along Fisher directions", key="w.rho_fisher_run", icon=":material/play_arrow:",
                         type="primary"):
                ui.measure_rho_fisher(ctx)
                st.rerun()
            view = "rho"
        if view in ("misalignment", "dl_plan", "knowledge"):
            ui.decompose(ctx)  # with a progress bar; ρ itself needs no eigen-decomposition
        ready = an.decomposed()
        plan = ctx.plan() if ready else None
        rows = ui.report_rows(ctx, float(ratio), ready)
        values = plan_values(plan, an) if view == "dl_plan" else None
        view, values, label, kv = K.knowledge_view(ctx, plan, view, values, len(rows))
        title = kv.title or {"rho": "ρ = mean |ρ(u)| over random unit directions (0 = independent)",
                 "rho_fisher": "ρ = mean |ρ(u)| over each module's top Fisher directions (the ones FASC keeps)",
                 "misalignment": f"Share of the FASC subspace missed by PCA at rank ratio {ratio:g}",
                 "dl_plan": f"Predicted ΔL per module at the current ranks (Σ = {plan.predicted(an):.4g} nats/token)"
                 if plan else ""}[view]
        fig = rho_heatmap(rows, value=view, selected=sel, values=values, title=title, label=label)

        def on_select() -> None:
            fqn = selected_fqn(st.session_state.get("rho_chart"), rows)
            if fqn:
                select_module(fqn)

        st.plotly_chart(fig, width="stretch", key="rho_chart", on_select=on_select, selection_mode="points",
                        config={"displayModeBar": False})
        st.caption("Hover a cell for its numbers; click it to select the module for the Spectra and Ranks pages.")
    with right:
        module_panel(ctx, rows, sel, plan)
        K.module_metric(kv, sel)
    if view == "knowledge":
        K.knowledge_details(ctx, kv, plan)
    with about:
        for line in rho_explained(rho_facts(rows, ui.fisher_energy(ctx)), K.rho_verdict(ctx, kv.km)):
            st.markdown(line)


ui.run_page(main)
