"""Model & calibration: what the model is, which text and loss the statistics come from (spec §1),
and the Fisher ↔ variance shrinkage γ (spec §3). Results are cached on disk and in the session."""

import streamlit as st

from fasc.app import choices as C
from fasc.app import ui
from fasc.app.explain import START_HERE
from fasc.app.format import dashboard_wording, gamma_label
from fasc.config import CalibConfig, field_help
from fasc.data import parse_upload
from fasc.errors import FascError
from fasc.pipeline import model_defaults


DATA_LABELS = {"builtin": "Built-in", "upload": "Upload .txt / .jsonl"}


def model_metrics(s: dict) -> None:
    c = st.columns(5)
    c[0].metric("Architecture", s["architecture"].replace("ForCausalLM", ""))
    c[1].metric("Layers", s["layers"])
    c[2].metric("Compressible modules", s["modules"], help="Linear layers FASC can factor: " + ", ".join(s["kinds"]))
    c[3].metric("Parameters", f"{s['parameters'] / 1e6:.2f} M")
    c[4].metric("In those modules", f"{s['compressible_parameters'] / s['parameters']:.0%}",
                help=f"{s['compressible_parameters']:,} parameters; embeddings and lm_head are never touched")


def upload_widget() -> None:
    """The calibration file uploader; a new file is parsed once into `calib_upload`."""
    f = st.file_uploader("Calibration file", type=["txt", "jsonl", "json"], key="w.upload",
                         help="Plain text, JSONL with a \"text\" field, or prompt/answer JSONL lines "
                              "(needed for targets = answers).")
    if f is not None:
        raw = f.getvalue()
        sha = ui.sha256(raw)
        up = st.session_state.get("calib_upload")
        if not up or up["sha"] != sha:
            st.session_state.pop("calib_upload", None)
            try:  # empty / binary / malformed JSONL → one line here; the settings stay usable
                st.session_state["calib_upload"] = {"name": f.name, "sha": sha, "source": parse_upload(f.name, raw)}
            except FascError as e:
                st.error(str(e), icon=":material/error:")
    up = st.session_state.get("calib_upload")
    if up:
        st.caption(f"Using {up['name']} ({'prompt/answer lines' if isinstance(up['source'], list) else 'text'}).")


def number(col, label: str, name: str, default: int, **kw) -> None:
    ui.commit(name, int(col.number_input(label, **kw, **ui.bind(name, default))))


def radio(col, label: str, name: str, options: list, default: str, **kw) -> str:
    return ui.commit(name, col.radio(label, options, horizontal=True, **kw, **ui.bind(name, default)))


def calibration_settings(spec: str) -> str:
    """The calibration widgets (all durable); returns the data choice ('builtin' or 'upload')."""
    d, m = CalibConfig(), model_defaults(spec)
    st.subheader("Calibration")
    builtin_name = " + ".join(p.name for p in m.calib_files)
    # labels the same for every model: the browser keeps the selected label across a model switch
    data = radio(st, "Calibration text", "data", ["builtin", "upload"], "builtin", format_func=DATA_LABELS.get,
                 help=f"Built-in for this model: {builtin_name}")
    if data == "builtin":
        st.caption(f"Built-in text for this model: `{builtin_name}`.")
    if data == "upload":
        upload_widget()
    a, b = st.columns(2)
    number(a, "Token budget N", f"tokens@{spec}", C.default_tokens(spec), min_value=16, max_value=10_000_000,
           step=1024, help=field_help(CalibConfig, "n_tokens") + f". The dashboard starts small to stay interactive; "
           f"the CLI's default for compressing is {m.tokens:,} (what more tokens keep is measured in BENCHMARKS.md).")
    number(b, "Sequence length", f"seq_len@{spec}", m.seq_len, min_value=2, max_value=8192, step=32,
           help=field_help(CalibConfig, "seq_len"))
    if ui.setting(f"tokens@{spec}", C.default_tokens(spec)) < m.tokens:
        a.caption(f"Fewer than the {m.tokens:,} tokens `fasc compress` uses: quick to explore; raise it for a "
                  f"model you export.")
    a, b = st.columns(2)
    radio(a, "Fisher", "fisher", ["empirical", "sampled"], d.fisher, help=field_help(CalibConfig, "fisher"))
    radio(b, "Loss on", "targets", ["all", "answers"], d.targets, help=field_help(CalibConfig, "targets"),
          format_func=lambda v: "all tokens" if v == "all" else "answers only")
    temp = st.slider("Temperature T of the calibration loss CE(logits / T)", 0.25, 8.0, step=0.25,
                     help="Gradient saturation (spec §1): a fact known with p ≈ 1 has gradient ≈ 0; T > 1 "
                          "softens the softmax so known facts still send gradient.",
                     **ui.bind(f"temperature@{spec}", float(m.temperature)))
    ui.commit(f"temperature@{spec}", float(temp))
    with st.expander("Advanced"):
        a, b = st.columns(2)
        number(a, "Batch size", "batch_size", d.batch_size, min_value=1, max_value=512,
               help=field_help(CalibConfig, "batch_size"))
        number(b, "Seed", "seed", d.seed, min_value=0, max_value=2**31 - 1, help=field_help(CalibConfig, "seed"))
    return data


def subspace_settings(spec: str) -> None:
    st.subheader("Subspace")
    default = model_defaults(spec).gamma
    gamma = st.select_slider("Fisher shrinkage γ  (Fisher ↔ variance)", options=ui.GAMMA_STEPS,
                             format_func=gamma_label, **ui.bind(f"gamma@{spec}", default))
    ui.commit(f"gamma@{spec}", float(gamma))
    st.caption("Gradient statistics from a few thousand tokens are noisy; γ shrinks the curvature toward "
               "isotropy, C_h(γ) = C_h + γ·tr(C_h)/‖W‖²·WᵀW. γ = 0 is the pure Fisher optimum, γ → ∞ gives the "
               f"variance-only asvd basis (spec §3). This model's default: γ = {default:g} (real models 0: "
               "measured best on held-out text with 32,768 calibration tokens; the demo 1; BENCHMARKS.md). "
               "Changing γ needs no new calibration.")


def show_result(info: dict, key: str) -> None:
    if info["from_cache"]:
        st.success(f"Loaded from cache: {info['n_tokens']:,} tokens, {info['modules']} modules "
                   f"(`cache/{key[:12]}…`; the same model, data and settings ran before).", icon=":material/cached:")
    else:
        st.success(f"Calibrated {info['n_tokens']:,} tokens over {info['modules']} modules in "
                   f"{info['seconds']:.1f} s; stored in the cache.", icon=":material/check_circle:")
    for w in info.get("warnings", [])[:5]:
        st.warning(dashboard_wording(w))
    st.page_link(ui.PAGES["rho"], label="Next: see where the model stores knowledge — ρ map",
                 icon=":material/arrow_forward:")


def main() -> None:
    st.title("Model & calibration")
    for line in START_HERE:   # what this is, what to do first, where it leads
        st.markdown(line)
    lm = ui.require_model()
    model_metrics(lm.summary)
    left, right = st.columns([3, 2], gap="large")
    with left:
        data = calibration_settings(lm.spec)
    with right:
        subspace_settings(lm.spec)

    st.divider()
    if data == "upload" and not st.session_state.get("calib_upload"):
        st.info("Upload a calibration file (.txt, or .jsonl with text or prompt/answer lines) to continue.",
                icon=":material/upload_file:")
        return
    req = ui.calib_request(lm.spec)
    batches, key = ui.batches_and_key(lm, req)
    info = ui.calib_info(lm.ident)
    if info is None or info["key"] != key:
        info = ui.cached_info(lm, req)
        if info is not None:
            ui.set_calib_info(lm.ident, info)
    if st.session_state.get("w.cancel"):
        st.warning("Calibration cancelled; nothing was cached.", icon=":material/cancel:")
    ready = info is not None and info["key"] == key
    a, b = st.columns([1, 4], vertical_alignment="center")
    run = not ready and a.button("Run calibration", type="primary", key="w.run",
                                 help="Forward + backward over the calibration text (spec §1)")
    n_real = sum(int(bt.stat_mask.sum()) for bt in batches)
    (b if not ready else st).caption(f"{req.data_name}: {n_real:,} tokens in {len(batches)} batches · cache key "
                                     f"`{key[:16]}…`")
    if run:
        st.button("Cancel", key="w.cancel", icon=":material/cancel:")
        ui.calibrate_now(lm, req, label=f"Calibrating {C.model_label(lm.spec)}")
        st.rerun()
    if ready:
        show_result(info, key)
    else:
        st.info("Not calibrated with these settings yet. Calibration runs once; later runs with the same "
                "model, data and settings load from the cache.", icon=":material/info:")


ui.run_page(main)
