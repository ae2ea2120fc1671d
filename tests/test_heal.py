"""Healing: only the low-rank factors move, the KL to the dense model falls, cancel restores."""

from __future__ import annotations

import copy

import pytest
import torch

import fasc
from fasc.calibrate import Cancelled
from fasc.config import HEAL_STEP_TOKENS
from fasc.heal import (_kl_sum, balance_factors_, copy_positions, heal_, heldout_kl, kl_per_token, kl_weights,
                       step_groups, teacher_logits)
from fasc.layers import LowRankLinear

from helpers import random_batches


def _kl(model, dense, batches) -> float:
    with torch.no_grad():
        tot = sum(float(kl_per_token(dense(input_ids=b.input_ids).logits, model(input_ids=b.input_ids).logits,
                                     b.attention_mask.bool())) for b in batches)
    return tot / sum(int(b.attention_mask.sum()) for b in batches)


@pytest.fixture()
def compressed(llama, llama_stats):
    an = fasc.Analysis(llama, llama_stats, fasc.CompressConfig())
    work = copy.deepcopy(llama)
    fasc.compress_(work, an, fasc.allocate(an, "fasc", rank_ratio=0.3))
    return work


def test_balance_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    layer = LowRankLinear.from_factors(torch.randn(6, 3, generator=g) * 100, torch.randn(5, 3, generator=g) / 50)
    before = layer.to_dense().clone()
    balance_factors_(layer)
    torch.testing.assert_close(layer.to_dense(), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.U.norm(dim=0), layer.V.norm(dim=0), rtol=1e-5, atol=1e-6)


def test_heal_lowers_kl_and_trains_only_the_factors(llama, compressed):
    batches = random_batches(3, seed=5)
    frozen = {n: p.detach().clone() for n, p in compressed.named_parameters() if not n.endswith((".U", ".V"))}
    grads = {n: p.requires_grad for n, p in compressed.named_parameters()}
    dense_before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    before = _kl(compressed, llama, batches)
    res = heal_(compressed, llama, batches, tokens=3000, lr=3e-3)
    after = _kl(compressed, llama, batches)
    assert res.tokens >= 3000 and res.steps >= 1
    assert after < 0.8 * before
    for n, p in compressed.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert p.requires_grad == grads[n] and p.grad is None
    assert all(torch.equal(p, dense_before[n]) for n, p in llama.named_parameters())


def test_cancel_restores_factors_and_bad_input(llama, compressed):
    batches = random_batches(2, seed=6)
    ref = {n: p.detach().clone() for n, p in compressed.named_parameters()}
    with pytest.raises(Cancelled):
        heal_(compressed, llama, batches, tokens=5000, lr=1e-2, progress=lambda i, n: i == 0)
    assert all(torch.equal(p, ref[n]) for n, p in compressed.named_parameters())
    with pytest.raises(fasc.FascError, match="positive integer"):
        heal_(compressed, llama, batches, tokens=0)
    with pytest.raises(fasc.FascError, match="no low-rank factors"):
        heal_(copy.deepcopy(llama), llama, batches, tokens=10)


def test_heldout_checks_keep_the_factors_of_the_lowest_heldout_kl(llama, compressed):
    """The held-out KL is measured before, at `checks` points and at the end; what is kept is the
    best of them, and the model really has that held-out KL afterwards."""
    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    res = heal_(compressed, llama, train, tokens=3000, lr=3e-3, heldout=held, checks=4)
    xs = [t for t, _ in res.heldout_curve]
    assert xs[0] == 0 and xs[-1] == res.tokens and len(xs) == len(set(xs)) >= 4
    assert res.heldout_kl_after == min(kl for _, kl in res.heldout_curve) < res.heldout_kl_before
    assert res.kept_tokens > 0
    assert heldout_kl(compressed, llama, held) == pytest.approx(res.heldout_kl_after, rel=1e-5)
    d = res.to_dict()
    assert d["kept_tokens"] == res.kept_tokens and "held-out KL" in res.summary()


def test_heldout_checks_run_the_teacher_once(llama, compressed):
    """The teacher's held-out logits are computed once and reused by every check: the same KL as running
    the teacher each time, and the dense model sees the held-out text once, not once per check."""
    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    cached = teacher_logits(llama, held, micro_batch=2)
    assert all(t.device.type == "cpu" and t.ndim == 2 for t in cached)
    assert heldout_kl(compressed, llama, held, 2, cached) == pytest.approx(heldout_kl(compressed, llama, held, 2),
                                                                            rel=1e-6)
    assert heldout_kl(compressed, llama, held, 2, cached) == pytest.approx(_kl(compressed, llama, held), rel=1e-5)
    seen = []
    hook = llama.register_forward_hook(lambda m, a, k, out: seen.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        res = heal_(compressed, llama, train, tokens=1500, lr=3e-3, heldout=held, checks=4)
    finally:
        hook.remove()
    rows_held = sum(b.input_ids.shape[0] for b in held)
    rows_train = sum(b.input_ids.shape[0] for b in train)
    groups = step_groups(train, HEAL_STEP_TOKENS)
    steps_rows = sum(train[j].input_ids.shape[0] for i in range(res.steps) for j in groups[i % len(groups)])
    assert len(res.heldout_curve) >= 4 and rows_train > 0
    assert sum(seen) == rows_held + steps_rows        # held-out once; each training batch once per step's group


def test_healing_that_hurts_heldout_text_is_undone(llama, compressed):
    """A step size that makes the model worse on held-out text: the unhealed factors are kept."""
    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    before = {n: m.to_dense().detach().clone() for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    res = heal_(compressed, llama, train, tokens=2000, lr=0.5, heldout=held, checks=2)
    assert res.kept_tokens == 0 and res.heldout_kl_after == res.heldout_kl_before
    assert max(kl for _, kl in res.heldout_curve[1:]) > res.heldout_kl_before
    for n, m in compressed.named_modules():
        if isinstance(m, LowRankLinear):
            torch.testing.assert_close(m.to_dense(), before[n], rtol=1e-5, atol=1e-6)
    assert "unhealed factors kept" in res.summary()
    with pytest.raises(fasc.FascError, match="held-out"):
        heal_(compressed, llama, train, tokens=10, heldout=[])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_heal_in_half_precision_keeps_float32_steps(llama, compressed, dtype):
    """A bf16/fp16 model (`--dtype bfloat16` on a GPU) heals as far as the float32 one at the default
    learning rate: Adam's steps (≈ lr = 1e-4) are below a bf16 factor's resolution, so without float32
    master copies they round away and healing stalls (measured: 76 % of float32's gain after these
    12k tokens, a third after 40k)."""
    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    gains = {}
    for dt in (torch.float32, dtype):
        model, dense = copy.deepcopy(compressed).to(dt), copy.deepcopy(llama).to(dt)
        before = heldout_kl(model, dense, held)
        heal_(model, dense, train, tokens=12_000)
        assert all(p.dtype == dt and p.grad is None for p in model.parameters())
        gains[dt] = before - heldout_kl(model, dense, held)
    assert gains[torch.float32] > 0
    assert gains[dtype] == pytest.approx(gains[torch.float32], rel=0.1)


# ------------------------------------------------------------------------------------ block-local healing
def _compressed(model, ratio=0.3, seq_len=24):
    """A compressed copy of `model` (fasc, uniform rank ratio) from statistics on random batches."""
    st = fasc.calibrate(model, random_batches(3, L=seq_len), fasc.CalibConfig(n_tokens=10_000, seq_len=seq_len))
    an = fasc.Analysis(model, st, fasc.CompressConfig())
    work = copy.deepcopy(model)
    fasc.compress_(work, an, fasc.allocate(an, "fasc", rank_ratio=ratio))
    return work


def _llama(layers: int = 2, d: int = 32):
    import transformers as tf

    from helpers import VOCAB
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.LlamaForCausalLM(cfg).eval()


def _factors(model):
    return {n: (m.U.detach().clone(), m.V.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


def test_block_mode_on_one_block_is_global_healing():
    """With one decoder block, block-local healing trains that block on the KL through the frozen head from
    the embeddings, which the dense and compressed models share: the same loss, batches and steps as the
    global mode, so the same factors."""
    dense = _llama(layers=1)
    work = _compressed(dense)
    train = random_batches(3, seed=5)
    a, b = copy.deepcopy(work), copy.deepcopy(work)
    ra = heal_(a, dense, train, tokens=2000, lr=3e-3, mode="global")
    rb = heal_(b, dense, train, tokens=2000, lr=3e-3, mode="block")
    assert ra.steps == rb.steps and ra.tokens == rb.tokens and rb.blocks == 1
    assert rb.head_kl and rb.block_losses[0][1] == pytest.approx(_kl(b, dense, train), rel=1e-4)   # after: on its tokens
    fa, fb = _factors(a), _factors(b)
    for n in fa:
        torch.testing.assert_close(fb[n][0], fa[n][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fb[n][1], fa[n][1], rtol=1e-4, atol=1e-6)


def test_block_mode_lowers_each_blocks_error_and_trains_only_the_factors(llama, compressed):
    """Every block's loss falls, the model comes closer to the dense one, nothing but the factors moves,
    every flag is restored and the result says what was done."""
    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    frozen = {n: p.detach().clone() for n, p in compressed.named_parameters() if not n.endswith((".U", ".V"))}
    grads = {n: p.requires_grad for n, p in compressed.named_parameters()}
    dense_before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    before = _kl(compressed, llama, train)
    res = heal_(compressed, llama, train, tokens=3000, lr=3e-3, mode="block", loss="mse", head_kl=False)
    assert res.mode == "block" and res.blocks == 2 and res.tokens >= 3000 and res.steps >= 2
    assert res.kl_last < 0.8 * res.kl_first and not res.head_kl
    assert len(res.block_losses) == 2 and all(last < first for first, last in res.block_losses)
    assert _kl(compressed, llama, train) < before
    for n, p in compressed.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert p.requires_grad == grads[n] and p.grad is None
    assert all(torch.equal(p, dense_before[n]) for n, p in llama.named_parameters())
    d = res.to_dict()
    assert d["mode"] == "block" and d["blocks"] == 2 and d["cpu_seconds"] >= 0 and "block-local" in d["summary"]


def test_block_mode_heldout_checks_keep_the_best_prefix_of_blocks(llama, compressed):
    """The held-out KL after each healed block: the model keeps the best state (the first `kept_blocks`
    blocks healed, the others as they were) and really has that KL; a step size that hurts keeps none."""
    from helpers import tiny_model

    train, held = random_batches(3, seed=5), random_batches(2, seed=9)
    gpt2 = tiny_model("gpt2")   # (on the tiny Llama the blocks' errors fall but its held-out KL does not)
    work = _compressed(gpt2)
    res = heal_(work, gpt2, train, tokens=1500, lr=3e-3, heldout=held, checks=2, mode="block")
    assert [t for t, _ in res.heldout_curve] == [0, res.tokens, 2 * res.tokens]
    assert res.heldout_kl_after == min(kl for _, kl in res.heldout_curve) < res.heldout_kl_before
    assert res.kept_blocks == [kl for _, kl in res.heldout_curve].index(res.heldout_kl_after) > 0
    assert heldout_kl(work, gpt2, held) == pytest.approx(res.heldout_kl_after, rel=1e-5)
    before = _factors(compressed)
    res = heal_(compressed, llama, train, tokens=2000, lr=0.5, heldout=held, checks=2, mode="block")
    assert res.kept_blocks == 0 and res.heldout_kl_after == res.heldout_kl_before
    assert max(kl for _, kl in res.heldout_curve[1:]) > res.heldout_kl_before
    after = _factors(compressed)
    assert all(torch.equal(after[n][0], U) and torch.equal(after[n][1], V) for n, (U, V) in before.items())
    assert "unhealed factors kept" in res.summary()


def test_block_mode_cancel_and_bad_input(llama, compressed):
    """Cancel during the second block: every factor as it was (the first block's healing undone too)."""
    train = random_batches(2, seed=6)
    before = _factors(compressed)
    calls = []

    def progress(i, n):
        calls.append((i, n))
        return i < n // 2 + 100     # False once into the second block
    with pytest.raises(Cancelled):
        heal_(compressed, llama, train, tokens=1000, lr=1e-2, mode="block", progress=progress)
    assert calls[0] == (0, calls[0][1]) and calls[-1][0] >= calls[0][1] // 2
    after = _factors(compressed)
    assert all(torch.equal(after[n][0], U) and torch.equal(after[n][1], V) for n, (U, V) in before.items())
    assert all(p.grad is None for p in compressed.parameters())
    with pytest.raises(fasc.FascError, match="Unknown healing mode"):
        heal_(compressed, llama, train, tokens=10, mode="layer")
    with pytest.raises(fasc.FascError, match="block-local healing only"):
        heal_(compressed, llama, train, tokens=10, loss="mse")
    with pytest.raises(fasc.FascError, match="block-healing loss"):
        heal_(compressed, llama, train, tokens=10, mode="block", loss="l1")
    with pytest.raises(fasc.FascError, match="decoder blocks"):
        heal_(compressed, _llama(layers=3), train, tokens=10, mode="block")


def test_copy_positions_find_an_earlier_pair():
    """t is a copy position when (ids[t], top[t]) occurred as a pair (ids[s], ids[s+1]) with s < t; padding never."""
    ids = torch.tensor([[5, 7, 9, 5, 3, 7, 4, 4]])
    top = torch.tensor([[7, 1, 1, 7, 1, 9, 4, 4]])   # t=0: the pair (5, 7) lies at s=0, not before t; t=3, t=5: copies
    am = torch.ones_like(ids)                        # t=6: (4, 4) at s=6, not before; t=7: at s=6 — a copy
    assert copy_positions(ids, am, top).tolist() == [[False, False, False, True, False, True, False, True]]
    am[0, :2] = 0                                    # the pair (5, 7) is padding now, (7, 9) half padding
    assert copy_positions(ids, am, top).tolist() == [[False] * 7 + [True]]
    am = torch.ones_like(ids)
    am[0, 7] = 0
    assert copy_positions(ids, am, top)[0, 7].item() is False


def test_copy_weighted_kl_is_the_weighted_sum_with_the_plain_kls_size(llama, compressed):
    """`_kl_sum(copy_weight=W)` = Σ w_t KL_t with w = W at copy positions, 1 elsewhere, scaled to sum to the
    token count; W = 1 is the plain KL; the weights of a row that repeats itself fall on its second half."""
    g = torch.Generator().manual_seed(3)
    half = torch.randint(0, llama.config.vocab_size, (2, 12), generator=g)
    ids = torch.cat([half, half], 1)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    mask = am.bool()
    with torch.no_grad():
        tl, sl = llama(input_ids=ids, attention_mask=am).logits, compressed(input_ids=ids, attention_mask=am).logits
        plain = _kl_sum(compressed, llama, ids, am, mask)
        assert torch.allclose(_kl_sum(compressed, llama, ids, am, mask, 1.0), plain)
        kl_t = torch.stack([kl_per_token(tl[i:i + 1, j:j + 1], sl[i:i + 1, j:j + 1], mask[i:i + 1, j:j + 1])
                            for i, j in mask.nonzero().tolist()])
        assert torch.allclose(kl_t.sum(), plain, rtol=1e-4)
        w = kl_weights(ids, am, tl, mask, 20.0)
        assert w.shape == kl_t.shape and torch.isclose(w.sum(), torch.tensor(float(mask.sum())))
        assert torch.allclose(_kl_sum(compressed, llama, ids, am, mask, 20.0), (w * kl_t).sum(), rtol=1e-4)
    # a teacher whose top-1 always continues the first half: the second half's tokens are copies, weighted 20 : 1
    forced = torch.cat([half[:, 1:], half[:, :1]], 1).repeat(1, 2)
    fake = torch.nn.functional.one_hot(forced, llama.config.vocab_size).float()
    full = torch.ones_like(ids, dtype=torch.bool)
    assert copy_positions(ids, full.long(), forced)[:, 12:].all()
    w = kl_weights(ids, full.long(), fake, full, 20.0).view(2, 24)
    first = ~copy_positions(ids, full.long(), forced)[:, :12]
    assert first.any() and torch.allclose(w[:, 12:] / w[:, :12][first].max(), torch.tensor(20.0))
    assert torch.isclose(w.sum(), torch.tensor(48.0))


def test_heal_with_a_copy_weight_records_it_and_refuses_bad_ones(llama, compressed):
    batches = random_batches(2, seed=7)
    res = heal_(compressed, llama, batches, tokens=300, lr=1e-3, copy_weight=20)
    d = res.to_dict()
    assert d["copy_weight"] == 20.0 and "×20 at copy positions" in d["summary"]
    assert heal_(compressed, llama, batches, tokens=10, lr=1e-3).to_dict()["copy_weight"] == 1.0   # the default
    for bad in (0.5, float("nan"), "20", True):
        with pytest.raises(fasc.FascError, match="copy weight must be a number"):
            heal_(compressed, llama, batches, tokens=10, copy_weight=bad)
    with pytest.raises(fasc.FascError, match="heal with --heal-mode global"):
        heal_(compressed, llama, batches, tokens=10, mode="block", copy_weight=5)


def _peak_bytes(fn) -> int:
    """The peak of CPU tensor memory allocated by `fn()` above what was allocated before (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("d", [128, 256])
def test_block_memory_formula_against_the_measured_peak(d):
    """`heal_block_memory_bytes` against the peak tensor memory of a real block-local healing run, at two
    widths (on the CPU, where the saved copy of the factors is in the same memory: added to the formula);
    and what does not grow with depth: four blocks instead of two add the weights' copies only."""
    from fasc.heal import heal_block_memory_bytes, used_batches

    L, train = 64, random_batches(3, L=64, seed=5)
    measured, formula = {}, {}
    for layers in (2, 4):
        dense = _llama(layers=layers, d=d)
        work = _compressed(dense, seq_len=L)
        low = {n: m for n, m in work.named_modules() if isinstance(m, LowRankLinear)}
        fac = {n: m.U.numel() + m.V.numel() for n, m in low.items()}
        replaced = sum(m.in_features * m.out_features for m in low.values())
        copy_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
        positions = sum(b.input_ids.numel() for b in used_batches(train, 768))
        formula[layers] = (heal_block_memory_bytes(dense, fac, replaced, positions, seq_len=L) - copy_bytes
                           + 4 * sum(fac.values()))          # the factors' saved copy, on the CPU here
        # one batch a step (256 tokens): the optimizer state exists from the second batch's backward on, the steady
        # state of a long run that the formula prices (summing a step's batches' gradients adds no memory)
        measured[layers] = _peak_bytes(lambda: heal_(work, dense, train, tokens=768, lr=1e-3, mode="block",
                                                     step_tokens=256))
        assert 0.9 * measured[layers] <= formula[layers] <= 1.1 * measured[layers], (layers, formula, measured)
    grown = formula[4] - formula[2]
    assert grown == 4 * (sum(fac.values()) // 2)     # two more blocks' saved factors, nothing else
    assert measured[4] - measured[2] <= 1.2 * grown


@pytest.mark.parametrize("d", [128, 256])
def test_global_memory_formula_against_the_measured_peak(d):
    """`heal_memory_bytes` (global healing: every block's activations for the backward pass) against the
    peak tensor memory of a real global healing run at two widths and two depths (on the CPU the saved copy
    of the factors shares the memory: added to the formula)."""
    from fasc.heal import heal_memory_bytes

    L, train = 64, random_batches(3, L=64, seed=5)
    for layers in (2, 4):
        dense = _llama(layers=layers, d=d)
        work = _compressed(dense, seq_len=L)
        low = [m for m in work.modules() if isinstance(m, LowRankLinear)]
        fac = sum(m.U.numel() + m.V.numel() for m in low)
        replaced = sum(m.in_features * m.out_features for m in low)
        copy_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
        formula = heal_memory_bytes(dense, fac, replaced, seq_len=L) - copy_bytes + 4 * fac
        measured = _peak_bytes(lambda: heal_(work, dense, train, tokens=768, lr=1e-3, mode="global",
                                             step_tokens=256))   # one batch a step: as the block test
        assert 0.9 * measured <= formula <= 1.1 * measured, (layers, formula, measured)


def test_choose_heal_picks_the_mode_that_fits():
    """`--heal-tokens` × `--heal-mode` on a GPU with each mode's memory: auto is global where it fits, else
    block-local, else off with both figures; a given token count always heals; the CPU follows the
    measured default; a merged export is never healed."""
    from fasc.config import HEAL_TOKENS_GPU
    from fasc.heal import HEAL_MODE_CPU, choose_heal

    need = {"global": 12 * 2**30, "block": 4 * 2**30}
    gib = 2**30
    assert choose_heal("cuda", "auto", "auto", need, free_bytes=20 * gib) == (HEAL_TOKENS_GPU, "global", "")
    assert choose_heal("cuda", "auto", "auto", need, free_bytes=8 * gib) == (HEAL_TOKENS_GPU, "block", "")
    tokens, mode, why = choose_heal("cuda", "auto", "auto", need, free_bytes=2 * gib)
    assert tokens == 0 and "12.0 GiB global, 4.0 GiB block" in why and "2.0 GiB are free" in why
    assert choose_heal("cuda", "auto", "global", need, free_bytes=8 * gib)[0] == 0
    assert choose_heal("cuda", 500, "auto", need, free_bytes=2 * gib) == (500, "block", "")
    assert choose_heal("cuda", 500, "global", need, free_bytes=2 * gib) == (500, "global", "")
    assert choose_heal("cpu", 500, "auto") == (500, HEAL_MODE_CPU, "")
    assert choose_heal("cpu", 500, "block") == (500, "block", "")
    assert choose_heal("cpu", "auto", "block")[:2] == (0, "block") and "off on the CPU" in choose_heal("cpu", "auto", "block")[2]
    assert choose_heal("cuda", "auto", "auto", need, merge=True, free_bytes=20 * gib)[0] == 0
    with pytest.raises(fasc.FascError, match="Unknown healing mode"):
        choose_heal("cpu", 500, "layers")


def test_cli_heals_block_by_block_and_the_export_records_it(capsys, saved_llama, tmp_path):
    """`fasc compress --heal-mode block`: the export's fasc_config.json and the JSON line name the mode
    and the global mode is recorded as such."""
    import json

    from helpers import run_cli

    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--param-ratio", "0.6",
              "--heal-tokens", "300", "--json"]
    code, out, err = run_cli(capsys, "compress", *common, "--heal-mode", "block", "--out", str(tmp_path / "b"))
    assert code == 0, err
    res = json.loads(out)
    assert res["heal_mode"] == "block" and res["heal"]["mode"] == "block" and res["heal"]["blocks"] == 2
    meta = json.loads((tmp_path / "b" / "fasc_config.json").read_text())
    assert meta["heal"]["mode"] == "block" and "block-local" in meta["heal"]["summary"]
    assert meta["heal"]["heldout_curve"] is not None          # the held-out checks ran (default --heal-check-tokens)
    code, out, err = run_cli(capsys, "compress", *common, "--out", str(tmp_path / "g"))
    assert code == 0, err
    assert json.loads(out)["heal"]["mode"] == "global"
    assert json.loads((tmp_path / "g" / "fasc_config.json").read_text())["heal"]["mode"] == "global"
    with pytest.raises(SystemExit):
        run_cli(capsys, "compress", *common, "--heal-mode", "layers", "--out", str(tmp_path / "x"))
    assert "invalid choice" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # another healing text (--heal-data): the same compression, healed on other batches
    other = tmp_path / "other.txt"
    other.write_text("Question: What is the capital of France?\nAnswer: Paris.\n\n" * 60)
    code, out, err = run_cli(capsys, "compress", *common, "--heal-data", str(other), "--out", str(tmp_path / "q"))
    assert code == 0, err
    res = json.loads(out)
    assert res["heal_data"] == [str(other)] and res["heal"]["tokens"] >= 300
    assert json.loads((tmp_path / "q" / "fasc_config.json").read_text())["heal"]["text"] == str(other)
    assert "text" not in json.loads((tmp_path / "g" / "fasc_config.json").read_text())["heal"]
    assert res["heal"]["kl_first"] != json.loads((tmp_path / "g" / "fasc_config.json").read_text())["heal"]["kl_first"]
    # the dense model's own text (--heal-data generated), recorded as such; it stands alone
    code, out, err = run_cli(capsys, "compress", *common, "--heal-data", "generated", "--out", str(tmp_path / "s"))
    assert code == 0, err
    res = json.loads(out)
    assert res["heal_data"] == ["generated"] and res["heal"]["tokens"] >= 300
    assert json.loads((tmp_path / "s" / "fasc_config.json").read_text())["heal"]["text"] == "generated"
    code, out, err = run_cli(capsys, "compress", *common, "--heal-data", "generated", str(other),
                             "--out", str(tmp_path / "s2"))
    assert code != 0 and "stands alone" in err and not (tmp_path / "s2").exists()
    # the KL weighted at copy positions (--heal-copy-weight): recorded; block mode refuses it before any work
    code, out, err = run_cli(capsys, "compress", *common, "--heal-copy-weight", "20", "--out", str(tmp_path / "c"))
    assert code == 0, err
    meta = json.loads((tmp_path / "c" / "fasc_config.json").read_text())["heal"]
    assert meta["copy_weight"] == 20.0 and "×20 at copy positions" in meta["summary"]
    code, out, err = run_cli(capsys, "compress", *common, "--heal-mode", "block", "--heal-copy-weight", "20",
                             "--out", str(tmp_path / "c2"))
    assert code != 0 and "heal with --heal-mode global" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c2").exists()


def test_generated_healing_text_is_the_dense_models_own_continuation(saved_llama):
    """`fasc.heal_text.generated_batches`: rows shaped like the calibration rows, each its first tokens
    followed by what the dense model samples (reproducible by seed; another seed, other text)."""
    from fasc.data import make_batches
    from fasc.heal_text import generated_batches

    model, tok = fasc.load_model(str(saved_llama / "model"))
    cfg = fasc.CalibConfig(n_tokens=256, seq_len=32, batch_size=4)
    batches = make_batches(tok, (saved_llama / "calib.txt").read_text(), cfg)
    steps = []
    gen = generated_batches(model, batches, 200, prompt_tokens=8, progress=lambda d, t: steps.append((d, t)))
    rows = lambda bs: sorted(b.input_ids[r][b.attention_mask[r].bool()].tolist() for b in bs for r in range(len(b.input_ids)))
    src, new = rows(batches[:len(gen)]), rows(gen)
    assert [len(r) for r in new] == [len(r) for r in src] and sum(map(len, new)) >= 200
    assert sorted(r[:8] for r in new) == sorted(r[:8] for r in src)      # the calibration rows' first tokens
    assert new != src                                                     # then the model's own text
    assert rows(generated_batches(model, batches, 200, prompt_tokens=8)) == new
    assert rows(generated_batches(model, batches, 200, prompt_tokens=8, seed=1)) != new
    assert steps and steps[-1][0] == steps[-1][1]
    for b in gen:  # a position predicts the next real token
        assert torch.equal(b.target_mask[:, :-1], b.attention_mask[:, 1:].bool())
    with pytest.raises(fasc.FascError, match="positive number of tokens"):
        generated_batches(model, batches, 0)


def _pivoted_copy(model):
    """A copy of `model` whose `LowRankLinear` layers hold the same maps pivoted (R, P), as a loaded pivoted
    export does."""
    from fasc.layers import pivoted
    from fasc.surgery import replace_module

    work = copy.deepcopy(model)
    for f in [f for f, m in work.named_modules() if isinstance(m, LowRankLinear)]:
        replace_module(work, f, pivoted(work.get_submodule(f)))
    return work


@pytest.mark.parametrize("mode", ["global", "block"])
def test_a_pivoted_model_heals_its_R_and_P(llama, compressed, mode):
    """Healing trains R, P of `PivotedLowRankLinear` layers — nothing else moves, the KL falls — and cancel puts
    them back bit for bit."""
    from fasc.layers import PivotedLowRankLinear

    work = _pivoted_copy(compressed)
    layers = {n: m for n, m in work.named_modules() if isinstance(m, PivotedLowRankLinear)}
    assert layers and not any(isinstance(m, LowRankLinear) for m in work.modules())
    batches = random_batches(3, seed=5)
    torch.testing.assert_close(_kl(work, llama, batches), _kl(compressed, llama, batches), rtol=1e-3, atol=1e-6)
    ref = {n: p.detach().clone() for n, p in work.named_parameters()}
    with pytest.raises(Cancelled):
        heal_(work, llama, batches, tokens=5000, lr=1e-2, mode=mode, progress=lambda i, n: i == 0)
    assert all(torch.equal(p, ref[n]) for n, p in work.named_parameters())
    before = _kl(work, llama, batches)
    extra = {"loss": "mse", "head_kl": False} if mode == "block" else {}
    res = heal_(work, llama, batches, tokens=3000, lr=3e-3, mode=mode, **extra)
    assert res.steps >= 1 and _kl(work, llama, batches) < 0.9 * before
    moved = {n for n, p in work.named_parameters() if not torch.equal(p, ref[n])}
    assert moved and moved <= {f"{n}.{x}" for n in layers for x in ("R", "P")}
    assert all(p.grad is None for p in work.parameters())


def test_compressed_copy_heals_u_v_however_the_plan_is_stored(llama, llama_stats):
    """`compressed_copy` with healing trains U, V for a pivoted plan too (R, P heal less: docs/method.md §6); the
    export writes them pivoted."""
    from fasc.layers import PivotedLowRankLinear
    from fasc.pipeline import compressed_copy

    an = fasc.Analysis(llama, llama_stats, fasc.CompressConfig())
    batches = random_batches(2, seed=3)
    for factors in ("pivoted", "uv"):
        plan = fasc.allocate(an, "fasc", param_ratio=0.7, factors=factors)
        healed, res = compressed_copy(llama, an, plan, batches=batches, heal_tokens=200)
        assert res["tokens"] >= 200
        kinds = {type(m) for m in healed.modules() if isinstance(m, (LowRankLinear, PivotedLowRankLinear))}
        assert kinds == {LowRankLinear}, factors


def test_step_groups_sum_consecutive_batches_to_the_step_size():
    from fasc.data import Batch

    def batch(n):
        ones = torch.ones(1, n, dtype=torch.long)
        return Batch(ones, ones, ones.bool())

    batches = [batch(n) for n in (40, 40, 2048, 100, 30)]
    assert step_groups(batches, 2048) == [[0, 1, 2], [3, 4]]
    assert step_groups(batches, 1) == [[0], [1], [2], [3], [4]]
    assert step_groups(batches, 10**6) == [[0, 1, 2, 3, 4]]
    for bad in (0, -5, 1.5, True):
        with pytest.raises(fasc.FascError, match="tokens per step"):
            step_groups(batches, bad)


@pytest.mark.parametrize("mode", ["global", "block"])
def test_a_step_over_two_batches_is_one_step_on_both(llama, compressed, mode):
    """Summing two batches' gradients into one step (`step_tokens`) trains exactly as one batch holding both
    batches' rows, in either mode: the loss is the mean over the step's tokens."""
    from fasc.data import Batch

    a, b = random_batches(2, seed=5)
    both = Batch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.attention_mask, b.attention_mask]),
                 torch.cat([a.target_mask, b.target_mask]))
    n = int(both.attention_mask.sum())
    w1, w2 = copy.deepcopy(compressed), copy.deepcopy(compressed)
    r1 = heal_(w1, llama, [a, b], tokens=3 * n, lr=3e-3, mode=mode, step_tokens=n)
    r2 = heal_(w2, llama, [both], tokens=3 * n, lr=3e-3, mode=mode, step_tokens=1)
    assert r1.steps == r2.steps == (3 if mode == "global" else 3 * r1.blocks)
    assert r1.kl_first == pytest.approx(r2.kl_first, rel=1e-5)    # the step's mean over its tokens, not a sum
    f1, f2 = _factors(w1), _factors(w2)
    for k in f1:
        torch.testing.assert_close(f1[k][0], f2[k][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f1[k][1], f2[k][1], rtol=1e-4, atol=1e-6)
    r3 = heal_(copy.deepcopy(compressed), llama, [a, b], tokens=3 * n, lr=3e-3, mode=mode, step_tokens=1)
    assert r3.steps == 2 * r1.steps       # one step a batch
