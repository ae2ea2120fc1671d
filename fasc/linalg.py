"""Pure linear-algebra helpers (tensors in, tensors out), spec §3.

Every function computes in the dtype and on the device of its inputs (float64 by default, see
`fasc.linalg_device` for where and in which precision `Analysis` runs them); new tensors are created
beside their inputs, never on the default device."""

from __future__ import annotations

import torch
from torch import Tensor

LINALG_DTYPE = torch.float64


def sym(C: Tensor) -> Tensor:
    """Symmetric part (C + Cᵀ)/2."""
    return (C + C.T) * 0.5


def damp(C: Tensor, delta: float) -> Tensor:
    """C + δ·(tr C / n)·I (spec §3); an all-zero C gets δ·I so that inverses stay finite."""
    n = C.shape[0]
    scale = float(torch.trace(C)) / n
    if not scale > 0:
        scale = 1.0
    out = C + C.T          # one new n×n tensor: symmetrized and damped in place
    out.mul_(0.5).diagonal().add_(max(delta, 1e-12) * scale)
    return out


def eigh_desc(C: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric matrix, eigenvalues descending, eigenvector signs pinned.

    Returns (values (n,), vectors (n,n) with vectors[:, i] the i-th eigenvector). The sign of each
    eigenvector is chosen so that its largest-magnitude entry is positive (deterministic plots/caches).
    `eigh` reads one triangle of C only, so C is not symmetrized first (a product such as B C_h B is
    symmetric up to rounding; its lower triangle is what is decomposed).
    """
    vals, vecs = torch.linalg.eigh(C)
    return vals.flip(0), flip_signs_(vecs.flip(1))


def column_signs(V: Tensor) -> Tensor:
    """±1 per column: the sign of its largest-|.| entry (+1 on an exact tie of max and −min, or a zero column)."""
    lo, hi = torch.aminmax(V, dim=0)
    return torch.where(-lo > hi, -1.0, 1.0).to(V.dtype)


def flip_signs_(V: Tensor) -> Tensor:
    """Flip column signs in place so that each column's largest-|.| entry is positive; returns V."""
    return V.mul_(column_signs(V))


def right_singular_vectors(A: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values (desc) and right singular vectors (n,n), completed to a full basis, signs pinned.

    For A (m,n) with m < n the basis is completed with vectors of the null space (singular value 0).
    Computed as eigenvectors of AᵀA when n ≤ m or from the SVD otherwise (in A's dtype).
    """
    m, n = A.shape
    if m >= n:
        vals, vecs = eigh_desc(A.T @ A)
        return vals.clamp_min(0).sqrt(), vecs
    _, S, Vh = torch.linalg.svd(A, full_matrices=True)
    s = torch.zeros(n, dtype=A.dtype, device=A.device)
    s[: S.shape[0]] = S
    return s, flip_signs_(Vh.T.contiguous())


def suffix_sum(x: Tensor) -> Tensor:
    """t[k] = Σ_{i≥k} x[i] for k = 0..n, with t[n] = 0. (n,) -> (n+1,)."""
    out = torch.zeros(x.shape[0] + 1, dtype=x.dtype, device=x.device)
    out[:-1] = x.flip(0).cumsum(0).flip(0)
    return out


def tail_block_sums(E: Tensor) -> Tensor:
    """T[k] = Σ_{i≥k, j≥k} E[i,j] for a symmetric E, k = 0..n (T[n] = 0). (n,n) -> (n+1,), O(n²)."""
    n = E.shape[0]
    # row_tail[i] = Σ_{j>i} E[i, j]
    row_tail = E.flip(1).cumsum(1).flip(1)
    strict = torch.zeros(n, dtype=E.dtype, device=E.device)
    idx = torch.arange(n - 1, device=E.device)
    strict[:-1] = row_tail[idx, idx + 1]
    return suffix_sum(E.diagonal() + 2 * strict)
