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
