"""The low-rank layer that replaces an `nn.Linear` / `Conv1D`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        if U.shape[1] != V.shape[1]:
            raise ValueError(f"Factor ranks differ: U {tuple(U.shape)}, V {tuple(V.shape)}.")
        if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise ValueError("Low-rank factors contain NaN or Inf.")
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
