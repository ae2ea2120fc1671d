"""`Analysis`: statistics + the model's weights + a `CompressConfig`, with every per-module
decomposition computed once and cached (spectra, predicted ΔL curves, ρ, misalignment).

After the first decomposition of a module, any rank query (predicted ΔL, parameters) is O(1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .config import BASE_METHODS, CompressConfig
from .errors import FascError
from .linalg import LINALG_DTYPE, eigh_desc
from .modules import ModuleInfo, weight_matrix
from .spectra import (Basis, basis_asvd, basis_fasc, basis_fwsvd, basis_pca, basis_svd, misalignment_curve,
                      rho_from_sketch, whitening)
from .stats import CalibStats


@dataclass
class ModuleReport:
    """One row of `fasc report`: diagnostics of a module at a reference rank."""

    fqn: str
    layer: int
    kind: str
    out_features: int
    in_features: int
    rho: float                 # mean |ρ(u)| over random directions (the heatmap's default)
    rho_signed: float          # signed mean ρ(u)
    rho_fisher: float | None   # mean |ρ| along the top Fisher directions (None until measured)
    rho_fisher_signed: float | None
    misalignment: float        # at the reference rank
    rank: int                  # the reference rank
    dl_pca: float              # predicted ΔL at the reference rank, nats/token
    dl_fasc: float
    fisher_top_share: float    # share of Σλ in the top `rank` Fisher eigenvalues
    variance_top_share: float  # share of Σμ in the top `rank` variance eigenvalues


class Analysis:
    """Per-module decompositions for one model and its statistics.

    Args:
        model: the (uncompressed) model whose weights the statistics describe; its weight tensors
            are referenced, never modified.
        stats: calibration statistics for (a subset of) its modules.
        cfg: damping, γ, hybrid τ and fallback.
    """

    def __init__(self, model: nn.Module, stats: CalibStats, cfg: CompressConfig = CompressConfig()):
        self.stats, self.cfg = stats, cfg
        mods = dict(model.named_modules())
        missing = [f for f in stats.fqns if f not in mods]
        if missing:
            raise FascError(f"The statistics name {len(missing)} modules not in this model (e.g. {missing[0]}); "
                            f"they were calibrated on another model — re-run calibration on this one.")
        self._weights = {f: weight_matrix(mods[f]).detach() for f in stats.fqns}
        for f, W in self._weights.items():
            info = stats.info(f)
            if tuple(W.shape) != (info.out_features, info.in_features):
                raise FascError(f"Module {f} is {tuple(W.shape)} in the model but {info.out_features}×"
                                f"{info.in_features} in the statistics; re-run calibration on this model.")
        self._white: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._bases: dict[tuple[str, str], Basis] = {}
        self._var: dict[str, tuple[Tensor, Tensor]] = {}
        self._misalign: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- basic accessors
    @property
    def modules(self) -> list[ModuleInfo]:
        return self.stats.modules

    def info(self, fqn: str) -> ModuleInfo:
        return self.stats.info(fqn)

    def weight(self, fqn: str) -> Tensor:
        """W (m, n) float64."""
        return self._weights[fqn].to(LINALG_DTYPE)

    def whitening(self, fqn: str) -> tuple[Tensor, Tensor, Tensor]:
        """(C_x,δ, B, B⁻¹) of the module's input group, cached per group."""
        g = self.stats.group[fqn]
        if g not in self._white:
            self._white[g] = whitening(self.stats.cx[g], self.cfg.damping)
        return self._white[g]

    def resolve(self, fqn: str, method: str) -> str:
        """The base method used for `fqn` (hybrid → fasc where ρ ≥ τ, else the fallback)."""
        if method == "hybrid":
            return "fasc" if self.rho(fqn)[0] >= self.cfg.tau else self.cfg.fallback
        if method not in BASE_METHODS:
            raise FascError(f"Unknown method {method!r}; choose one of {', '.join(BASE_METHODS + ('hybrid',))}.")
        return method

    def basis(self, fqn: str, method: str) -> Basis:
        """The ordered basis of `method` for `fqn` (computed once)."""
        method = self.resolve(fqn, method)
        key = (fqn, method)
        if key not in self._bases:
            W, C_h = self.weight(fqn), self.stats.ch[fqn].to(LINALG_DTYPE)
            Cx_d, B, B_inv = self.whitening(fqn)
            if method == "svd":
                b = basis_svd(W, Cx_d, C_h)
            elif method == "pca":
                b = basis_pca(W, Cx_d, C_h)
            elif method == "fwsvd":
                b = basis_fwsvd(W, Cx_d, C_h, self.stats.fw[fqn], self.cfg.damping)
            elif method == "asvd":
                b = basis_asvd(W, Cx_d, C_h, B, B_inv)
            elif self.cfg.gamma == 0:
                b = self.fisher_basis(fqn)
            else:
                b = basis_fasc(W, Cx_d, C_h, B, B_inv, self.cfg.gamma)
            self._bases[key] = b
        return self._bases[key]

    def fisher_basis(self, fqn: str) -> Basis:
        """The unshrunk (γ = 0) Fisher basis: eigenvectors of C_x^{1/2} C_h C_x^{1/2}."""
        key = (fqn, "fisher")
        if key not in self._bases:
            Cx_d, B, B_inv = self.whitening(fqn)
            self._bases[key] = basis_fasc(self.weight(fqn), Cx_d, self.stats.ch[fqn].to(LINALG_DTYPE), B, B_inv, 0.0)
        return self._bases[key]

    def precompute(self, methods: tuple[str, ...] = ("pca", "fasc"),
                   progress: Callable[[int, int], None] | None = None) -> None:
        """Decompose every module for `methods` now (with progress), so later queries are instant."""
        fqns = self.stats.fqns
        total = len(fqns) * len(methods)
        for i, fqn in enumerate(fqns):
            for j, m in enumerate(methods):
                self.basis(fqn, m)
                if progress is not None:
                    progress(i * len(methods) + j + 1, total)

    def curve(self, fqn: str, method: str) -> np.ndarray:
        """Predicted ΔL(k), k = 0..min(m,n), nats per token."""
        info = self.info(fqn)
        return self.basis(fqn, method).curve[: info.max_rank + 1].numpy()

    def predicted(self, fqn: str, method: str, k: int) -> float:
        return float(self.curve(fqn, method)[k])

    def factors(self, fqn: str, method: str, k: int) -> tuple[Tensor, Tensor]:
        """(U (m,k), V (n,k)) float64 with W' = U Vᵀ."""
        info = self.info(fqn)
        if not 1 <= k <= info.max_rank:
            raise FascError(f"Rank {k} for {fqn} is out of range; it must be in [1, {info.max_rank}].")
        return self.basis(fqn, method).factors(self.weight(fqn), k)

    # ---------------------------------------------------------------- diagnostics
    def variance_spectrum(self, fqn: str) -> Tensor:
        """μ: eigenvalues of C_x (undamped), descending."""
        return self._variance(fqn)[0]

    def _variance(self, fqn: str) -> tuple[Tensor, Tensor]:
        g = self.stats.group[fqn]
        if g not in self._var:
            mu, V = eigh_desc(self.stats.cx[g])
            self._var[g] = (mu.clamp_min(0), V)
        return self._var[g]

    def fisher_spectrum(self, fqn: str) -> Tensor:
        """λ: eigenvalues of C_x^{1/2} C_h C_x^{1/2} (γ = 0, damped C_x), descending."""
        return self.fisher_basis(fqn).values

    def misalignment(self, fqn: str) -> np.ndarray:
        """Subspace misalignment between pca and fasc at k = 1..n (entry k−1)."""
        if fqn not in self._misalign:
            self._misalign[fqn] = misalignment_curve(self._variance(fqn)[1], self.basis(fqn, "fasc"))
        return self._misalign[fqn].numpy()

    def rho(self, fqn: str) -> tuple[float, float]:
        """(mean |ρ(u)|, signed mean ρ(u)) over the random sketch directions (spec §4)."""
        return _rho_means(self.stats.sketch.get(fqn))

    def rho_fisher(self, fqn: str) -> tuple[float, float] | None:
        sk = self.stats.sketch_fisher.get(fqn)
        return None if sk is None else _rho_means(sk)

    def report(self, ratio: float = 0.5) -> list[ModuleReport]:
        """Diagnostics of every module at rank round(ratio·min(m,n))."""
        rows = []
        for info in self.modules:
            f = info.fqn
            k = max(1, min(info.max_rank, round(ratio * info.max_rank)))
            lam = self.fisher_spectrum(f)
            mu = self.variance_spectrum(f)
            rf = self.rho_fisher(f)
            r_abs, r_sig = self.rho(f)
            rows.append(ModuleReport(
                fqn=f, layer=info.layer, kind=info.kind, out_features=info.out_features,
                in_features=info.in_features, rho=r_abs, rho_signed=r_sig,
                rho_fisher=None if rf is None else rf[0], rho_fisher_signed=None if rf is None else rf[1],
                misalignment=float(self.misalignment(f)[k - 1]), rank=k,
                dl_pca=self.predicted(f, "pca", k), dl_fasc=self.predicted(f, "fasc", k),
                fisher_top_share=_share(lam, k), variance_top_share=_share(mu, k)))
        return rows


def _share(vals: Tensor, k: int) -> float:
    tot = float(vals.sum())
    return float(vals[:k].sum()) / tot if tot > 0 else 1.0


def _rho_means(sk: Tensor | None) -> tuple[float, float]:
    if sk is None:
        return 0.0, 0.0
    r = rho_from_sketch(sk)
    r = r[~torch.isnan(r)]
    if r.numel() == 0:
        return 0.0, 0.0
    return float(r.abs().mean()), float(r.mean())
