"""Sequential (error-aware) compression: the closed-form refit against brute-force least squares on
per-token inputs, module by module, on tiny models (spec §5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fasc
from fasc.calibrate import Cancelled
from fasc.data import Batch
from fasc.layers import LowRankLinear, PivotedLowRankLinear
from fasc.linalg_device import LinalgConfig
from fasc.sequential import compress_sequential_, refit_left

from helpers import VOCAB, tiny_model

RTOL = 1e-6


def padded_batches(n_batches: int = 3, bsz: int = 4, L: int = 20, seed: int = 0) -> list[Batch]:
    """Random token batches with right padding on some rows (padding must not count)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, VOCAB, (bsz, L), generator=g)
        attn = torch.ones_like(ids)
        attn[1, L - 6:] = 0
        attn[3, L - 3:] = 0
        ids[attn == 0] = 0
        tm = attn.bool().clone()
        tm[:, -1] = False
        tm[1, L - 7] = False
        tm[3, L - 4] = False
        out.append(Batch(ids, attn, tm))
    return out


def planned(model, method: str, rank_ratio: float, seed: int = 0, cfg: fasc.CompressConfig = fasc.CompressConfig()):
    """(batches, analysis, plan): `model` calibrated on padded batches and allocated at `rank_ratio`;
    float64 linear algebra (the tests check least-squares identities to 1e-8)."""
    batches = padded_batches(seed=seed)
    stats = fasc.calibrate(model, batches, fasc.CalibConfig(n_tokens=10_000, seq_len=20))
    an = fasc.Analysis(model, stats, cfg, linalg=LinalgConfig(dtype="float64"))
    return batches, an, fasc.allocate(an, method, rank_ratio=rank_ratio)


def test_refit_matches_lstsq():
    g = torch.Generator().manual_seed(1)
    m, n, k, T = 7, 9, 4, 200
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(T, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    Xt = X + 0.3 * torch.randn(T, n, generator=g, dtype=torch.float64)
    V = torch.randn(n, k, generator=g, dtype=torch.float64)
    U = refit_left(W, V, X.T @ Xt / T, Xt.T @ Xt / T, damping=0.0)
    ref = torch.linalg.lstsq(Xt @ V, X @ W.T).solution.T       # argmin_U Σ_t ‖W x_t − U Vᵀ x̃_t‖²
    torch.testing.assert_close(U, ref, rtol=RTOL, atol=1e-9)
    # the refit is the optimum: any perturbation fits worse
    err = lambda U_: float(((X @ W.T - Xt @ V @ U_.T) ** 2).sum())
    assert err(U) < err(U + 1e-3 * torch.randn(m, k, generator=g, dtype=torch.float64))
    # x = x̃: the refit of an asvd factor pair gives back its U (VᵀC V = I)
    C = X.T @ X / T
    an_U = refit_left(W, V, C, C, damping=0.0)
    torch.testing.assert_close(an_U, W @ C @ V @ torch.linalg.inv(V.T @ C @ V), rtol=RTOL, atol=1e-9)


def _inputs(model, fqns, batches) -> dict[str, torch.Tensor]:
    """Per-token inputs (counted tokens only) of each module, by brute force: (tokens, n) float64."""
    got = {f: [] for f in fqns}
    mods = dict(model.named_modules())
    handles = []
    for f in fqns:
        def hook(m, args, f=f):
            got[f].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64))
        handles.append(mods[f].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                idx = b.stat_mask.reshape(-1).nonzero().squeeze(1)
                n0 = {f: len(v) for f, v in got.items()}
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                for f in fqns:
                    assert len(got[f]) == n0[f] + 1
                    got[f][-1] = got[f][-1].index_select(0, idx)
    finally:
        for h in handles:
            h.remove()
    return {f: torch.cat(v) for f, v in got.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rebasis", [False, True])
def test_every_module_is_the_least_squares_fit_to_its_real_inputs(arch, rebasis):
    model = tiny_model(arch)
    batches, an, plan = planned(model, "fasc", 0.4, cfg=fasc.CompressConfig(damping=0.0, gamma=1.0))
    work = copy.deepcopy(model)
    compress_sequential_(work, an, plan, batches, rebasis=rebasis)
    mods = dict(work.named_modules())
    assert all(isinstance(mods[f], LowRankLinear) for f in plan.ranks)
    X = _inputs(model, list(plan.ranks), batches)          # dense inputs
    Xt = _inputs(work, list(plan.ranks), batches)          # the inputs the compressed modules really see
    moved = 0
    for f, k in plan.ranks.items():
        U, V = mods[f].U.detach().double(), mods[f].V.detach().double()
        if not rebasis:
            torch.testing.assert_close(V, an.factors(f, "fasc", k)[1], rtol=1e-5, atol=1e-6)
        ref = torch.linalg.lstsq(Xt[f] @ V, X[f] @ an.weight(f).T).solution.T
        torch.testing.assert_close(U, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        moved += int(not torch.allclose(X[f], Xt[f]))
    assert moved > 0                                       # later modules did see different inputs
    # the first layer's first group sees the dense inputs: with the dense basis, U is the plain one
    first = next(iter(plan.ranks))
    if not rebasis:
        torch.testing.assert_close(mods[first].U.detach().double(), an.factors(first, "fasc", plan.ranks[first])[0],
                                   rtol=1e-4, atol=1e-6)


def test_sequential_fits_the_calibration_outputs_better(llama):
    """Sum over modules of the output error ‖W x − W' x̃‖² on the calibration tokens: sequential
    (fitted to x̃) is below one-shot compression of the same plan."""
    batches, an, plan = planned(llama, "asvd", 0.3, seed=3)
    one, seq = copy.deepcopy(llama), copy.deepcopy(llama)
    fasc.compress_(one, an, plan)
    compress_sequential_(seq, an, plan, batches, rebasis=False)
    X = _inputs(llama, list(plan.ranks), batches)

    def err(model):
        Xt, mods = _inputs(model, list(plan.ranks), batches), dict(model.named_modules())
        return sum(float(((X[f] @ an.weight(f).T - Xt[f] @ mods[f].to_dense().detach().double().T) ** 2).sum())
                   for f in plan.ranks)
    assert err(seq) < err(one)


def test_cancel_and_errors_leave_the_model_as_it_was(llama):
    batches, an, plan = planned(llama, "fasc", 0.5)
    work = copy.deepcopy(llama)
    work.train()
    ref = llama(input_ids=batches[0].input_ids).logits
    with pytest.raises(Cancelled):
        compress_sequential_(work, an, plan, batches, progress=lambda i, n: i < 1 or False)
    assert not any(isinstance(m, LowRankLinear) for m in work.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in work.modules())
    assert work.training
    work.eval()
    torch.testing.assert_close(work(input_ids=batches[0].input_ids).logits, ref)
    with pytest.raises(fasc.FascError, match="calibration batches"):
        compress_sequential_(work, an, plan, [])
    fasc.compress_(work, an, plan)
    with pytest.raises(fasc.FascError, match="already compressed"):
        compress_sequential_(work, an, plan, batches)


def test_full_rank_plan_changes_nothing(llama):
    batches, an, plan = planned(llama, "fasc", 1.0)
    work = copy.deepcopy(llama)
    compress_sequential_(work, an, plan, batches)
    with torch.no_grad():
        torch.testing.assert_close(work(input_ids=batches[0].input_ids).logits,
                                   llama(input_ids=batches[0].input_ids).logits)


def test_cli_sequential_and_heal(capsys, saved_llama, tmp_path):
    import json

    from fasc.cli import main

    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    out_dir = tmp_path / "seq"
    code = main(["compress", *common, "--param-ratio", "0.6", "--heal-tokens", "256", "--heal-check-tokens", "64",
                 "--sequential", "--out", str(out_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["sequential"] == "refit" and res["heal"]["tokens"] >= 256
    h = res["heal"]   # checked on held-out tokens: the kept factors are the best point of the curve
    assert h["heldout_curve"][0] == [0, h["heldout_kl_before"]] and len(h["heldout_curve"]) >= 2
    assert h["heldout_kl_after"] == min(kl for _, kl in h["heldout_curve"]) and "held-out KL" in h["summary"]
    fc = json.loads((out_dir / "fasc_config.json").read_text())
    assert fc["sequential"] == "refit" and fc["heal"]["steps"] >= 1 and fc["heal"]["kept_tokens"] == h["kept_tokens"]
    code = main(["compress", *common, "--param-ratio", "0.6", "--heal-tokens", "64", "--heal-check-tokens", "0",
                 "--out", str(tmp_path / "unchecked"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "heldout_curve" not in json.loads(out)["heal"]
    code = main(["compress", *common, "--param-ratio", "0.6", "--heal-tokens", "64", "--heal-check-tokens", "1",
                 "--out", str(tmp_path / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and "--heal-check-tokens" in err and len(err.strip().splitlines()) == 1
    model, _ = fasc.load_model(str(out_dir))
    assert any(isinstance(m, PivotedLowRankLinear) for m in model.modules())     # the default storage
    code = main(["compress", *common, "--param-ratio", "0.6", "--heal-tokens", "64", "--merge", "--out",
                 str(tmp_path / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_heal_tokens_auto_heals_on_a_gpu_only(capsys, saved_llama, tmp_path):
    """`--heal-tokens auto` (the default): HEAL_TOKENS_GPU for a factored export of a CUDA model where it
    fits, 0 on the CPU (with a hint naming the flag), for merged exports and where the GPU memory it needs
    is not free; a bad value is one line naming the choices."""
    import json

    from fasc.cli import main
    from fasc.config import HEAL_TOKENS_GPU
    from fasc.heal import auto_heal_tokens

    assert auto_heal_tokens(torch.device("cuda", 1), need_bytes=10, free_bytes=10) == (HEAL_TOKENS_GPU, "")
    assert HEAL_TOKENS_GPU > 0
    tokens, why = auto_heal_tokens("cuda", need_bytes=11 * 2**30, free_bytes=10 * 2**30)
    assert tokens == 0 and "needs ≈ 11.0 GiB" in why and "10.0 GiB are free" in why
    assert auto_heal_tokens("cuda", merge=True) == auto_heal_tokens("cpu", merge=True) == (0, "")
    for dev in ("cpu", "meta"):
        tokens, why = auto_heal_tokens(dev)
        assert tokens == 0 and "off on the CPU" in why and f"--heal-tokens {HEAL_TOKENS_GPU}" in why
    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--param-ratio", "0.6"]
    code = main(["compress", *common, "--out", str(tmp_path / "a"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["heal_tokens"] == 0 and res["heal"] is None and "--heal-tokens" in res["heal_off"]
    assert json.loads((tmp_path / "a" / "fasc_config.json").read_text())["heal"] is None
    code = main(["compress", *common, "--out", str(tmp_path / "b")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"--heal-tokens {HEAL_TOKENS_GPU}" in out.splitlines()[-1] and "off on the CPU" in out
    code = main(["compress", *common, "--merge", "--out", str(tmp_path / "c")])
    out, err = capsys.readouterr()
    assert code == 0 and "healing" not in out
    with pytest.raises(SystemExit) as e:
        main(["compress", *common, "--heal-tokens", "lots", "--out", str(tmp_path / "d")])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and "expected 'auto' or a number of tokens" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heal_memory_counts_the_compressed_copy_and_adam(llama, dtype):
    """The estimate behind `--heal-tokens auto` on a GPU: the plan's factor counts are those of the
    compressed copy, and its size term is that copy's real size in bytes."""
    from fasc.heal import heal_memory_bytes

    model = copy.deepcopy(llama).to(dtype)
    batches, an, plan = planned(model, "fasc", 0.4, seed=4)
    plan.factors = "uv"         # the copy in memory holds U, V however the export stores them
    fac, replaced = plan.factored_params(an)
    work = copy.deepcopy(model)
    fasc.compress_(work, an, plan)
    low = [m for m in work.modules() if isinstance(m, LowRankLinear)]
    assert fac == sum(m.U.numel() + m.V.numel() for m in low) > 0
    assert replaced == sum(m.in_features * m.out_features for m in low)
    size = torch.empty((), dtype=dtype).element_size()
    state = fac * (size + 8 + (8 if dtype == torch.bfloat16 else 0))   # grad, Adam moments, float32 master + grad
    real = sum(p.numel() * p.element_size() for p in work.parameters())
    assert heal_memory_bytes(model, fac, replaced, seq_len=32, micro_batch=0) == real + state
    from fasc.heal import KL_LOGIT_COPIES
    from fasc.modules import find_linears

    act = 2 * 32 * sum(i.in_features + i.out_features for i in find_linears(model)) * size
    assert heal_memory_bytes(model, fac, replaced, seq_len=32) == real + state + act + KL_LOGIT_COPIES * 2 * 32 * VOCAB * 4


def test_restat_uses_the_method_on_the_compressed_inputs(llama):
    """refit=False: each module is the method's own factorization on C_x̃x̃ (W C̃ V (VᵀC̃V)⁻¹ = U for asvd)."""
    batches, an, plan = planned(llama, "asvd", 0.4, seed=4, cfg=fasc.CompressConfig(damping=0.0))
    work = copy.deepcopy(llama)
    compress_sequential_(work, an, plan, batches, refit=False)
    Xt = _inputs(work, list(plan.ranks), batches)
    mods = dict(work.named_modules())
    for f in plan.ranks:
        U, V = mods[f].U.detach().double(), mods[f].V.detach().double()
        ref = torch.linalg.lstsq(Xt[f] @ V, Xt[f] @ an.weight(f).T).solution.T   # fit W x̃ from x̃
        torch.testing.assert_close(U, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(fasc.FascError, match="one-shot"):
        compress_sequential_(copy.deepcopy(llama), an, plan, batches, rebasis=False, refit=False)


def test_refit_with_float32_linear_algebra(llama):
    """`--linalg-dtype float32 --sequential`: the float32 right factor meets the float64 refit (this
    mixed dtypes and failed before); the result is as good as the float64 run's (the loss on the
    calibration batches; single factors may differ where the tiny random model's spectrum has ties)."""
    from fasc.linalg_device import LinalgConfig

    batches = padded_batches(seed=5)
    stats = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=10_000, seq_len=20))

    def loss(model):
        with torch.no_grad():
            return sum(float(model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                   labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss) for b in batches)
    out = {}
    for dtype in ("float32", "float64"):
        an = fasc.Analysis(llama, stats, fasc.CompressConfig(), linalg=LinalgConfig(device="cpu", dtype=dtype))
        plan = fasc.allocate(an, "fasc", rank_ratio=0.5)
        work = copy.deepcopy(llama)
        compress_sequential_(work, an, plan, batches)
        out[dtype] = loss(work)
    dense = loss(llama)
    assert math.isfinite(out["float32"]) and out["float32"] != dense
    assert abs(out["float32"] - out["float64"]) <= 0.01 * abs(out["float64"] - dense) + 1e-6 * dense
