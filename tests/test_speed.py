"""The predicted speed-up of a plan and the 'will not be faster than dense' warning."""

import copy
import json

import pytest
import torch

import fasc
from fasc.layers import LowRankLinear
from fasc.modules import find_linears
from fasc.speed import MIN_SPEEDUP, matmul_params, predicted_speedup, speed_warning
from fasc.surgery import replace_module

from helpers import tiny_model


def uniform_ranks(infos, p):
    """Ranks keeping share p of each module as U, V (`LowRankLinear`, `factors="uv"`)."""
    return {i.fqn: max(1, int(p * i.out_features * i.in_features / (i.out_features + i.in_features)))
            for i in infos}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prediction_is_the_ratio_of_matmul_parameters_before_and_after(arch):
    model = tiny_model(arch)
    infos = find_linears(model)
    dense = matmul_params(model)
    head = model.get_output_embeddings().weight.numel()
    assert dense == sum(i.out_features * i.in_features for i in infos) + head
    ranks = uniform_ranks(infos, 0.5)
    small = copy.deepcopy(model)
    for i in infos:
        k = ranks[i.fqn]
        replace_module(small, i.fqn, LowRankLinear(i.in_features, i.out_features, k))
    shapes = {i.fqn: (i.out_features, i.in_features) for i in infos}
    assert predicted_speedup(model, shapes, ranks, factors="uv") == pytest.approx(dense / matmul_params(small))
    assert predicted_speedup(model, shapes, ranks, merge=True) == 1.0


def test_pivoted_prediction_counts_the_pivoted_layers_parameters():
    """Pivoted, a module works k(m+n−k) per token, as many as its parameters; bench.speed's uniform ranks keep
    the same share of parameters in either storage."""
    from bench.speed import uniform_rank
    from fasc.layers import PivotedLowRankLinear

    model = tiny_model("llama")
    infos = find_linears(model)
    ranks = {i.fqn: uniform_rank(i.out_features, i.in_features, 0.8, "pivoted") for i in infos}
    small = copy.deepcopy(model)
    for i in infos:
        replace_module(small, i.fqn, PivotedLowRankLinear(i.in_features, i.out_features, ranks[i.fqn], bias=False))
    shapes = {i.fqn: (i.out_features, i.in_features) for i in infos}
    assert predicted_speedup(model, shapes, ranks, factors="pivoted") == \
        pytest.approx(matmul_params(model) / matmul_params(small))
    for i in infos:
        for f in ("uv", "pivoted"):
            k = uniform_rank(i.out_features, i.in_features, 0.8, f)
            cost = k * (i.out_features + i.in_features - (k if f == "pivoted" else 0))
            assert 0.8 * i.params - (i.out_features + i.in_features) <= cost <= 0.8 * i.params


def test_warning_fires_near_break_even_and_for_merged_exports():
    model = tiny_model("llama")
    infos = find_linears(model)
    shapes = {i.fqn: (i.out_features, i.in_features) for i in infos}
    near = predicted_speedup(model, shapes, uniform_ranks(infos, 0.95), factors="uv")
    far = predicted_speedup(model, shapes, uniform_ranks(infos, 0.3), factors="uv")
    assert near < MIN_SPEEDUP < far
    assert "not be faster than dense" in speed_warning(near)
    assert speed_warning(far) is None
    assert "--merge" in speed_warning(far, merge=True)
    # ranks past break-even stay dense in compress_: no saving counted
    full = {i.fqn: min(i.out_features, i.in_features) for i in infos}
    assert predicted_speedup(model, shapes, full) == 1.0


def test_cli_compress_reports_the_predicted_speedup(capsys, saved_llama, tmp_path):
    from fasc.cli import main

    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json"]
    assert main(["compress", *common, "--rank-ratio", "0.25", "--out", str(tmp_path / "a")]) == 0
    fast = json.loads(capsys.readouterr().out)["predicted_speedup"]
    assert main(["compress", *common, "--rank-ratio", "0.25", "--merge", "--out", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out)["predicted_speedup"] == 1.0
    assert fast > MIN_SPEEDUP
