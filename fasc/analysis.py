"""`Analysis`: statistics + the model's weights + a `CompressConfig`, with every per-module
decomposition computed once and cached (spectra, predicted ΔL curves, ρ, misalignment).

After the first decomposition of a module, any rank query (predicted ΔL, parameters) is O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .config import BASE_METHODS, CompressConfig
from .errors import FascError
from .linalg import LINALG_DTYPE
from .modules import ModuleInfo, weight_matrix
from .spectra import (Basis, Whitening, basis_asvd, basis_fasc, basis_fwsvd, basis_pca, basis_svd,
                      fisher_eigenvalues, misalignment_curve, rho_from_sketch, whitening)
from .stats import CalibStats


@dataclass
class ModuleReport:
    """One row of `fasc report`: diagnostics of a module at a reference rank.

    ρ needs no eigen-decomposition; the fields from `misalignment` on do, and are None in a report
    built with `decompose=False` before the module was decomposed.
    """

    fqn: str
    layer: int
    kind: str
    out_features: int
    in_features: int
    rho: float                 # mean |ρ(u)| over random directions (the heatmap's default)
    rho_signed: float          # signed mean ρ(u)
    rho_fisher: float | None   # mean |ρ| along the top Fisher directions (None until measured)
    rho_fisher_signed: float | None
    misalignment: float | None        # at the reference rank
    rank: int                         # the reference rank
    dl_pca: float | None              # predicted ΔL at the reference rank, nats/token
    dl_fasc: float | None
    fisher_top_share: float | None    # share of Σλ in the top `rank` Fisher eigenvalues
    variance_top_share: float | None  # share of Σμ in the top `rank` variance eigenvalues


@dataclass
class Summary:
    """What stays in memory per (module, method) after its decomposition: O(n), not O(n²)."""

    curve: Tensor    # (n+1,) predicted ΔL(k)
    values: Tensor   # (n,) ordering values (λ, μ or σ²)


class Analysis:
    """Per-module decompositions for one model and its statistics.

    Only O(n) summaries (predicted ΔL curves, spectra, misalignment) are kept for every module; the
    O(n²) bases and whitening matrices live in small LRU caches and are recomputed when a module is
    compressed, so memory stays bounded on large models.

    Args:
        model: the (uncompressed) model whose weights the statistics describe; its weight tensors
            are referenced, never modified.
        stats: calibration statistics for (a subset of) its modules.
        cfg: damping, γ, hybrid τ and fallback.
        max_cached_bases: how many n×n bases to keep (LRU).
    """

    def __init__(self, model: nn.Module, stats: CalibStats, cfg: CompressConfig = CompressConfig(),
                 max_cached_bases: int = 16):
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
        self._white: OrderedDict[str, Whitening] = OrderedDict()
        self._bases: OrderedDict[tuple[str, str], Basis] = OrderedDict()
        self.max_cached_bases = max(2, max_cached_bases)
        self.summaries: dict[tuple[str, str], Summary] = {}   # (fqn, method | 'fisher') -> Summary
        self.variance: dict[str, Tensor] = {}                  # group -> μ of the undamped C_x
        self.misalignments: dict[str, Tensor] = {}             # fqn -> (n,) at k = 1..n

    # ---------------------------------------------------------------- basic accessors
    @property
    def modules(self) -> list[ModuleInfo]:
        return self.stats.modules

    def info(self, fqn: str) -> ModuleInfo:
        return self.stats.info(fqn)

    def weight(self, fqn: str) -> Tensor:
        """W (m, n) float64."""
        return self._weights[fqn].to(LINALG_DTYPE)

    def whitening(self, fqn: str) -> Whitening:
        """C_x,δ, its eigenpairs, B and B⁻¹ of the module's input group (LRU-cached per group)."""
        g = self.stats.group[fqn]
        if g in self._white:
            self._white.move_to_end(g)
            return self._white[g]
        wh = whitening(self.stats.cx[g], self.cfg.damping)
        if g not in self.variance:
            shift = float(torch.trace(wh.Cx_d) - torch.trace(self.stats.cx[g].to(LINALG_DTYPE))) / wh.mu.numel()
            self.variance[g] = (wh.mu - shift).clamp_min(0)
        self._white[g] = wh
        while len(self._white) > 4:
            self._white.popitem(last=False)
        return wh

    def resolve(self, fqn: str, method: str) -> str:
        """The base method used for `fqn` (hybrid → fasc where ρ ≥ τ, else the fallback)."""
        if method == "hybrid":
            return "fasc" if self.rho(fqn)[0] >= self.cfg.tau else self.cfg.fallback
        if method not in BASE_METHODS:
            raise FascError(f"Unknown method {method!r}; choose one of {', '.join(BASE_METHODS + ('hybrid',))}.")
        return method

    def basis(self, fqn: str, method: str) -> Basis:
        """The ordered basis of `method` for `fqn` (LRU-cached; its summary is kept for good)."""
        method = self.resolve(fqn, method)
        key = (fqn, method)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        W, C_h = self.weight(fqn), self.stats.ch[fqn].to(LINALG_DTYPE)
        wh = self.whitening(fqn)
        if method == "svd":
            b = basis_svd(W, wh.Cx_d, C_h)
        elif method == "pca":
            b = basis_pca(wh.mu, wh.V, C_h)
        elif method == "fwsvd":
            b = basis_fwsvd(W, wh.Cx_d, C_h, self.stats.fw[fqn], self.cfg.damping)
        elif method == "asvd":
            b = basis_asvd(W, C_h, wh.B, wh.B_inv)
        else:
            b = basis_fasc(W, C_h, wh.B, wh.B_inv, self.cfg.gamma)
            if b.fisher_values is not None:  # γ = 0: the Fisher spectrum is the basis' own
                self.summaries[(fqn, "fisher")] = Summary(b.curve, b.fisher_values)
        self.summaries[key] = Summary(b.curve, b.values)
        self._bases[key] = b
        while len(self._bases) > self.max_cached_bases:
            self._bases.popitem(last=False)
        return b

    def _summary(self, fqn: str, method: str) -> Summary:
        key = (fqn, method if method == "fisher" else self.resolve(fqn, method))
        if key not in self.summaries:
            if method != "fisher":
                self.basis(fqn, method)
            elif self.cfg.gamma == 0:
                self.basis(fqn, "fasc")
            else:  # a diagnostic (Spectra page, report): not computed when a basis is only compressed with
                self.summaries[key] = Summary(None, fisher_eigenvalues(self.stats.ch[fqn], self.whitening(fqn).B))
        return self.summaries[key]

    def decomposed(self, methods: tuple[str, ...] = ("pca", "fasc")) -> bool:
        """True when every module's summary for `methods` (and the diagnostics `precompute` adds) is
        already here, i.e. `precompute(methods)` and `report()` would run no eigen-decomposition."""
        for f in self.stats.fqns:
            for m in methods:
                base = self.resolve(f, m)
                if (f, base) not in self.summaries:
                    return False
                if base == "fasc" and ((f, "fisher") not in self.summaries or f not in self.misalignments):
                    return False
        return True

    def precompute(self, methods: tuple[str, ...] = ("pca", "fasc"),
                   progress: Callable[[int, int], None] | None = None) -> None:
        """Decompose every module for `methods` now (with progress), so later queries are instant."""
        fqns = sorted(self.stats.fqns, key=lambda f: self.stats.group[f])  # group order: whitening LRU hits
        todo = [(f, m) for f in fqns for m in methods if (f, self.resolve(f, m)) not in self.summaries]
        for i, (f, m) in enumerate(todo):
            self._summary(f, m)
            if self.resolve(f, m) == "fasc":  # the diagnostics, while basis and whitening are LRU-cached
                self.fisher_spectrum(f)
                self.misalignment(f)
            if progress is not None:
                progress(i + 1, len(todo))

    def curve(self, fqn: str, method: str) -> np.ndarray:
        """Predicted ΔL(k), k = 0..min(m,n), nats per token."""
        return self._summary(fqn, method).curve[: self.info(fqn).max_rank + 1].numpy()

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
        g = self.stats.group[fqn]
        if g not in self.variance:
            self.whitening(fqn)
        return self.variance[g]

    def fisher_spectrum(self, fqn: str) -> Tensor:
        """λ: eigenvalues of C_x^{1/2} C_h C_x^{1/2} (γ = 0, damped C_x), descending."""
        return self._summary(fqn, "fisher").values

    def fisher_basis(self, fqn: str) -> Basis:
        """The unshrunk (γ = 0) Fisher basis (for ρ along Fisher directions); not cached."""
        wh = self.whitening(fqn)
        return basis_fasc(self.weight(fqn), self.stats.ch[fqn], wh.B, wh.B_inv, 0.0)

    def misalignment(self, fqn: str) -> np.ndarray:
        """Subspace misalignment between pca and fasc at k = 1..n (entry k−1)."""
        if fqn not in self.misalignments:  # a diagnostic: not computed when a basis is only compressed with
            self.misalignments[fqn] = misalignment_curve(self.whitening(fqn).V, self.basis(fqn, "fasc"))
        return self.misalignments[fqn].numpy()

    def rho(self, fqn: str) -> tuple[float, float]:
        """(mean |ρ(u)|, signed mean ρ(u)) over the random sketch directions (spec §4)."""
        return _rho_means(self.stats.sketch.get(fqn))

    def rho_fisher(self, fqn: str) -> tuple[float, float] | None:
        sk = self.stats.sketch_fisher.get(fqn)
        return None if sk is None else _rho_means(sk)

    def report(self, ratio: float = 0.5, decompose: bool = True) -> list[ModuleReport]:
        """Diagnostics of every module at rank round(ratio·min(m,n)).

        `decompose=False` runs no eigen-decomposition: ρ comes from the calibration sketch alone (spec
        §4), and the decomposition fields are filled only for modules already decomposed (else None).
        """
        rows = []
        for info in self.modules:
            f = info.fqn
            k = max(1, min(info.max_rank, round(ratio * info.max_rank)))
            rf = self.rho_fisher(f)
            r_abs, r_sig = self.rho(f)
            row = ModuleReport(
                fqn=f, layer=info.layer, kind=info.kind, out_features=info.out_features,
                in_features=info.in_features, rho=r_abs, rho_signed=r_sig,
                rho_fisher=None if rf is None else rf[0], rho_fisher_signed=None if rf is None else rf[1],
                misalignment=None, rank=k, dl_pca=None, dl_fasc=None, fisher_top_share=None,
                variance_top_share=None)
            if decompose or self._has_diagnostics(f):
                lam, mu = self.fisher_spectrum(f), self.variance_spectrum(f)
                row.misalignment = float(self.misalignment(f)[k - 1])
                row.dl_pca, row.dl_fasc = self.predicted(f, "pca", k), self.predicted(f, "fasc", k)
                row.fisher_top_share, row.variance_top_share = _share(lam, k), _share(mu, k)
            rows.append(row)
        return rows

    def _has_diagnostics(self, fqn: str) -> bool:
        """The report's decomposition fields of `fqn` are all at hand (no eigen-decomposition needed)."""
        return (fqn in self.misalignments and (fqn, "fisher") in self.summaries and (fqn, "pca") in self.summaries
                and (fqn, "fasc") in self.summaries and self.stats.group[fqn] in self.variance)

    # ---------------------------------------------------------------- persistence (small: O(n) per module)
    def summary_tensors(self) -> dict[str, Tensor]:
        out = {}
        for (f, m), s in self.summaries.items():
            if s.curve is not None:
                out[f"curve/{m}/{f}"] = s.curve
            out[f"values/{m}/{f}"] = s.values
        out.update({f"variance/{g}": v for g, v in self.variance.items()})
        out.update({f"misalignment/{f}": v for f, v in self.misalignments.items()})
        return {k: v.clone().contiguous() for k, v in out.items()}  # shared tensors (pca μ) saved apart

    def load_summary_tensors(self, tensors: dict[str, Tensor]) -> None:
        curves = {}
        for name, t in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "variance":
                self.variance[rest] = t
            elif kind == "misalignment":
                self.misalignments[rest] = t
            else:
                m, _, f = rest.partition("/")
                curves.setdefault((f, m), {})[kind] = t
        for key, d in curves.items():
            self.summaries[key] = Summary(d.get("curve"), d["values"])


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
