"""Allocations of a parameter budget (spec §6): uniform, greedy and anchored; measured anchors."""

import copy

import numpy as np
import pytest
import torch

import fasc
from fasc.allocate import module_params, rank_ratio_cost, uniform_ranks
from fasc.anchors import Anchors, anchor_scale, anchors_cached, heldout_batches, measure_anchors, overlap
from fasc.data import make_batches

from helpers import make_text, random_batches


@pytest.fixture(scope="module")
def an(llama, llama_stats):
    return fasc.Analysis(llama, llama_stats, fasc.CompressConfig())


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_uniform_keeps_the_same_share_of_every_module(an, ratio):
    plan = fasc.allocate(an, "fasc", param_ratio=ratio, allocation="uniform", factors="uv")   # pivoted: test_pivoted
    for f, k in plan.ranks.items():
        i = an.info(f)
        assert k == max(1, round(ratio * i.params / (i.out_features + i.in_features)))
        # within one rank step of the target share
        assert abs(module_params(i, k, "uv") - ratio * i.params) <= (i.out_features + i.in_features) / 2 + 1e-9
    kept, total = plan.params(an)
    assert abs(kept / total - ratio) < 0.05
    assert plan.note["allocation"] == "uniform"


@pytest.mark.parametrize("ratio", [0.4, 0.7])
def test_greedy_predicts_less_loss_than_uniform_at_the_same_budget(an, ratio):
    greedy = fasc.allocate(an, "fasc", param_ratio=ratio)
    uniform = fasc.allocate(an, "fasc", param_ratio=ratio, allocation="uniform")
    kg, tot = greedy.params(an)
    ku, _ = uniform.params(an)
    assert kg <= ratio * tot + 1e-9
    # greedy is optimal for the predicted costs: at no more parameters than uniform (up to its rounding),
    # it predicts no more loss
    if kg <= ku:
        assert greedy.predicted(an) <= uniform.predicted(an) + 1e-12


def test_anchored_with_unit_scales_is_greedy_and_scales_move_ranks(an):
    greedy = fasc.allocate(an, "fasc", param_ratio=0.5)
    ones = {i.fqn: 1.0 for i in an.modules}
    assert fasc.allocate(an, "fasc", param_ratio=0.5, allocation="anchored", anchors=ones).ranks == greedy.ranks
    target = an.modules[0].fqn
    heavy = dict(ones, **{target: 10.0})
    anchored = fasc.allocate(an, "fasc", param_ratio=0.5, allocation="anchored", anchors=heavy)
    assert anchored.ranks[target] >= greedy.ranks[target]
    light = dict(ones, **{target: 0.1})
    assert fasc.allocate(an, "fasc", param_ratio=0.5, allocation="anchored",
                         anchors=light).ranks[target] <= greedy.ranks[target]


def test_attention_share_splits_the_budget_and_allocates_each_group_greedily(an):
    """`attention_share`: the attention modules keep that share of their parameters (up to the greedy
    rounding), the MLP modules the rest of the budget; inside each group the ranks are the group's own
    greedy allocation; shares that leave the MLP outside (0, 1] are one line naming the range."""
    from fasc.allocate import split_budget

    ratio, share = 0.6, 0.8
    plan = fasc.allocate(an, "fasc", param_ratio=ratio, attention_share=share)
    attn = [i for i in an.modules if not i.is_mlp]
    mlp = [i for i in an.modules if i.is_mlp]
    (ga, ra), (gm, rm) = split_budget(an.modules, ratio, share)
    assert ra == share and [an.modules[j] for j in ga] == attn and [an.modules[j] for j in gm] == mlp
    a, m = sum(i.params for i in attn), sum(i.params for i in mlp)
    assert abs(share * a + rm * m - ratio * (a + m)) < 1e-6 * (a + m)
    kept_a = sum(module_params(i, plan.ranks[i.fqn]) for i in attn)
    kept_m = sum(module_params(i, plan.ranks[i.fqn]) for i in mlp)
    assert kept_a <= share * a + 1e-9 and kept_a > share * a - max(i.out_features + i.in_features for i in attn)
    assert kept_m <= rm * m + 1e-9
    assert {f: plan.ranks[f] for f in (i.fqn for i in attn)} == \
        fasc.allocate(an, "fasc", param_ratio=share, modules="attention").ranks
    assert plan.note["attention_share"] == share
    greedy = fasc.allocate(an, "fasc", param_ratio=ratio)
    assert greedy.predicted(an) <= plan.predicted(an) + 1e-12   # one greedy allocation predicts no more loss
    with pytest.raises(fasc.FascError, match="attention share between"):
        fasc.allocate(an, "fasc", param_ratio=0.3, attention_share=1.0)
    with pytest.raises(fasc.FascError, match="--param-ratio"):
        fasc.allocate(an, "fasc", rank_ratio=0.5, attention_share=0.8)
    with pytest.raises(fasc.FascError, match=r"in \(0, 1\]"):
        fasc.allocate(an, "fasc", param_ratio=0.5, attention_share=1.5)


def test_allocation_errors_are_one_clear_line(an):
    with pytest.raises(fasc.FascError, match="Unknown allocation"):
        fasc.allocate(an, "fasc", param_ratio=0.5, allocation="ilp")
    with pytest.raises(fasc.FascError, match="param-ratio"):
        fasc.allocate(an, "fasc", rank_ratio=0.5, allocation="uniform")
    with pytest.raises(fasc.FascError, match="anchors"):
        fasc.allocate(an, "fasc", param_ratio=0.5, allocation="anchored")


def test_rank_ratio_cost_is_the_real_parameter_share(an):
    infos = an.modules
    plan = fasc.allocate(an, "fasc", rank_ratio=0.5)
    kept, total = plan.params(an)
    assert rank_ratio_cost(infos, 0.5) == pytest.approx(kept / total)
    assert rank_ratio_cost(infos, 1.0) == pytest.approx(1.0)


def test_uniform_ranks_is_pure_and_at_least_one(an):
    r = uniform_ranks(an.modules, 1e-6)
    assert set(r.values()) == {1}


def test_anchor_scale_is_clipped_and_neutral_without_prediction():
    assert anchor_scale(0.1, 0.2) == pytest.approx(2.0)
    assert anchor_scale(0.1, -0.5) == pytest.approx(0.1)      # noise below zero cannot zero a curve
    assert anchor_scale(0.1, 50.0) == pytest.approx(10.0)
    assert anchor_scale(0.0, 1.0) == 1.0


def test_measured_anchors_restore_the_model_and_match_one_module_compressed(llama, an, tokenizer):
    batches = random_batches(1, seed=5)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    mods_before = {n: type(m) for n, m in llama.named_modules()}
    a = measure_anchors(llama, an, "fasc", batches, share=0.5)
    assert {n: type(m) for n, m in llama.named_modules()} == mods_before
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())
    assert set(a.ranks) == {i.fqn for i in an.modules}
    # the measured value of one module equals compressing that module alone in a copy
    f = an.modules[-1].fqn
    plan = fasc.allocate(an, "fasc", ranks={f: a.ranks[f]})
    work = copy.deepcopy(llama)
    fasc.compress_(work, an, plan)
    from fasc.evaluate import target_loss
    assert a.measured[f] == pytest.approx(target_loss(work, batches) - target_loss(llama, batches), abs=1e-6)
    assert a.predicted[f] == pytest.approx(an.predicted(f, "fasc", a.ranks[f]))
    assert Anchors.from_dict(a.to_dict()).scales == a.scales


def test_anchors_are_cached_beside_the_statistics(llama, tmp_path, tokenizer):
    cfg = fasc.CalibConfig(n_tokens=600, seq_len=24)
    text = make_text(1500, seed=3)
    batches = make_batches(tokenizer, text, cfg)
    stats, _ = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    an2 = fasc.Analysis(llama, stats, fasc.CompressConfig())
    held = heldout_batches(tokenizer, [text], cfg, 200)
    assert overlap(held, batches) == 0.0
    calls = []
    a1, hit1 = anchors_cached(llama, an2, "asvd", held, root=tmp_path, progress=lambda i, n: calls.append(i))
    a2, hit2 = anchors_cached(llama, an2, "asvd", held, root=tmp_path, progress=lambda i, n: calls.append(i))
    assert (hit1, hit2) == (False, True) and a1.measured == a2.measured
    assert len(calls) == len(an2.modules)
    assert not list(tmp_path.rglob("*.incomplete"))
    assert np.isfinite(list(a1.scales.values())).all()


def test_qk_method_gives_queries_and_keys_their_own_basis_priced_by_its_curve(an):
    """`qk_method`: the query and key projections take their own method, and the greedy allocation prices
    them with that method's curve (not fasc's), so its plan predicts less loss than fasc's ranks with
    the q/k methods swapped afterwards."""
    from fasc.allocate import base_methods, check_request

    plan = fasc.allocate(an, "fasc", param_ratio=0.9, qk_method="asvd")
    qk = {f for f in plan.ranks if an.info(f).kind in ("q", "k")}
    assert qk and {plan.methods[f] for f in qk} == {"asvd"}
    assert {m for f, m in plan.methods.items() if f not in qk} == {"fasc"}
    assert plan.note["qk_method"] == "asvd"
    kept, total = plan.params(an)
    assert kept <= 0.9 * total
    swapped = fasc.allocate(an, "fasc", param_ratio=0.9)
    swapped.methods.update({f: "asvd" for f in qk})
    assert swapped.ranks != plan.ranks and plan.predicted(an) < swapped.predicted(an)
    assert fasc.allocate(an, "fasc", param_ratio=0.9, qk_method=None).methods == fasc.allocate(
        an, "fasc", param_ratio=0.9).methods
    assert base_methods("fasc", qk_method="asvd") == ("fasc", "asvd")
    assert base_methods("asvd", qk_method="asvd") == ("asvd",)
    with pytest.raises(fasc.FascError, match="Unknown method 'whiten' for the query/key projections"):
        check_request("fasc", param_ratio=0.5, qk_method="whiten")
