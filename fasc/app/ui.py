"""Streamlit glue shared by `app.py` and `pages/*.py`: cached resources, the sidebar model picker,
calibration and analysis with progress bars, and one-line errors (STYLE §13). The rules live in the
library and in `fasc.app.choices` / `fasc.app.table` (no Streamlit there); the session's durable
state in `fasc.app.state`.

Resources (`st.cache_resource`, shared read-only by every session and never mutated — compressions
run on deep copies, ρ along Fisher directions is kept per session): the loaded model, tokenized
calibration batches, calibration statistics (the on-disk cache `fasc.cache` is the source of
truth), `Analysis` objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from .. import cache
from ..analysis import Analysis
from ..config import HEAL_CHECK_TOKENS, HEAL_TOKENS_GPU, CalibConfig, CompressConfig
from ..data import Batch, data_fingerprint, load_source, make_batches
from ..errors import FascError
from ..loading import model_summary
from ..modules import model_fingerprint
from ..pipeline import calibrate_cached, heal_choice, model_defaults
from ..stats import CalibStats
from . import choices as C
from .format import dashboard_wording, eta_text
from .state import (PlanStore, bind, calib_info, commit, model_switched, rho_fisher,  # noqa: F401 - pages use
                    set_calib_info, setting)                                        # ui.bind/commit/setting

log = logging.getLogger("fasc.app")

PAGES = {
    "calibration": "pages/1_calibration.py",
    "rho": "pages/2_rho_map.py",
    "spectra": "pages/3_spectra.py",
    "ranks": "pages/4_ranks.py",
    "export": "pages/5_export.py",
    "training": "pages/6_training.py",
}
GAMMA_STEPS = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0]


# ------------------------------------------------------------------------------------------ errors
def one_line(e: BaseException) -> str:
    """A one-line message for an unexpected exception, with what to do next."""
    msg = (str(e).strip().splitlines() or [""])[0][:200]
    return (f"Unexpected {type(e).__name__}: {msg or 'no message'} — check the inputs on this page; "
            f"if it persists, run the same step with the `fasc` CLI and `--debug` for details.")


@contextmanager
def guard():
    """Show a `FascError` (or any other exception, in one line) as `st.error` and stop the page.

    Streamlit's own control flow (st.stop / st.rerun / an interrupting widget click) passes through:
    those are BaseExceptions, not Exceptions.
    """
    try:
        yield
    except FascError as e:
        st.error(dashboard_wording(str(e)), icon=":material/error:")
        st.stop()
    except Exception as e:  # noqa: BLE001 - no traceback reaches the page
        log.error("dashboard error: %s", "".join(traceback.format_exception(e)))
        st.error(one_line(e), icon=":material/error:")
        st.stop()


def run_page(main: Callable[[], None]) -> None:
    """Run a page body under `guard`.

    Normally app.py has drawn the sidebar model picker in this script run. When a page file runs on
    its own (Streamlit's legacy `pages/` routing on a fresh server opened at a page URL), the page
    draws the picker itself, so it still works.
    """
    try:
        if not st.session_state.get("_picker_drawn"):
            st.set_page_config(page_title="FASC — knowledge-aware compression", layout="wide")
            model_picker()
        with guard():
            main()
    finally:
        st.session_state["_picker_drawn"] = False


# ------------------------------------------------------------------------------------------ model
@dataclass
class LoadedModel:
    spec: str
    model: Any
    tok: Any
    fingerprint: str
    summary: dict
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def ident(self) -> str:
        """This model on its device in its dtype (`choices.model_ident`): what the session's calibration
        and the shared analysis are kept by."""
        return C.model_ident(self.spec, self.device, self.dtype)


@st.cache_resource(max_entries=4, show_spinner=False)
def _load(spec: str, stamp: float, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    import torch

    from ..loading import load_model

    model, tok = load_model(spec, device=device, dtype=getattr(torch, dtype))   # a GPU that is gone: one line
    return LoadedModel(spec, model, tok, model_fingerprint(model), model_summary(model), device, dtype)


def _stamp(spec: str) -> float:
    """Newest modification time of a local model folder's files (0 for other specs): a retrained demo
    or checkpoint is reloaded instead of served stale from memory."""
    from ..loading import model_source

    try:
        src = model_source(spec)
    except FascError:
        return 0.0
    p = Path(src.path)
    if src.kind == "hub" or not p.is_dir():
        return 0.0
    return max((f.stat().st_mtime for f in p.iterdir() if f.is_file()), default=0.0)


def placement() -> tuple[str, str]:
    """(device, weights' dtype) the sidebar asks for (before the sidebar is drawn: the defaults)."""
    device = setting("model_device", None) or C.initial_device(C.gpu_count())[0]
    return device, setting(f"model_dtype@{device}", C.WEIGHT_DTYPES[0])


def get_model(spec: str) -> LoadedModel:
    """The model for `spec` on the sidebar's device and dtype, loaded once per process and shared
    read-only (never mutate it)."""
    return _load(spec, _stamp(spec), *placement())


def model_picker() -> str | None:
    """The sidebar model picker (rendered by app.py on every page); returns the spec or None."""
    choice0, text0 = C.initial_model_choice()
    keys = list(C.MODEL_CHOICES)
    with st.sidebar:
        st.markdown("### Model")
        choice = st.selectbox("Model", keys, format_func=C.MODEL_CHOICES.get, label_visibility="collapsed",
                              **bind("model_choice", choice0))
        commit("model_choice", choice)
        text = ""
        if choice == "folder":
            text = st.text_input("Model folder", placeholder="/path/to/hf-model (config.json + weights)",
                                 **bind("model_folder", text0 if choice0 == "folder" else ""))
            commit("model_folder", text)
        elif choice == "hub":
            text = st.text_input("Hub id", placeholder="HuggingFaceTB/SmolLM2-135M",
                                 help="Looked up in the local Hugging Face cache (no network here).",
                                 **bind("model_hub", text0 if choice0 == "hub" else ""))
            commit("model_hub", text)
        try:
            spec = C.model_spec(choice, text)
        except FascError:
            spec = None
        device, dtype = placement_picker()
        st.session_state["model_spec"] = spec
        st.session_state["_picker_drawn"] = True
        ident = C.model_ident(spec, device, dtype) if spec else None
        model_switched(ident)   # widgets that select within one model's data start afresh
        loaded = st.session_state.get("loaded", {}).get(ident)
        if loaded:
            st.caption(f"{loaded['architecture']} · {loaded['layers']} layers · {loaded['modules']} modules · "
                       f"{loaded['parameters'] / 1e6:.2f} M parameters · {C.device_label(device)}, {dtype}")
        calib = calib_info(ident)
        if calib:
            st.caption(f"Calibrated: {calib['n_tokens']:,} tokens · γ = {gamma_setting(spec):g} · key "
                       f"`{calib['key'][:10]}…`")
    return spec


DEVICE_HELP = ("Where the model runs: calibration, evaluation, healing and export. The eigen-decompositions "
               "run on the first GPU whenever there is one (`--linalg-device auto`). `fasc … --device` in the CLI.")
DTYPE_HELP = ("The weights' dtype (`--dtype`; float32 by default, as in the CLI, so both share one calibration "
              "cache). bfloat16 halves the model's memory: choose it for a 7–8B model on one GPU (its statistics "
              "stay float32/float64). Another dtype is another model: it is calibrated separately.")


def placement_picker() -> tuple[str, str]:
    """The sidebar's device and dtype selectors (durable settings `model_device`, `model_dtype@<device>`)."""
    n = C.gpu_count()
    devices = C.device_choices(n)
    dev0, note = C.initial_device(n)
    if st.session_state.get("w.model_device") not in (None, *devices):   # a GPU that is gone
        del st.session_state["w.model_device"]
        st.session_state.pop("set.model_device", None)
    c = st.columns(2)
    device = commit("model_device", c[0].selectbox("Device", devices, format_func=C.device_label, help=DEVICE_HELP,
                                                   **bind("model_device", dev0)))
    dtype = commit(f"model_dtype@{device}", c[1].selectbox("Weights", C.WEIGHT_DTYPES, help=DTYPE_HELP,
                                                           **bind(f"model_dtype@{device}", C.WEIGHT_DTYPES[0])))
    if note:
        st.caption(note)
    return device, dtype


def require_model() -> LoadedModel:
    """The current model (loaded with a spinner), or a one-line error and stop."""
    spec = st.session_state.get("model_spec")
    choice = setting("model_choice", "demo")
    if spec is None:
        C.model_spec(choice, "")  # raises the "enter a folder / hub id" message
    if spec == "demo" and not C.demo_available():
        raise FascError(C.DEMO_MISSING + " Or pick SmolLM2 in the sidebar.")
    device, dtype = placement()
    with st.spinner(f"Loading {C.model_label(spec)} on {C.device_label(device)} ({dtype}) …"):
        lm = get_model(spec)
    st.session_state.setdefault("loaded", {})[lm.ident] = lm.summary
    return lm


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class CalibRequest:
    """What the calibration settings say to run for a model: config, data and its identity."""

    cfg: CalibConfig
    data_id: str          # "builtin:<path>" | "upload:<sha256>"
    data_name: str
    source: Any           # text or list[Example], or None for a built-in file (read lazily)
    path: Path | None


def calib_request(spec: str, data_path: Path | None = None) -> CalibRequest:
    """The calibration to run for `spec` from the durable settings (page 1 writes them)."""
    d = model_defaults(spec)
    cfg = CalibConfig(n_tokens=int(setting(f"tokens@{spec}", C.default_tokens(spec))),
                      seq_len=int(setting(f"seq_len@{spec}", d.seq_len)), batch_size=int(setting("batch_size", 8)),
                      fisher=setting("fisher", "empirical"),
                      temperature=float(setting(f"temperature@{spec}", d.temperature)),
                      targets=setting("targets", "all"), seed=int(setting("seed", 0)))
    up = st.session_state.get("calib_upload")
    if data_path is None and setting("data", "builtin") == "upload":
        if not up:
            raise FascError("No calibration file uploaded; upload a .txt or .jsonl file, or choose the built-in text.")
        return CalibRequest(cfg, f"upload:{up['sha']}", up["name"], up["source"], None)
    files = [Path(data_path)] if data_path else d.calib_files
    if len(files) > 1:  # the built-in mix of real models (pipeline.REAL_MIX), interleaved
        return CalibRequest(cfg, "builtin:" + "+".join(map(str, files)), " + ".join(p.name for p in files),
                            [load_source(p) for p in files], None)
    return CalibRequest(cfg, f"builtin:{files[0]}", files[0].name, None, files[0])


@st.cache_resource(max_entries=8, show_spinner=False)
def _batches(spec: str, fingerprint: str, data_id: str, cfg_json: str, name: str, _tok, _source,
             _path) -> tuple[list[Batch], str]:
    cfg = CalibConfig(**{k: tuple(v) if k == "layers" and v is not None else v for k, v in json.loads(cfg_json).items()})
    src = _source if _source is not None else load_source(_path)
    batches = make_batches(_tok, src, cfg, name=name)   # messages name the file, as the user knows it
    return batches, cache.cache_key(fingerprint, data_fingerprint(batches), cfg)


def batches_and_key(lm: LoadedModel, req: CalibRequest) -> tuple[list[Batch], str]:
    """Tokenized calibration batches and the cache key (model, data, config) — computed once."""
    return _batches(lm.spec, lm.fingerprint, req.data_id, json.dumps(asdict(req.cfg), sort_keys=True), req.data_name,
                    lm.tok, req.source, req.path)


@st.cache_resource(max_entries=3, show_spinner=False)
def _stats(key: str, _fresh: CalibStats | None = None) -> CalibStats:
    """Statistics by cache key (a few in memory): `_fresh` when just computed, else from the disk
    cache; raises LookupError when on neither (an exception is not cached)."""
    stats = _fresh if _fresh is not None else cache.load(key)
    if stats is None:
        raise LookupError(key)
    return stats


def get_stats(key: str) -> CalibStats | None:
    """Statistics by cache key: from memory, else from the disk cache, else None."""
    try:
        return _stats(key)
    except LookupError:
        return None


def calibrate_now(lm: LoadedModel, req: CalibRequest, label: str = "Calibrating") -> dict:
    """Run (or load from the disk cache) the calibration with a progress bar; returns the run info."""
    batches, key = batches_and_key(lm, req)
    bar = ProgressBar(label, unit="tokens")
    t0 = time.perf_counter()
    try:
        stats, hit = calibrate_cached(lm.model, batches, req.cfg, progress=bar, model_fp=lm.fingerprint)
    finally:
        bar.clear()
    _stats(stats.key, _fresh=stats)
    info = {"spec": lm.spec, "key": stats.key, "from_cache": hit, "n_tokens": stats.n_tokens,
            "seconds": round(time.perf_counter() - t0, 2), "data": req.data_name, "cfg": asdict(req.cfg),
            "modules": len(stats.modules), "warnings": list(stats.warnings)}
    set_calib_info(lm.ident, info)
    return info


def cached_info(lm: LoadedModel, req: CalibRequest) -> dict | None:
    """Run info of the calibration the settings ask for when it is already on disk (no computation)."""
    _, key = batches_and_key(lm, req)
    stats = get_stats(key)
    if stats is None:
        return None
    return {"spec": lm.spec, "key": key, "from_cache": True, "n_tokens": stats.n_tokens, "seconds": 0.0,
            "data": req.data_name, "cfg": asdict(req.cfg), "modules": len(stats.modules),
            "warnings": list(stats.warnings)}


def current_calib(lm: LoadedModel) -> dict | None:
    """This session's calibration of the model, else the on-disk one matching the settings."""
    info = calib_info(lm.ident)
    if info is not None and get_stats(info["key"]) is not None:
        return info
    info = cached_info(lm, calib_request(lm.spec))
    if info is not None:
        set_calib_info(lm.ident, info)
    return info


# ------------------------------------------------------------------------------------------ analysis
@st.cache_resource(max_entries=2, show_spinner=False)  # a real model's bases take GBs: keep few
def _analysis(ident: str, key: str, gamma: float, _model, _stats) -> Analysis:
    return Analysis(_model, _stats, CompressConfig(gamma=gamma))


def gamma_setting(spec: str) -> float:
    """This model's Fisher shrinkage γ: the Model & calibration page's slider, else the model's default
    (`ModelDefaults.gamma`: 0 for real models, 1 for the demo)."""
    return float(setting(f"gamma@{spec}", model_defaults(spec).gamma))


# What the views decompose together: pca and fasc (spectra, predicted ΔL, misalignment) and asvd, Evaluate's
# default baseline. Together they share each module's whitening: on SmolLM2 asvd adds 6 s to the 19 s of pca and
# fasc, where alone, when Evaluate first asks for it, it took 18 s.
DECOMPOSED = ("pca", "fasc", "asvd")


def get_analysis(lm: LoadedModel, key: str, gamma: float | None = None, methods=DECOMPOSED) -> Analysis:
    """The (shared) Analysis of a model's statistics at γ, with every decomposition of `methods` done
    (a progress bar appears when that takes a while). `methods=()`: none yet — enough for ρ."""
    stats = get_stats(key)
    if stats is None:
        raise FascError("The calibration statistics are no longer in the cache; run the calibration again "
                        "on the Model & calibration page.")
    gamma = gamma_setting(lm.spec) if gamma is None else float(gamma)
    an = _analysis(lm.ident, key, gamma, lm.model, stats)
    bar = ProgressBar("Eigen-decompositions", unit="steps", lazy=0.3)
    todo = [m for m in methods if not an.decomposed((m,))]
    t0 = time.perf_counter()
    try:
        an.precompute(tuple(methods), progress=bar)
    finally:
        bar.clear()
    if todo:   # measured here: the prior of what a compressed copy's bases cost (`fasc.app.copies`)
        decompose_speed()[(lm.ident, key, gamma)] = (time.perf_counter() - t0) / (len(an.modules) * len(todo))
    return an


@st.cache_resource(show_spinner=False)
def decompose_speed() -> dict:
    """{(model ident, calibration key, γ): seconds per module and method of the last decomposition run}."""
    return {}


@dataclass
class Context:
    """What every page after the first works on: the model, its calibration and its analysis."""

    lm: LoadedModel
    calib: dict
    an: Analysis

    @property
    def plans(self) -> PlanStore:
        """The session's plan store for this model, calibration and γ."""
        return PlanStore([self.lm.spec, self.calib["key"], gamma_setting(self.lm.spec)])

    def plan(self):
        return self.plans.get(self.an, self.lm.fingerprint)

    @property
    def rho_fisher(self) -> dict:
        """ρ sketches along Fisher directions measured in this session for this calibration."""
        return rho_fisher(self.calib["key"])


def require_analysis(decompose: bool = True) -> Context:
    """Model + calibration + analysis, or an explanation (with a link to page 1) and stop.

    `decompose=False` skips the eigen-decompositions (ρ needs none: the ρ map appears as soon as the
    calibration is there); `decompose(ctx)` runs them when a view needs them."""
    lm = require_model()
    info = current_calib(lm)
    if info is None:
        st.info(f"{C.model_label(lm.spec)} is not calibrated with the current settings yet; run the calibration "
                f"first.", icon=":material/info:")
        st.page_link(PAGES["calibration"], label="Go to Model & calibration", icon=":material/tune:")
        st.stop()
    return Context(lm, info, get_analysis(lm, info["key"], methods=DECOMPOSED if decompose else ()))


def decompose(ctx: Context) -> None:
    """The eigen-decompositions of every module (`DECOMPOSED`: spectra, predicted ΔL, misalignment, the
    baseline's curves), with a progress bar; instant once done (shared by every session of this server)."""
    get_analysis(ctx.lm, ctx.calib["key"], ctx.an.cfg.gamma)


@st.cache_data(max_entries=16, show_spinner=False)
def _report_rows(ident: str, key: str, gamma: float, ratio: float, _an: Analysis, n_rho_fisher: int,
                 _sketches: dict, decomposed: bool) -> list:
    return _an.report(ratio, decompose=decomposed, sketch_fisher=_sketches)


def report_rows(ctx: Context, ratio: float, decomposed: bool = True) -> list:
    """`Analysis.report(ratio)` rows with this session's ρ along Fisher directions (small: cached by
    value; rebuilt once ρ along Fisher directions is measured). `decomposed=False`: ρ only, no
    eigen-decomposition (the other fields None)."""
    sk = ctx.rho_fisher
    return _report_rows(ctx.lm.ident, ctx.calib["key"], ctx.an.cfg.gamma, float(ratio), ctx.an, len(sk), sk or None,
                        decomposed)


@st.cache_data(max_entries=8, show_spinner=False)
def _fisher_energy(key: str, _stats: CalibStats) -> dict[str, float] | None:
    from ..knowledge_map import fisher_energy
    from ..offload import LazyTensors

    if isinstance(_stats.cx, LazyTensors) or isinstance(_stats.ch, LazyTensors):
        return None   # statistics held on disk: reading them all back is not worth a sentence
    return fisher_energy(_stats)


def fisher_energy(ctx: Context) -> dict[str, float] | None:
    """Each module's Fisher energy ½ tr(C_h C_x) (the predicted loss of removing it; no decomposition),
    once per calibration; None for statistics held on disk."""
    return _fisher_energy(ctx.calib["key"], ctx.an.stats)


def calibration_batches(ctx: Context) -> tuple[list[Batch], str]:
    """The batches the current calibration ran on (for passes that need the text again: ρ along
    Fisher directions, sequential compression, healing), and their key."""
    batches, key = batches_and_key(ctx.lm, calib_request(ctx.lm.spec))
    if key != ctx.calib["key"]:
        raise FascError("The calibration settings changed since this calibration ran; run the calibration again "
                        "on the Model & calibration page first.")
    return batches, key


SEQUENTIAL_HELP = ("Error-aware compression (`fasc compress --sequential`): each module is fitted to the inputs of "
                   "the partly compressed model. Costs about two more forward passes over the calibration text plus "
                   "one partial layer pass per input group. restat: re-measured statistics only; refit: also a "
                   "least-squares refit to the dense outputs. Off by default; what each does to fact recall is "
                   "measured in BENCHMARKS.md.")
HEAL_HELP = ("Healing (`--heal-tokens`): after compressing, train only the low-rank factors to match the dense "
             "model (KL) on this many calibration tokens. Costs one teacher forward plus one student "
             f"forward/backward per token. The KL is checked on {HEAL_CHECK_TOKENS:,} held-out tokens (the end of "
             "the calibration text) 8 times, and the factors of the lowest held-out KL are kept. What it recovers, "
             f"and how long it takes, is measured in BENCHMARKS.md. Default: {HEAL_TOKENS_GPU:,} when the model is "
             "on a GPU and healing fits in its free memory, 0 (off) on the CPU. Factored models only.")


HEAL_MODE_HELP = ("Healing mode (`--heal-mode`): global trains every factor at once on the model's KL (memory grows "
                  "with depth: Adam for all factors, every block's activations); block trains one decoder block at a "
                  "time to reproduce the dense block's outputs (memory of one block: what fits a large model on one "
                  "GPU). auto: global on the CPU (it heals more per token there); on a GPU the first that fits in "
                  "free memory. Measured trade-off: docs/healing-results.md.")


@dataclass(frozen=True)
class Refinement:
    """What the Evaluate and Export pages apply after compressing: sequential compression (False,
    'restat', 'refit') and healing (tokens, 0 = off; mode 'global' or 'block')."""
    sequential: bool | str = False
    heal_tokens: int = 0
    heal_mode: str = "global"

    def opts(self) -> dict:
        """Keyword arguments of `compressed_copy`, `compress_and_save`, `evaluate_plan` and the copy cache."""
        return {"sequential": self.sequential, "heal_tokens": self.heal_tokens, "heal_mode": self.heal_mode}


def refinement_options(name: str, ctx: Context, plan, merged: bool = False) -> Refinement:
    """Sequential compression (off by default) and healing — tokens and mode, by default what `fasc compress
    --heal-tokens auto --heal-mode auto` does for `plan` (`fasc.pipeline.heal_choice`); disabled, 0, for a
    merged export — widgets `w.<name>_sequential`, `w.<name>_heal_tokens`, `w.<name>_heal_mode`, with their
    cost in the help texts."""
    cfg = ctx.calib["cfg"]
    geometry = {"seq_len": int(cfg["seq_len"]), "rows": int(cfg.get("batch_size") or 1),
                "calib_positions": int(cfg.get("n_tokens") or 0) or None}
    c = st.columns(3)
    seq = commit(f"{name}_sequential", c[0].selectbox("Sequential", ["off", "restat", "refit"], help=SEQUENTIAL_HELP,
                                                       **bind(f"{name}_sequential", "off")))
    auto_tokens = heal_choice(ctx.lm.model, ctx.an, plan, "auto", "auto", **geometry)[0]
    heal = commit(f"{name}_heal_tokens", c[1].number_input(
        "Healing tokens", 0, 10_000_000, step=1024, disabled=merged,
        help=HEAL_HELP + (" Off here: a merged export keeps no factors to heal." if merged else ""),
        **bind(f"{name}_heal_tokens", auto_tokens)))
    heal = 0 if merged else int(heal)
    mode = commit(f"{name}_heal_mode", c[2].selectbox("Healing mode", ["auto", "global", "block"],
                                                       disabled=merged or not heal, help=HEAL_MODE_HELP,
                                                       **bind(f"{name}_heal_mode", "auto")))
    tokens, resolved, _ = heal_choice(ctx.lm.model, ctx.an, plan, heal, mode, **geometry, merge=merged)
    return Refinement(False if seq == "off" else seq, tokens, resolved)


def measure_rho_fisher(ctx: Context) -> None:
    """ρ along each module's top Fisher directions (spec §4): one more forward+backward over the
    calibration text, with a progress bar. Kept in this session (the shared statistics are not
    touched), only when the pass completes."""
    from ..rho import measure_rho_fisher as measure
    from .state import put_rho_fisher

    batches, key = calibration_batches(ctx)
    bar = ProgressBar("Measuring ρ along Fisher directions", unit="tokens")
    try:
        put_rho_fisher(key, measure(ctx.lm.model, batches, ctx.an, progress=bar))
    finally:
        bar.clear()


# ------------------------------------------------------------------------------------------ progress
class ProgressBar:
    """A progress callback drawing `st.progress` with counts and an ETA.

    `lazy` seconds: the bar appears only once the work has taken that long (no flicker for cached
    work). A click elsewhere in the app interrupts the run (Streamlit reruns the script); the
    library's hooks and locks are released on the way out, and nothing half-done is cached.
    """

    def __init__(self, label: str, unit: str = "tokens", lazy: float = 0.0):
        self.label, self.unit, self.lazy = label, unit, lazy
        self.t0 = time.perf_counter()
        self.slot = st.empty()
        self.bar = None if lazy else self.slot.progress(0.0, text=f"{label} …")

    def __call__(self, done: int, total: int):
        el = time.perf_counter() - self.t0
        if self.bar is None:
            if el < self.lazy or done >= total:
                return None
            self.bar = self.slot.progress(0.0)
        frac = min(1.0, done / total) if total else 0.0
        self.bar.progress(frac, text=f"{self.label}: {eta_text(done, total, el, self.unit)}")
        return None

    def clear(self) -> None:
        self.slot.empty()

    close = clear   # tqdm's name: library loops that make their own bars close them (`compress_stages`)


@st.cache_data(show_spinner=False, max_entries=64)
def _suite_work(spec: str, tasks: tuple[str, ...], limit: int, probe: str, _tok):
    from dataclasses import fields

    from ..suite import Work, estimate_work

    work = estimate_work(_tok, list(tasks), limit, probe).values()
    return Work(*(sum(getattr(w, f.name) for w in work) for f in fields(Work)))


@st.cache_data(show_spinner=False, max_entries=16)
def _seconds_per_token(ident: str, _model) -> float:
    from ..suite import seconds_per_token

    return seconds_per_token(_model)


@st.cache_data(show_spinner=False, max_entries=16)
def _seconds_per_scored_token(ident: str, _model) -> float:
    from ..suite import seconds_per_scored_token

    return seconds_per_scored_token(_model)


@st.cache_data(show_spinner=False, max_entries=16)
def _seconds_per_step(ident: str, _model) -> tuple[float, float]:
    from ..suite import seconds_per_step

    return seconds_per_step(_model)


def benchmark_seconds(ctx, tasks: tuple[str, ...], limit: int, probe: str) -> tuple[float, float]:
    """≈ seconds `fasc.comparison.benchmark_plan` takes here, (low, high): three models × (the tasks' token
    positions × this model's seconds per scored token + their decode steps and rows × its seconds per step
    and per row; `fasc.suite.Work.seconds`), both timed once per model and device; high when generated
    answers loop to the length cap."""
    work = _suite_work(ctx.lm.spec, tasks, limit, probe, ctx.lm.tok)
    spt, sps = _seconds_per_scored_token(ctx.lm.ident, ctx.lm.model), _seconds_per_step(ctx.lm.ident, ctx.lm.model)
    return 3 * work.seconds(spt, sps), 3 * work.seconds(spt, sps, most=True)


def seconds_per_token(ctx) -> float:
    """This model's measured forward seconds per token (batched; timed once per model and device)."""
    return _seconds_per_token(ctx.lm.ident, ctx.lm.model)


@st.cache_data(show_spinner=False, max_entries=16)
def _probe_tokens(probe: str, ident: str, _tok) -> int:
    from ..data import load_probe

    return sum(len(_tok(e.prompt + " " + e.answer)["input_ids"]) for e in load_probe(probe))


def probe_tokens(ctx) -> int:
    """Tokens of the model's default probe (what fact recall runs on)."""
    return _probe_tokens(str(model_defaults(ctx.lm.spec).probe), ctx.lm.ident, ctx.lm.tok)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def minutes_range(low: float, high: float) -> str:
    """'3 min', '2–4 min', '50–80 s' or '50 s – 2 min'."""
    a, b = minutes(low), minutes(high)
    if a == b:
        return a
    (x, ux), (y, uy) = a.split(" "), b.split(" ")
    return f"{x}–{y} {ux}" if ux == uy else f"{a} – {b}"


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------------------------------ anchors
ANCHOR_TOKENS = 1024


def heldout_tail(ctx, n_tokens: int) -> list[Batch]:
    """About `n_tokens` from the end of the calibration sources (`fasc.anchors.heldout_batches`):
    text the calibration rows do not use, for anchors and healing's checks."""
    from fasc.anchors import heldout_batches
    from fasc.data import Example

    req = calib_request(ctx.lm.spec)
    src = req.source if req.source is not None else load_source(req.path)
    one = isinstance(src, str) or (isinstance(src, list) and src and isinstance(src[0], Example))
    return heldout_batches(ctx.lm.tok, [src] if one else src, req.cfg, n_tokens)


def get_anchors(ctx, an: Analysis, method: str, tau: float):
    """Measured anchors (spec §6) of `method` on the end of the calibration data, with a progress bar;
    cached beside the statistics. Measured on a copy: the shared model is never modified."""
    import copy

    from fasc.anchors import anchors_cached

    req = calib_request(ctx.lm.spec)
    held = heldout_tail(ctx, ANCHOR_TOKENS)
    bar = ProgressBar(f"Measuring anchors for {method} (one forward pass per module)", unit="modules", lazy=0.5)
    try:
        anchors, _ = anchors_cached(copy.deepcopy(ctx.lm.model), an, method, held, temperature=req.cfg.temperature,
                                    progress=bar, tau=tau)
    finally:
        bar.clear()
    return anchors
