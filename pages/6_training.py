"""Knowledge over training: the ρ map of the embedded model at each training checkpoint beside its
fact recall — high-ρ modules appear as the model learns its facts (spec §4). Each checkpoint's
calibration goes through the disk cache, so moving the slider back is instant."""

from dataclasses import replace

import streamlit as st

from fasc.app import choices as C
from fasc.app import ui
from fasc.app.format import mean_rho
from fasc.data import load_probe
from fasc.evaluate import fact_recall
from fasc.pipeline import model_defaults
from fasc.plots import rho_heatmap, training_figure

VIEWS = {"rho": "ρ", "misalignment": "Misalignment pca ↔ fasc"}


def checkpoint_stats(path, tokens: int, calibrate: bool, decompose: bool = False):
    """(Analysis, rows) of a checkpoint, calibrating it when `calibrate` (else None if not cached); the
    eigen-decompositions (for the misalignment) only when `decompose` — ρ needs none."""
    lm = ui.get_model(str(path))
    req = ui.calib_request(lm.spec, data_path=model_defaults(lm.spec).calib)
    req.cfg = replace(req.cfg, n_tokens=int(tokens))
    info = ui.cached_info(lm, req)
    if info is None:
        if not calibrate:
            return None
        info = ui.calibrate_now(lm, req, label=f"Calibrating {path.name}")
    an = ui.get_analysis(lm, info["key"], methods=ui.DECOMPOSED if decompose else ())
    decomposed = an.decomposed()
    rows = ui.report_rows(ui.Context(lm, info, an), 0.5, decomposed)
    st.session_state.setdefault("ckpt_rho", {})[path.name] = mean_rho(rows)
    st.session_state.setdefault("ckpt_max", {})[(path.name, "rho")] = max(r.rho for r in rows)
    if decomposed:
        st.session_state["ckpt_max"][(path.name, "misalignment")] = max(r.misalignment for r in rows)
    return lm, an, rows


def checkpoint_recalls(ckpts: list, entries: dict, idx: int, lm) -> list:
    """Fact recall per checkpoint from the training log; the shown one evaluated (once per session)
    when the log lacks it."""
    recalls = [None if not (e := entries.get(p.name)) or e.get("recall") is None else float(e["recall"])
               for p in ckpts]
    if recalls[idx] is None:
        cache = st.session_state.setdefault("ckpt_recall", {})
        path = ckpts[idx]
        if path.name not in cache:
            with st.spinner(f"Fact recall of {path.name} …"):
                probe = load_probe(model_defaults(lm.spec).probe)
                cache[path.name] = fact_recall(lm.model, lm.tok, probe).first_token
        recalls = [cache.get(p.name, r) for p, r in zip(ckpts, recalls)]
    return recalls


def progress_panel(ckpts: list, entries: dict, idx: int, recalls: list, rows: list, tokens: int) -> None:
    """Recall and mean ρ of the shown checkpoint, the curves over training, calibrate the rest."""
    rho_by = st.session_state.get("ckpt_rho", {})
    steps = [entries.get(p.name, {}).get("step", i) for i, p in enumerate(ckpts)]
    m = st.columns(2)
    m[0].metric("Fact recall", "—" if recalls[idx] is None else f"{recalls[idx]:.1%}",
                help="top-1 first answer token on the demo's facts" + (" (training log)" if entries else ""))
    m[1].metric("Mean ρ", f"{mean_rho(rows):.3f}")
    st.plotly_chart(training_figure(steps, recalls, [rho_by.get(p.name) for p in ckpts], current=idx,
                                    labels=[p.name for p in ckpts]), width="stretch", key="ckpt_curve")
    missing = [p for p in ckpts if p.name not in rho_by]
    if missing and st.button(f"Calibrate {len(missing)} more checkpoint{'s' if len(missing) > 1 else ''}",
                             key="w.ckpt_all",
                             icon=":material/play_arrow:"):
        for p in missing:
            checkpoint_stats(p, tokens, calibrate=True)
        st.rerun()
    st.caption("Mean ρ fills in as checkpoints are calibrated (cached on disk).")


def main() -> None:
    st.title("Knowledge over training")
    root = C.checkpoints_root()
    ckpts = C.list_checkpoints(root)
    if not ckpts:
        st.info(f"No training checkpoints in `{root}`. They are written by `python -m fasc.demo.train` "
                f"(ckpt-000 … ckpt-100 along the demo model's training); then this page shows how the ρ map "
                f"changes as the model learns its facts.", icon=":material/info:")
        return
    log = C.training_log(root)
    entries = C.checkpoint_entries(log)
    labels = [C.checkpoint_label(p, entries.get(p.name)) for p in ckpts]

    c = st.columns([5, 2, 2], vertical_alignment="bottom")
    idx = c[0].select_slider("Checkpoint", options=list(range(len(ckpts))), format_func=lambda i: labels[i],
                             **ui.bind("ckpt_index", len(ckpts) - 1))
    ui.commit("ckpt_index", idx)
    tokens = c[1].number_input("Calibration tokens", 16, 1_000_000, step=1024, **ui.bind("ckpt_tokens", 4096),
                               help="Per checkpoint, with the other settings of the Model & calibration page.")
    ui.commit("ckpt_tokens", int(tokens))
    view = c[2].selectbox("Show", list(VIEWS), format_func=VIEWS.get, **ui.bind("ckpt_view", "rho"))
    ui.commit("ckpt_view", view)

    path = ckpts[idx]
    with st.spinner(f"Loading {path.name} …"):
        lm, an, rows = checkpoint_stats(path, tokens, calibrate=True, decompose=view == "misalignment")

    recalls = checkpoint_recalls(ckpts, entries, idx, lm)
    for p in ckpts:  # checkpoints calibrated before (this or another session): their mean ρ from the cache
        if p.name not in st.session_state.get("ckpt_rho", {}):
            checkpoint_stats(p, tokens, calibrate=False)

    left, right = st.columns([3, 2], gap="medium")
    with left:
        top = max(v for (n, w), v in st.session_state["ckpt_max"].items() if w == view)
        fig = rho_heatmap(rows, value=view, title=f"{VIEWS[view]} · {path.name} (mean ρ {mean_rho(rows):.3f})",
                          zrange=(0.0, top))  # one colour scale for every checkpoint seen
        st.plotly_chart(fig, width="stretch", key="ckpt_heat")
    with right:
        progress_panel(ckpts, entries, idx, recalls, rows, tokens)


ui.run_page(main)
