"""The linear-algebra device and precision (fasc.linalg_device) and the small-side solve for wide
modules (spec §3): same results as the n×n solve, no device leaks, dtype mixes handled in one place.

No GPU is available to this project's tests: the device logic is proven on the CPU by (a) running the
whole analysis under `torch.device("meta")` as the *default* device with the linear-algebra device
set to `cpu` explicitly — any tensor created without an explicit device (the bug class that breaks
on CUDA) lands on meta and fails — and (b) device/dtype resolution with a mocked CUDA runtime.
"""

import copy
import logging
import threading

import numpy as np
import pytest
import torch

import fasc
from fasc.errors import FascError
from fasc.linalg_device import LinalgConfig, Place, resolve_device, resolve_dtype
from fasc.spectra import (basis_asvd, basis_asvd_wide, basis_fasc, basis_fasc_wide, basis_pca, basis_pca_wide,
                          fisher_spectrum, fisher_spectrum_wide, misalignment_curve, misalignment_curve_eigen,
                          pca_coordinates, whitening, wide_ok, wide_side, Whitening)

from helpers import random_batches

METHODS = ("svd", "asvd", "pca", "fwsvd", "fasc")


def wide_stats(n=40, m=12, seed=0, dead_row=False):
    """W (m, n) with m < n and C_h = Wᵀ C_g W exactly, as autograd's h = Wᵀg gives."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    if dead_row:
        W[3] = 0
    X = torch.randn(500, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    H = torch.randn(500, m, generator=g, dtype=torch.float64) @ W
    return W, X.T @ X / 500, H.T @ H / 500


def same_map(b1, b2, W, k):
    U1, V1 = b1.factors(W, k)
    U2, V2 = b2.factors(W, k)
    return torch.allclose(U1 @ V1.T, U2 @ V2.T, atol=1e-9 * float(W.abs().max()))


@pytest.mark.parametrize("dead_row", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_small_side_fasc_equals_full_solve(gamma, dead_row):
    W, Cx, Ch = wide_stats(dead_row=dead_row)
    n, m = W.shape[1], W.shape[0]
    wh = whitening(Cx, 1e-4)
    ws = wide_side(W, Ch, wh.B, wh.Cx_d)
    assert wide_ok(ws) and ws.Z.shape == (n, m)
    full, small = basis_fasc(W, Ch, wh.B, wh.B_inv, gamma), basis_fasc_wide(ws, Ch, W, wh.B, wh.B_inv, gamma, n)
    assert small.Q.shape == (n, m) and small.curve.shape == full.curve.shape and small.values.shape == (n,)
    scale = float(full.curve[0])
    assert torch.allclose(small.curve, full.curve, atol=1e-10 * scale, rtol=0)
    assert torch.allclose(small.values, full.values, atol=1e-10 * float(full.values[0]), rtol=0)
    rank = m - 1 if dead_row else m
    for k in range(1, rank + 1):  # the same rank-k map (hence factors up to sign) wherever λ_k > λ_{k+1}
        assert same_map(full, small, W, k)
    q_full, q_small = full.Q[:, :rank], small.Q[:, :rank]
    assert torch.allclose(q_full, q_small, atol=1e-8)  # signs pinned the same way by both
    assert np.allclose(misalignment_curve(wh.V, small).numpy()[:rank],
                       misalignment_curve(wh.V, full).numpy()[:rank], atol=1e-8)
    if gamma == 0:
        assert torch.allclose(small.fisher_spectrum, fisher_spectrum(Ch, wh.B), atol=1e-10 * scale)


def test_small_side_asvd_and_fisher_spectrum_equal_full_solve():
    W, Cx, Ch = wide_stats(seed=1)
    n = W.shape[1]
    wh = whitening(Cx, 1e-4)
    ws = wide_side(W, Ch, wh.B, wh.Cx_d)
    full, small = basis_asvd(W, Ch, wh.B, wh.B_inv), basis_asvd_wide(ws, wh.B, wh.B_inv, n)
    assert torch.allclose(small.curve, full.curve, atol=1e-10 * float(full.curve[0]), rtol=0)
    assert torch.allclose(small.values, full.values, atol=1e-10 * float(full.values[0]), rtol=0)
    for k in (1, 5, W.shape[0]):
        assert same_map(full, small, W, k)
    lam = fisher_spectrum(Ch, wh.B)
    assert torch.allclose(fisher_spectrum_wide(ws, n), lam, atol=1e-10 * float(lam[0]))


def symmetric(wh: Whitening) -> Whitening:
    """The same C_x,δ whitened by its symmetric square root (the spec's B = C_x^{1/2}) instead of Cholesky."""
    return Whitening(wh.Cx_d, None, wh.shift)


def eigen(wh: Whitening) -> Whitening:
    """The same C_x,δ whitened by B = V diag(μ^{1/2}) from its eigenpairs (an analysis that needs them anyway)."""
    return Whitening(wh.Cx_d, None, wh.shift, eigen=True)


def test_small_side_pca_curve_equals_full_solve(llama, llama_stats):
    """pca's predicted curve of a wide module from the m×m side (Zt T0 Ztᵀ, no n³ product C_h V) equals
    the n×n one, whether the small side was whitened by the Cholesky factor or by the symmetric square
    root; so does a whole analysis with and without the small side."""
    W, Cx, Ch = wide_stats(seed=4)
    wh = whitening(Cx, 1e-4)
    assert wh.L is not None and wh._mu is None     # Cholesky; no eigen-decomposition until one is asked for
    full = basis_pca(wh.mu, wh.V, Ch)
    for w in (wh, symmetric(wh), eigen(wh)):
        ws = wide_side(W, Ch, w, w.Cx_d)
        small = basis_pca_wide(wh.mu, wh.V, ws, pca_coordinates(w, ws.Z))
        assert torch.equal(small.Q, full.Q) and torch.equal(small.values, full.values)
        assert torch.allclose(small.curve, full.curve, atol=1e-10 * float(full.curve[0]), rtol=0)
    on = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype="float64"))
    off = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype="float64", small_side=False))
    wide = [i.fqn for i in llama_stats.modules if i.out_features < i.in_features]
    assert wide
    for f in wide:  # real statistics: h = Wᵀg in float32, so C_h = Wᵀ C_g W up to float32 rounding
        a, b = on.curve(f, "pca"), off.curve(f, "pca")
        assert np.allclose(a, b, atol=1e-6 * b[0], rtol=0), f


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_any_whitening_factor_gives_the_same_maps(gamma, llama, llama_stats):
    """B = L (Cholesky) and B = C_x,δ^{1/2} (spec) differ by a rotation, B = C^{1/2} U: asvd and fasc
    give the same curves, spectra and rank-k weights with either, for narrow (n×n) and wide (m×m)
    modules; asvd on the shared (W B)ᵀ(W B) equals asvd from W B; and an asvd/fasc-only analysis does
    no n×n eigen-decomposition of C_x."""
    W, Cx, Ch = wide_stats(seed=3)
    wh = whitening(Cx, 1e-4)
    sq = symmetric(wh)
    assert torch.allclose(wh.B @ wh.B.T, wh.Cx_d, atol=1e-12 * float(wh.Cx_d.abs().max()))
    assert torch.allclose(wh.B_inv, torch.linalg.inv(wh.B).T, atol=1e-8 * float(wh.B_inv.abs().max()))
    n = W.shape[1]
    Wn, Chn = W[:, :10].contiguous(), Ch[:10, :10]        # 12 × 10 (m ≥ n)
    whn = whitening(Cx[:10, :10], 1e-4)
    ev = eigen(wh)
    assert torch.allclose(ev.B @ ev.B.T, ev.Cx_d, atol=1e-12 * float(ev.Cx_d.abs().max()))
    assert torch.allclose(ev.B_inv, torch.linalg.inv(ev.B).T, atol=1e-8 * float(ev.B_inv.abs().max()))
    X = torch.randn(n, 3, dtype=torch.float64)
    assert torch.allclose(eigen(wh).right(X), ev.B_inv @ X, atol=1e-10 * float(ev.B_inv.abs().max()))
    pairs = []
    for w in (wh, sq, ev):
        ws = wide_side(W, Ch, w, w.Cx_d)
        pairs.append((basis_asvd_wide(ws, w.B, w.B_inv, n), basis_fasc_wide(ws, Ch, W, w.B, w.B_inv, gamma, n),
                      basis_asvd(W, Ch, w.B, w.B_inv), basis_fasc(W, Ch, w.B, w.B_inv, gamma)))
    for other in pairs[1:]:
        for a, b in zip(pairs[0], other):
            scale = float(a.curve[0])
            assert torch.allclose(a.curve, b.curve, atol=1e-9 * scale, rtol=0)
            assert torch.allclose(a.values, b.values, atol=1e-9 * float(a.values[0]), rtol=0)
            for k in (1, 4, W.shape[0] - 1):
                assert same_map(a, b, W, k)
    for w in (whn, symmetric(whn), eigen(whn)):
        WB = Wn @ w.B
        a, b = basis_asvd(Wn, Chn, w.B, w.B_inv, AtA=WB.T @ WB), basis_asvd(Wn, Chn, w.B, w.B_inv)
        assert torch.allclose(a.curve, b.curve, atol=1e-12 * float(a.curve[0])) and same_map(a, b, Wn, 5)
    fn, sn = basis_fasc(Wn, Chn, whn.B, whn.B_inv, gamma), basis_fasc(Wn, Chn, symmetric(whn).B, symmetric(whn).B_inv, gamma)
    assert torch.allclose(fn.curve, sn.curve, atol=1e-9 * float(fn.curve[0]), rtol=0) and same_map(fn, sn, Wn, 5)

    an = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=gamma), linalg=LinalgConfig(device="cpu"))
    down = next(i.fqn for i in llama_stats.modules if i.kind == "down")
    for m in ("asvd", "fasc"):
        an.basis(down, m)
    assert an.whitening(down)._mu is None      # Cholesky only: no eigen-decomposition of C_x
    U, V = an.factors(down, "fasc", 4)        # V = B⁻ᵀ Q_k by a triangular solve
    assert U.shape[1] == V.shape[1] == 4 and an.whitening(down)._B_inv is None


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_eigen_whitening_shares_the_eigenpairs_and_changes_no_result(gamma, llama, llama_stats, monkeypatch):
    """An analysis that needs C_x's eigenpairs anyway (pca, misalignment) whitens by B = V diag(μ^{1/2}):
    it runs no Cholesky, and its pca / asvd / fasc curves, Fisher spectra and misalignments equal those of
    the Cholesky-whitened analysis computed method by method; so do its rank-k maps. The shortcuts
    (pca's curve from diag(Bᵀ C_h B), misalignment from the QR of diag(μ^{1/2}) Q) equal the general formulas."""
    cfg = fasc.CompressConfig(gamma=gamma)
    chol = fasc.Analysis(llama, llama_stats, cfg, linalg=LinalgConfig(device="cpu"))
    for f in llama_stats.fqns:
        for m in ("pca", "asvd", "fasc"):
            chol.basis(f, m)
        chol.fisher_spectrum(f), chol.misalignment(f)
    assert not chol.eigen_whitening
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    an = fasc.Analysis(llama, llama_stats, cfg, linalg=LinalgConfig(device="cpu"))
    an.precompute(("pca", "asvd", "fasc"), workers=1)
    assert an.eigen_whitening and not calls
    for key, s in chol.summaries.items():
        t = an.summaries[key]
        scale = max(float(s.values.abs().max()), 1e-300)
        assert torch.allclose(t.values, s.values, atol=1e-9 * scale, rtol=0), key
        if s.curve is not None:
            assert torch.allclose(t.curve, s.curve, atol=1e-9 * float(s.curve[0]), rtol=0), key
    for f in llama_stats.fqns:
        assert np.allclose(an.misalignment(f), chol.misalignment(f), atol=1e-7), f
        k = max(1, llama_stats.info(f).max_rank // 2)
        for m in ("asvd", "fasc"):
            U1, V1 = an.factors(f, m, k)
            U2, V2 = chol.factors(f, m, k)
            W = an.weight(f)
            assert torch.allclose(U1 @ V1.T, U2 @ V2.T, atol=1e-8 * float(W.abs().max())), (f, m)
    f = next(i.fqn for i in llama_stats.modules if i.out_features >= i.in_features)
    wh, b = an.whitening(f), an.basis(f, "fasc")
    assert wh.by_eigenpairs
    assert torch.allclose(misalignment_curve_eigen(wh.mu, b), misalignment_curve(wh.V, b), atol=1e-10)
    C_h = an.stats.ch[f].to(torch.float64)
    S = wh.B.T @ C_h @ wh.B
    assert torch.allclose(basis_pca(wh.mu, wh.V, C_h, S).curve, basis_pca(wh.mu, wh.V, C_h).curve,
                          atol=1e-10 * float(S.diagonal().sum()), rtol=0)


def test_statistics_not_of_the_form_WtCgW_are_detected():
    """A C_h with energy outside range(Wᵀ) (not from h = Wᵀg) must not take the small side."""
    W, Cx, _ = wide_stats(seed=2)
    X = torch.randn(300, W.shape[1], dtype=torch.float64)
    wh = whitening(Cx, 1e-4)
    assert not wide_ok(wide_side(W, X.T @ X / 300, wh.B, wh.Cx_d))


def test_analysis_small_side_matches_full_on_a_tiny_model(llama, llama_stats):
    """Every module and method of a tiny GQA Llama (k/v 32→16 and down 48→32 are wide): the same
    curves, spectra, misalignment and rank-k weights with and without the small side."""
    new = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=1.0),
                        linalg=LinalgConfig(device="cpu", dtype="float64"))
    old = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=1.0),
                        linalg=LinalgConfig(device="cpu", dtype="float64", small_side=False))
    wide = [i for i in llama_stats.modules if i.out_features < i.in_features]
    assert {i.kind for i in wide} >= {"k", "v", "down"}
    for an in (new, old):
        an.precompute(METHODS)
    for info in llama_stats.modules:
        f = info.fqn
        for m in METHODS:
            c_new, c_old = new.curve(f, m), old.curve(f, m)
            assert np.allclose(c_new, c_old, rtol=1e-6, atol=1e-6 * c_old[0]), (f, m)  # h = Wᵀg in float32
        assert np.allclose(new.fisher_spectrum(f), old.fisher_spectrum(f), rtol=1e-6,
                           atol=1e-6 * float(old.fisher_spectrum(f)[0]))
        assert np.allclose(new.misalignment(f), old.misalignment(f), atol=1e-6)
        k = max(1, info.max_rank // 2)
        for m in ("asvd", "fasc"):
            U1, V1 = new.factors(f, m, k)
            U2, V2 = old.factors(f, m, k)
            assert torch.allclose(U1 @ V1.T, U2 @ V2.T, atol=1e-8), (f, m)
    assert new.basis(wide[0].fqn, "fasc").Q.shape[1] == wide[0].out_features  # the m-column basis was used
    assert old.basis(wide[0].fqn, "fasc").Q.shape[1] == wide[0].in_features


def test_no_tensor_is_created_on_the_default_device(llama, llama_stats):
    """With the default device set to meta and the linear-algebra device to cpu, a tensor created
    without an explicit device (what breaks on CUDA) would be meta and fail: the whole analysis,
    every method, the diagnostics, factors and surgery run, and give the same numbers."""
    ref = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu"))
    ref.precompute(METHODS)
    small = copy.deepcopy(llama)
    with torch.device("meta"):  # a thread-local default: the serial path, so every call runs under it
        an = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu"))
        an.precompute(METHODS, workers=1)
        rows = an.report(0.5)
        plan = fasc.allocate(an, "fasc", param_ratio=0.6)
        fasc.compress_(small, an, plan)
        fb = an.fisher_basis(llama_stats.fqns[-1]).directions(4)
    assert fb.device.type == "cpu" and len(rows) == len(llama_stats.modules)
    for info in llama_stats.modules:
        for m in METHODS:
            assert np.array_equal(an.curve(info.fqn, m), ref.curve(info.fqn, m))
    assert all(p.device.type == "cpu" for p in small.parameters())
    ids = torch.randint(5, 90, (1, 12))
    assert torch.isfinite(small(ids).logits).all()


@pytest.fixture(scope="module")
def bf16_llama(llama):
    return copy.deepcopy(llama).to(torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_stats(bf16_llama):
    """Statistics of a bf16 model: float32 products summed in float64 (the CPU default)."""
    return fasc.calibrate(bf16_llama, random_batches(3), fasc.CalibConfig(n_tokens=10_000, seq_len=24))


@pytest.mark.parametrize("stats_dtype", [torch.float64, torch.float32])
def test_bf16_weights_with_float32_or_float64_statistics(bf16_llama, bf16_stats, stats_dtype):
    """Weights bf16, statistics float32 or float64, linear algebra float32 or float64 on an explicit
    device: one conversion point; float32 passes its measured check against float64 and agrees."""
    stats = copy.copy(bf16_stats)
    stats.cx = {k: v.to(stats_dtype) for k, v in bf16_stats.cx.items()}
    stats.ch = {k: v.to(stats_dtype) for k, v in bf16_stats.ch.items()}
    an64 = fasc.Analysis(bf16_llama, stats, linalg=LinalgConfig(device="cpu", dtype="float64"))
    an32 = fasc.Analysis(bf16_llama, stats, linalg=LinalgConfig(device="cpu", dtype="float32"))
    assert an32.place == Place(torch.device("cpu"), torch.float32)
    f = "model.layers.1.mlp.down_proj"
    k = 8
    U64, V64 = an64.factors(f, "fasc", k)
    U32, V32 = an32.factors(f, "fasc", k)
    assert U64.dtype == torch.float64 and U32.dtype == torch.float32 and an32.weight(f).dtype == torch.float32
    chk = an32.precision_checks[48]
    assert chk["dtype"] == "float32" and chk["module"] == f and chk["curve_rel_err"] <= 1e-3
    c32, c64 = an32.curve(f, "fasc"), an64.curve(f, "fasc")
    assert np.allclose(c32, c64, atol=1e-3 * c64[0], rtol=0)
    W = U64 @ V64.T
    assert float((U32.double() @ V32.double().T - W).norm() / W.norm()) < 1e-2
    small = copy.deepcopy(bf16_llama)
    fasc.compress_(small, an32, fasc.allocate(an32, "fasc", rank_ratio=0.5))
    low = [m for m in small.modules() if isinstance(m, fasc.LowRankLinear)]
    assert low and all(m.U.dtype == torch.bfloat16 and m.U.device.type == "cpu" for m in low)


def test_float32_failing_its_check_falls_back_to_float64(llama, llama_stats, caplog):
    """A tolerance no float32 result can meet: the checked width is computed in float64, with a
    one-line warning, and gives exactly the float64 numbers."""
    an = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype="float32", tol=1e-15))
    ref = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype="float64"))
    f = "model.layers.0.mlp.down_proj"
    with caplog.at_level(logging.WARNING, logger="fasc"):
        c = an.curve(f, "fasc")
    assert an.precision_checks[48]["dtype"] == "float64" and "float64" in caplog.text
    assert an.place_of(f).dtype == torch.float64
    assert np.array_equal(c, ref.curve(f, "fasc"))


class FakeCuda:
    """The torch.cuda calls `fasc.linalg_device` makes, for a machine with `count` GPUs."""

    def __init__(self, count, capability):
        self.count, self.capability = count, capability

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: self.capability)


def test_device_and_dtype_resolution(monkeypatch):
    FakeCuda(0, None).install(monkeypatch)
    # the CPU: float64 (float32 halves the time but lost up to 15 % of ΔL on SmolLM2's ill-conditioned inputs)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", torch.device("cpu")) == torch.float64
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(FascError, match="asks for a GPU but (none is visible|this torch .* is built without CUDA)"):
        resolve_device("cuda")
    with pytest.raises(FascError, match="not supported|Unknown"):
        resolve_device("tpu")
    FakeCuda(2, (9, 0)).install(monkeypatch)  # H100/H200 class
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float64
    with pytest.raises(FascError, match="only 2 GPU"):
        resolve_device("cuda:3")
    FakeCuda(1, (8, 9)).install(monkeypatch)  # a consumer GPU: float64 at 1/64 rate
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32
    assert resolve_dtype("float64", torch.device("cuda", 0)) == torch.float64
    with pytest.raises(FascError, match="linalg_dtype"):
        LinalgConfig(dtype="float16")


def test_cli_linalg_device_without_gpu_is_one_line(capsys, saved_llama, tmp_path):
    from fasc.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code = main(["report", "--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"),
                 "--tokens", "256", "--seq-len", "32", "--cache-dir", str(tmp_path / "c"), "--quiet",
                 "--linalg-device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--linalg-device cpu" in err


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parallel_precompute_equals_serial(llama, llama_stats, dtype):
    """Layers shared out over worker threads give bit-for-bit the serial results (every curve,
    spectrum, variance and misalignment), progress counts up to the total from the calling thread,
    and the intra-op thread count is restored."""
    threads = torch.get_num_threads()
    serial = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype=dtype))
    serial.precompute(METHODS, workers=1)
    par = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu", dtype=dtype))
    seen = []
    par.precompute(METHODS, workers=3, progress=lambda i, n: seen.append((i, n, threading.current_thread())))
    assert torch.get_num_threads() == threads
    assert set(par.summaries) == set(serial.summaries) and set(par.variance) == set(serial.variance)
    for key, s in serial.summaries.items():
        assert torch.equal(par.summaries[key].values, s.values), key
        assert (s.curve is None and par.summaries[key].curve is None) or torch.equal(par.summaries[key].curve, s.curve)
    for f, v in serial.misalignments.items():
        assert torch.equal(par.misalignments[f], v)
    for g, v in serial.variance.items():
        assert torch.equal(par.variance[g], v)
    total = len(llama_stats.fqns) * len(METHODS)
    assert [i for i, _, _ in seen] == sorted(i for i, _, _ in seen) and seen[-1][:2] == (total, total)
    assert len(seen) == len({i.layer for i in llama_stats.modules})  # one call per layer
    assert all(t is threading.main_thread() for _, _, t in seen)
    assert par.decomposed(METHODS)


def test_cancelled_parallel_precompute_stops_and_keeps_what_finished(llama, llama_stats):
    """A progress callback that raises (the dashboard's cancel) ends precompute with that error; the
    threads are restored and a later precompute completes the rest."""
    threads = torch.get_num_threads()
    an = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu"))

    def cancel(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        an.precompute(METHODS, workers=2, progress=cancel)
    assert torch.get_num_threads() == threads
    assert 0 < len(an.summaries) < len(llama_stats.fqns) * len(METHODS) + len(llama_stats.fqns)
    an.precompute(METHODS, workers=2)
    assert an.decomposed(METHODS)


def test_default_workers_follow_threads_and_memory(llama, llama_stats):
    an = fasc.Analysis(llama, llama_stats, linalg=LinalgConfig(device="cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert an.default_workers() == 1
        torch.set_num_threads(2)
        assert an.default_workers() == 2
    finally:
        torch.set_num_threads(threads)


def test_float32_condition_gate_sends_ill_conditioned_groups_to_float64(llama, llama_stats):
    """With almost no damping some inputs' C_x are ill-conditioned: float32 whitening would lose
    their weak directions, so those groups (and only those) are computed in float64, and their
    rank-k maps then match float64's; well-conditioned groups stay float32."""
    cfg = fasc.CompressConfig(damping=1e-9)
    a32 = fasc.Analysis(llama, llama_stats, cfg, linalg=LinalgConfig(device="cpu", dtype="float32"))
    a64 = fasc.Analysis(llama, llama_stats, cfg, linalg=LinalgConfig(device="cpu", dtype="float64"))
    a32.precompute(("fasc",), workers=2)
    bound = a32.linalg.tol / torch.finfo(torch.float32).eps
    conds = a32.group_conditions
    assert set(conds) == set(llama_stats.group.values())
    assert a32.float64_groups == {g for g, c in conds.items() if c > bound}
    assert a32.float64_groups and len(a32.float64_groups) < len(conds), conds   # the test needs both kinds
    for f in llama_stats.fqns:
        g = llama_stats.group[f]
        width_ok = a32._place_by_width[llama_stats.info(f).in_features].dtype == torch.float32
        want = torch.float32 if width_ok and g not in a32.float64_groups else torch.float64
        assert a32.place_of(f).dtype == want, f
        if want == torch.float64:   # the same computation as float64's
            k = max(1, llama_stats.info(f).max_rank // 2)
            U1, V1 = a32.factors(f, "fasc", k)
            U2, V2 = a64.factors(f, "fasc", k)
            torch.testing.assert_close(U1 @ V1.T, U2 @ V2.T, rtol=1e-9, atol=1e-12)
