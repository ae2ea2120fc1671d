"""Progressive compression (`fasc compress --stages N`): the export equals compressing the merged first stage
again by hand, the stages are recorded, healing distils the uncompressed model, and the options it does not
take are one line each."""

import json

import pytest
import torch
from safetensors.torch import load_file

import fasc
from fasc.cli import main
from fasc.modules import model_fingerprint
from fasc.pipeline import compressed_copy, default_stages, stage_budgets, stage_count


def test_stage_budgets_and_the_auto_count():
    assert [stage_count(p, 0.1) for p in (0.95, 0.9, 0.85, 0.8, 0.6, 0.5)] == [1, 1, 2, 2, 4, 5]
    assert stage_count(0.5, 0.0) == 1
    assert default_stages("smollm2", 0.8) == 2 and default_stages("demo", 0.5) == 1
    assert [default_stages("smollm2", *r) for r in ((None,), (0.8, "anchored"), (0.8, "greedy", 0.7),
                                                     (0.8, "uniform", None, "restat"), (0.8, "uniform"))] == [1, 1, 1, 1, 2]
    assert stage_budgets(0.8, 1) == [0.8]
    assert stage_budgets(0.8, 2) == [0.9, 0.8]
    assert stage_budgets(0.6, 4) == [0.9, 0.8, 0.7, 0.6]
    with pytest.raises(fasc.FascError, match="--stages"):
        stage_budgets(0.8, 0)


def test_two_stages_equal_the_merged_first_stage_compressed_again(saved_llama, common, tmp_path, capsys):
    code = main(["compress", *common, "--param-ratio", "0.6", "--stages", "2", "--out", str(tmp_path / "s2"),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert [s["param_ratio"] for s in res["stages"]] == [0.8] and abs(res["param_ratio"] - 0.6) < 0.02
    assert res["predicted_delta_loss"] == pytest.approx(sum(res["predicted_delta_loss_stages"]))
    # by hand: the first stage merged to a folder, then compressed from there on the same text
    assert main(["compress", *common, "--param-ratio", "0.8", "--stages", "1", "--merge", "--out",
                 str(tmp_path / "m80")]) == 0
    by_hand = [a if a != str(saved_llama / "model") else str(tmp_path / "m80") for a in common]
    assert main(["compress", *by_hand, "--param-ratio", "0.6", "--stages", "1", "--out", str(tmp_path / "byhand")]) == 0
    capsys.readouterr()
    staged, manual = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("s2", "byhand"))
    assert staged.keys() == manual.keys() and all(torch.equal(staged[k], manual[k]) for k in staged)
    fc = json.loads((tmp_path / "s2" / "fasc_config.json").read_text())
    dense, _ = fasc.load_model(str(saved_llama / "model"))
    assert fc["source_fingerprint"] == model_fingerprint(dense) and fc["stages"][0]["param_ratio"] == 0.8
    assert fc["ranks"] == json.loads((tmp_path / "byhand" / "fasc_config.json").read_text())["ranks"]


def test_stages_heal_from_the_uncompressed_model(saved_llama, common, tmp_path, capsys, monkeypatch):
    import fasc.heal as heal

    own, teachers = heal.heal_, []

    def spy(work, teacher, *a, **kw):
        teachers.append(model_fingerprint(teacher))
        return own(work, teacher, *a, **kw)

    monkeypatch.setattr(heal, "heal_", spy)
    code = main(["compress", *common, "--param-ratio", "0.6", "--stages", "2", "--heal-tokens", "64",
                 "--heal-check-tokens", "0", "--out", str(tmp_path / "h")])
    _, err = capsys.readouterr()
    assert code == 0, err
    dense, _ = fasc.load_model(str(saved_llama / "model"))
    assert teachers == [model_fingerprint(dense)]


@pytest.mark.parametrize("extra", [["--rank-ratio", "0.5"], ["--param-ratio", "0.6", "--sequential"],
                                   ["--param-ratio", "0.6", "--attention-share", "0.7"],
                                   ["--param-ratio", "0.6", "--stages", "0"]])
def test_stages_refuse_what_they_do_not_take(common, tmp_path, capsys, extra):
    stages = [] if "--stages" in extra else ["--stages", "2"]
    code = main(["compress", *common, *extra, *stages, "--out", str(tmp_path / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and "--stages" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, stages", [(["--param-ratio", "0.6"], 4), (["--param-ratio", "0.9"], 1),
                                           (["--param-ratio", "0.6", "--sequential"], 1),
                                           (["--rank-ratio", "0.3"], 1)])
def test_auto_stages_follow_the_budget(common, tmp_path, capsys, extra, stages):
    """`--stages auto` (the default): one stage per 10 % of the parameters removed for a real model; one where the
    request takes no stages (instead of the error an explicit count gets)."""
    code = main(["compress", *common, *extra, "--heal-tokens", "0", "--out", str(tmp_path / "e"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(json.loads(out).get("stages", [])) == stages - 1


def test_the_demo_compresses_in_one_stage():
    from fasc.pipeline import model_defaults
    assert model_defaults("demo").stage_step == 0 and model_defaults("smollm2").stage_step == 0.1


def test_healing_in_place_needs_its_teacher(llama, llama_stats):
    """A model compressed in place is no longer the uncompressed one: healing it without `teacher` is one line."""
    from fasc.allocate import allocate
    from fasc.analysis import Analysis

    an = Analysis(llama, llama_stats)
    plan = allocate(an, "fasc", param_ratio=0.8)
    with pytest.raises(fasc.FascError, match="pass teacher="):
        compressed_copy(llama, an, plan, in_place=True, heal_tokens=64, batches=[object()])
