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


def test_side_by_side_generations(env):
    at = goto(calibrated(env), "pages/4_ranks.py")
    at.text_area(key="w.gen_prompts").set_value("the cat sat\na big red").run()
    at.number_input(key="w.gen_tokens").set_value(4).run()
    at.button(key="w.generate").click().run()
    ok(at)
    rows = _frame(at, "prompt")
    assert list(rows["prompt"]) == ["the cat sat", "a big red"]
    assert {"uncompressed", "plan", "asvd (same budget)"} <= set(rows.columns)
    at.text_area(key="w.gen_prompts").set_value("  ").run()
    at.button(key="w.generate").click().run()
    assert len(errors(ok(at))) == 1 and "No prompt" in errors(at)[0]


def test_default_facts_and_labels():
    assert K.default_facts(5200, "demo") == 5200 and K.default_facts(358, "smollm2") == 150
    assert K.default_facts(20, "x") == 20
    from fasc.data import Example

    assert K.fact_label(Example("a" * 100, "b")).endswith("…")
