"""Subspaces, spectra and predicted loss (spec §2, §3, §5) as pure functions, float64.

Every method of spec §5 keeps an input-side map of the same form,
    W' = W M,   M = B Q_k Q_kᵀ B⁻¹   (B = I or C_x^{1/2}, Q orthonormal, Q_k its first k columns),
so W' = U Vᵀ with U = W B Q_k (m,k) and V = B⁻ᵀ Q_k (n,k), and the decoupled loss of spec §2 for
every k follows from one n×n matrix:
    ΔL(k) = ½ tr(C_h (I−M) C_x (I−M)ᵀ) = ½ Σ_{i,j>k} (Qᵀ Bᵀ C_h B Q)_{ij} (Qᵀ B⁻¹ C_x B⁻ᵀ Q)_{ij}.
| method | B          | Q (right singular / eigen vectors of) |
| svd    | I          | W                                     |
| pca    | I          | C_x                                   |
| fwsvd  | I          | diag(r)^{1/2} W                       |
| asvd   | C_x^{1/2}  | W B                                   |
| fasc   | C_x^{1/2}  | B C_h(γ) B, C_h(γ) = C_h + γ tr(C_h)/‖W‖² WᵀW |
For fasc at γ = 0 the two factors are diag(λ) and I, hence ΔL_fasc(k) = ½ Σ_{i>k} λ_i exactly.
C_x is damped (C + δ tr(C)/n I) wherever it appears, C_h never (spec §3), so that fasc is exactly
optimal among all rank-k maps for the same objective: ΔL_var(k) ≥ ΔL_fasc(k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import LINALG_DTYPE, damp, eigh_desc, right_singular_vectors, suffix_sum, tail_block_sums


@dataclass
class Basis:
    """An ordered basis Q of input space under a whitening B; the rank-k map is B Q_k Q_kᵀ B⁻¹.

    Attributes:
        Q: (n, n) orthonormal columns, most important first.
        B, B_inv: (n, n) whitening and its inverse, or None for the identity.
        curve: (n+1,) predicted ΔL(k), k = 0..n, nats per token (decoupled surrogate).
        values: (n,) the ordering values (singular values², eigenvalues) for display.
    """

    Q: Tensor
    B: Tensor | None
    B_inv: Tensor | None
    curve: Tensor
    values: Tensor
    fisher_spectrum: Tensor | None = None  # fasc with γ = 0 only: λ of C_x^{1/2} C_h C_x^{1/2} (= values)

    def factors(self, W: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(U, V) with W' = U Vᵀ: U = W B Q_k (m,k), V = B⁻¹ Q_k (n,k) (B symmetric)."""
        Qk = self.Q[:, :k]
        W = W.to(LINALG_DTYPE)
        if self.B is None:
            return W @ Qk, Qk.clone()
        return W @ (self.B @ Qk), self.B_inv @ Qk

    def directions(self, s: int) -> Tensor:
        """The first s kept input directions B q_i, unit-normalised, (n, s) — for ρ along them."""
        D = self.Q[:, :s] if self.B is None else self.B @ self.Q[:, :s]
        return D / D.norm(dim=0, keepdim=True).clamp_min(1e-300)


@dataclass
class Whitening:
    """C_x,δ = C_x + δ tr(C_x)/n I, its eigenpairs (μ desc, V) and B = C_x,δ^{1/2}, B⁻¹ (all float64)."""

    Cx_d: Tensor
    mu: Tensor
    V: Tensor
    B: Tensor
    B_inv: Tensor


def whitening(C_x: Tensor, damping: float) -> Whitening:
    """One eigen-decomposition of the damped C_x gives the variance basis and both square roots."""
    Cd = damp(C_x.to(LINALG_DTYPE), damping)
    mu, V = eigh_desc(Cd)
    mu = mu.clamp_min(float(mu.max().clamp_min(1e-300)) * 1e-15)
    s = mu.sqrt()
    return Whitening(Cd, mu, V, (V * s) @ V.T, (V / s) @ V.T)


def predicted_curve(Cx_d: Tensor, C_h: Tensor, Q: Tensor, B: Tensor | None = None,
                    B_inv: Tensor | None = None) -> Tensor:
    """ΔL(k) for k = 0..n of the map B Q_k Q_kᵀ B⁻¹ (spec §2 decoupled), (n+1,). O(n³) once, O(1) per k.

    The general case needs the full tail-block sums; when B = C_x,δ^{1/2} the second factor is I and
    only diag(Qᵀ B C_h B Q) matters (see `whitened_curve`).
    """
    C_h = C_h.to(LINALG_DTYPE)
    if B is None:
        Hq, Xq = Q.T @ C_h @ Q, Q.T @ Cx_d @ Q
    else:
        BQ, BiQ = B @ Q, B_inv @ Q
        Hq, Xq = BQ.T @ C_h @ BQ, BiQ.T @ Cx_d @ BiQ
    return 0.5 * tail_block_sums(Hq * Xq).clamp_min(0)


def diagonal_curve(weights: Tensor) -> Tensor:
    """½ Σ_{i>k} w_i for k = 0..n: the curve when one factor of the general formula is diagonal."""
    return 0.5 * suffix_sum(weights.clamp_min(0))


def whitened_curve(S: Tensor, Q: Tensor) -> Tensor:
    """Curve of B Q_k Q_kᵀ B⁻¹ with B = C_x,δ^{1/2} and S = B C_h B: ½ Σ_{i>k} q_iᵀ S q_i."""
    return diagonal_curve(((S @ Q) * Q).sum(0))


def basis_svd(W: Tensor, Cx_d: Tensor, C_h: Tensor) -> Basis:
    s, Q = right_singular_vectors(W)
    return Basis(Q, None, None, predicted_curve(Cx_d, C_h, Q), s.square())


def basis_pca(mu: Tensor, V: Tensor, C_h: Tensor) -> Basis:
    """Variance basis from the eigenpairs (μ, V) of C_x,δ: ΔL_var(k) = ½ Σ_{i>k} μ_i v_iᵀ C_h v_i."""
    hv = ((C_h.to(LINALG_DTYPE) @ V) * V).sum(0)
    return Basis(V, None, None, diagonal_curve(mu * hv), mu)


def basis_fwsvd(W: Tensor, Cx_d: Tensor, C_h: Tensor, r: Tensor, damping: float) -> Basis:
    r = r.to(LINALG_DTYPE).clamp_min(0)
    r = r + max(damping, 1e-12) * (float(r.mean()) if float(r.sum()) > 0 else 1.0)
    s, Q = right_singular_vectors(r.sqrt()[:, None] * W.to(LINALG_DTYPE))
    return Basis(Q, None, None, predicted_curve(Cx_d, C_h, Q), s.square())


def basis_asvd(W: Tensor, C_h: Tensor, B: Tensor, B_inv: Tensor, S: Tensor | None = None) -> Basis:
    """Whitened SVD: Q = right singular vectors of W B. `S` = B C_h B if already computed."""
    s, Q = right_singular_vectors(W.to(LINALG_DTYPE) @ B)
    S = B @ C_h.to(LINALG_DTYPE) @ B if S is None else S
    return Basis(Q, B, B_inv, whitened_curve(S, Q), s.square())


def shrunk_fisher(C_h: Tensor, W: Tensor, gamma: float) -> Tensor:
    """C_h(γ) = C_h + γ·tr(C_h)/‖W‖_F²·WᵀW (spec §3, Fisher shrinkage)."""
    C_h = C_h.to(LINALG_DTYPE)
    if gamma == 0:
        return C_h
    W = W.to(LINALG_DTYPE)
    c = gamma * float(torch.trace(C_h)) / max(float(W.square().sum()), 1e-300)
    return C_h + c * (W.T @ W)


def basis_fasc(W: Tensor, C_h: Tensor, B: Tensor, B_inv: Tensor, gamma: float) -> Basis:
    """Fisher-aligned basis: eigenvectors of B C_h(γ) B; falls back to asvd order when C_h = 0."""
    C_h = C_h.to(LINALG_DTYPE)
    S = B @ C_h @ B
    if float(torch.trace(C_h)) <= 0:  # no gradient reached the module: λ = 0, keep the whitened-SVD order
        b = basis_asvd(W, C_h, B, B_inv, S)
        b.values = torch.zeros_like(b.values)
        b.fisher_spectrum = b.values
        return b
    if gamma == 0:  # exact tail-sum identity (spec §3)
        lam, Q = eigh_desc(S)
        lam = lam.clamp_min(0)
        return Basis(Q, B, B_inv, diagonal_curve(lam), lam, lam)
    W = W.to(LINALG_DTYPE)
    c = gamma * float(torch.trace(C_h)) / max(float(W.square().sum()), 1e-300)
    WB = W @ B
    lam, Q = eigh_desc(S + c * (WB.T @ WB))                # B C_h(γ) B
    return Basis(Q, B, B_inv, whitened_curve(S, Q), lam.clamp_min(0))


def fisher_spectrum(C_h: Tensor, B: Tensor) -> Tensor:
    """λ: eigenvalues of B C_h B (B = C_x,δ^{1/2}; the unshrunk Fisher spectrum), descending."""
    C_h = C_h.to(LINALG_DTYPE)
    return torch.linalg.eigvalsh(B @ C_h @ B).flip(0).clamp_min(0)


def misalignment_curve(Q_var: Tensor, fasc: Basis) -> Tensor:
    """1 − ‖P_var,k P_fasc,k‖_F² / k for k = 1..n ((n,) with entry k−1), spec §3.

    P_fasc,k projects onto span(B Q_k) (the input directions FASC keeps); nested orthonormal bases
    come from one QR, so every k costs O(1) after O(n³).
    """
    D = fasc.Q if fasc.B is None else fasc.B @ fasc.Q
    O, _ = torch.linalg.qr(D)
    G2 = (Q_var.T @ O).square()
    overlap = G2.cumsum(0).cumsum(1).diagonal()
    k = torch.arange(1, G2.shape[0] + 1, dtype=G2.dtype)
    return (1 - overlap / k).clamp(0, 1)


def rho_from_sketch(sk: Tensor) -> Tensor:
    """ρ(u) per direction from sketch means (3, s): E[(uᵀx)²(uᵀh)²] / (E[(uᵀx)²] E[(uᵀh)²]) − 1 (spec §4).

    Directions with no activation or no gradient energy give NaN (excluded by the caller's means).
    """
    ex, eh, exh = sk[0].to(LINALG_DTYPE), sk[1].to(LINALG_DTYPE), sk[2].to(LINALG_DTYPE)
    den = ex * eh
    out = torch.full_like(den, float("nan"))
    ok = den > 0
    out[ok] = exh[ok] / den[ok] - 1
    return out
