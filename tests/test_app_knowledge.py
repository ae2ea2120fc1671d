"""AppTests of the knowledge views: measured knowledge map and facts-vs-general Fisher on the ρ map
page, one fact at a time, side-by-side generations on the Ranks page (tiny saved Llama)."""

from __future__ import annotations

import json

from test_app import _navigation_v2, calibrated, env, errors, goto, ok  # noqa: F401 - fixtures

from fasc.app import knowledge as K


def _probe_upload(at, env):
    at.radio(key="w.kmap_probe").set_value("upload").run()
    raw = (env["root"] / "probe.jsonl").read_bytes()
    at.file_uploader(key="w.kmap_file").upload("probe.jsonl", raw, "application/json")
    return ok(at.run())


def _frame(at, column: str):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _title(at) -> str:
    return json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"]


def test_knowledge_map_measured_on_request(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    assert any("not assumed" in m.value for m in at.markdown)  # the page claims nothing unmeasured
    at.button_group[0].set_value("knowledge").run()
    ok(at)
    at = _probe_upload(at, env)
    assert any("one probe evaluation per module" in i.value for i in at.info)
    assert "ρ =" in _title(at)  # until measured, the ρ map is shown
    at.slider(key="w.kmap_share").set_value(0.3).run()
    at.button(key="w.kmap_run").click().run()
    ok(at)
    assert not at.info and "Measured with only this module compressed" in _title(at) and "3 facts" in _title(at)
    table = _frame(at, "statistic")
    assert table["statistic"][0].startswith("ρ") and set(table["modules"]) == {14}
    assert "Fisher energy, probe answers" in list(table["statistic"])
    assert any("Spearman of ρ with the knowledge loss" in m.value for m in at.markdown)
    at.radio(key="w.kmap_value").set_value("recall_drop").run()
    assert "recall drop" in json.loads(ok(at).get("plotly_chart")[0].proto.spec)["data"][0]["colorbar"]["title"]["text"]
    # one fact at a time: dense probability and the most harmful modules at once, the rest on request
    assert any(m.label == "P(answer) uncompressed" for m in at.metric)
    assert len(_frame(at, "loss ↑ (nats)")) == 5
    at.selectbox(key="w.kmap_fact").set_value(2).run()
    at.button(key="w.kmap_fact_run").click().run()
    ok(at)
    cmp = _frame(at, "greedy continuation")
    assert list(cmp["model"]) == ["uncompressed", "plan", "asvd (same budget)"]
    assert all(isinstance(t, str) for t in cmp["greedy continuation"])
    # the map is cached on disk beside the statistics
    key = at.session_state["calib"][env["ident"]]["key"]
    assert len(list((env["tmp"] / "cache" / key).glob("kmap-*.safetensors"))) == 1


def test_knowledge_map_at_planned_ranks(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("knowledge").run()
    at = _probe_upload(ok(at), env)
    at.radio(key="w.kmap_mode").set_value("plan").run()
    at.button(key="w.kmap_run").click().run()
    ok(at)
    assert "planned rank" in _title(at) and "default plan" in _title(at)   # no plan was made: it says so


def test_fact_focus_view(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("fact_focus").run()
    at = _probe_upload(ok(at), env)
    assert any("answers of probe.jsonl" in i.value for i in at.info)
    at.button(key="w.kmap_focus_run").click().run()
    ok(at)
    assert not at.info and "general text" in _title(at)


def test_bad_probe_upload_is_one_line_error(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("knowledge").run()
    at.radio(key="w.kmap_probe").set_value("upload").run()
    ok(at)
    assert errors(at) and "No probe uploaded" in errors(at)[0]
    at.file_uploader(key="w.kmap_file").upload("bad.jsonl", b'{"prompt": "x"}\n', "application/json")
    at.run()
    assert len(errors(ok(at))) == 1 and "\n" not in errors(at)[0]


GEN_NAMES = ("uncompressed", "plan", "asvd (same budget)")


def _gen_columns(at) -> dict[str, list[str]]:
    """{model: [markdown block per prompt]} of the three generation columns."""
    out = {}
    for col in at.columns:
        md = [m.value for m in col.markdown]
        if md and md[0].strip("*") in GEN_NAMES:
            out[md[0].strip("*")] = md[1:]
    return out


def test_side_by_side_generations(env, monkeypatch):
    """Three columns (one per model, one block per prompt, no table), cost shown first, progress to the
    total, no Cancel left; the copies are built once and Evaluate and Export reuse them."""
    from fasc.app import copies as CP
    from fasc.app import ui

    calls = []
    orig = ui.ProgressBar.__call__
    monkeypatch.setattr(ui.ProgressBar, "__call__", lambda self, d, t: (calls.append((self.label, d, t)),
                                                                        orig(self, d, t))[1])
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.text_area(key="w.gen_prompts").set_value("the cat sat\na big red").run()
    at.number_input(key="w.gen_tokens").set_value(4).run()
    assert any(c.value.startswith("≈ ") and "builds 2 compressed copies" in c.value
               and "3 models × 2 prompts × 4 tokens" in c.value for c in ok(at).caption)
    at.button(key="w.generate").click().run()
    cols = _gen_columns(ok(at))
    assert set(cols) == set(GEN_NAMES)
    assert all([b.split("**")[1] for b in cols[n]] == ["the cat sat", "a big red"] for n in GEN_NAMES)
    assert not [d for d in at.dataframe if "prompt" in d.value.columns]        # no table cells to cut text
    assert not [b for b in at.button if b.key == "w.gen_cancel"]               # gone when the work ended
    gen = [(d, t) for label, d, t in calls if label == "Generating"]
    assert gen[-1] == (24, 24) and [d for d, _ in gen] == sorted(d for d, _ in gen)   # 3 models × 2 × 4 tokens
    assert any(label.startswith("Compressing a copy") for label, *_ in calls)
    assert CP.cache().builds_ == 2
    at.run()                                                 # kept: the same columns without a click
    assert _gen_columns(ok(at)) == cols
    assert any("the compressed copies are built" in c.value for c in at.caption)
    # Evaluate and Export reuse the copies (same plan, same options): no new build
    at.number_input(key="w.eval_tokens").set_value(256).run()
    at.button(key="w.evaluate").click().run()
    rows = ok(at).dataframe[-1].value
    assert CP.cache().builds_ == 2
    goto(at, "pages/5_export.py")
    assert any("already built" in c.value for c in at.caption)
    at.button(key="w.export").click().run()
    assert any("Wrote" in s.value for s in ok(at).success) and CP.cache().builds_ == 2
    # building anew (a fresh server) gives the same evaluation table
    env2 = dict(env)
    from test_app import new_app
    import streamlit as st

    st.cache_resource.clear()
    at2 = goto(ok(new_app(env2).run()), "pages/4_ranks.py")
    at2.number_input(key="w.eval_tokens").set_value(256).run()
    at2.button(key="w.evaluate").click().run()
    assert ok(at2).dataframe[-1].value.equals(rows) and CP.cache().builds_ == 2   # a new cache: 2 builds there


def test_generation_cancel_keeps_nothing(env, monkeypatch):
    """A click on Cancel reruns the script, which stops the generation at its next update: the Cancel
    button was there while it ran, is gone after, nothing is kept and the page says it was cancelled."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    import fasc.app.generation as G

    seen = {}
    orig = G.stream_continuations

    def interrupted(*a, **k):
        for j, ev in enumerate(orig(*a, **k)):
            if j == 1:     # every model yields at least once, even one that ends at once
                import streamlit as st
                seen["cancel"] = "w.gen_cancel" in st.session_state
                raise StopException()      # what an interrupting click amounts to
            yield ev

    monkeypatch.setattr(G, "stream_continuations", interrupted)
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.text_area(key="w.gen_prompts").set_value("the cat sat").run()
    at.number_input(key="w.gen_tokens").set_value(4).run()
    at.button(key="w.generate").click().run()
    ok(at)
    assert seen["cancel"] and not [b for b in at.button if b.key == "w.gen_cancel"]
    at.run()
    assert not _gen_columns(ok(at)) and not G._results()
    assert any("compressed copies are built" in c.value for c in at.caption)    # the copies were kept
    at.text_area(key="w.gen_prompts").set_value("  ").run()
    at.button(key="w.generate").click().run()
    assert len(errors(ok(at))) == 1 and "No prompt" in errors(at)[0]


def test_default_facts_and_labels():
    assert K.default_facts(5200, "demo") == 5200 and K.default_facts(358, "smollm2") == 150
    assert K.default_facts(20, "x") == 20
    from fasc.data import Example

    assert K.fact_label(Example("a" * 100, "b")).endswith("…")
