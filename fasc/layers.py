"""The low-rank layer that replaces an `nn.Linear` / `Conv1D`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_factors(U: Tensor, V: Tensor) -> None:
    """U (out,k) and V (in,k) of one rank k, finite: a ValueError otherwise."""
    if U.shape[1] != V.shape[1]:
        raise ValueError(f"Factor ranks differ: U {tuple(U.shape)}, V {tuple(V.shape)}.")
    if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
        raise ValueError("Low-rank factors contain NaN or Inf.")


class LowRankLinear(nn.Module):
    """y = U (Vᵀ x) + b: a rank-k linear map W' = U Vᵀ stored as two factors.

    Convention (stated once): `U` is (out, k) and `V` is (in, k) — V, not Vᵀ — so W' = U @ V.T.
    Parameters k·(out + in) (+ bias), against out·in for the dense weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(in_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from U (out,k), V (in,k) (any float dtype; stored in `dtype`, default U's)."""
        check_factors(U, V)
        dtype = dtype or U.dtype
        layer = cls(V.shape[0], U.shape[0], U.shape[1], bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            layer.U.copy_(U.to(dtype))
            layer.V.copy_(V.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.V.T), self.U, self.bias)

    def to_dense(self) -> Tensor:
        """W' = U Vᵀ, (out, in), computed in float32 at least."""
        dt = torch.promote_types(self.U.dtype, torch.float32)
        return (self.U.to(dt) @ self.V.to(dt).T).to(self.U.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


def pivot_rows(U: Tensor) -> Tensor:
    """A permutation of U's m rows whose first k are a well-conditioned k×k block (LU with partial pivoting
    on U, m×k, m ≥ k): the rows `PivotedLowRankLinear` keeps whole."""
    lu, piv, _ = torch.linalg.lu_factor_ex(U)
    if not bool((lu.diagonal().abs() > 0).all()):
        raise ValueError("Low-rank factor U is rank-deficient: no k of its rows are independent.")
    perm = torch.arange(U.shape[0], device=U.device)
    for i, p in enumerate(piv.tolist()):     # LAPACK's sequential row swaps, 1-based
        p -= 1
        if p != i:
            perm[[i, p]] = perm[[p, i]]
    return perm


class PivotedLowRankLinear(nn.Module):
    """The same rank-k map W' = U Vᵀ stored in k·(out + in − k) parameters instead of k·(out + in).

    Any rank-k matrix has k rows that span the others: W'[rows] = R stacked on W'[rest] = P R with
    R = W'[pivots] (k, in) and P (out − k, k). The layer computes z = R x (k values, the pivot outputs),
    then P z (the other outputs), and puts the out values back in order: y = [z; P z][order] + b. The map
    is W' exactly, up to rounding; `order` (out integers, a buffer) is not counted as parameters. A rank
    below min(out, in) saves parameters, where two factors save nothing until k < out·in/(out + in).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= rank < out_features:
            raise ValueError(f"rank {rank} must be in [1, {out_features - 1}] for a pivoted layer.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.R = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.P = nn.Parameter(torch.zeros(out_features - rank, rank, dtype=dtype, device=device))
        self.register_buffer("order", torch.arange(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "PivotedLowRankLinear":
        """Build from U (out,k), V (in,k): the pivots chosen on U, computed in float64 (float32 on a GPU)."""
        check_factors(U, V)
        dtype = dtype or U.dtype
        wide = torch.float64 if U.device.type == "cpu" else torch.float32
        U64, V64 = U.to(wide), V.to(wide)
        perm = pivot_rows(U64)
        k = U.shape[1]
        Up, Ur = U64[perm[:k]], U64[perm[k:]]
        R = Up @ V64.T                                            # the pivot rows of W'
        P = torch.linalg.solve(Up.T, Ur.T).T                      # Ur = P Up
        if not (torch.isfinite(R).all() and torch.isfinite(P).all()):
            raise ValueError("Low-rank factor U is rank-deficient: its pivot block cannot be inverted.")
        layer = cls(V.shape[0], U.shape[0], k, bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            layer.R.copy_(R.to(dtype))
            layer.P.copy_(P.to(dtype))
            layer.order.copy_(torch.argsort(perm))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        z = F.linear(x, self.R)
        if x.numel() == x.shape[-1]:  # one token (decoding): one gather of [z; P z] is the fastest
            y = torch.cat([z, F.linear(z, self.P)], dim=-1).index_select(-1, self.order)
        else:  # several tokens (prefill): each part written in place, one copy less (`bench.speed`)
            at = torch.argsort(self.order)  # where each of [z; P z] goes
            y = z.new_empty(*z.shape[:-1], self.out_features)
            y.index_copy_(-1, at[:self.rank], z).index_copy_(-1, at[self.rank:], F.linear(z, self.P))
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> Tensor:
        """W', (out, in), computed in float32 at least."""
        dt = torch.promote_types(self.R.dtype, torch.float32)
        R = self.R.to(dt)
        return torch.cat([R, self.P.to(dt) @ R])[self.order].to(self.R.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}, pivoted"


def pivoted(layer: LowRankLinear) -> PivotedLowRankLinear:
    """The same map as `layer`, stored pivoted (k·(out + in − k) parameters)."""
    return PivotedLowRankLinear.from_factors(layer.U.detach(), layer.V.detach(),
                                             None if layer.bias is None else layer.bias.detach(),
                                             dtype=layer.U.dtype)


FACTORED = (LowRankLinear, PivotedLowRankLinear)   # the low-rank layers: healing trains their factors, an export writes them


def factors_of(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The trainable factors of a factored layer: (U, V) of a `LowRankLinear`, (R, P) of a pivoted one."""
    return (layer.R, layer.P) if isinstance(layer, PivotedLowRankLinear) else (layer.U, layer.V)
