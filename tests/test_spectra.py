"""Property tests of spec §2–§4 on synthetic statistics and on a tiny real model."""

import numpy as np
import pytest
import torch

import fasc
from fasc.linalg import damp, tail_block_sums
from fasc.linalg_device import LinalgConfig
from fasc.spectra import (basis_asvd, basis_fasc, basis_pca, basis_svd, misalignment_curve, rho_from_sketch, whitening)

FLOAT64_SUM_ATOL = 1e-9  # float64 rounding of a sum of ~50 unit-size entries


def random_stats(n=12, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    G = torch.randn(400, m, generator=g, dtype=torch.float64)
    H = G @ W
    return W, X.T @ X / 400, H.T @ H / 400


def brute_dl(C_h, Cx, M):
    I = torch.eye(M.shape[0], dtype=M.dtype)
    return float(0.5 * torch.trace(C_h @ (I - M) @ Cx @ (I - M).T))


def test_tail_block_sums_matches_brute_force():
    E = torch.randn(7, 7, dtype=torch.float64)
    E = E + E.T
    T = tail_block_sums(E)
    for k in range(8):
        assert abs(float(T[k]) - float(E[k:, k:].sum())) < FLOAT64_SUM_ATOL
    assert float(T[7]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fasc_exact_tail_sum_identity(seed):
    """½ tr(C_h (I−M*) C_x (I−M*)ᵀ) equals ½ Σ_{i>k} λ_i for the FASC map, every k (γ = 0)."""
    W, Cx, Ch = random_stats(seed=seed)
    wh = whitening(Cx, 1e-4)
    Cxd, B, Bi = wh.Cx_d, wh.B, wh.B_inv
    b = basis_fasc(W, Ch, B, Bi, gamma=0.0)
    for k in range(0, 13):
        M = B @ b.Q[:, :k] @ b.Q[:, :k].T @ Bi.T
        assert brute_dl(Ch, Cxd, M) == pytest.approx(float(b.curve[k]), rel=1e-8, abs=1e-14)
        assert float(b.curve[k]) == pytest.approx(0.5 * float(b.values[k:].sum()), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("builder", ["svd", "pca", "asvd", "fasc_gamma"])
def test_predicted_curve_equals_brute_force_for_every_method(builder):
    W, Cx, Ch = random_stats(seed=3)
    wh = whitening(Cx, 1e-4)
    Cxd, B, Bi = wh.Cx_d, wh.B, wh.B_inv
    b = {"svd": lambda: basis_svd(W, Cxd, Ch), "pca": lambda: basis_pca(wh.mu, wh.V, Ch),
         "asvd": lambda: basis_asvd(W, Ch, B, Bi),
         "fasc_gamma": lambda: basis_fasc(W, Ch, B, Bi, gamma=0.7)}[builder]()
    for k in (1, 4, 8):
        U, V = b.factors(W, k)
        P = b.Q[:, :k] @ b.Q[:, :k].T
        M = P if b.B is None else b.B @ P @ b.B_inv.T
        assert torch.allclose(W @ M, U @ V.T, atol=1e-10)
        assert brute_dl(Ch, Cxd, M) == pytest.approx(float(b.curve[k]), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_variance_never_beats_fasc(seed):
    """ΔL_var(k) ≥ ΔL_fasc(k) and ΔL_asvd(k) ≥ ΔL_fasc(k) for every k (FASC is optimal, spec §3)."""
    W, Cx, Ch = random_stats(seed=seed)
    wh = whitening(Cx, 1e-4)
    Cxd, B, Bi = wh.Cx_d, wh.B, wh.B_inv
    f = basis_fasc(W, Ch, B, Bi, 0.0).curve
    for other in (basis_pca(wh.mu, wh.V, Ch).curve, basis_svd(W, Cxd, Ch).curve, basis_asvd(W, Ch, B, Bi).curve):
        assert torch.all(other >= f - 1e-12 * max(float(f[0]), 1e-30))


def test_singular_fisher_gives_no_nan():
    """GQA-like k/v projection (m < n) and dead units: C_h singular, nothing is NaN."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 16, generator=g, dtype=torch.float64)
    X = torch.randn(300, 16, generator=g, dtype=torch.float64)
    X[:, 3] = 0  # a dead input unit
    Hs = torch.randn(300, 4, generator=g, dtype=torch.float64) @ W
    Cx, Ch = X.T @ X / 300, Hs.T @ Hs / 300
    wh = whitening(Cx, 1e-4)
    B, Bi = wh.B, wh.B_inv
    for gamma in (0.0, 1.0):
        b = basis_fasc(W, Ch, B, Bi, gamma)
        U, V = b.factors(W, 2)
        assert torch.isfinite(U).all() and torch.isfinite(V).all() and torch.isfinite(b.curve).all()
    zero = basis_fasc(W, torch.zeros(16, 16, dtype=torch.float64), B, Bi, 0.0)
    assert torch.isfinite(zero.Q).all() and float(zero.curve.abs().max()) == 0.0


def test_whitening_falls_back_to_the_square_root_where_cholesky_fails():
    """A damped C_x that is not positive definite (here: an invalid, negative one) gets the symmetric
    square root from its (clamped) eigenpairs instead of a failed Cholesky: finite factors, B⁻ᵀ = B⁻¹."""
    wh = whitening(-torch.eye(5, dtype=torch.float64), 1e-4)
    assert wh.L is None
    assert torch.isfinite(wh.B).all() and torch.isfinite(wh.B_inv).all()
    assert torch.allclose(wh.B, wh.B.T) and torch.allclose(wh.B_inv @ wh.B, torch.eye(5, dtype=torch.float64))
    good = whitening(torch.eye(5, dtype=torch.float64), 1e-4)
    assert good.L is not None and torch.allclose(good.B @ good.B.T, good.Cx_d)


def test_large_gamma_gives_asvd():
    """γ → ∞: the shrunk FASC map equals whitened SVD (spec §3)."""
    W, Cx, Ch = random_stats(seed=4)
    wh = whitening(Cx, 1e-4)
    B, Bi = wh.B, wh.B_inv
    a = basis_asvd(W, Ch, B, Bi)
    f = basis_fasc(W, Ch, B, Bi, gamma=1e9)
    for k in (1, 3, 6):
        Ua, Va = a.factors(W, k)
        Uf, Vf = f.factors(W, k)
        assert torch.allclose(Ua @ Va.T, Uf @ Vf.T, atol=1e-6 * float(W.abs().max()))


def test_misalignment_zero_for_same_subspace_and_one_for_orthogonal():
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    same = fasc.spectra.Basis(Q, None, None, torch.zeros(7), torch.ones(6))
    assert np.allclose(misalignment_curve(Q, same).numpy(), 0, atol=1e-12)
    flipped = fasc.spectra.Basis(Q.flip(1), None, None, torch.zeros(7), torch.ones(6))
    mis = misalignment_curve(Q, flipped).numpy()
    assert mis[0] == pytest.approx(1.0) and mis[2] == pytest.approx(1.0) and mis[5] == pytest.approx(0.0, abs=1e-12)


def _sketch(X, H, s=64):
    from fasc.calibrate import sketch_directions
    om = sketch_directions(X.shape[1], s, 0)
    xp, hp = (X @ om).square(), (H @ om).square()
    return torch.stack([xp.mean(0), hp.mean(0), (xp * hp).mean(0)])


def test_rho_near_zero_for_independent_and_large_for_coupled():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    H = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    r_ind = rho_from_sketch(_sketch(X, H))
    assert float(r_ind.abs().mean()) < 0.05
    scale = torch.exp(torch.randn(20000, 1, generator=g, dtype=torch.float64))  # shared magnitude
    r_cpl = rho_from_sketch(_sketch(X * scale, H * scale))
    assert float(r_cpl.mean()) > 1.0


def test_damp_handles_zero_matrix():
    assert torch.isfinite(damp(torch.zeros(3, 3, dtype=torch.float64), 1e-4)).all()
    assert float(torch.linalg.eigvalsh(damp(torch.zeros(3, 3, dtype=torch.float64), 1e-4)).min()) > 0


def test_fisher_spectrum_and_misalignment_do_not_depend_on_gamma_or_order(llama, llama_stats):
    """The diagnostics are computed lazily (not when a basis is only compressed with); they must
    be the γ = 0 Fisher spectrum whatever γ is, and the same whether or not precompute ran."""
    f = "model.layers.1.mlp.down_proj"
    f64 = LinalgConfig(dtype="float64")    # a 1e-8 identity: float64 on every device
    an0 = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=0.0), linalg=f64)
    an1 = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=1.0), linalg=f64)
    lam0 = an0.basis(f, "fasc").values
    assert torch.allclose(an1.fisher_spectrum(f), lam0, rtol=1e-8, atol=1e-12 * float(lam0.max()))
    an1.factors(f, "fasc", 4)  # compressing computes neither diagnostic
    assert f not in an1.misalignments
    lazy = an1.misalignment(f)
    an2 = fasc.Analysis(llama, llama_stats, fasc.CompressConfig(gamma=1.0))
    an2.precompute(("fasc",))
    assert np.allclose(an2.misalignment(f), lazy) and (f, "fisher") in an2.summaries


def test_rho_report_needs_no_eigen_decomposition(llama, llama_stats, monkeypatch):
    """ρ comes from the calibration sketch alone (spec §4): `report(decompose=False)` gives the same ρ
    as the full report without any eigen-decomposition, and fills the rest once the modules are
    decomposed."""
    import fasc.analysis as A

    full = fasc.Analysis(llama, llama_stats).report(0.5)
    an = fasc.Analysis(llama, llama_stats)
    assert not an.decomposed()

    def forbidden(*a, **k):
        raise AssertionError("an eigen-decomposition ran")

    with monkeypatch.context() as m:
        for name in ("whitening", "basis_pca", "basis_fasc", "basis_fasc_wide", "basis_asvd_wide", "wide_side",
                     "fisher_spectrum", "fisher_spectrum_wide", "misalignment_curve", "misalignment_curve_eigen",
                     "pca_coordinates"):
            m.setattr(A, name, forbidden)
        lazy = an.report(0.5, decompose=False)
    assert [(r.fqn, r.rho, r.rho_signed, r.rank) for r in lazy] == [(r.fqn, r.rho, r.rho_signed, r.rank) for r in full]
    assert all(r.misalignment is None and r.dl_fasc is None and r.fisher_top_share is None for r in lazy)
    assert not an.decomposed()
    an.precompute()
    assert an.decomposed()
    assert an.report(0.5, decompose=False) == full


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_fasc_is_the_kronecker_factored_optimum_over_all_rank_k_weights(shape):
    """With C_h = Wᵀ C_g W (h = Wᵀg), fasc's γ = 0 map is the minimiser of ½ tr(C_g ΔW C_x ΔWᵀ) over *every*
    rank-k W′ (the generalized SVD C_g^{-1/2} [C_g^{1/2} W C_x^{1/2}]_k C_x^{-1/2}), not only among maps
    W M: no rank allocation of any other rank-k factorisation can beat its per-module predicted loss."""
    m, n = shape
    g = torch.Generator().manual_seed(7)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    Gs = torch.randn(300, m, generator=g, dtype=torch.float64) * torch.logspace(0, -1, m, dtype=torch.float64)
    C_x, C_g = X.T @ X / 300, Gs.T @ Gs / 300
    C_h = W.T @ C_g @ W
    wh = whitening(C_x, 1e-4)

    def kfac(Wp):
        E = W - Wp
        return 0.5 * float(torch.trace(C_g @ E @ wh.Cx_d @ E.T))

    def sqrt_inv(C):
        mu, V = torch.linalg.eigh(C)
        return (V * mu.sqrt()) @ V.T, (V / mu.sqrt()) @ V.T

    Gh, Gih = sqrt_inv(C_g)
    Xh, Xih = sqrt_inv(wh.Cx_d)
    U, S, Vh = torch.linalg.svd(Gh @ W @ Xh)
    b = basis_fasc(W, C_h, wh.B, None, 0.0)
    b.white = wh
    for k in range(1, min(m, n)):
        best = Gih @ (U[:, :k] * S[:k]) @ Vh[:k] @ Xih
        Uk, Vk = b.factors(W, k)
        ours = kfac(Uk @ Vk.T)
        assert ours == pytest.approx(kfac(best), rel=1e-9, abs=1e-12)
        assert ours == pytest.approx(float(b.curve[k]), rel=1e-9, abs=1e-12)
        for _ in range(3):   # any other rank-k weight is worse
            A = Uk + 0.05 * torch.randn(Uk.shape, generator=g, dtype=torch.float64)
            Bm = Vk + 0.05 * torch.randn(Vk.shape, generator=g, dtype=torch.float64) * Vk.abs().mean()
            assert kfac(A @ Bm.T) > ours
