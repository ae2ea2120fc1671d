"""Spectra of the selected module: variance vs Fisher eigenvalues (spec §3), cumulative energy, and
the predicted ΔL(k) of the variance methods vs FASC, with the module's planned rank marked."""

import streamlit as st

from fasc.allocate import module_params
from fasc.app import ui
from fasc.app.state import select_module, selected_module
from fasc.plots import dl_curves_figure, energy_figure, spectra_figure


def main() -> None:
    st.title("Spectra")
    ctx = ui.require_analysis()
    an = ctx.an
    plan = ctx.plan()
    sel = selected_module(an)
    infos = an.modules
    names = [i.fqn for i in infos]

    def fmt(f: str) -> str:
        i = an.info(f)
        return f"L{i.layer} · {i.kind} — ρ {an.rho(f)[0]:.3f}  ({f})"

    st.session_state["w.spec_module"] = sel

    def on_module() -> None:
        select_module(st.session_state["w.spec_module"])

    a, b = st.columns([3, 2])
    a.selectbox("Module", names, format_func=fmt, key="w.spec_module", on_change=on_module)
    info = an.info(sel)
    k_plan = plan.ranks.get(sel, info.max_rank)
    st.session_state["w.spec_rank"] = int(k_plan)

    def on_rank() -> None:  # the slider edits the session's plan
        ctx.plans.put(ctx.plan().with_rank(an, sel, int(st.session_state["w.spec_rank"])))

    k = b.slider(f"Rank k (of {info.max_rank}) — edits the plan", 1, info.max_rank, key="w.spec_rank",
                 on_change=on_rank)
    method = plan.methods.get(sel, "fasc")

    mu = an.variance_spectrum(sel).numpy()
    lam = an.fisher_spectrum(sel).numpy()
    dl = {m: an.curve(sel, m) for m in ("pca", "asvd", "fasc")}
    r_abs, r_sig = an.rho(sel)
    c = st.columns(5)
    c[0].metric("ρ", f"{r_abs:.3f}", help=f"signed mean {r_sig:+.3f} (spec §4)")
    c[1].metric(f"Misalignment at k={k}", f"{float(an.misalignment(sel)[k - 1]):.1%}",
                help="share of the FASC subspace the PCA subspace misses (0 = same subspace)")
    c[2].metric("ΔL pca(k)", f"{dl['pca'][k]:.3g}", help="predicted loss increase, nats/token")
    c[3].metric("ΔL fasc(k)", f"{dl['fasc'][k]:.3g}",
                delta=f"{(dl['fasc'][k] - dl['pca'][k]) / dl['pca'][k]:+.0%} vs pca" if dl["pca"][k] > 0 else None,
                delta_color="inverse")
    kept = module_params(info, k, plan.factors)
    c[4].metric("Parameters kept", f"{kept / info.params:.0%}",
                help=f"{kept:,} of {info.params:,} (shape {info.out_features}×{info.in_features}, stored "
                     f"{plan.factors}); plan method {method}")

    left, right = st.columns(2)
    left.plotly_chart(spectra_figure(mu, lam, k, title=f"Spectra · {sel}"), width="stretch", key="spec_fig")
    right.plotly_chart(energy_figure(mu, lam, k), width="stretch", key="energy_fig")
    log = st.toggle("log scale for ΔL", **ui.bind("dl_log", False))
    ui.commit("dl_log", log)
    st.plotly_chart(dl_curves_figure(dl, k, log=log, title=f"Predicted ΔL(k) · {sel}"), width="stretch",
                    key="dl_fig")
    st.caption("Variance methods keep the directions where activations are large; FASC keeps those where "
               "activations × gradients are large. Where the red Fisher spectrum decays differently from the blue "
               "variance one, the two subspaces differ and ΔL fasc(k) < ΔL pca(k).")


ui.run_page(main)
