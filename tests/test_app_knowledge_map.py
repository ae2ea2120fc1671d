"""AppTests of the knowledge map's fast and exact paths on the ρ map page (tiny saved Llama): the fast map
on request, the exact map of a subset with its estimated cost shown first, the two merged and compared."""

from __future__ import annotations

import json

from test_app import _navigation_v2, calibrated, env, goto, ok  # noqa: F401 - fixtures


def _title(at) -> str:
    return json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]["text"].replace("<br>", " ")


def _knowledge_view(env):
    at = goto(calibrated(env), "pages/2_rho_map.py")
    at.button_group[0].set_value("knowledge").run()
    at.radio(key="w.kmap_probe").set_value("upload").run()
    at.file_uploader(key="w.kmap_file").upload("probe.jsonl", (env["root"] / "probe.jsonl").read_bytes(),
                                               "application/json")
    return ok(at.run())


def _estimate(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("≈ "))


def test_fast_map_then_the_exact_map_of_its_top_modules(env):
    at = _knowledge_view(env)
    assert any("fast map predicts it" in i.value for i in at.info) and "ρ =" in _title(at)
    assert "for 14 modules × 3 facts" in _estimate(at) and "GFLOP/s" in _estimate(at)   # before anything runs
    assert "top" not in at.radio(key="w.kmap_subset").options                          # needs the fast map
    at.button(key="w.kmap_fast_run").click().run()
    ok(at)
    assert "Predicted by the fast map" in _title(at) and "3 facts" in _title(at) and not at.info
    assert any(m.label == "Predicted (fast map)" for m in at.metric)
    assert not [b for b in at.button if b.key == "w.kmap_fast_run"]                     # done: no button
    at.radio(key="w.kmap_subset").set_value("top").run()
    at.number_input(key="w.kmap_top@" + env["spec"]).set_value(3).run()
    assert "for 3 modules" in _estimate(ok(at))
    at.button(key="w.kmap_run").click().run()
    ok(at)
    assert "Measured with only this module compressed" in _title(at) and "3 of 14 modules measured" in _title(at)
    frame = next(d.value for d in at.dataframe if "statistic" in d.value.columns)
    fast = [s for s in frame["statistic"] if s.startswith("fast map:")]
    assert len(fast) == 5 and sum("(shown)" in s for s in fast) == 1 and set(frame["modules"]) == {3}
    # the rest of the modules: only those not measured yet, merged into one map
    at.radio(key="w.kmap_subset").set_value("all").run()
    assert "for 11 modules" in _estimate(ok(at)) and "3 of the chosen already measured" in _estimate(at)
    at.button(key="w.kmap_run").click().run()
    ok(at)
    assert "modules measured" not in _title(at) and not [b for b in at.button if b.key == "w.kmap_run"]
    frame = next(d.value for d in at.dataframe if "statistic" in d.value.columns)
    assert set(frame["modules"]) == {14}
    at.radio(key="w.kmap_source").set_value("predicted").run()
    assert "Predicted by the fast map" in _title(ok(at))
    # both are on disk beside the statistics
    key = at.session_state["calib"][env["ident"]]["key"]
    assert len(list((env["tmp"] / "cache" / key).glob("fmap-*.safetensors"))) == 1
    assert len(list((env["tmp"] / "cache" / key).glob("kmap-*.safetensors"))) == 2


def test_exact_map_of_chosen_layers_and_kinds(env):
    at = _knowledge_view(env)
    at.radio(key="w.kmap_subset").set_value("kinds").run()
    at.multiselect(key="w.kmap_kinds@" + env["spec"]).set_value(["q", "down"]).run()
    assert "for 4 modules" in _estimate(ok(at))
    at.radio(key="w.kmap_subset").set_value("layers").run()
    at.multiselect(key="w.kmap_layers@" + env["spec"]).set_value([1]).run()
    assert "for 7 modules" in _estimate(ok(at))
    at.button(key="w.kmap_run").click().run()
    ok(at)
    assert "7 of 14 modules measured" in _title(at)
    at.multiselect(key="w.kmap_layers@" + env["spec"]).set_value([]).run()
    assert [e.value for e in at.error] and all("\n" not in e.value for e in at.error)   # nothing chosen: one line
