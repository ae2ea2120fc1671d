"""The measured knowledge map against a brute-force loop; Spearman; Fisher energy; generation."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import fasc
from fasc.allocate import Plan
from fasc.data import Example, encode_example
from fasc.evaluate import answer_scores, fact_recall
from fasc.generate import continuations, greedy_continuation
from fasc.knowledge_map import (KnowledgeMap, average_ranks, energy_shares, facts_within, fisher_energy, focus_ratio,
                                knowledge_map, knowledge_map_cached, predictor_table, probe_calibration,
                                probe_subset, share_ranks, spearman)

from helpers import WORDS

FLOAT32_SWAP_ATOL = 1e-4  # dense W′ here vs LowRankLinear factors in compress_: float32 rounding of the product


@pytest.fixture(scope="module")
def probe():
    rng = random.Random(3)
    return [Example(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))),
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2))), f"r{i % 2}")
            for i in range(10)]


@pytest.fixture(scope="module")
def an(llama, llama_stats):
    return fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=0.5))


def _brute(model, tok, an, probe, ranks, methods):
    """Compress one module of a fresh copy with the public surgery, score the probe, move on."""
    encoded = [encode_example(tok, ex) for ex in probe]
    base = answer_scores(model, encoded)
    rows = []
    for f in ranks:
        work = copy.deepcopy(model)
        fasc.compress_(work, an, Plan({f: ranks[f]}, {f: methods[f]}))
        rows.append(answer_scores(work, encoded))
    return base, rows


def test_map_matches_brute_force_and_restores_model(llama, tokenizer, an, probe):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    types = {n: type(m) for n, m in llama.named_modules()}
    km = knowledge_map(llama, tokenizer, an, probe, share=0.3, method="asvd")
    ranks = share_ranks(an.modules, 0.3)
    (b_nll, b_ok), rows = _brute(llama, tokenizer, an, probe, ranks, {f: "asvd" for f in ranks})
    assert km.fqns == [i.fqn for i in an.modules] and km.ranks == [ranks[f] for f in km.fqns]
    torch.testing.assert_close(km.base_nll, b_nll)
    assert torch.equal(km.base_correct, b_ok)
    for j, (nll, ok) in enumerate(rows):
        torch.testing.assert_close(km.nll[j], nll, atol=FLOAT32_SWAP_ATOL, rtol=FLOAT32_SWAP_ATOL)
    # the map's figures are the means of the per-fact data
    kl = [float((n - b_nll).double().mean()) for n, _ in rows]
    assert km.knowledge_loss().tolist() == pytest.approx(kl, abs=FLOAT32_SWAP_ATOL)
    rd = [float(b_ok.double().mean() - ok.double().mean()) for _, ok in rows]
    assert [r["recall_drop"] for r in km.rows()] == pytest.approx(rd, abs=1e-9)
    assert any(abs(x) > 1e-3 for x in kl)  # compressing at 30 % does change the answers
    # the model is exactly as it was
    assert {n: type(m) for n, m in llama.named_modules()} == types
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_map_at_planned_ranks_and_first_token_recall(llama, tokenizer, an, probe):
    fq = [i.fqn for i in an.modules][:3]
    plan = Plan({f: 2 for f in fq}, {f: "fasc" for f in fq})
    km = knowledge_map(llama, tokenizer, an, probe, plan=plan)
    assert km.fqns == fq and km.methods == ["fasc"] * 3 and km.ranks == [2, 2, 2]
    rec = fact_recall(llama, tokenizer, probe)
    assert km.base_correct.tolist() == rec.correct
    effects = km.fact_effects(4)
    assert [d for _, d, _ in effects] == sorted((d for _, d, _ in effects), reverse=True)
    with pytest.raises(fasc.FascError, match="out of range"):
        km.fact_effects(10)


def test_cancel_restores_the_model(llama, tokenizer, an, probe):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(fasc.FascError, match="cancelled"):
        knowledge_map(llama, tokenizer, an, probe, share=0.5, progress=lambda d, n: d < 3)
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cache_roundtrip_and_key(llama, tokenizer, llama_stats, probe, tmp_path):
    stats = copy.copy(llama_stats)
    stats.key = "k" * 32
    (tmp_path / stats.key).mkdir()
    an = fasc.Analysis(llama, stats, fasc.CompressConfig())
    km, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, root=tmp_path)
    assert not hit
    files = sorted(p.name for p in (tmp_path / stats.key).iterdir())
    assert len(files) == 1 and files[0].startswith("kmap-") and files[0].endswith(".safetensors")
    km2, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, root=tmp_path)
    assert hit and km2.fqns == km.fqns and torch.equal(km2.nll, km.nll) and torch.equal(km2.correct, km.correct)
    # another share or probe is another entry; cached_only never measures
    assert knowledge_map_cached(llama, tokenizer, an, probe[:5], share=0.5, root=tmp_path, cached_only=True) == (None, False)
    assert knowledge_map_cached(llama, tokenizer, an, probe, share=0.4, root=tmp_path, cached_only=True) == (None, False)
    # a damaged entry is measured again, not loaded
    (tmp_path / stats.key / files[0]).write_bytes(b"garbage")
    _, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, root=tmp_path)
    assert not hit and not list((tmp_path / stats.key).glob(".*incomplete"))


@pytest.mark.parametrize("kw, msg", [({}, "exactly one"), ({"share": 0.5, "plan": Plan({}, {})}, "exactly one"),
                                     ({"share": 0.0}, "share must be in"), ({"share": 1.5}, "share must be in"),
                                     ({"plan": Plan({}, {})}, "no module"),
                                     ({"plan": Plan({"nope.q": 2}, {"nope.q": "fasc"})}, "without statistics")])
def test_bad_requests_are_one_line(llama, tokenizer, an, probe, kw, msg):
    with pytest.raises(fasc.FascError, match=msg) as e:
        knowledge_map(llama, tokenizer, an, probe, **kw)
    assert "\n" not in str(e.value)


def test_empty_probe_is_one_line(llama, tokenizer, an):
    with pytest.raises(fasc.FascError, match="no facts"):
        knowledge_map(llama, tokenizer, an, [], share=0.5)


def test_probe_subset_is_even_and_deterministic(probe):
    assert probe_subset(probe, None) == probe and probe_subset(probe, 99) == probe
    sub = probe_subset(probe, 4)
    assert sub == [probe[0], probe[2], probe[5], probe[7]]
    with pytest.raises(fasc.FascError, match="max-facts"):
        probe_subset(probe, 0)


def test_share_ranks_uniform_parameter_share(an):
    for info in an.modules:
        k = share_ranks([info], 0.5)[info.fqn]
        assert k == max(1, round(0.5 * info.params / (info.out_features + info.in_features)))


# ---------------------------------------------------------------------- Spearman
def test_spearman_matches_definition_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # ties: Pearson of average ranks, by hand: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = sum(rx) / 4, sum(ry) / 4
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(num / den)
    # monotone transforms do not change it; NaN pairs are dropped; constant → NaN
    rng = random.Random(0)
    a = [rng.random() for _ in range(30)]
    b = [x + rng.random() for x in a]
    assert spearman(a, b) == pytest.approx(spearman([math.exp(x) for x in a], [x ** 3 for x in b]))
    assert spearman(a + [math.nan], b + [1.0]) == pytest.approx(spearman(a, b))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_spearman_against_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    a = [rng.randint(0, 5) for _ in range(40)]
    b = [rng.randint(0, 5) for _ in range(40)]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


# ---------------------------------------------------------------------- Fisher energy
def test_fisher_energy_is_predicted_loss_of_removing_the_module(llama, llama_stats, an):
    E = fisher_energy(llama_stats)
    for info in an.modules[:4]:
        f = info.fqn
        C_x = llama_stats.cx[llama_stats.group[f]].double()
        C_h = llama_stats.ch[f].double()
        assert E[f] == pytest.approx(0.5 * float(torch.trace(C_h @ C_x)), rel=1e-9)
        # = the pca curve at k = 0 (every direction removed), up to the damping of C_x
        assert E[f] == pytest.approx(an.predicted(f, "pca", 0), rel=1e-3)
    sh = energy_shares(E)
    assert sum(sh.values()) == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in focus_ratio(E, E).values())
    doubled = {f: (2 * v if f == an.modules[0].fqn else v) for f, v in E.items()}
    r = focus_ratio(doubled, E)
    assert r[an.modules[0].fqn] > 1 > r[an.modules[1].fqn]


def test_probe_calibration_puts_the_loss_on_answers(llama, tokenizer, probe, tmp_path):
    cfg = fasc.CalibConfig(n_tokens=64, seq_len=16, temperature=2.0)
    ps, hit = probe_calibration(llama, tokenizer, probe, cfg, root=tmp_path)
    assert not hit and ps.config.targets == "answers" and ps.config.temperature == 2.0
    # every fact fits; statistics stop at each row's last target (its last token has none)
    assert ps.n_tokens == sum(len(encode_example(tokenizer, ex)[0]) - 1 for ex in probe)
    _, hit = probe_calibration(llama, tokenizer, probe, cfg, root=tmp_path)
    assert hit
    # a budget below the probe's size: evenly spaced facts that fit, never more tokens than the budget
    small, _ = probe_calibration(llama, tokenizer, probe, fasc.CalibConfig(n_tokens=20, seq_len=16), root=tmp_path)
    assert 0 < small.n_tokens < 20
    sub = facts_within(tokenizer, probe, 20)
    assert sub == probe_subset(probe, len(sub)) and sum(len(encode_example(tokenizer, e)[0]) for e in sub) <= 20
    bigger = probe_subset(probe, len(sub) + 1)
    assert sum(len(encode_example(tokenizer, e)[0]) for e in bigger) > 20


def test_predictor_table_lists_each_statistic(llama, tokenizer, an, llama_stats, probe):
    km = knowledge_map(llama, tokenizer, an, probe, share=0.3)
    E = fisher_energy(llama_stats)
    tab = predictor_table(km, an, E, E)
    names = [r["statistic"] for r in tab]
    assert names[0].startswith("ρ") and "Fisher energy, probe answers" in names
    assert all(r["n_modules"] == len(an.modules) for r in tab)
    kl = km.knowledge_loss().tolist()
    row = next(r for r in tab if r["statistic"] == "Fisher energy, general text")
    assert row["spearman_knowledge_loss"] == pytest.approx(spearman([E[f] for f in km.fqns], kl))
    assert "ρ along Fisher directions" not in names  # not measured on these statistics


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_continuation_is_argmax_decoding(arch, tokenizer):
    """The cached decoder (one token per step) gives the tokens of a full forward per step."""
    from helpers import tiny_model

    llama = tiny_model(arch)
    prompt = "the cat sat on"
    out = greedy_continuation(llama, tokenizer, prompt, 5)
    ids = tokenizer(prompt)["input_ids"]
    for _ in range(5):
        nxt = int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
    assert out == tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)
    rows = continuations({"dense": llama, "again": llama}, tokenizer, [prompt], 5)
    assert rows == [{"prompt": prompt, "dense": out, "again": out}]


@pytest.mark.parametrize("prompt, n, msg", [("", 4, "empty"), ("the cat", 0, "must be in"), ("the cat", 10**6, "must be in")])
def test_generation_errors_are_one_line(llama, tokenizer, prompt, n, msg):
    with pytest.raises(fasc.FascError, match=msg):
        greedy_continuation(llama, tokenizer, prompt, n)
    with pytest.raises(fasc.FascError, match="No prompt"):
        continuations({"dense": llama}, tokenizer, [], 4)


def test_saved_map_rejects_wrong_format(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "kmap-x.safetensors"
    save_file({"nll": torch.zeros(1, 1)}, str(p), metadata={"format": "99"})
    with pytest.raises(fasc.FascError, match="format"):
        KnowledgeMap.load(p)


# ---------------------------------------------------------------------- the fast engine: replay, subsets
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_replay_equals_the_loop_and_brute_force_on_a_subset(arch, tokenizer, probe):
    """Layers from the module's on, head at the answer positions only: the same rows as a full forward per
    module (the reference loop) and as compressing a fresh copy with the public surgery."""
    from helpers import random_batches, tiny_model

    from fasc.knowledge_map import _Replay, encode_probe, select_modules

    model = tiny_model(arch)
    stats = fasc.calibrate(model, random_batches(3), fasc.CalibConfig(n_tokens=2_000, seq_len=24))
    an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=0.5))
    _Replay(model, encode_probe(tokenizer, probe), stats.fqns)           # runs as a plain layer stack (no fallback)
    fq = [i.fqn for i in an.modules]
    sub = select_modules(fq, an.modules, layers=[1]) + [fq[0]]
    km = knowledge_map(model, tokenizer, an, probe, share=0.3, method="asvd", modules=sub, engine="replay")
    assert km.fqns == [f for f in fq if f in sub]                         # the map's order, not the request's
    loop = knowledge_map(model, tokenizer, an, probe, share=0.3, method="asvd", modules=sub, engine="loop")
    ranks = share_ranks(an.modules, 0.3)
    (b_nll, b_ok), rows = _brute(model, tokenizer, an, probe, {f: ranks[f] for f in km.fqns},
                                 {f: "asvd" for f in km.fqns})
    torch.testing.assert_close(km.base_nll, b_nll, atol=FLOAT32_SWAP_ATOL, rtol=FLOAT32_SWAP_ATOL)
    assert torch.equal(km.base_correct, b_ok) and torch.equal(km.correct, loop.correct)
    torch.testing.assert_close(km.nll, loop.nll, atol=FLOAT32_SWAP_ATOL, rtol=FLOAT32_SWAP_ATOL)
    for j, (nll, ok) in enumerate(rows):
        torch.testing.assert_close(km.nll[j], nll, atol=FLOAT32_SWAP_ATOL, rtol=FLOAT32_SWAP_ATOL)
        assert torch.equal(km.correct[j], ok)
    assert km.knowledge_loss().abs().max() > 1e-3


def test_subset_is_cut_from_a_stored_full_map_and_maps_merge(llama, tokenizer, llama_stats, probe, tmp_path):
    from fasc.knowledge_map import merge_maps

    stats = copy.copy(llama_stats)
    stats.key = "s" * 32
    (tmp_path / stats.key).mkdir()
    an = fasc.Analysis(llama, stats, fasc.CompressConfig())
    fq = [i.fqn for i in an.modules]
    part, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, modules=fq[3:5], root=tmp_path)
    assert not hit and part.fqns == fq[3:5]
    full, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, root=tmp_path)
    assert not hit and full.fqns == fq
    cut, hit = knowledge_map_cached(llama, tokenizer, an, probe, share=0.5, modules=fq[:2], root=tmp_path)
    assert hit and cut.fqns == fq[:2] and torch.equal(cut.nll, full.nll[:2])
    both = merge_maps(merge_maps(None, part, fq), cut, fq)
    assert both.fqns == fq[:2] + fq[3:5] and torch.equal(both.nll, full.nll[[0, 1, 3, 4]])
    with pytest.raises(fasc.FascError, match="not in the map"):
        knowledge_map(llama, tokenizer, an, probe, share=0.5, modules=["nope"])


def test_select_modules_and_layers(an):
    from fasc.knowledge_map import FastMap, parse_layers, select_modules

    fq = [i.fqn for i in an.modules]
    assert parse_layers("0-1", 2) == [0, 1] and parse_layers("1,0,1", 2) == [0, 1] and parse_layers(None, 2) is None
    assert select_modules(fq, an.modules, layers=[1]) == [f for f in fq if an.info(f).layer == 1]
    assert select_modules(fq, an.modules, kinds=["q", "down"]) == [f for f in fq if an.info(f).kind in ("q", "down")]
    pred = torch.arange(len(fq), dtype=torch.float32)                      # the last modules predicted worst
    z = pred[:, None].repeat(1, 2)
    fm = FastMap(fq, [1] * len(fq), ["asvd"] * len(fq), z, 2 * z, z, 2 * z, torch.zeros(2), 1.0)
    assert select_modules(fq, an.modules, top=3, fast=fm) == fq[-3:]
    assert select_modules(fq, an.modules, layers=[0], top=2, fast=fm) == [f for f in fq if an.info(f).layer == 0][-2:]
    for kw, msg in [({"layers": [5]}, "not in this model; its layers are 0 … 1"), ({"kinds": ["qkv"]}, "kinds are q, k"), ({"top": 3}, "needs the fast map"),
                    ({"top": 0, "fast": fm}, "whole number")]:
        with pytest.raises(fasc.FascError, match=msg) as e:
            if "layers" in kw:
                parse_layers("5", 2)
            else:
                select_modules(fq, an.modules, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(fasc.FascError, match="0-3,7"):
        parse_layers("a-b", 2)


def test_map_factors_once_in_parallel_equal_the_analysis(llama, an):
    from fasc.knowledge_map import map_factors

    fq = [i.fqn for i in an.modules][:8]
    ranks = share_ranks(an.modules, 0.3)
    one = map_factors(an, fq, ["asvd"] * 8, [ranks[f] for f in fq], workers=1)
    two = map_factors(an, fq, ["asvd"] * 8, [ranks[f] for f in fq], workers=2)
    for f in fq:
        U, V = an.factors(f, "asvd", ranks[f])
        torch.testing.assert_close(one[f][0], U.float())
        torch.testing.assert_close(two[f][1], V.float())
        torch.testing.assert_close(two[f][0] @ two[f][1].T, one[f][0] @ one[f][1].T)
    assert (fq[0], "asvd") in an.summaries                                  # the predicted ΔL curve is kept
    # an analysis that whitens by C_x's eigenpairs (after pca): the same maps W' = U Vᵀ
    eig = fasc.Analysis(llama, an.stats, an.cfg)
    eig._use_eigen_whitening()
    again = map_factors(eig, fq, ["asvd"] * 8, [ranks[f] for f in fq])
    for f in fq:
        U, V = eig.factors(f, "asvd", ranks[f])
        torch.testing.assert_close(again[f][0] @ again[f][1].T, (U @ V.T).float(), atol=1e-5, rtol=1e-4)



# ---------------------------------------------------------------------- the fast map
def _grad_stats(model, tok, probe, f, U, V, T=1.0):
    """Per fact, batch of one, full logits: g_t at the module's output by autograd, r_t = g_tᵀ ΔW x_t."""
    mod = dict(model.named_modules())[f]
    s, q = [], []
    for ex in probe:
        ids, start = encode_example(tok, ex)
        got = {}
        h1 = mod.register_forward_hook(lambda m, a, out: got.update(x=a[0].detach(), y=out) or out.retain_grad())
        try:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            h1.remove()
        lp = (logits[start - 1:len(ids) - 1] / T).log_softmax(-1)
        loss = -lp.gather(-1, torch.tensor(ids[start:])[:, None]).sum()
        loss.backward()
        W = mod.weight.detach()
        r = (got["y"].grad[0] * (got["x"][0] @ (U @ V.T - W).T)).sum(-1)[:len(ids) - 1]
        s.append(float(r.sum()))
        q.append(float((r * r).sum()))
    return torch.tensor(s), torch.tensor(q)


def test_fast_map_statistics_equal_a_direct_computation(llama, tokenizer, an, probe):
    from fasc.knowledge_map import fast_map

    fq = [i.fqn for i in an.modules]
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    fm = fast_map(llama, tokenizer, an, probe, share=0.3, method="asvd", temperature=2.0)
    assert fm.fqns == fq and fm.s.shape == (len(fq), len(probe)) and fm.temperature == 2.0
    ranks = share_ranks(an.modules, 0.3)
    work = copy.deepcopy(llama)
    for j in (0, 4, len(fq) - 1):
        U, V = an.factors(fq[j], "asvd", ranks[fq[j]])
        for T, (s_, q_) in [(1.0, (fm.s, fm.q)), (2.0, (fm.s_t, fm.q_t))]:   # the loss itself, and at T
            s, q = _grad_stats(work, tokenizer, probe, fq[j], U.float(), V.float(), T=T)
            torch.testing.assert_close(s_[j], s, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(q_[j], q, atol=1e-8, rtol=1e-4)
    assert not torch.equal(fm.q, fm.q_t)
    # the predictors are these per-fact sums' means; the model is as it was, flags included
    assert fm.predicted("fisher_token").tolist() == pytest.approx((0.5 * fm.q_t.double().mean(1)).tolist())
    assert fm.predicted("first_fisher").tolist() == pytest.approx((fm.s.double() + 0.5 * fm.q_t.double()).mean(1).tolist())
    assert fm.predicted("first_order").tolist() == pytest.approx(fm.s.double().mean(1).tolist())
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    with pytest.raises(fasc.FascError, match="Unknown fast predictor"):
        fm.predicted("nope")


def test_fast_map_first_order_is_the_derivative(llama, tokenizer, an, probe):
    """With ΔW = ε·D, s ≈ (nll(W + εD) − nll(W)) / ε … ε → 0 (first order of the answer loss, T = 1)."""
    from fasc.knowledge_map import fast_map

    f = an.modules[5].fqn
    W = dict(llama.named_modules())[f].weight.detach()
    D = torch.randn(W.shape, generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    plan = Plan({f: min(W.shape)}, {f: "svd"})
    fm = fast_map(llama, tokenizer, an, probe, plan=plan, temperature=1.0,
                  factors={f: (W + eps * D, torch.eye(W.shape[1]))})
    km = knowledge_map(llama, tokenizer, an, probe, plan=plan, factors={f: (W + eps * D, torch.eye(W.shape[1]))})
    fd = (km.nll[0].double() - km.base_nll.double())
    torch.testing.assert_close(fm.s[0].double(), fd, atol=2e-5, rtol=5e-2)


def test_fast_map_cache_and_spearman_with_the_exact_map(llama, tokenizer, llama_stats, probe, tmp_path):
    from fasc.knowledge_map import DEFAULT_FAST, FAST_PREDICTORS, FastMap, fast_map_cached, fast_vs_exact

    stats = copy.copy(llama_stats)
    stats.key = "f" * 32
    (tmp_path / stats.key).mkdir()
    an = fasc.Analysis(llama, stats, fasc.CompressConfig())
    assert fast_map_cached(llama, tokenizer, an, probe, share=0.4, root=tmp_path, cached_only=True) == (None, False)
    fm, hit = fast_map_cached(llama, tokenizer, an, probe, share=0.4, root=tmp_path)
    fm2, hit2 = fast_map_cached(llama, tokenizer, an, probe, share=0.4, root=tmp_path)
    assert not hit and hit2 and torch.equal(fm.s, fm2.s) and torch.equal(fm.q, fm2.q) and fm2.fqns == fm.fqns
    assert fm2.forward_seconds > 0 and fm2.forward_flops > 0
    assert fast_map_cached(llama, tokenizer, an, probe, share=0.4, temperature=3.0, root=tmp_path,
                           cached_only=True) == (None, False)                  # the temperature is in the key
    files = sorted(p.name for p in (tmp_path / stats.key).iterdir())
    assert len(files) == 1 and files[0].startswith("fmap-")
    with pytest.raises(fasc.FascError, match="not a knowledge map"):
        KnowledgeMap.load(tmp_path / stats.key / files[0])                     # a fast map is not an exact one
    with pytest.raises(fasc.FascError, match="not a knowledge map"):
        FastMap.load(_saved_exact(llama, tokenizer, an, probe, tmp_path))
    km = knowledge_map(llama, tokenizer, an, probe, share=0.4, modules=[i.fqn for i in an.modules][:6])
    rows = fast_vs_exact(fm, km)
    assert [r["predictor"] for r in rows] == list(FAST_PREDICTORS) and sum(r["default"] for r in rows) == 1
    row = next(r for r in rows if r["predictor"] == DEFAULT_FAST)
    v = fm.values()
    assert row["n_modules"] == 6 and row["spearman_knowledge_loss"] == pytest.approx(
        spearman([v[f] for f in km.fqns], km.knowledge_loss().tolist()))
    with pytest.raises(fasc.FascError, match="temperature"):
        fast_map_cached(llama, tokenizer, an, probe, share=0.4, temperature=0.0, root=tmp_path)



def test_factors_stored_once_beside_the_statistics(llama, llama_stats, tmp_path, monkeypatch):
    import fasc.knowledge_map as K

    stats = copy.copy(llama_stats)
    stats.key = "g" * 32
    (tmp_path / stats.key).mkdir()
    an = fasc.Analysis(llama, stats, fasc.CompressConfig())
    fq, ranks, methods = K._targets(an, None, 0.4, "asvd")
    got, hit = K.map_factors_cached(an, fq, methods, ranks, root=tmp_path)
    again, hit2 = K.map_factors_cached(an, fq, methods, ranks, root=tmp_path)
    assert not hit and hit2 and all(torch.equal(got[f][0], again[f][0]) and torch.equal(got[f][1], again[f][1])
                                    for f in fq)
    assert len(list((tmp_path / stats.key).glob("factors-*.safetensors"))) == 1
    monkeypatch.setattr(K, "FACTORS_MAX_BYTES", 10)                         # too big to keep: not stored
    K.map_factors_cached(an, fq[:3], methods[:3], ranks[:3], root=tmp_path)
    assert len(list((tmp_path / stats.key).glob("factors-*"))) == 1


def _saved_exact(model, tok, an, probe, tmp_path):
    p = tmp_path / "exact.safetensors"
    knowledge_map(model, tok, an, probe, share=0.4, modules=[an.modules[0].fqn]).save(p)
    return p


def test_cost_model_and_estimate(llama, tokenizer, an, probe):
    from fasc.knowledge_map import encode_probe, estimate_seconds, exact_flops, forward_flops, measure_gflops

    enc = encode_probe(tokenizer, probe)
    fq = [i.fqn for i in an.modules]
    full = forward_flops(llama, enc, fq)
    last = [f for f in fq if an.info(f).layer == 1]
    first = [f for f in fq if an.info(f).layer == 0]
    # a module of the last layer re-runs less than one of the first; the replay never exceeds the loop
    assert exact_flops(llama, enc, fq, last[:1]) < exact_flops(llama, enc, fq, first[:1]) <= 2 * full
    assert exact_flops(llama, enc, fq, fq) < exact_flops(llama, enc, fq, fq, engine="loop") == full * (len(fq) + 1)
    gf = measure_gflops(llama, enc, fq)
    assert gf > 0 and estimate_seconds(llama, enc, fq, fq, gf) == pytest.approx(exact_flops(llama, enc, fq, fq) / gf / 1e9)


# ---------------------------------------------------------------------- CLI: --fast and the subset options
def test_cli_fast_map_then_a_subset_measured_exactly(capsys, common, saved_llama):
    import json

    from helpers import run_cli

    probe = str(saved_llama / "probe.jsonl")
    base = ["report", *common, "--knowledge-map", "--probe", probe, "--share", "0.3"]
    code, out, err = run_cli(capsys, *base, "--fast", "--json")
    assert code == 0, err
    rep = json.loads(out)
    km = rep["knowledge_map"]
    assert km["fast"]["predictor"] and not km["fast"]["from_cache"] and "correlations" not in km
    assert all("predicted_knowledge_loss" in m and "knowledge_loss" not in m for m in rep["modules"])
    code, out, _ = run_cli(capsys, *base, "--fast")
    assert code == 0 and "Fast map" in out and "without --fast" in out
    # the two highest of the fast map, exactly: the estimate goes to stderr first (not with --quiet)
    loud = [a for a in base if a != "--quiet"]
    code, out, err = run_cli(capsys, *loud, "--map-top", "2", "--json")
    assert code == 0 and "exact map: 2 modules × 3 facts" in err and "(estimated)" in err
    rep = json.loads(out)
    km = rep["knowledge_map"]
    measured = [m for m in rep["modules"] if "knowledge_loss" in m]
    top = sorted(rep["modules"], key=lambda m: -m["predicted_knowledge_loss"])[:2]
    assert km["fast"]["from_cache"] and km["n_measured"] == 2 and {m["fqn"] for m in measured} == {m["fqn"] for m in top}
    assert km["estimated_seconds"] > 0 and km["seconds"] > 0 and km["fast"]["vs_exact"][0]["n_modules"] == 2
    code, out, _ = run_cli(capsys, *base, "--map-kinds", "down", "--map-layers", "1")
    assert code == 0 and "Exact map: 1 modules" in out and out.count("—") == 3 * 13


@pytest.mark.parametrize("extra, msg", [
    (["--fast", "--map-top", "3"], "--fast predicts every module"),
    (["--map-kinds", "qkv"], "kind 'qkv' is not in the map"),
    (["--map-layers", "7"], "Layer 7 is not in this model"),
    (["--map-layers", "x"], "not a list like 0-3,7"),
    (["--map-top", "0"], "whole number"),
])
def test_cli_map_options_errors_are_one_line(capsys, common, saved_llama, extra, msg):
    from helpers import run_cli

    code, out, err = run_cli(capsys, "report", *common, "--knowledge-map", "--probe", str(saved_llama / "probe.jsonl"),
                             *extra)
    assert code == 2 and out == "" and msg in err and err.count("\n") == 1


def test_cli_map_options_need_the_flag(capsys, common):
    from helpers import run_cli

    code, _, err = run_cli(capsys, "report", *common, "--fast")
    assert code == 2 and "belong to --knowledge-map" in err
