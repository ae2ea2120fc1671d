"""Compressed copies built once and reused (`fasc.copies.CopyCache`): the cached copy gives the logits
and evaluation values of a copy built anew, the build runs once per key, the memory bound evicts the
least recently used; streamed greedy continuations equal the plain ones."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, random_batches, tiny_model

import fasc
from fasc.comparison import evaluate_plan
from fasc.copies import MIN_COPIES, CopyCache, copy_key, module_bytes
from fasc.generate import continuations, greedy_continuation, seconds_per_new_token, stream_continuations
from fasc.pipeline import compressed_copy

MB = 2**20


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    stats = fasc.calibrate(model, random_batches(2), fasc.CalibConfig(n_tokens=10_000, seq_len=24))
    an = fasc.Analysis(model, stats)
    plan = fasc.allocate(an, "fasc", param_ratio=0.5)
    return model, an, plan


def _key(plan, **opts) -> str:
    return copy_key("tiny@cpu", "calib", 0.0, plan.key(), **opts)


def test_cached_copy_equals_a_fresh_build_and_is_built_once(setup):
    model, an, plan = setup
    cache, calls = CopyCache(), []

    def build():
        calls.append(1)
        return compressed_copy(model, an, plan)

    x = torch.randint(0, VOCAB, (2, 16))
    first, healed = cache.get(_key(plan), build)
    again, _ = cache.get(_key(plan), build)
    fresh, _ = compressed_copy(model, an, plan)
    assert again is first and len(calls) == 1 and cache.builds_ == 1 and healed is None
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, fresh(input_ids=x).logits)
    # other options are another copy
    cache.get(_key(plan, merge=True), lambda: compressed_copy(model, an, plan, merge=True))
    assert cache.builds_ == 2 and _key(plan) != _key(plan, sequential="restat") != _key(plan, heal_tokens=64)


def test_evaluation_with_cached_copies_equals_building_anew(setup, tokenizer, tmp_path):
    model, an, plan = setup
    from helpers import make_text

    (tmp_path / "held.txt").write_text(make_text(400, seed=3))
    (tmp_path / "probe.jsonl").write_text('{"prompt": "the cat sat on the", "answer": "mat"}\n')
    args = (model, tokenizer, an, plan, tmp_path / "held.txt", tmp_path / "probe.jsonl")
    cache = CopyCache()

    def copies(p):
        return cache.get(_key(p), lambda: compressed_copy(model, an, p))

    fresh = evaluate_plan(*args, max_tokens=256)
    cached = evaluate_plan(*args, max_tokens=256, copies=copies)
    again = evaluate_plan(*args, max_tokens=256, copies=copies)
    assert cached == fresh == again and cache.builds_ == 2    # the plan and the baseline, built once each
    calls = []   # the uncompressed model's row given: it is not run again (the copies were built before the hook)
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert evaluate_plan(*args, max_tokens=256, copies=copies, reference=fresh[0]) == fresh and not calls
    finally:
        hook.remove()


def test_export_takes_the_cached_copy(setup, tokenizer, tmp_path):
    from fasc.pipeline import compress_and_save

    model, an, plan = setup
    cache = CopyCache()
    cache.get(_key(plan), lambda: compressed_copy(model, an, plan))
    res = compress_and_save(model, tokenizer, an, plan, tmp_path / "out",
                            copies=lambda p: cache.get(_key(p), lambda: compressed_copy(model, an, p)))
    assert cache.builds_ == 1 and res["modules"] == len(plan.ranks)
    loaded, _ = fasc.load_model(str(tmp_path / "out"))
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, cache.get(_key(plan), None)[0](input_ids=x).logits,
                              atol=1e-5)


def test_memory_bound_evicts_the_least_recently_used(setup):
    model, an, plan = setup
    size = module_bytes(model)
    free = {"bytes": 10 * size}
    cache = CopyCache(max_copies=4, free=lambda dev: free["bytes"])
    assert cache.limit(size) == 4                     # half of 10 copies' room, capped at 4
    free["bytes"] = size
    assert cache.limit(size) == MIN_COPIES             # a plan and its baseline always fit
    free["bytes"] = 6 * size
    assert cache.limit(size) == 3
    fake = [(tiny_model("llama"), None) for _ in range(4)]
    for i in range(3):
        cache.get(f"k{i}", lambda i=i: fake[i])
    cache.get("k0", None)                             # used again: k1 is now the oldest
    free["bytes"] = 6 * size - 3 * module_bytes(fake[0][0])   # what the held copies take is counted back
    cache.get("k3", lambda: fake[3])
    assert "k1" not in cache and {"k0", "k2", "k3"} <= {k for k in ("k0", "k1", "k2", "k3") if k in cache}
    assert len(cache) == 3 and cache.builds_ == 4


def test_a_failed_build_stores_nothing():
    cache = CopyCache()

    def boom():
        raise fasc.FascError("no")

    with pytest.raises(fasc.FascError):
        cache.get("k", boom)
    assert "k" not in cache and cache.builds_ == 0
    with pytest.raises(ValueError, match="memory_share"):
        CopyCache(memory_share=0)


def test_streamed_continuations_equal_the_plain_ones(llama, tokenizer):
    other = tiny_model("gpt2")
    models = {"a": llama, "b": other}
    prompts = ["the cat sat on", "a big red"]
    events = list(stream_continuations(models, tokenizer, prompts, 5))
    final = {}
    for i, name, text, _ in events:
        final[(i, name)] = text
    rows = continuations(models, tokenizer, prompts, 5)
    assert all(final[(i, n)] == rows[i][n] for i in range(2) for n in models)
    # decoded together (left-padded: the prompts differ in length), each prompt gets what it gets alone
    assert all(rows[i][n] == greedy_continuation(models[n], tokenizer, p, 5) for i, p in enumerate(prompts)
               for n in models)
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 2
    done = [d for *_, d in events]
    assert done == sorted(done) and done[-1] == 2 * 2 * 5          # tokens done reach the total
    assert [e[1] for e in events[:2]] == ["a", "b"]                  # the models take turns
    assert seconds_per_new_token(llama, tokenizer, 3) > 0
    with pytest.raises(fasc.FascError, match="No prompt"):
        list(stream_continuations(models, tokenizer, [], 4))


def test_sampled_continuations_follow_the_softmax(llama, tokenizer):
    """`sampled_continuations`: near temperature 0 it is greedy decoding; at temperature 1 the seed decides
    and the same seed gives the same tokens."""
    from fasc.generate import greedy_tokens, sampled_continuations

    prompts = [tokenizer(p)["input_ids"] for p in ("the cat sat on", "a big red")]
    cold = sampled_continuations(llama, prompts, 6, temperature=1e-6)
    assert cold == [list(greedy_tokens(llama, tokenizer, p, 6)) for p in ("the cat sat on", "a big red")]
    hot = sampled_continuations(llama, prompts, 6, seed=3)
    assert hot == sampled_continuations(llama, prompts, 6, seed=3) and hot != cold
    assert all(len(t) == 6 for t in hot)
    with pytest.raises(fasc.FascError, match="temperature"):
        sampled_continuations(llama, prompts, 6, temperature=0)
