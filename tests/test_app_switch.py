"""State follows the model: the sidebar switches demo → another model → demo, and every page shows the
current model's own state (plan, budget widgets, prompts, selection, export), never the other's.

The "other" model is the tiny saved Llama of conftest (a real switch to SmolLM2 works the same way but
takes minutes on a CPU); both are Llamas, so their module names overlap (layers 0-1) and a plan or a
selection of one would even look valid for the other — only keying by the model keeps them apart.
"""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest
from test_app import APP, TIMEOUT, TOKENS, _navigation_v2, env, errors, goto, metric, ok, plan  # noqa: F401 - fixtures

from fasc.app import choices, state
from fasc.data import load_probe
from fasc.pipeline import model_defaults

PAGES = ("pages/1_calibration.py", "pages/2_rho_map.py", "pages/3_spectra.py", "pages/4_ranks.py",
         "pages/5_export.py")


@pytest.fixture
def switch_env(env, monkeypatch):
    if not choices.demo_available():
        pytest.skip("the embedded demo model is not built")
    monkeypatch.delenv("FASC_APP_MODEL")   # the sidebar starts on the demo model
    return env


def _app(env) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["set.tokens@demo"] = TOKENS
    at.session_state[f"set.tokens@{env['spec']}"] = TOKENS
    return at


def _to_demo(at) -> AppTest:
    at.selectbox(key="w.model_choice").set_value("demo").run()
    return ok(at)


def _to_other(at, env) -> AppTest:
    at.selectbox(key="w.model_choice").set_value("folder").run()
    at.text_input(key="w.model_folder").set_value(env["spec"]).run()
    return ok(at)


def _calibrate(at) -> AppTest:
    goto(at, "pages/1_calibration.py")
    if [b for b in at.button if b.key == "w.run"]:
        ok(at.button(key="w.run").click().run())
    assert not errors(at), errors(at)
    return at


def _heat_layers(at) -> int:
    return len(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"])


def _default_prompts(spec: str) -> str:
    return "\n".join(e.prompt for e in load_probe(model_defaults(spec).probe)[:2])


def test_every_page_follows_the_model_demo_other_demo(switch_env):
    env = switch_env
    at = ok(_app(env).run())
    assert at.session_state["model_spec"] == "demo"

    # ---- demo: calibrate, select a module, allocate 30 %, own prompts, export
    _calibrate(at)
    assert metric(at, "Layers") == "6"
    goto(at, "pages/2_rho_map.py")
    assert _heat_layers(at) == 6
    demo_sel = "model.layers.5.mlp.up_proj"   # not in the other model (2 layers)
    next(s for s in at.selectbox if s.key and s.key.startswith("w.rho_pick")).set_value(demo_sel).run()
    assert ok(at).session_state["module"] == demo_sel
    goto(at, "pages/4_ranks.py")
    assert at.text_area(key="w.gen_prompts").value == _default_prompts("demo")   # the invented world's facts
    assert "Fadou Stimosstan" in at.text_area(key="w.gen_prompts").value
    at.slider(key="w.alloc_ratio").set_value(0.3)
    at.button(key="w.allocate").click().run()
    demo_plan = plan(ok(at))
    assert len(demo_plan.ranks) == 42 and metric(at, "Plan") == "fasc"
    at.text_area(key="w.gen_prompts").set_value("my demo prompt").run()
    goto(at, "pages/5_export.py")
    assert "default plan" not in " ".join(m.value for m in at.markdown)
    at.button(key="w.export").click().run()
    demo_export = ok(at).session_state["exports"][choices.model_ident("demo", "cpu", "float32")]
    assert any("Wrote" in s.value for s in at.success)

    # ---- switch to the other model on the Export page: no demo export, plan or prompts anywhere
    _to_other(at, env)
    assert at.session_state["model_spec"] == env["spec"]
    assert not any("Wrote" in s.value for s in at.success)           # the demo's export is not shown
    assert any("not calibrated" in i.value for i in at.info)
    _calibrate(at)
    assert metric(at, "Layers") == "2" and any("2 layers" in c.value for c in at.sidebar.caption)
    goto(at, "pages/2_rho_map.py")
    assert _heat_layers(at) == 2 and at.session_state["module"].startswith("model.layers.")
    assert at.session_state["module"] != demo_sel
    goto(at, "pages/3_spectra.py")
    assert len(at.selectbox(key="w.spec_module").options) == 14
    goto(at, "pages/4_ranks.py")
    other_plan = plan(at)
    assert len(other_plan.ranks) == 14 and other_plan.ranks != {f: demo_plan.ranks[f] for f in other_plan.ranks}
    assert at.slider(key="w.alloc_ratio").value == state.DEFAULT_SHARE   # the budget widget of this model's plan
    assert state.DEFAULT_SHARE - 0.05 <= float(metric(at, "Parameters kept").rstrip("%")) / 100 <= state.DEFAULT_SHARE
    assert any("default plan" in c.value for c in at.caption)         # and the page says nobody made it
    assert at.text_area(key="w.gen_prompts").value == _default_prompts(env["spec"])   # real-world prompts
    assert "The capital of France is" in at.text_area(key="w.gen_prompts").value
    goto(at, "pages/5_export.py")
    assert not any("Wrote" in s.value for s in at.success)
    assert any("default plan" in m.value for m in at.markdown)

    # ---- back to the demo: its own plan, budget, prompts, selection and export again
    _to_demo(at)
    assert any("Wrote" in s.value for s in at.success)
    assert at.session_state["exports"][choices.model_ident("demo", "cpu", "float32")] == demo_export
    assert not any("default plan" in m.value for m in at.markdown)
    for page in PAGES:
        goto(at, page)
        assert not errors(at), (page, errors(at))
        if page.endswith("1_calibration.py"):
            assert metric(at, "Layers") == "6"
        elif page.endswith("2_rho_map.py"):
            assert _heat_layers(at) == 6 and at.session_state["module"] == demo_sel
        elif page.endswith("3_spectra.py"):
            assert at.selectbox(key="w.spec_module").value == demo_sel
        elif page.endswith("4_ranks.py"):
            assert plan(at).ranks == demo_plan.ranks and at.slider(key="w.alloc_ratio").value == 0.3
            assert at.text_area(key="w.gen_prompts").value == "my demo prompt"
            assert not any("default plan" in c.value for c in at.caption)
        elif page.endswith("5_export.py"):
            assert any("Wrote" in s.value for s in at.success)


def test_switch_on_the_ranks_page_rebuilds_its_widgets(switch_env):
    """Switching while the Ranks page is open (its widgets on screen) shows the new model's values at
    once, and a switch back restores the first model's."""
    env = switch_env
    at = ok(_app(env).run())
    _calibrate(at)
    _to_other(at, env)
    _calibrate(at)
    goto(at, "pages/4_ranks.py")
    at.slider(key="w.alloc_ratio").set_value(0.7).run()
    at.text_area(key="w.gen_prompts").set_value("other prompt").run()
    _to_demo(ok(at))
    assert at.slider(key="w.alloc_ratio").value == state.DEFAULT_SHARE and len(plan(at).ranks) == 42
    assert at.text_area(key="w.gen_prompts").value == _default_prompts("demo")
    _to_other(at, env)
    assert at.slider(key="w.alloc_ratio").value == 0.7
    assert at.text_area(key="w.gen_prompts").value == "other prompt" and len(plan(at).ranks) == 14
