"""Streamlit glue shared by `app.py` and `pages/*.py`: cached resources, the sidebar model picker,
durable session state, progress bars and one-line errors (STYLE §13). The rules themselves live
in `fasc.app_state` (no Streamlit there), so the pages stay thin.

Resources (`st.cache_resource`, shared read-only by every session; never mutated — compressions
run on deep copies): the loaded model, tokenized calibration batches, calibration statistics
(the on-disk cache `fasc.cache` is the source of truth), `Analysis` objects.

Durable session state (plain keys, survive page switches): `model_spec`, `calib` ({spec: run
info}), `plan` ({"for": [spec, key, γ], "plan": Plan.to_dict()}), `plan_ver`, `module` (the
selected fqn) and the calibration settings (`set.*`); widget keys are `w.*` and are rebuilt from
the durable keys when a page is revisited.
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

from . import app_state as S
from . import cache
from .allocate import Plan
from .analysis import Analysis
from .config import CalibConfig, CompressConfig
from .data import Batch, data_fingerprint, load_source, make_batches
from .errors import FascError
from .loading import model_summary
from .modules import model_fingerprint
from .pipeline import calibrate_cached, default_data
from .stats import CalibStats

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
        st.error(str(e), icon=":material/error:")
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


# ------------------------------------------------------------------------------------------ durable widgets
def bind(name: str, default: Any) -> dict:
    """Keyword arguments for a widget whose value survives page switches.

    The widget key is `w.<name>`; its value is initialised from the durable key `set.<name>` (or
    `default`) when the widget is (re)created. Call `commit(name, value)` with what it returns.
    """
    wkey, dkey = f"w.{name}", f"set.{name}"
    if wkey not in st.session_state:
        st.session_state[wkey] = st.session_state.get(dkey, default)
    return {"key": wkey}


def commit(name: str, value: Any) -> Any:
    st.session_state[f"set.{name}"] = value
    return value


def setting(name: str, default: Any) -> Any:
    """A durable setting (the value its widget had last), or `default`."""
    return st.session_state.get(f"set.{name}", default)


# ------------------------------------------------------------------------------------------ model
@dataclass
class LoadedModel:
    spec: str
    model: Any
    tok: Any
    fingerprint: str
    summary: dict


@st.cache_resource(max_entries=4, show_spinner=False)
def _load(spec: str, stamp: float) -> LoadedModel:
    from .loading import load_model

    model, tok = load_model(spec)
    return LoadedModel(spec, model, tok, model_fingerprint(model), model_summary(model))


def _stamp(spec: str) -> float:
    """Newest modification time of a local model folder's files (0 for other specs): a retrained demo
    or checkpoint is reloaded instead of served stale from memory."""
    from .loading import resolve

    try:
        src = resolve(spec)
    except FascError:
        return 0.0
    p = Path(src.path)
    if src.kind == "hub" or not p.is_dir():
        return 0.0
    return max((f.stat().st_mtime for f in p.iterdir() if f.is_file()), default=0.0)


def get_model(spec: str) -> LoadedModel:
    """The model for `spec`, loaded once per process and shared read-only (never mutate it)."""
    return _load(spec, _stamp(spec))


def model_picker() -> str | None:
    """The sidebar model picker (rendered by app.py on every page); returns the spec or None."""
    choice0, text0 = S.initial_model_choice()
    keys = list(S.MODEL_CHOICES)
    with st.sidebar:
        st.markdown("### Model")
        choice = st.selectbox("Model", keys, format_func=S.MODEL_CHOICES.get, label_visibility="collapsed",
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
            spec = S.model_spec(choice, text)
        except FascError:
            spec = None
        st.session_state["model_spec"] = spec
        st.session_state["_picker_drawn"] = True
        loaded = st.session_state.get("loaded", {}).get(spec)
        if loaded:
            st.caption(f"{loaded['architecture']} · {loaded['layers']} layers · {loaded['modules']} modules · "
                       f"{loaded['parameters'] / 1e6:.2f} M parameters")
        calib = (st.session_state.get("calib") or {}).get(spec) if spec else None
        if calib:
            st.caption(f"Calibrated: {calib['n_tokens']:,} tokens · γ = {setting('gamma', 1.0):g} · key "
                       f"`{calib['key'][:10]}…`")
    return spec


def require_model() -> LoadedModel:
    """The current model (loaded with a spinner), or a one-line error and stop."""
    spec = st.session_state.get("model_spec")
    choice = setting("model_choice", "demo")
    if spec is None:
        S.model_spec(choice, "")  # raises the "enter a folder / hub id" message
    if spec == "demo" and not S.demo_available():
        raise FascError(S.DEMO_MISSING + " Or pick SmolLM2 in the sidebar.")
    with st.spinner(f"Loading {S.model_label(spec)} …"):
        lm = get_model(spec)
    st.session_state.setdefault("loaded", {})[spec] = lm.summary
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
    d = default_data(spec)
    cfg = CalibConfig(n_tokens=int(setting(f"tokens@{spec}", S.default_tokens(spec))),
                      seq_len=int(setting(f"seq_len@{spec}", d.seq_len)), batch_size=int(setting("batch_size", 8)),
                      fisher=setting("fisher", "empirical"),
                      temperature=float(setting(f"temperature@{spec}", d.temperature)),
                      targets=setting("targets", "all"), seed=int(setting("seed", 0)))
    up = st.session_state.get("calib_upload")
    if data_path is None and setting("data", "builtin") == "upload":
        if not up:
            raise FascError("No calibration file uploaded; upload a .txt or .jsonl file, or choose the built-in text.")
        return CalibRequest(cfg, f"upload:{up['sha']}", up["name"], up["source"], None)
    path = Path(data_path or default_data(spec).calib)
    return CalibRequest(cfg, f"builtin:{path}", path.name, None, path)


@st.cache_resource(max_entries=8, show_spinner=False)
def _batches(spec: str, fingerprint: str, data_id: str, cfg_json: str, _tok, _source, _path) -> tuple[list[Batch], str]:
    cfg = CalibConfig(**{k: tuple(v) if k == "layers" and v is not None else v for k, v in json.loads(cfg_json).items()})
    src = _source if _source is not None else load_source(_path)
    name = Path(_path).name if _path is not None else data_id
    batches = make_batches(_tok, src, cfg, name=name)
    return batches, cache.cache_key(fingerprint, data_fingerprint(batches), cfg)


def batches_and_key(lm: LoadedModel, req: CalibRequest) -> tuple[list[Batch], str]:
    """Tokenized calibration batches and the cache key (model, data, config) — computed once."""
    return _batches(lm.spec, lm.fingerprint, req.data_id, json.dumps(asdict(req.cfg), sort_keys=True), lm.tok,
                    req.source, req.path)


@st.cache_resource(show_spinner=False)
def _stats_store() -> dict:
    return {}


def get_stats(key: str) -> CalibStats | None:
    """Statistics by cache key: from memory, else from the disk cache, else None."""
    store = _stats_store()
    if key in store:
        return store[key]
    stats = cache.load(key)
    if stats is not None:
        put_stats(stats)
    return stats


def put_stats(stats: CalibStats) -> None:
    store = _stats_store()
    store[stats.key] = stats
    while len(store) > 3:
        store.pop(next(iter(store)))


def calibrate_now(lm: LoadedModel, req: CalibRequest, label: str = "Calibrating") -> dict:
    """Run (or load from the disk cache) the calibration with a progress bar; returns the run info."""
    batches, key = batches_and_key(lm, req)
    bar = Progress(label, unit="tokens")
    t0 = time.perf_counter()
    try:
        stats, hit = calibrate_cached(lm.model, batches, req.cfg, progress=bar, model_fp=lm.fingerprint)
    finally:
        bar.clear()
    put_stats(stats)
    info = {"spec": lm.spec, "key": stats.key, "from_cache": hit, "n_tokens": stats.n_tokens,
            "seconds": round(time.perf_counter() - t0, 2), "data": req.data_name, "cfg": asdict(req.cfg),
            "modules": len(stats.modules), "warnings": list(stats.warnings)}
    st.session_state.setdefault("calib", {})[lm.spec] = info
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
    info = (st.session_state.get("calib") or {}).get(lm.spec)
    if info is not None and get_stats(info["key"]) is not None:
        return info
    info = cached_info(lm, calib_request(lm.spec))
    if info is not None:
        st.session_state.setdefault("calib", {})[lm.spec] = info
    return info


# ------------------------------------------------------------------------------------------ analysis
@st.cache_resource(max_entries=2, show_spinner=False)  # a real model's bases take GBs: keep few
def _analysis(spec: str, key: str, gamma: float, _model, _stats) -> Analysis:
    return Analysis(_model, _stats, CompressConfig(gamma=gamma))


def get_analysis(lm: LoadedModel, key: str, gamma: float | None = None, methods=("pca", "fasc")) -> Analysis:
    """The (shared) Analysis of a model's statistics at γ, with every decomposition of `methods` done
    (a progress bar appears when that takes a while). `methods=()`: none yet — enough for ρ."""
    stats = get_stats(key)
    if stats is None:
        raise FascError("The calibration statistics are no longer in the cache; run the calibration again "
                        "on the Model & calibration page.")
    gamma = float(setting("gamma", 1.0) if gamma is None else gamma)
    an = _analysis(lm.spec, key, gamma, lm.model, stats)
    bar = Progress("Eigen-decompositions", unit="steps", lazy=0.3)
    try:
        an.precompute(tuple(methods), progress=bar)
    finally:
        bar.clear()
    return an


@dataclass
class Context:
    lm: LoadedModel
    calib: dict
    an: Analysis


def require_analysis(decompose: bool = True) -> Context:
    """Model + calibration + analysis, or an explanation (with a link to page 1) and stop.

    `decompose=False` skips the eigen-decompositions (ρ needs none: the ρ map appears as soon as the
    calibration is there); `decompose(ctx)` runs them when a view needs them."""
    lm = require_model()
    info = current_calib(lm)
    if info is None:
        st.info(f"{S.model_label(lm.spec)} is not calibrated with the current settings yet; run the calibration "
                f"first.", icon=":material/info:")
        st.page_link(PAGES["calibration"], label="Go to Model & calibration", icon=":material/tune:")
        st.stop()
    return Context(lm, info, get_analysis(lm, info["key"], methods=("pca", "fasc") if decompose else ()))


def decompose(ctx: Context) -> None:
    """The pca and fasc eigen-decompositions of every module (spectra, predicted ΔL, misalignment), with a
    progress bar; instant once done (shared by every session of this server)."""
    get_analysis(ctx.lm, ctx.calib["key"], ctx.an.cfg.gamma)


@st.cache_data(max_entries=16, show_spinner=False)
def report_rows(spec: str, key: str, gamma: float, ratio: float, _an: Analysis, n_rho_fisher: int = 0,
                decomposed: bool = True) -> list:
    """`Analysis.report(ratio)` rows (small: cached by value; `n_rho_fisher` = modules with ρ measured
    along Fisher directions, so that the rows are rebuilt once it is measured). `decomposed=False`: ρ
    only, no eigen-decomposition (the other fields None)."""
    return _an.report(ratio, decompose=decomposed)


def measure_rho_fisher(ctx: Context) -> None:
    """ρ along each module's top Fisher directions (spec §4): one more forward+backward over the
    calibration text, with a progress bar. Stored with the statistics in memory (for this server),
    only when the pass completes."""
    from .rho import rho_fisher_pass

    batches, key = batches_and_key(ctx.lm, calib_request(ctx.lm.spec))
    if key != ctx.calib["key"]:
        raise FascError("The calibration settings changed since this calibration ran; run the calibration again "
                        "on the Model & calibration page first.")
    bar = Progress("Measuring ρ along Fisher directions", unit="tokens")
    try:
        rho_fisher_pass(ctx.lm.model, batches, ctx.an, progress=bar)
    finally:
        bar.clear()


# ------------------------------------------------------------------------------------------ plan & selection
def plan_owner(ctx: Context) -> list:
    return [ctx.lm.spec, ctx.calib["key"], float(setting("gamma", 1.0))]


def current_plan(ctx: Context) -> Plan:
    """The session's rank plan for this model/calibration (the default one the first time)."""
    d = st.session_state.get("plan")
    if d and d.get("for") == plan_owner(ctx):
        plan = Plan.from_dict(d["plan"])
        if S.plan_fits(plan, ctx.an):
            return plan
    plan = S.default_plan(ctx.an, ctx.lm.fingerprint)
    set_plan(ctx, plan)
    return plan


def set_plan(ctx: Context, plan: Plan, bump: bool = True) -> None:
    """Store the plan (durable); `bump` resets widgets that show a copy of it (editor, sliders)."""
    st.session_state["plan"] = {"for": plan_owner(ctx), "plan": plan.to_dict()}
    if bump:
        st.session_state["plan_ver"] = st.session_state.get("plan_ver", 0) + 1


def selected_module(an: Analysis) -> str:
    """The selected fqn (durable across pages); the module with the highest ρ at first."""
    fqn = st.session_state.get("module")
    names = [i.fqn for i in an.modules]
    if fqn not in names:
        fqn = max(names, key=lambda f: an.rho(f)[0])
        st.session_state["module"] = fqn
    return fqn


def select_module(fqn: str) -> None:
    st.session_state["module"] = fqn


# ------------------------------------------------------------------------------------------ progress
class Progress:
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
        self.bar.progress(frac, text=f"{self.label}: {S.eta_text(done, total, el, self.unit)}")
        return None

    def clear(self) -> None:
        self.slot.empty()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@st.cache_resource(show_spinner=False)
def eval_store() -> dict:
    """Evaluation results by (model, calibration, γ, plan, baseline, tokens): small rows, shared."""
    return {}
