"""Subspaces, spectra and predicted loss (spec §2, §3, §5) as pure functions, float64.

Every method of spec §5 keeps an input-side map of the same form,
    W' = W M,   M = B Q_k Q_kᵀ B⁻¹   (B = I or a whitening factor, B Bᵀ = C_x; Q orthonormal, Q_k its first k columns),
so W' = U Vᵀ with U = W B Q_k (m,k) and V = B⁻ᵀ Q_k (n,k), and the decoupled loss of spec §2 for
every k follows from one n×n matrix:
    ΔL(k) = ½ tr(C_h (I−M) C_x (I−M)ᵀ) = ½ Σ_{i,j>k} (Qᵀ Bᵀ C_h B Q)_{ij} (Qᵀ B⁻¹ C_x B⁻ᵀ Q)_{ij}.
| method | B                    | Q (right singular / eigen vectors of)         |
| svd    | I                    | W                                             |
| pca    | I                    | C_x                                           |
| fwsvd  | I                    | diag(r)^{1/2} W                               |
| asvd   | L, L Lᵀ = C_x        | W B                                           |
| fasc   | L                    | Bᵀ C_h(γ) B, C_h(γ) = C_h + γ tr(C_h)/‖W‖² WᵀW |
For fasc at γ = 0 the two factors are diag(λ) and I, hence ΔL_fasc(k) = ½ Σ_{i>k} λ_i exactly.
The spec writes B = C_x^{1/2}; any factor with B Bᵀ = C_x gives the same maps M, curves and spectra
(B = C_x^{1/2} U for an orthogonal U, and Q turns into Uᵀ Q), so the analysis uses the Cholesky factor
L of C_x,δ (n³/3, as SVD-LLM does) instead of an n×n eigen-decomposition (`Whitening`) — or, when it
eigen-decomposes C_x anyway (pca, misalignment), B = V diag(μ^{1/2}) from those eigenpairs.
C_x is damped (C + δ tr(C)/n I) wherever it appears, C_h never (spec §3), so that fasc is exactly
optimal among all rank-k maps for the same objective: ΔL_var(k) ≥ ΔL_fasc(k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg import (LINALG_DTYPE, column_signs, damp, eigh_desc, right_singular_vectors, suffix_sum, sym,
                     tail_block_sums)

# The wide-side solve (n > m) is exact when C_h = Wᵀ C_g W, which autograd's h = Wᵀg guarantees up to
# rounding; if less than this share of tr(Bᵀ C_h B) lies in range(Bᵀ Wᵀ) (e.g. synthetic statistics),
# the full n×n problem is solved instead.
WIDE_CAPTURE_TOL = 1e-3


@dataclass
class Basis:
    """An ordered basis Q of input space under a whitening factor B (B Bᵀ = C_x,δ); the rank-k map is B Q_k Q_kᵀ B⁻¹.

    Attributes:
        Q: (n, r) orthonormal columns, most important first; r = n, or r = m for the wide-side
            solve (a rank k ≤ min(m, n) never needs more).
        B, B_inv: (n, n) whitening factor and B⁻ᵀ (= B⁻¹ for the symmetric square root), or None for
            the identity — unless `white` is given: then a None B or B_inv is the whitening's own
            (B⁻ᵀ applied by a triangular solve, never formed there).
        curve: (n+1,) predicted ΔL(k), k = 0..n, nats per token (decoupled surrogate).
        values: (n,) the ordering values (singular values², eigenvalues) for display.
        BQ: (n, r) = B Q when already known (the wide-side solve gets it for free).
    """

    Q: Tensor
    B: Tensor | None
    B_inv: Tensor | None
    curve: Tensor
    values: Tensor
    fisher_spectrum: Tensor | None = None  # fasc with γ = 0 only: λ of C_x^{1/2} C_h C_x^{1/2} (= values)
    BQ: Tensor | None = field(default=None, repr=False)
    white: "Whitening | None" = field(default=None, repr=False)  # supplies B, B⁻¹ when they are None

    @property
    def identity(self) -> bool:
        """True for an unwhitened basis (B = I: svd, pca, fwsvd)."""
        return self.B is None and self.white is None

    def _B(self) -> Tensor:
        return self.B if self.B is not None else self.white.B

    def factors(self, W: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(U, V) with W' = U Vᵀ: U = W B Q_k (m,k), V = B⁻ᵀ Q_k (n,k), in Q's dtype."""
        if k > self.Q.shape[1]:
            raise ValueError(f"rank {k} exceeds the {self.Q.shape[1]} basis vectors computed")
        Qk = self.Q[:, :k]
        W = W.to(self.Q.dtype)
        if self.identity:
            return W @ Qk, Qk.clone()
        right = self.B_inv @ Qk if self.B_inv is not None else self.white.right(Qk)
        return W @ self.whitened(k), right

    def whitened(self, k: int | None = None) -> Tensor:
        """B Q_k (n, k) (all columns when k is None)."""
        if self.identity:
            return self.Q if k is None else self.Q[:, :k]
        if self.BQ is None and (k is None or k == self.Q.shape[1]):
            self.BQ = self._B() @ self.Q
        if self.BQ is not None:
            return self.BQ if k is None else self.BQ[:, :k]
        return self._B() @ self.Q[:, :k]

    def directions(self, s: int) -> Tensor:
        """The first s kept input directions B q_i, unit-normalised, (n, s) — for ρ along them."""
        D = self.whitened(s)
        return D / D.norm(dim=0, keepdim=True).clamp_min(1e-300)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.Q, self.BQ) if t is not None)


@dataclass
class Whitening:
    """C_x,δ = C_x + δ tr(C_x)/n I and a whitening factor B with B Bᵀ = C_x,δ: its Cholesky factor L
    (lower-triangular, n³/3), or — where Cholesky fails in this precision — the symmetric square root
    from the eigenpairs. The eigenpairs (μ desc, V) of C_x,δ — pca's basis, the variance spectrum,
    misalignment — are computed on first use, so a fasc- or asvd-only analysis needs no n×n eigh.
    (float32 eigenpairs on the CPU were measured and rejected: pca maps up to 1.6 % off, BENCHMARKS.md.)

    With `eigen` (an analysis that needs the eigenpairs anyway: pca, misalignment) B = V diag(μ^{1/2})
    instead: no Cholesky, B⁻ᵀ = V diag(μ^{-1/2}), and the whitened coordinates are pca's own, so pca's
    curve is diag(Bᵀ C_h B) and misalignment needs no n×n product (`misalignment_curve_eigen`)."""

    Cx_d: Tensor
    L: Tensor | None = None
    shift: float = 0.0          # the damping added to the diagonal: μ − shift are C_x's own eigenvalues
    eigen: bool = False         # B = V diag(μ^{1/2}) (used when L is None)
    _mu: Tensor | None = field(default=None, repr=False)
    _V: Tensor | None = field(default=None, repr=False)
    _B: Tensor | None = field(default=None, repr=False)
    _B_inv: Tensor | None = field(default=None, repr=False)

    @property
    def by_eigenpairs(self) -> bool:
        """B = V diag(μ^{1/2}): the whitened coordinates are pca's, scaled (the shortcuts below apply)."""
        return self.L is None and self.eigen

    def _eig(self) -> None:
        mu, self._V = eigh_desc(self.Cx_d)
        self._mu = mu.clamp_min(float(mu.max().clamp_min(1e-300)) * 1e-15)

    @property
    def mu(self) -> Tensor:
        if self._mu is None:
            self._eig()
        return self._mu

    @property
    def V(self) -> Tensor:
        if self._V is None:
            self._eig()
        return self._V

    @property
    def B(self) -> Tensor:
        """The whitening factor (L, or C_x,δ^{1/2} where Cholesky failed)."""
        if self.L is not None:
            return self.L
        if self._B is None:
            self._B = self.V * self.mu.sqrt() if self.eigen else (self.V * self.mu.sqrt()) @ self.V.T
        return self._B

    def right(self, X: Tensor) -> Tensor:
        """B⁻ᵀ X (the right factor of a map): a triangular solve with L, else through the eigenpairs."""
        if self._B_inv is not None:
            return self._B_inv @ X
        if self.L is not None:
            return torch.linalg.solve_triangular(self.L.T, X, upper=True)
        if self.eigen:
            return self.V @ (X / self.mu.sqrt()[:, None])
        return self.V @ ((self.V.T @ X) / self.mu.sqrt()[:, None])

    @property
    def B_inv(self) -> Tensor:
        """B⁻ᵀ, formed (n×n)."""
        if self._B_inv is None:
            if self.by_eigenpairs:
                self._B_inv = self.V / self.mu.sqrt()
            else:
                n = self.Cx_d.shape[0]
                self._B_inv = self.right(torch.eye(n, dtype=self.Cx_d.dtype, device=self.Cx_d.device))
        return self._B_inv

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.Cx_d, self.L, self._V, self._B, self._B_inv)
                   if t is not None)


def whitening(C_x: Tensor, damping: float, eigen: bool = False) -> Whitening:
    """The damped C_x and its Cholesky factor (in C_x's dtype and on its device); the eigenpairs on
    first use. Falls back to the symmetric square root from the
    eigenpairs (in C_x's dtype) when Cholesky fails — a C_x,δ not positive definite in this precision.
    With `eigen`, no Cholesky: B = V diag(μ^{1/2}) from the eigenpairs (computed on first use)."""
    Cd = damp(C_x, damping)
    shift = float(torch.trace(Cd) - torch.trace(C_x)) / Cd.shape[0]
    if eigen:
        return Whitening(Cd, None, shift, eigen=True)
    L, info = torch.linalg.cholesky_ex(Cd)
    if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()) and float(L.diagonal().min()) > 0:
        return Whitening(Cd, L, shift)
    return Whitening(Cd, None, shift)


def predicted_curve(Cx_d: Tensor, C_h: Tensor, Q: Tensor, B: Tensor | None = None,
                    B_inv: Tensor | None = None) -> Tensor:
    """ΔL(k) for k = 0..n of the map B Q_k Q_kᵀ B⁻¹ (spec §2 decoupled), (n+1,). O(n³) once, O(1) per k.

    The general case needs the full tail-block sums; when B Bᵀ = C_x,δ the second factor is I and
    only diag(Qᵀ Bᵀ C_h B Q) matters (see `whitened_curve`).
    """
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
    """Curve of B Q_k Q_kᵀ B⁻¹ with B Bᵀ = C_x,δ and S = Bᵀ C_h B: ½ Σ_{i>k} q_iᵀ S q_i."""
    return diagonal_curve((S @ Q).mul_(Q).sum(0))


def captured_curve(trace_S: float, d: Tensor, n: int) -> Tensor:
    """½ (tr S − Σ_{i≤k} d_i) for k = 0..n, d_i = q_iᵀ S q_i of the r computed columns (the exact loss
    of the map for any orthonormal Q); beyond k = r the curve stays at its value at r. (r,) -> (n+1,)."""
    out = torch.full((n + 1,), 0.0, dtype=d.dtype, device=d.device)
    out[1:d.shape[0] + 1] = d.clamp_min(0).cumsum(0)
    out[d.shape[0] + 1:] = out[d.shape[0]]
    return (0.5 * (trace_S - out)).clamp_min(0)


def pad(values: Tensor, n: int) -> Tensor:
    """values (r,) followed by n − r zeros, (n,)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out[: values.shape[0]] = values
    return out


def basis_svd(W: Tensor, Cx_d: Tensor, C_h: Tensor) -> Basis:
    s, Q = right_singular_vectors(W)
    return Basis(Q, None, None, predicted_curve(Cx_d, C_h, Q), s.square())


def basis_pca(mu: Tensor, V: Tensor, C_h: Tensor, S: Tensor | None = None) -> Basis:
    """Variance basis from the eigenpairs (μ, V) of C_x,δ: ΔL_var(k) = ½ Σ_{i>k} μ_i v_iᵀ C_h v_i.
    `S` = Bᵀ C_h B for the eigen factor B = V diag(μ^{1/2}) if already computed: its diagonal is
    exactly those weights (no n³ product C_h V)."""
    w = S.diagonal() if S is not None else mu * (C_h @ V).mul_(V).sum(0)
    return Basis(V, None, None, diagonal_curve(w), mu)


def basis_pca_wide(mu: Tensor, V: Tensor, ws: "WideSide", Zt: Tensor) -> Basis:
    """`basis_pca` of a wide module from its small side: Bᵀ C_h B = Z T0 Zᵀ gives
    μ_i v_iᵀ C_h v_i = (Zt T0 Ztᵀ)_ii with Zt = diag(μ^{1/2}) Vᵀ B⁻ᵀ Z, (n, m) (`pca_coordinates`) —
    O(n m²) instead of the O(n³) product C_h V."""
    return Basis(V, None, None, diagonal_curve((Zt @ ws.T0).mul_(Zt).sum(1)), mu)


def pca_coordinates(wh: Whitening, Z: Tensor) -> Tensor:
    """Zt = diag(μ^{1/2}) Vᵀ B⁻ᵀ Z of `basis_pca_wide`: Z itself for the eigen factor, O(n² m) otherwise."""
    if wh.by_eigenpairs:
        return Z
    return wh.mu.sqrt()[:, None] * (wh.V.T @ wh.right(Z))


def basis_fwsvd(W: Tensor, Cx_d: Tensor, C_h: Tensor, r: Tensor, damping: float) -> Basis:
    r = r.to(W.dtype).clamp_min(0)
    r = r + max(damping, 1e-12) * (float(r.mean()) if float(r.sum()) > 0 else 1.0)
    s, Q = right_singular_vectors(r.sqrt()[:, None] * W)
    return Basis(Q, None, None, predicted_curve(Cx_d, C_h, Q), s.square())


def basis_asvd(W: Tensor, C_h: Tensor, B: Tensor, B_inv: Tensor | None, S: Tensor | None = None,
               AtA: Tensor | None = None) -> Basis:
    """Whitened SVD: Q = right singular vectors of W B. `S` = Bᵀ C_h B and, for m ≥ n, `AtA` =
    (W B)ᵀ(W B) if already computed (shared with fasc)."""
    if AtA is not None and W.shape[0] >= W.shape[1]:   # what `right_singular_vectors` computes for m ≥ n
        vals, Q = eigh_desc(AtA)
        s = vals.clamp_min(0).sqrt()
    else:
        s, Q = right_singular_vectors(W @ B)
    S = B.T @ C_h @ B if S is None else S
    return Basis(Q, B, B_inv, whitened_curve(S, Q), s.square())


def shrink_scale(C_h: Tensor, W: Tensor, gamma: float) -> float:
    """c = γ·tr(C_h)/‖W‖_F² of the Fisher shrinkage C_h(γ) = C_h + c·WᵀW (spec §3)."""
    return gamma * float(torch.trace(C_h)) / max(float(W.square().sum()), 1e-300)


def shrunk_fisher(C_h: Tensor, W: Tensor, gamma: float) -> Tensor:
    """C_h(γ) = C_h + γ·tr(C_h)/‖W‖_F²·WᵀW (spec §3, Fisher shrinkage)."""
    if gamma == 0:
        return C_h
    return C_h + shrink_scale(C_h, W, gamma) * (W.T @ W)


def basis_fasc(W: Tensor, C_h: Tensor, B: Tensor, B_inv: Tensor | None, gamma: float,
               S: Tensor | None = None, AtA: Tensor | None = None) -> Basis:
    """Fisher-aligned basis: eigenvectors of Bᵀ C_h(γ) B; falls back to asvd order when C_h = 0.
    `S` = Bᵀ C_h B and `AtA` = (W B)ᵀ(W B) if already computed (shared with asvd)."""
    S = B.T @ C_h @ B if S is None else S
    if float(torch.trace(C_h)) <= 0:  # no gradient reached the module: λ = 0, keep the whitened-SVD order
        b = basis_asvd(W, C_h, B, B_inv, S)
        b.values = torch.zeros_like(b.values)
        b.fisher_spectrum = b.values
        return b
    if gamma == 0:  # exact tail-sum identity (spec §3)
        lam, Q = eigh_desc(S)
        lam = lam.clamp_min(0)
        return Basis(Q, B, B_inv, diagonal_curve(lam), lam, lam)
    c = shrink_scale(C_h, W, gamma)
    if AtA is None:
        WB = W @ B
        AtA = WB.T @ WB
    lam, Q = eigh_desc(S + c * AtA)                # Bᵀ C_h(γ) B
    return Basis(Q, B, B_inv, whitened_curve(S, Q), lam.clamp_min(0))


# ------------------------------------------------------------------------- the small side (n > m)
@dataclass
class WideSide:
    """Shared work for a module wider than tall (n > m, e.g. down_proj, GQA k/v): every
    C_h(γ) = Wᵀ(C_g + c·I)W has rank ≤ m, so Bᵀ C_h(γ) B lives in range(Aᵀ), A = W B (spec §3,
    "whichever side is smaller"). With Aᵀ = Z R (thin QR), Bᵀ C_h(γ) B = Z T(γ) Zᵀ and
    T(γ) = Zᵀ Bᵀ C_h B Z + c·R Rᵀ is m×m: the FASC and asvd bases come from m×m problems.

    Attributes:
        Z: (n, m) orthonormal basis of range(Bᵀ Wᵀ);  R: (m, m) with Bᵀ Wᵀ = Z R (non-negative diagonal).
        Y: (n, m) = B Z;  T0: (m, m) = Yᵀ C_h Y (the unshrunk Fisher matrix on that range).
        trace_S: tr(Bᵀ C_h B) = Σ C_h ⊙ C_x,δ; `captured` = tr T0 / tr S (1 up to rounding).
    """

    Z: Tensor
    R: Tensor
    Y: Tensor
    T0: Tensor
    trace_S: float
    captured: float


def qr_positive(X: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR with a non-negative diagonal of R (the unique factorization of a full-rank X). (n,m) -> (n,m), (m,m)."""
    Q, R = torch.linalg.qr(X)
    d = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R.dtype)
    return Q.mul_(d), R.mul_(d[:, None])


def wide_side(W: Tensor, C_h: Tensor, B: "Tensor | Whitening", Cx_d: Tensor) -> WideSide:
    """O(n²m) instead of the O(n³) of an n×n eigen-decomposition: two n²m products (Bᵀ Wᵀ, B Z) and
    C_h Y. (m,n), (n,n), (n,n) or its `Whitening`, (n,n)."""
    B = B.B if isinstance(B, Whitening) else B
    Z, R = qr_positive((W @ B).T)                  # (n, m), (m, m)
    Y = B @ Z
    T0 = sym(Y.T @ (C_h @ Y))
    tr_S = float(torch.dot(C_h.reshape(-1), Cx_d.reshape(-1)))   # tr(Bᵀ C_h B) = tr(C_h C_x,δ)
    tr_T = float(torch.trace(T0))
    captured = tr_T / tr_S if tr_S > 0 else 1.0
    return WideSide(Z, R, Y, T0, tr_S, captured)


def wide_ok(ws: WideSide) -> bool:
    """Whether the statistics have the form C_h = Wᵀ C_g W closely enough for the small side."""
    return ws.trace_S > 0 and abs(1.0 - ws.captured) <= WIDE_CAPTURE_TOL


def _wide_basis(ws: WideSide, V: Tensor, values: Tensor, B: Tensor, B_inv: Tensor | None, n: int) -> Basis:
    """Basis Q = Z V from an m×m eigen/singular basis V, its curve with the unshrunk T0."""
    Q = ws.Z @ V
    signs = column_signs(Q)                        # as `flip_signs_`, on Q rather than V
    Q.mul_(signs)
    V = V * signs
    d = (ws.T0 @ V).mul_(V).sum(0)                 # q_iᵀ Bᵀ C_h B q_i
    return Basis(Q, B, B_inv, captured_curve(ws.trace_S, d, n), pad(values, n), BQ=ws.Y @ V)


def basis_asvd_wide(ws: WideSide, B: Tensor, B_inv: Tensor | None, n: int) -> Basis:
    """Whitened SVD from the m×m factor: W B = Rᵀ Zᵀ, so its right singular vectors are Z P for
    Rᵀ = U Σ Pᵀ, i.e. the eigenvectors of R Rᵀ = P Σ² Pᵀ (as `right_singular_vectors` for m ≥ n)."""
    s2, P = eigh_desc(ws.R @ ws.R.T)
    return _wide_basis(ws, P, s2.clamp_min(0), B, B_inv, n)


def basis_fasc_wide(ws: WideSide, C_h: Tensor, W: Tensor, B: Tensor, B_inv: Tensor | None, gamma: float,
                    n: int) -> Basis:
    """FASC basis from the m×m matrix T(γ) = T0 + c R Rᵀ (same factors as `basis_fasc` up to sign
    and ties; Q has m columns)."""
    if float(torch.trace(C_h)) <= 0:
        b = basis_asvd_wide(ws, B, B_inv, n)
        b.values = torch.zeros_like(b.values)
        b.fisher_spectrum = b.values
        return b
    T = ws.T0 if gamma == 0 else ws.T0 + shrink_scale(C_h, W, gamma) * (ws.R @ ws.R.T)
    lam, V = eigh_desc(T)
    b = _wide_basis(ws, V, lam.clamp_min(0), B, B_inv, n)
    if gamma == 0:
        b.fisher_spectrum = b.values
    return b


def fisher_spectrum_wide(ws: WideSide, n: int) -> Tensor:
    """λ of Bᵀ C_h B from the m×m T0, zero-padded to n."""
    return pad(torch.linalg.eigvalsh(ws.T0).flip(0).clamp_min(0), n)


def map_loss(C_h: Tensor, Cx_d: Tensor, D: Tensor, V: Tensor) -> float:
    """½ tr(C_h (I−M) C_x (I−M)ᵀ) for M = D Vᵀ (spec §2, decoupled), by brute force. O(n³)."""
    E = -(D @ V.T)
    E.diagonal().add_(1.0)
    return 0.5 * float(((C_h @ E) * (Cx_d @ E.T).T).sum())


def fisher_spectrum(C_h: Tensor, B: Tensor, S: Tensor | None = None) -> Tensor:
    """λ: eigenvalues of Bᵀ C_h B (B Bᵀ = C_x,δ; the unshrunk Fisher spectrum), descending."""
    S = B.T @ C_h @ B if S is None else S
    return torch.linalg.eigvalsh(S).flip(0).clamp_min(0)


def misalignment_curve(Q_var: Tensor, fasc: Basis, k_max: int | None = None) -> Tensor:
    """1 − ‖P_var,k P_fasc,k‖_F² / k for k = 1..r ((r,) with entry k−1), spec §3; r = min(k_max, columns of Q).

    P_fasc,k projects onto span(B Q_k) (the input directions FASC keeps); nested orthonormal bases
    come from one QR, so every k costs O(1) after O(n r²).
    """
    r = fasc.Q.shape[1] if k_max is None else min(k_max, fasc.Q.shape[1])
    O, _ = torch.linalg.qr(fasc.whitened(r))
    return _misalignment((Q_var[:, :r].T @ O).square())


def misalignment_curve_eigen(mu: Tensor, fasc: Basis, k_max: int | None = None) -> Tensor:
    """`misalignment_curve` for a basis whitened by the eigen factor B = V diag(μ^{1/2}): B Q_k = V (D Q_k),
    and an orthogonal V neither changes the QR nor the overlaps, so Vᵀ O is the QR of D Q_r itself —
    no n×n product. μ (n,), fasc.Q (n, ≥r) -> (r,)."""
    r = fasc.Q.shape[1] if k_max is None else min(k_max, fasc.Q.shape[1])
    O, _ = torch.linalg.qr(mu.sqrt()[:, None] * fasc.Q[:, :r])
    return _misalignment(O[:r].square())


def _misalignment(G2: Tensor) -> Tensor:
    """1 − (Σ_{i,j≤k} G2_ij) / k for k = 1..r from the squared overlaps G2 (r, r) of the two bases."""
    r = G2.shape[0]
    overlap = G2.cumsum(0).cumsum(1).diagonal()
    k = torch.arange(1, r + 1, dtype=G2.dtype, device=G2.device)
    return (1 - overlap / k).clamp(0, 1)


def rho_from_sketch(sk: Tensor) -> Tensor:
    """ρ(u) per direction from sketch means (3, s): E[(uᵀx)²(uᵀh)²] / (E[(uᵀx)²] E[(uᵀh)²]) − 1 (spec §4).

    Directions with no activation or no gradient energy give NaN (excluded by the caller's means).
    """
    sk = sk.to(LINALG_DTYPE)
    ex, eh, exh = sk[0], sk[1], sk[2]
    den = ex * eh
    out = torch.full_like(den, float("nan"))
    ok = den > 0
    out[ok] = exh[ok] / den[ok] - 1
    return out
