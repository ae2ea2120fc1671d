"""Pivoted factors: the same rank-k map in k(m+n−k) parameters, budgets priced that way, exports that load."""

import json

import numpy as np
import pytest
import torch

import fasc
from fasc.allocate import Plan, greedy_ranks, is_factored, max_factored_rank, module_params, uniform_ranks
from fasc.layers import LowRankLinear, PivotedLowRankLinear, pivoted
from fasc.modules import ModuleInfo

from helpers import VOCAB, compress_tiny, run_cli as run


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("out_f,in_f,k,bias", [(48, 48, 30, True), (96, 32, 20, False), (16, 64, 15, True),
                                               (8, 4, 3, True)])
def test_pivoted_layer_is_the_same_map_in_fewer_parameters(out_f, in_f, k, bias):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(out_f, k, generator=g), torch.randn(in_f, k, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    uv = LowRankLinear.from_factors(U, V, b)
    pv = pivoted(uv)
    assert isinstance(pv, PivotedLowRankLinear) and pv.rank == k
    assert n_params(pv) == k * (out_f + in_f - k) + (out_f if bias else 0) == n_params(uv) - k * k
    x = torch.randn(3, 5, in_f, generator=g)
    with torch.no_grad():
        ref, got = uv(x), pv(x)
        one = pv(x[:1, 2:3])                    # a single token (decoding) takes the other path
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    torch.testing.assert_close(one, got[:1, 2:3], atol=1e-5 * float(ref.abs().max()), rtol=0)
    W = uv.to_dense().detach()
    torch.testing.assert_close(pv.to_dense().detach(), W, atol=1e-4 * float(W.abs().max()), rtol=0)
    assert sorted(pv.order.tolist()) == list(range(out_f))      # a permutation of the outputs


def test_pivoted_layer_refuses_a_rank_deficient_or_full_rank_factor():
    with pytest.raises(ValueError, match="rank 8 must be"):
        PivotedLowRankLinear(4, 8, 8)
    U = torch.ones(6, 2)                                       # rank 1 < k = 2: no invertible pivot block
    with pytest.raises(ValueError, match="rank-deficient"):
        PivotedLowRankLinear.from_factors(U, torch.randn(5, 2))


def test_pivoted_costs_save_at_every_rank_below_full():
    sq, wide = ModuleInfo("a", 0, "q", 64, 64, False, False), ModuleInfo("b", 0, "up", 32, 96, False, False)
    assert module_params(sq, 40, "uv") == sq.params and not is_factored(sq, 40, "uv")   # U, V: 40·128 > 64·64
    assert module_params(sq, 40) == module_params(sq, 40, "pivoted") == 40 * 88 and is_factored(sq, 40)  # default
    assert max_factored_rank(sq, "uv") == 31 and max_factored_rank(sq, "pivoted") == 63
    assert module_params(wide, 31, "pivoted") == 31 * 97 < wide.params
    for info in (sq, wide):      # the uniform baseline keeps the same share of parameters in either storage
        for c in (0.9, 0.6):
            for factors in ("uv", "pivoted"):
                k = uniform_ranks([info], c, factors)[info.fqn]
                assert abs(module_params(info, k, factors) - c * info.params) <= info.out_features + info.in_features


def test_a_pivoted_budget_keeps_higher_ranks_within_the_same_parameters():
    infos = [ModuleInfo(f"m{i}", i, "q", 64, 64, False, False) for i in range(4)]
    curves = [np.linspace(1, 0, 65) ** (2 + i) for i in range(4)]
    for c in (0.9, 0.8, 0.6):
        uv, pv = greedy_ranks(infos, curves, c, "uv"), greedy_ranks(infos, curves, c, "pivoted")
        assert sum(module_params(i, pv[i.fqn], "pivoted") for i in infos) <= c * 4 * 64 * 64
        assert sum(module_params(i, pv[i.fqn], "pivoted") for i in infos) >= c * 4 * 64 * 64 - 128
        loss = lambda ranks: sum(float(cv[ranks[i.fqn]]) for i, cv in zip(infos, curves))
        assert loss(pv) < loss(uv)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tokenizer, tmp_path_factory):
    model, an, plan, _ = compress_tiny(request.param)
    plan = fasc.allocate(an, "fasc", param_ratio=0.8, factors="pivoted")
    small = __import__("copy").deepcopy(model)
    fasc.compress_(small, an, plan)
    out = fasc.save_compressed(small, tokenizer, tmp_path_factory.mktemp("piv") / "out", factors=plan.factors)
    return model, an, plan, small, out


IDS = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))


def test_pivoted_export_reloads_the_same_model_in_the_planned_parameters(exported):
    from transformers import AutoModelForCausalLM

    dense, an, plan, small, out = exported
    low = [m for m in small.modules() if isinstance(m, LowRankLinear)]
    assert low and any(m.rank * (m.in_features + m.out_features) >= m.in_features * m.out_features for m in low)
    fc = json.loads((out / "fasc_config.json").read_text())
    assert all(v[4:] == ["pivoted"] for v in fc["factored"].values())
    ref, _ = fasc.load_compressed(out)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert sum(isinstance(m, PivotedLowRankLinear) for m in ref.modules()) == len(low)
    assert sum(type(m).__name__ == "PivotedLowRankLinear" for m in hf.modules()) == len(low)
    kept, orig = plan.params(an)
    assert kept <= 0.8 * orig
    assert n_params(ref) == n_params(hf) == n_params(small) - sum(m.rank ** 2 for m in low) \
        == n_params(dense) - (orig - kept)                                        # what the budget counted
    with torch.no_grad():
        a, b, c = small(input_ids=IDS).logits, ref(input_ids=IDS).logits, hf(input_ids=IDS).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    torch.testing.assert_close(c, b, atol=1e-6, rtol=0)


def test_plan_json_keeps_its_factors_and_refuses_an_unknown_one(exported, tmp_path):
    _, an, plan, _, _ = exported
    plan.save(tmp_path / "p.json")
    again = fasc.load_plan(tmp_path / "p.json", an)
    assert again.factors == "pivoted" and again.params(an) == plan.params(an)
    d = plan.to_dict() | {"factors": "csr"}
    with pytest.raises(fasc.FascError, match="factors"):
        Plan.from_dict(d)
    old = {k: v for k, v in plan.to_dict().items() if k != "factors"}   # saved before the key existed: U, V
    assert Plan.from_dict(old).factors == "uv" and fasc.allocate(an, "fasc", param_ratio=0.8).factors == "pivoted"
    with pytest.raises(fasc.FascError, match="Unknown factor storage"):
        fasc.allocate(an, "fasc", param_ratio=0.8, factors="csr")


def test_cli_compress_factors_pivoted(capsys, common, tmp_path):
    res = {}
    for factors in ("uv", "pivoted"):    # pivoted is the default
        flag = ["--factors", factors] if factors == "uv" else []
        code, out, err = run(capsys, "compress", *common, "--param-ratio", "0.8", "--stages", "1", *flag,
                             "--out", str(tmp_path / factors), "--save-plan", str(tmp_path / f"{factors}.json"), "--json")
        assert code == 0, err
        res[factors] = json.loads(out)
    uv, pv = res["uv"], res["pivoted"]
    assert pv["param_ratio"] <= 0.8 and pv["predicted_delta_loss"] < uv["predicted_delta_loss"]
    model, _ = fasc.load_compressed(tmp_path / "pivoted")
    assert n_params(model) == pv["model_params_after"] < pv["model_params_before"]
    assert json.loads((tmp_path / "pivoted.json").read_text())["factors"] == "pivoted"
    assert json.loads((tmp_path / "uv.json").read_text())["factors"] == "uv"
