"""Streamlit glue for the measured knowledge map (ρ map page) and the fact drill-down: the probe
choice, measurements with a progress bar and a cancel button,
and the shared in-memory store over the on-disk cache (`fasc.knowledge_map`).

Measurements run on a deep copy of the shared model (modules are swapped in and out there), so the
cached model is never mutated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from . import ui
from .table import plan_label
from ..allocate import Plan
from ..data import Example, load_probe, parse_jsonl, rows_to_examples
from ..errors import FascError
from ..knowledge_map import (KnowledgeMap, fisher_energy, focus_ratio, knowledge_map_cached, predictor_table,
                            probe_calibration, probe_subset)
from ..pipeline import model_defaults
from ..stats import CalibStats


@dataclass
class ProbeChoice:
    examples: list[Example]
    name: str
    ident: str          # identifies the facts for the in-memory store


@dataclass
class MapRequest:
    plan: Plan | None
    share: float | None
    method: str
    label: str          # what was compressed, in words


@st.cache_resource(show_spinner=False)
def _store() -> dict:
    """{key: value} for maps, probe statistics and generations (small; shared by sessions)."""
    return {}


def probe_source(spec: str) -> tuple[list[Example], str, str]:
    """(all facts, name, identity) of the probe picked on the ρ map page: built-in or uploaded."""
    if ui.setting("kmap_probe", "builtin") == "upload":
        up = st.session_state.get("kmap_upload")
        if not up:
            raise FascError("No probe uploaded; upload a JSONL file of {\"prompt\", \"answer\"} lines, or choose "
                            "the built-in probe.")
        return up["examples"], up["name"], up["sha"]
    path = Path(model_defaults(spec).probe)
    return load_probe(path), path.name, f"builtin:{path}"


def default_facts(n: int, spec: str) -> int:
    """Every fact of the demo probe; at most 150 elsewhere (one probe evaluation per module)."""
    return n if spec == "demo" else min(n, 150)


def parse_probe_upload(raw: bytes, name: str) -> dict:
    """An uploaded probe: {"examples", "name", "sha"}; a one-line FascError when it is not a probe."""
    from ..data import decode_text

    examples = rows_to_examples(parse_jsonl(decode_text(raw, name), name), name)
    if not examples:
        raise FascError(f"{name} has no prompt/answer lines; a probe line looks like "
                        f"{{\"prompt\": \"The capital of France is\", \"answer\": \"Paris\"}}.")
    return {"examples": examples, "name": name, "sha": hashlib.sha256(raw).hexdigest()}


def map_request(ctx, plan: Plan) -> MapRequest:
    mode = ui.setting("kmap_mode", "share")
    if mode == "plan":
        whose = " of the default plan (none made yet)" if ctx.plans.is_default else ""   # never silently
        return MapRequest(plan, None, "plan", f"each planned module at its planned rank and method{whose}")
    share = float(ui.setting("kmap_share", 0.5))
    method = ui.setting("kmap_method", "asvd")
    return MapRequest(None, share, method, f"{method} at {share:.0%} of each module's parameters")


def _key(kind: str, ctx, probe: ProbeChoice, req: MapRequest | None = None) -> str:
    parts = [kind, ctx.lm.spec, ctx.calib["key"], ctx.an.cfg.gamma, probe.ident]
    if req is not None:
        parts += [req.share, req.method, None if req.plan is None else json.dumps(req.plan.ranks, sort_keys=True),
                  None if req.plan is None else json.dumps(req.plan.methods, sort_keys=True)]
    return json.dumps(parts)


def cached_map(ctx, probe: ProbeChoice, req: MapRequest) -> KnowledgeMap | None:
    """The map from memory or the disk cache, or None (never measures)."""
    k = _key("map", ctx, probe, req)
    store = _store()
    if k not in store:
        km, _ = knowledge_map_cached(ctx.lm.model, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan,
                                     share=req.share, method=req.method, cached_only=True)
        if km is None:
            return None
        store[k] = km
    return store[k]


def cached_probe_stats(ctx, probe: ProbeChoice) -> CalibStats | None:
    return _store().get(_key("probe_stats", ctx, probe))


def _cancel_button(label: str) -> None:
    # A click reruns the script, which interrupts the measurement at its next progress update; the
    # library restores the model copy in `finally` and nothing half-measured is stored.
    st.button(label, key="w.kmap_cancel", icon=":material/cancel:")


def measure_probe_stats(ctx, probe: ProbeChoice) -> CalibStats:
    """Calibration on the probe's answers only (same settings as the general calibration)."""
    k = _key("probe_stats", ctx, probe)
    store = _store()
    if k not in store:
        bar = ui.ProgressBar("Calibrating on the probe's answers", unit="tokens")
        try:
            stats, _ = probe_calibration(ctx.lm.model, ctx.lm.tok, probe.examples, ctx.an.stats.config, progress=bar)
        finally:
            bar.clear()
        store[k] = stats
    return store[k]


def measure_map(ctx, probe: ProbeChoice, req: MapRequest) -> KnowledgeMap:
    """Probe calibration (for the predictors) and the map, with progress bars and a cancel button."""
    _cancel_button("Cancel measurement")
    measure_probe_stats(ctx, probe)
    k = _key("map", ctx, probe, req)
    store = _store()
    if k not in store:
        work = copy.deepcopy(ctx.lm.model)
        bar = ui.ProgressBar("Measuring the knowledge map (one probe evaluation per module)", unit="evaluations")
        try:
            km, _ = knowledge_map_cached(work, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan, share=req.share,
                                         method=req.method, progress=bar)
        finally:
            bar.clear()
            del work
        store[k] = km
    return store[k]


def map_values(km: KnowledgeMap, value: str) -> dict[str, float]:
    vals = km.knowledge_loss() if value == "knowledge_loss" else km.recall_drop()
    return {f: float(v) for f, v in zip(km.fqns, vals)}


def focus_values(ctx, probe_stats: CalibStats) -> dict[str, float]:
    return focus_ratio(fisher_energy(probe_stats), fisher_energy(ctx.an.stats))


def correlations(ctx, km: KnowledgeMap, probe_stats: CalibStats | None) -> list[dict]:
    ef = fisher_energy(probe_stats) if probe_stats is not None else None
    return predictor_table(km, ctx.an, fisher_energy(ctx.an.stats), ef, ctx.rho_fisher or None)


def correlation_frame(table: list[dict]):
    import pandas as pd

    def fmt(x: float) -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"

    return pd.DataFrame({"statistic": [r["statistic"] for r in table],
                         "Spearman with knowledge loss": [fmt(r["spearman_knowledge_loss"]) for r in table],
                         "with recall drop": [fmt(r["spearman_recall_drop"]) for r in table],
                         "modules": [r["n_modules"] for r in table]})


# ---------------------------------------------------------------------- page parts
MAP_VALUES = {"knowledge_loss": "answer loss increase (nats per fact)", "recall_drop": "recall drop"}


def probe_controls(spec: str) -> ProbeChoice:
    """Probe source (built-in / upload) and the number of facts, in an expander."""
    with st.expander("Probe and compression for the measurement", expanded=False):
        c1, c2 = st.columns(2)
        src = c1.radio("Probe", ["builtin", "upload"], format_func={"builtin": "built-in facts",
                       "upload": "upload prompt/answer JSONL"}.get, horizontal=True, **ui.bind("kmap_probe", "builtin"))
        ui.commit("kmap_probe", src)
        if src == "upload":
            f = c1.file_uploader("Probe JSONL", type=["jsonl"], key="w.kmap_file",
                                 help='one {"prompt": …, "answer": …} object per line')
            if f is not None:
                raw = f.getvalue()
                if (st.session_state.get("kmap_upload") or {}).get("raw_sha") != hashlib.sha256(raw).hexdigest():
                    st.session_state["kmap_upload"] = None
                    up = parse_probe_upload(raw, f.name)
                    st.session_state["kmap_upload"] = {**up, "raw_sha": up["sha"]}
        examples, name, ident = probe_source(spec)
        fkey = f"kmap_facts@{spec}@{ident}"
        n = c2.number_input("Facts used (evenly spaced)", 1, len(examples), step=10,
                            **ui.bind(fkey, default_facts(len(examples), spec)),
                            help="One probe evaluation per module: fewer facts, faster map.")
        ui.commit(fkey, int(n))
        mode = c2.radio("Compress each module", ["share", "plan"], horizontal=True,
                        format_func={"share": "at a parameter share", "plan": "at its planned rank"}.get,
                        **ui.bind("kmap_mode", "share"))
        ui.commit("kmap_mode", mode)
        if mode == "share":
            share = c1.slider("Parameter share kept", 0.05, 0.95, step=0.05, **ui.bind("kmap_share", 0.5))
            ui.commit("kmap_share", float(share))
            m = c2.selectbox("Method", ["asvd", "pca", "svd", "fwsvd", "fasc"], **ui.bind("kmap_method", "asvd"),
                             help="asvd: the variance baseline (the claim under test is about variance-only "
                                  "compression)")
            ui.commit("kmap_method", m)
    sub = probe_subset(examples, int(n))
    return ProbeChoice(sub, f"{name} ({len(sub)} of {len(examples)} facts)", f"{ident}#{len(sub)}")


def rho_verdict(ctx, km: KnowledgeMap | None) -> str:
    """What the measured map says about ρ as a locator of facts (or how to find out)."""
    if km is None:
        return ("Whether high ρ also marks where facts live is not assumed here: measure it with "
                "'Measured knowledge loss'.")
    r = predictor_table(km, ctx.an)[0]["spearman_knowledge_loss"]
    if math.isnan(r):
        return "The measured map is flat, so ρ cannot be ranked against it."
    return (f"Measured on this model: Spearman of ρ with the knowledge loss of compressing each module alone = "
            f"{r:+.2f} over {len(km.fqns)} modules (1 = ρ orders modules exactly as the facts lost, 0 = unrelated).")


def fact_label(ex: Example, width: int = 70) -> str:
    s = f"{ex.prompt} → {ex.answer}"
    return s if len(s) <= width else s[: width - 1] + "…"


def fact_panel(ctx, km: KnowledgeMap, probe: ProbeChoice, plan: Plan) -> None:
    """One fact at a time: answer probability and greedy continuation under the dense model, the
    plan and the variance baseline; the modules whose compression alone hurts it most."""
    from ..data import encode_example
    from ..evaluate import answer_scores
    from ..generate import greedy_continuation
    from .copies import three_models
    from .generation import cost_line

    st.markdown("**One fact at a time**")
    n = km.n_facts
    i = st.selectbox("Fact", list(range(n)), format_func=lambda j: f"{j + 1}. {fact_label(probe.examples[j])}",
                     key="w.kmap_fact")
    ex = probe.examples[i]
    c1, c2 = st.columns([2, 3])
    with c1:
        st.metric("P(answer) uncompressed", f"{math.exp(-float(km.base_nll[i])):.1%}",
                  help="P(answer | prompt), product over the answer's tokens (teacher-forced)")
        top = km.fact_effects(i)[:5]
        st.caption("Modules whose compression alone hurts this fact most (from the map's data)")
        short = [f"L{ctx.an.info(f).layer} {ctx.an.info(f).kind}" for f, _, _ in top]   # fits the column
        st.dataframe({"module": short, "loss ↑ (nats)": [round(d, 3) for _, d, _ in top],
                      "P(answer)": [f"{math.exp(-float(km.base_nll[i]) - d):.1%}" for _, d, _ in top],
                      "top-1": [ok for _, _, ok in top]}, hide_index=True, width="stretch",
                     column_config={"top-1": st.column_config.CheckboxColumn(
                         "top-1", help="the answer is still the top-1 token with only this module compressed")})
    with c2:
        baseline = ui.setting("eval_baseline", "asvd")
        st.caption(f"Plan compared: {plan_label(plan, ctx.an, ctx.plans.is_default)}; baseline: {baseline} at the "
                   f"same budget. Change the plan on the Ranks page.")
        key = json.dumps(["fact", ctx.lm.spec, ctx.calib["key"], ctx.an.cfg.gamma, plan.ranks, plan.methods,
                          baseline, ex.prompt, ex.answer], sort_keys=True)
        store = _store()
        if key not in store:
            st.caption(f"The plan and the {baseline} baseline at the same budget need compressed copies of the "
                       f"model (kept for Evaluate, Generate and Export): {cost_line(ctx, plan, baseline, 1, 12)}.")
            if not st.button("Compare under the plan and the baseline", key="w.kmap_fact_run",
                             icon=":material/play_arrow:"):
                return
            enc = [encode_example(ctx.lm.tok, ex)]
            rows = []
            cancel = st.empty()   # a click reruns: the comparison stops; cleared when it ends
            cancel.button("Cancel", key="w.kmap_fact_cancel", icon=":material/cancel:")
            try:
                for name, model in three_models(ctx, plan, baseline).items():   # copies built once, with progress
                    nll, ok = answer_scores(model, enc)
                    rows.append({"model": name, "P(answer)": f"{math.exp(-float(nll[0])):.1%}",
                                 "top-1": bool(ok[0]),
                                 "greedy continuation": greedy_continuation(model, ctx.lm.tok, ex.prompt, 12)})
            finally:
                cancel.empty()
            store[key] = rows
        st.dataframe(store[key], hide_index=True, width="stretch")


@dataclass
class KnowledgeView:
    """What the ρ map page needs from the knowledge views (all None for the other views)."""

    km: KnowledgeMap | None = None
    probe: ProbeChoice | None = None
    probe_stats: CalibStats | None = None
    title: str | None = None


def knowledge_view(ctx, plan: Plan, view: str, values, n_modules: int) -> tuple[str, object, str | None, KnowledgeView]:
    """Controls and on-request measurements of the 'knowledge' and 'fact_focus' views of the ρ map.

    Returns (view to draw, heatmap values, colour label, KnowledgeView); falls back to the ρ view
    (with an explanation and a measure button) while nothing is measured yet."""
    kv = KnowledgeView()
    if view not in ("knowledge", "fact_focus"):
        return view, values, None, kv
    kv.probe = probe = probe_controls(ctx.lm.spec)
    req = map_request(ctx, plan)
    kv.km = km = cached_map(ctx, probe, req)
    kv.probe_stats = cached_probe_stats(ctx, probe)
    if view == "knowledge" and km is None:
        st.info(f"Measured knowledge loss: each module alone is compressed ({req.label}) and the answer tokens' "
                f"loss and the first-token recall of {probe.name} are measured — one probe evaluation per module "
                f"({n_modules}), cached beside the statistics.", icon=":material/info:")
        if st.button("Measure the knowledge map", key="w.kmap_run", icon=":material/play_arrow:", type="primary"):
            measure_map(ctx, probe, req)
            st.rerun()
        return "rho", None, None, kv
    if view == "knowledge":
        shown = st.radio("Measured", list(MAP_VALUES), format_func=MAP_VALUES.get, horizontal=True,
                         **ui.bind("kmap_value", "knowledge_loss"))
        ui.commit("kmap_value", shown)
        kv.title = f"Measured with only this module compressed ({req.label}), {km.n_facts} facts"
        return view, map_values(km, shown), MAP_VALUES[shown], kv
    if kv.probe_stats is None:
        st.info(f"Calibrate on the answers of {probe.name} only (the loss on answer tokens, same settings as the "
                f"general calibration) and compare each module's share of that Fisher energy ½ tr(C_h C_x) with "
                f"its share on the general calibration text.", icon=":material/info:")
        if st.button("Calibrate on the probe's answers", key="w.kmap_focus_run", icon=":material/play_arrow:",
                     type="primary"):
            measure_probe_stats(ctx, probe)
            st.rerun()
        return "rho", None, None, kv
    kv.title = "Share of the facts' Fisher energy ÷ share of the general text's (1 = no focus)"
    return view, focus_values(ctx, kv.probe_stats), "facts/general energy share", kv


def knowledge_details(ctx, kv: KnowledgeView, plan: Plan) -> None:
    """Below the measured map: the Spearman table, what was measured, and one fact at a time."""
    km = kv.km
    st.markdown("**Does a statistic say where facts live?** Spearman rank correlation with the measured map, over "
                "the measured modules")
    st.dataframe(correlation_frame(correlations(ctx, km, kv.probe_stats)), hide_index=True, width="stretch")
    st.caption(f"Knowledge loss = mean increase of −log P(answer | prompt) over {km.n_facts} facts with only that "
               f"module compressed; recall drop = dense first-token recall "
               f"({float(km.base_correct.double().mean()):.1%}) minus recall with it compressed. Fisher energy = "
               f"½ tr(C_h C_x), the predicted loss of removing the module; 'probe answers' = calibrated on the "
               f"probe's answers only (the same facts, so it is a diagnostic, not a held-out prediction).")
    fact_panel(ctx, km, kv.probe, plan)


def module_metric(kv: KnowledgeView, fqn: str) -> None:
    """The selected module's measured knowledge loss, when the map is measured and covers it."""
    if kv.km is not None and fqn in kv.km.fqns:
        j = kv.km.fqns.index(fqn)
        st.metric("Measured knowledge loss", f"{float(kv.km.knowledge_loss()[j]):.3g} nats",
                  help=f"only this module compressed; recall drop {float(kv.km.recall_drop()[j]):+.1%}")
