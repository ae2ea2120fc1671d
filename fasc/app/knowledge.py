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
from ..knowledge_map import (FAST_PREDICTORS, FastMap, KnowledgeMap, fast_map_cached, fast_vs_exact, fisher_energy,
                            focus_ratio, knowledge_map_cached, predictor_table, probe_calibration, probe_subset)
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


def _targets(ctx, req: MapRequest) -> tuple[list[str], list[int], list[str]]:
    from ..knowledge_map import _targets as targets

    return targets(ctx.an, req.plan, req.share, req.method)


def cached_map(ctx, probe: ProbeChoice, req: MapRequest) -> KnowledgeMap | None:
    """The exact map from memory (every subset measured this session, merged) or the disk cache (every
    module), or None (never measures)."""
    k = _key("map", ctx, probe, req)
    store = _store()
    if k not in store:
        km, _ = knowledge_map_cached(ctx.lm.model, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan,
                                     share=req.share, method=req.method, cached_only=True)
        if km is None:
            return None
        store[k] = km
    return store[k]


def cached_fast(ctx, probe: ProbeChoice, req: MapRequest) -> FastMap | None:
    """The fast map from memory or the disk cache, or None (never computes)."""
    k = _key("fast", ctx, probe, req)
    store = _store()
    if k not in store:
        fm, _ = fast_map_cached(ctx.lm.model, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan, share=req.share,
                                method=req.method, cached_only=True)
        if fm is None:
            return None
        store[k] = fm
    return store[k]


def map_factors_shared(ctx, req: MapRequest) -> dict:
    """The map's factors, each module decomposed once and kept for the fast and the exact map (the
    latest request only: they hold about the compressed model's parameters)."""
    from ..knowledge_map import map_factors_cached

    k = json.dumps(["factors", ctx.lm.spec, ctx.calib["key"], ctx.an.cfg.gamma, req.share, req.method,
                    None if req.plan is None else [req.plan.ranks, req.plan.methods]], sort_keys=True)
    store = _store()
    if k not in store:
        fqns, ranks, methods = _targets(ctx, req)
        bar = ui.ProgressBar("Decomposing each module once (shared by the fast and the exact map)", unit="modules")
        try:
            got, _ = map_factors_cached(ctx.an, fqns, methods, ranks, progress=bar)
        finally:
            bar.clear()
        for old in [x for x in store if x.startswith('["factors"')]:
            store.pop(old)
        store[k] = got
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


def measure_fast(ctx, probe: ProbeChoice, req: MapRequest) -> FastMap:
    """The fast map (decompositions, then one forward and backward pass over the probe), with progress."""
    _cancel_button("Cancel")
    k = _key("fast", ctx, probe, req)
    store = _store()
    if k not in store:
        factors = map_factors_shared(ctx, req)
        work = copy.deepcopy(ctx.lm.model)   # hooks and requires_grad flags never touch the shared model
        bar = ui.ProgressBar("Fast map: one forward and backward pass over the probe", unit="batches")
        try:
            fm, _ = fast_map_cached(work, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan, share=req.share,
                                    method=req.method, factors=factors, progress=bar)
        finally:
            bar.clear()
            del work
        store[k] = fm
    return store[k]


def measure_map(ctx, probe: ProbeChoice, req: MapRequest, modules: list[str] | None = None) -> KnowledgeMap:
    """Probe calibration (for the predictors) and the exact map of `modules` (all by default), merged with
    what was measured before, with progress bars and a cancel button."""
    from ..knowledge_map import merge_maps

    _cancel_button("Cancel measurement")
    measure_probe_stats(ctx, probe)
    k = _key("map", ctx, probe, req)
    store = _store()
    have = store.get(k)
    todo = [f for f in (modules or _targets(ctx, req)[0]) if have is None or f not in have.fqns]
    if todo:
        factors = map_factors_shared(ctx, req)
        work = copy.deepcopy(ctx.lm.model)
        bar = ui.ProgressBar("Measuring the knowledge map exactly (layers from each module's on)", unit="modules")
        try:
            km, _ = knowledge_map_cached(work, ctx.lm.tok, ctx.an, probe.examples, plan=req.plan, share=req.share,
                                         method=req.method, modules=todo, factors=factors, progress=bar)
        finally:
            bar.clear()
            del work
        store[k] = merge_maps(have, km, _targets(ctx, req)[0])
    return store[k]


def exact_estimate(ctx, probe: ProbeChoice, modules: list[str]) -> str:
    """'≈ 3.1 min for 210 modules (12 TFLOP at 65 GFLOP/s)': the exact map's cost on this machine."""
    from ..knowledge_map import encode_probe, exact_flops, measure_gflops

    enc = encode_probe(ctx.lm.tok, probe.examples)
    fqns = ctx.an.stats.fqns
    k = json.dumps(["gflops", ctx.lm.spec, probe.ident])
    store = _store()
    if k not in store:
        store[k] = measure_gflops(ctx.lm.model, enc, fqns)
    flops = exact_flops(ctx.lm.model, enc, fqns, modules)
    sec = flops / store[k] / 1e9
    when = f"{sec:.0f} s" if sec < 90 else f"{sec / 60:.1f} min"
    return f"≈ {when} for {len(modules)} modules × {len(enc)} facts ({flops / 1e12:.2g} TFLOP at {store[k]:.0f} GFLOP/s)"


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
    fm: FastMap | None = None
    probe: ProbeChoice | None = None
    probe_stats: CalibStats | None = None
    title: str | None = None


def _bind_choice(name: str, default: str, options: list[str]) -> dict:
    """`ui.bind` for a choice whose options change (a stored value no longer offered falls back)."""
    for k in (f"w.{name}", f"set.{name}"):
        if st.session_state.get(k, options[0]) not in options:
            st.session_state.pop(k, None)
    return ui.bind(name, default if default in options else options[0])


SUBSETS = {"all": "every module", "layers": "chosen layers", "kinds": "chosen kinds", "top": "top of the fast map"}


def exact_subset(ctx, req: MapRequest, fm: FastMap | None) -> list[str]:
    """The modules to measure exactly: every module, chosen layers or kinds, or the fast map's top N."""
    from ..knowledge_map import select_modules

    fqns = _targets(ctx, req)[0]
    infos = {i.fqn: i for i in ctx.an.modules}
    options = [o for o in SUBSETS if o != "top" or fm is not None]
    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    which = c1.radio("Measure exactly", options, format_func=SUBSETS.get, horizontal=True,
                     **_bind_choice("kmap_subset", "all", options))
    ui.commit("kmap_subset", which)
    if which == "layers":
        layers = sorted({infos[f].layer for f in fqns})
        got = c2.multiselect("Layers", layers, **ui.bind(f"kmap_layers@{ctx.lm.spec}", layers[:1]))
        ui.commit(f"kmap_layers@{ctx.lm.spec}", list(got))
        return select_modules(fqns, ctx.an.modules, layers=list(got) or [-1])
    if which == "kinds":
        kinds = list(dict.fromkeys(infos[f].kind for f in fqns))
        got = c2.multiselect("Kinds", kinds, **ui.bind(f"kmap_kinds@{ctx.lm.spec}", kinds[-1:]))
        ui.commit(f"kmap_kinds@{ctx.lm.spec}", list(got))
        return select_modules(fqns, ctx.an.modules, kinds=list(got) or ["(none chosen)"])
    if which == "top":
        n = c2.number_input("Top N of the fast map", 1, len(fqns), step=5,
                            **ui.bind(f"kmap_top@{ctx.lm.spec}", min(20, len(fqns))))
        ui.commit(f"kmap_top@{ctx.lm.spec}", int(n))
        return select_modules(fqns, ctx.an.modules, top=int(n), fast=fm)
    return fqns


def knowledge_view(ctx, plan: Plan, view: str, values, n_modules: int) -> tuple[str, object, str | None, KnowledgeView]:
    """Controls and on-request measurements of the 'knowledge' and 'fact_focus' views of the ρ map.

    Returns (view to draw, heatmap values, colour label, KnowledgeView); falls back to the ρ view
    (with an explanation and the buttons) while nothing is predicted or measured yet."""
    kv = KnowledgeView()
    if view not in ("knowledge", "fact_focus"):
        return view, values, None, kv
    kv.probe = probe = probe_controls(ctx.lm.spec)
    req = map_request(ctx, plan)
    kv.km = km = cached_map(ctx, probe, req)
    kv.fm = fm = cached_fast(ctx, probe, req) if view == "knowledge" else None
    kv.probe_stats = cached_probe_stats(ctx, probe)
    if view == "knowledge":
        return _knowledge_controls(ctx, kv, req, n_modules)
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


def _knowledge_controls(ctx, kv: KnowledgeView, req: MapRequest, n_modules: int):
    """The fast map (one pass) and the exact map (all modules or a subset, its cost shown first)."""
    probe, km, fm = kv.probe, kv.km, kv.fm
    if km is None and fm is None:
        st.info(f"Knowledge loss: each module alone is compressed ({req.label}) and the answer tokens' loss and "
                f"the first-token recall of {probe.name} are measured — one probe evaluation per module "
                f"({n_modules}), from the module's layer on. The fast map predicts it from one forward and backward "
                f"pass over the probe; measure exactly every module or a subset. Both are cached beside the "
                f"statistics.", icon=":material/info:")
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    if fm is None and c1.button("Predict (fast map)", key="w.kmap_fast_run", icon=":material/bolt:",
                                type="primary", help="one forward and backward pass over the probe, after "
                                "decomposing each module once"):
        measure_fast(ctx, probe, req)
        st.rerun()
    with c2:
        chosen = exact_subset(ctx, req, fm)
    missing = [f for f in chosen if km is None or f not in km.fqns]
    if missing:
        c1, c2 = st.columns([1, 3], vertical_alignment="center")
        go = c1.button("Measure the knowledge map", key="w.kmap_run", icon=":material/play_arrow:",
                       type="secondary" if km is None and fm is None else "primary")
        c2.caption(exact_estimate(ctx, probe, missing) + ", after decomposing each module once"
                   + ("" if km is None else f"; {len(chosen) - len(missing)} of the chosen already measured"))
        if go:
            measure_map(ctx, probe, req, missing)
            st.rerun()
    if km is None and fm is None:
        return "rho", None, None, kv
    sources = (["measured"] if km is not None else []) + (["predicted"] if fm is not None else [])
    src = sources[0]
    if len(sources) > 1:
        src = st.radio("Show", sources, horizontal=True, format_func={
            "measured": f"measured ({len(km.fqns)} modules)", "predicted": "predicted (fast map)"}.get,
            **_bind_choice("kmap_source", "measured", sources))
        ui.commit("kmap_source", src)
    if src == "predicted":
        kv.title = (f"Predicted by the fast map (one pass over the probe) with only this module compressed "
                    f"({req.label}), {fm.n_facts} facts")
        return "knowledge", fm.values(), "predicted answer loss increase (nats per fact)", kv
    shown = st.radio("Measured", list(MAP_VALUES), format_func=MAP_VALUES.get, horizontal=True,
                     **ui.bind("kmap_value", "knowledge_loss"))
    ui.commit("kmap_value", shown)
    part = "" if len(km.fqns) == n_modules else f"; {len(km.fqns)} of {n_modules} modules measured"
    kv.title = f"Measured with only this module compressed ({req.label}), {km.n_facts} facts{part}"
    return "knowledge", map_values(km, shown), MAP_VALUES[shown], kv


def fast_rows(fm: FastMap, km: KnowledgeMap) -> list[dict]:
    """The fast map's predictors as rows of the Spearman table (statistic, both Spearmans, modules)."""
    return [{"statistic": f"fast map: {r['what']}" + (" (shown)" if r["default"] else ""),
             "spearman_knowledge_loss": r["spearman_knowledge_loss"], "spearman_recall_drop": r["spearman_recall_drop"],
             "n_modules": r["n_modules"]} for r in fast_vs_exact(fm, km)]


def knowledge_details(ctx, kv: KnowledgeView, plan: Plan) -> None:
    """Below the map: the Spearman table (with the fast map's), what was measured, and one fact at a time."""
    km, fm = kv.km, kv.fm
    if km is None:
        if fm is not None:
            st.caption(f"Fast map: per fact, the first- and second-order change of −log P(answer) from the "
                       f"gradient of the answer loss at each module's output (g) and the module's change ΔW x; "
                       f"temperature {fm.temperature:g}. Measure exactly to see how well it ranks the modules "
                       f"(Spearman).")
        return
    st.markdown("**Does a statistic say where facts live?** Spearman rank correlation with the measured map, over "
                "the measured modules")
    table = correlations(ctx, km, kv.probe_stats) + (fast_rows(fm, km) if fm is not None else [])
    st.dataframe(correlation_frame(table), hide_index=True, width="stretch")
    st.caption(f"Knowledge loss = mean increase of −log P(answer | prompt) over {km.n_facts} facts with only that "
               f"module compressed; recall drop = dense first-token recall "
               f"({float(km.base_correct.double().mean()):.1%}) minus recall with it compressed. Fisher energy = "
               f"½ tr(C_h C_x), the predicted loss of removing the module; 'probe answers' = calibrated on the "
               f"probe's answers only (the same facts, so it is a diagnostic, not a held-out prediction). Fast map "
               f"= predicted from one forward and backward pass over the probe (g: gradient of the answer loss at "
               f"the module's output, ΔW x: the module's change).")
    fact_panel(ctx, km, kv.probe, plan)


def module_metric(kv: KnowledgeView, fqn: str) -> None:
    """The selected module's measured knowledge loss and the fast map's prediction, where there are."""
    if kv.km is not None and fqn in kv.km.fqns:
        j = kv.km.fqns.index(fqn)
        st.metric("Measured knowledge loss", f"{float(kv.km.knowledge_loss()[j]):.3g} nats",
                  help=f"only this module compressed; recall drop {float(kv.km.recall_drop()[j]):+.1%}")
    if kv.fm is not None and fqn in kv.fm.fqns:
        st.metric("Predicted (fast map)", f"{kv.fm.values()[fqn]:.3g} nats",
                  help="from one forward and backward pass over the probe")
