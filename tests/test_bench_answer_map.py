"""bench.answer_map: groups of compressed modules restored to dense, scored on closed-book answers (tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bench.answer_map import answer_map, compressed_modules, main, module_groups, table
from fasc.data import load_probe
from fasc.qa import probe_qa

from helpers import tiny_model


def test_groups_follow_kinds_and_thirds():
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(6)] + ["model.layers.4.mlp.down_proj"]
    g = module_groups(names, 6)
    assert g["q_proj"] == names[:6] and g["down_proj"] == names[6:]
    assert g["layers 0–1"] == names[:2] and g["layers 4–5"] == names[4:]
    assert g["q_proj, layers 4–5"] == names[4:6]
    assert list(module_groups(names, 6, ("kinds",))) == ["q_proj", "down_proj"]


def test_restoring_every_module_gives_the_dense_answers_and_none_the_export(tmp_path, tokenizer):
    dense = tiny_model("llama").eval()
    comp = copy.deepcopy(dense)
    names = []
    with torch.no_grad():
        torch.manual_seed(0)
        for i, layer in enumerate(comp.model.layers):
            layer.self_attn.q_proj.weight.add_(torch.randn_like(layer.self_attn.q_proj.weight))
            names.append(f"model.layers.{i}.self_attn.q_proj")
    facts = [{"prompt": f"the {w} sat on the", "answer": a, "relation": f"r{i % 7}"}
             for i, (w, a) in enumerate(zip("cat dog king bird cow hen fox owl".split(), "mat rug land nest barn"
                                                                                    " coop den tree".split()))]
    (tmp_path / "probe.jsonl").write_text("\n".join(json.dumps(f) for f in facts))
    sets = {"qa_facts": (probe_qa(load_probe(tmp_path / "probe.jsonl")), 0, None)}
    groups = {"all": names, "first": names[:1]}
    res = answer_map(comp, dense, tokenizer, groups, sets)
    assert list(res) == ["dense", "none", "all", "first"]
    assert res["all"]["qa_facts"]["delta_logp_all"] == pytest.approx(0, abs=1e-5)
    assert abs(res["none"]["qa_facts"]["delta_logp_all"]) > 1e-3     # the export differs from the dense model
    assert res["first"]["qa_facts"]["delta_logp_all"] != pytest.approx(res["none"]["qa_facts"]["delta_logp_all"])
    rows = table(res, groups).splitlines()
    assert rows[0] == "| restored to dense | modules | qa_facts kept | qa_facts Δ log P |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| every module (the dense model)", "| none (the export)",
                                                     "| all", "| first"]
    ranks = {n: 4 for n in names} | {"model.layers.0.mlp.down_proj": 10**6}
    assert compressed_modules(ranks, dense) == names


def test_bad_arguments_are_one_line(capsys):
    assert main(["--model", "x", "--groups", "kinds,nope"]) == 2
    assert "Unknown group nope; choose from kinds, thirds, q." in capsys.readouterr().err
