"""`Analysis`: statistics + the model's weights + a `CompressConfig`, with every per-module
decomposition computed once and cached (spectra, predicted ΔL curves, ρ, misalignment).

After the first decomposition of a module, any rank query (predicted ΔL, parameters) is O(1).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import spectra
from .config import BASE_METHODS, CompressConfig
from .errors import FascError
from .linalg_device import LinalgConfig, Place, precision_check, single_threaded_ops
from .modules import ModuleInfo, weight_matrix
from .spectra import (Basis, WideSide, Whitening, basis_asvd, basis_asvd_wide, basis_fasc, basis_fasc_wide,
                      basis_fwsvd, basis_pca, basis_pca_wide, basis_svd, fisher_spectrum, fisher_spectrum_wide,
                      map_loss, misalignment_curve, misalignment_curve_eigen, pca_coordinates, rho_from_sketch,
                      whitening, wide_ok, wide_side)
from .stats import CalibStats

log = logging.getLogger("fasc")
CPU64 = (torch.device("cpu"), torch.float64)  # where summaries (O(n) per module) are kept


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

    Only O(n) summaries (predicted ΔL curves, spectra, misalignment) are kept for every module (on
    the CPU, float64); the O(n²) bases and whitening matrices live in small LRU caches on the
    linear-algebra device and are recomputed when a module is compressed, so memory stays bounded
    on large models.

    Args:
        model: the (uncompressed) model whose weights the statistics describe; its weight tensors
            are referenced, never modified (any device, any float dtype).
        stats: calibration statistics for (a subset of) its modules.
        cfg: damping and γ (what the bases depend on).
        max_cached_bases: how many bases to keep (LRU), and at most `max_cached_bytes` of them.
        linalg: where and in which precision bases, curves and factors are computed
            (`fasc.linalg_device`); statistics and weights are moved there one module at a time.
    """

    def __init__(self, model: nn.Module, stats: CalibStats, cfg: CompressConfig = CompressConfig(),
                 max_cached_bases: int = 16, *, linalg: LinalgConfig = LinalgConfig(),
                 max_cached_bytes: int = 4 << 30):
        self.stats, self.cfg, self.linalg = stats, cfg, linalg
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
        self.place = Place.from_config(linalg)
        self._place_by_width: dict[int, Place] = {}
        self._place_by_group: dict[str, Place] = {}
        self.precision_checks: dict[int, dict] = {}          # input width n -> float32 vs float64 errors
        self.group_conditions: dict[str, float] = {}         # float32 runs: input group -> cond(C_x,δ)
        self.float64_groups: set[str] = set()                 # float32 runs: groups the gate sent to float64
        self._white: OrderedDict[tuple[str, torch.dtype], Whitening] = OrderedDict()
        self._bases: OrderedDict[tuple[str, str], Basis] = OrderedDict()
        self._work: OrderedDict[str, dict] = OrderedDict()   # fqn -> products shared by its methods
        self.max_cached_bases = max(2, max_cached_bases)
        self.max_cached_bytes = max_cached_bytes
        self.summaries: dict[tuple[str, str], Summary] = {}   # (fqn, method | 'fisher') -> Summary
        self.variance: dict[str, Tensor] = {}                  # group -> μ of the undamped C_x
        self.misalignments: dict[str, Tensor] = {}             # fqn -> (max_rank,) at k = 1..max_rank
        # Whiten by B = V diag(μ^{1/2}) instead of Cholesky: set by `precompute` when C_x's eigenpairs
        # are needed anyway (pca, misalignment); the maps, curves and spectra are the same either way.
        self.eigen_whitening = False

    # ---------------------------------------------------------------- basic accessors
    @property
    def modules(self) -> list[ModuleInfo]:
        return self.stats.modules

    def info(self, fqn: str) -> ModuleInfo:
        return self.stats.info(fqn)

    def module_place(self, fqn: str) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) of the module's own weight: where its factors go at surgery."""
        W = self._weights[fqn]
        return W.device, W.dtype

    def place_of(self, fqn: str) -> Place:
        """The linear-algebra place of `fqn`: the configured one, or float64 where float32 is not
        accurate enough — for its input width (the check on the first module of each width) or for
        its input group (the condition-number gate, `_condition_gate`)."""
        if self.place.dtype == torch.float64:
            return self.place
        n = self.info(fqn).in_features
        if n not in self._place_by_width:
            self._place_by_width[n] = self._check_float32(fqn)
        if self._place_by_width[n].dtype == torch.float64:
            return self._place_by_width[n]
        g = self.stats.group[fqn]
        if g not in self._place_by_group:   # groups belong to one layer: one precompute worker each
            self._place_by_group[g] = self._condition_gate(fqn)
        return self._place_by_group[g]

    def _condition_gate(self, fqn: str) -> Place:
        """float32 for `fqn`'s input group only if eps₃₂ · cond(C_x,δ) ≤ `linalg.tol`.

        A float32 eigen-decomposition gets each eigenvalue to about eps·μ_max, so the whitening's
        relative error in its weakest directions is ≈ eps·cond; on SmolLM2 groups with cond 6e5–1.3e7
        gave rank-k maps 5–15 % worse in ΔL while the width check (another layer) passed. The float32
        whitening computed here is kept when it passes; otherwise the group is redone in float64."""
        g = self.stats.group[fqn]
        p32 = self.place
        mu = self.whitening(fqn, p32).mu
        cond = float(mu.max()) / max(float(mu.min()), 1e-300)
        self.group_conditions[g] = cond
        if cond * torch.finfo(torch.float32).eps <= self.linalg.tol:
            return p32
        self._white.pop((g, p32.dtype), None)
        self.variance.pop(g, None)      # recomputed from the float64 whitening
        first = not self.float64_groups      # shared with precompute's workers: one warning per analysis
        self.float64_groups.add(g)
        if first:
            log.warning("float32 is not accurate enough for input groups whose C_x has a condition number above "
                        "%.2g (first: %s, %.2g); those groups are computed in float64.",
                        self.linalg.tol / torch.finfo(torch.float32).eps, g, cond)
        return Place(p32.device, torch.float64)

    def weight(self, fqn: str, place: Place | None = None) -> Tensor:
        """W (m, n) on the linear-algebra device, in its dtype."""
        return (place or self.place_of(fqn)).put(self._weights[fqn])

    def whitening(self, fqn: str, place: Place | None = None) -> Whitening:
        """C_x,δ, its whitening factor and (on first use) eigenpairs, of the module's input group (LRU-cached per group)."""
        place = place or self.place_of(fqn)
        g = self.stats.group[fqn]
        key = (g, place.dtype)
        if key in self._white:
            self._white.move_to_end(key)
            return self._white[key]
        wh = whitening(place.put(self.stats.cx[g]), self.cfg.damping, eigen=self.eigen_whitening)
        self._white[key] = wh
        while len(self._white) > 2:  # consecutive modules share a group (q/k/v, gate/up)
            self._white.popitem(last=False)
        return wh

    def _note_variance(self, g: str, wh: Whitening) -> None:
        """μ of the undamped C_x of group `g` (the damping's shift taken off), kept on the CPU."""
        if g not in self.variance:
            self.variance[g] = (wh.mu - wh.shift).clamp_min(0).to(*CPU64)

    def _workspace(self, fqn: str, place: Place) -> dict:
        """W, C_h and the products its methods share (Bᵀ C_h B, (WB)ᵀWB or the wide side), LRU of 2."""
        key = (fqn, place.dtype)
        if key in self._work:
            self._work.move_to_end(key)
            return self._work[key]
        w = {"W": self.weight(fqn, place), "C_h": place.put(self.stats.ch[fqn])}
        self._work[key] = w
        while len(self._work) > 2:
            self._work.popitem(last=False)
        return w

    def _wide(self, fqn: str, place: Place, wh: Whitening) -> WideSide | None:
        """The m×m problem of a wide module (n > m), or None (narrow, disabled, or C_h not of the form WᵀC_gW)."""
        info = self.info(fqn)
        if not self.linalg.small_side or info.out_features >= info.in_features:
            return None
        w = self._workspace(fqn, place)
        if "wide" not in w:
            ws = wide_side(w["W"], w["C_h"], wh, wh.Cx_d)   # two n²m products, not an n×n eigh
            if not wide_ok(ws) and float(torch.trace(w["C_h"])) > 0:
                log.info("%s: only %.4f of tr(Bᵀ C_h B) lies in range(Bᵀ Wᵀ); solving the n×n problem",
                         fqn, ws.captured)
                ws = None
            w["wide"] = ws
        return w["wide"]

    def _S(self, w: dict, wh: Whitening) -> Tensor:
        if "S" not in w:
            w["S"] = wh.B.T @ w["C_h"] @ wh.B
        return w["S"]

    def _AtA(self, w: dict, wh: Whitening) -> Tensor:
        if "AtA" not in w:
            WB = w["W"] @ wh.B
            w["AtA"] = WB.T @ WB
        return w["AtA"]

    @staticmethod
    def _base(method: str) -> str:
        """`method` checked to be a base method (allocation picks hybrid's base method per module)."""
        if method not in BASE_METHODS:
            if method == "hybrid":
                raise FascError("`hybrid` is chosen per module by allocation; pass the module's base method "
                                "(fasc.allocate.base_method) to the analysis.")
            raise FascError(f"Unknown method {method!r}; choose one of {', '.join(BASE_METHODS + ('hybrid',))}.")
        return method

    def _compute(self, fqn: str, method: str, place: Place, gamma: float | None = None) -> Basis:
        """The basis of a base method, computed at `place` (not cached)."""
        gamma = self.cfg.gamma if gamma is None else gamma
        wh = self.whitening(fqn, place)
        w = self._workspace(fqn, place)
        W, C_h = w["W"], w["C_h"]
        n = self.info(fqn).in_features
        if method == "svd":
            return basis_svd(W, wh.Cx_d, C_h)
        if method == "fwsvd":
            return basis_fwsvd(W, wh.Cx_d, C_h, place.put(self.stats.fw[fqn]), self.cfg.damping)
        ws = self._wide(fqn, place, wh)
        if method == "pca":
            self._note_variance(self.stats.group[fqn], wh)
            if ws is not None:
                return basis_pca_wide(wh.mu, wh.V, ws, pca_coordinates(wh, ws.Z))
            shared = wh.by_eigenpairs and "S" in w    # Bᵀ C_h B of asvd/fasc, in pca's coordinates
            return basis_pca(wh.mu, wh.V, C_h, w["S"] if shared else None)
        if method == "asvd":  # wide bases take B and B⁻ᵀ from the whitening (b.white)
            b = basis_asvd_wide(ws, None, None, n) if ws is not None else \
                basis_asvd(W, C_h, wh.B, None, self._S(w, wh), self._AtA(w, wh) if W.shape[0] >= W.shape[1] else None)
        elif ws is not None:
            b = basis_fasc_wide(ws, C_h, W, None, None, gamma, n)
        else:
            b = basis_fasc(W, C_h, wh.B, None, gamma, self._S(w, wh), self._AtA(w, wh) if gamma else None)
        b.white = wh
        return b

    def basis(self, fqn: str, method: str) -> Basis:
        """The ordered basis of `method` for `fqn` (LRU-cached; its summary is kept for good)."""
        method = self._base(method)
        key = (fqn, method)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        b = self._compute(fqn, method, self.place_of(fqn))
        # a summary already here (e.g. from the cache) is kept: a basis recomputed under another
        # whitening factor has the same curve up to rounding, and cached numbers should not drift
        if method == "fasc" and b.fisher_spectrum is not None:  # γ = 0: the Fisher spectrum is the basis' own
            self.summaries.setdefault((fqn, "fisher"), Summary(b.curve.to(*CPU64), b.fisher_spectrum.to(*CPU64)))
        self.summaries.setdefault(key, Summary(b.curve.to(*CPU64), b.values.to(*CPU64)))
        self._bases[key] = b
        while len(self._bases) > 1 and (len(self._bases) > self.max_cached_bases
                                        or sum(x.nbytes() for x in self._bases.values()) > self.max_cached_bytes):
            self._bases.popitem(last=False)
        return b

    def _check_float32(self, fqn: str) -> Place:
        """Compute `fqn`'s fasc basis in float32 and float64 on the same device and keep float32 for
        its input width only if both the predicted ΔL curve and the loss the float32 rank-k map
        actually achieves (evaluated in float64) are within `linalg.tol` (relative)."""
        p32, p64 = self.place, Place(self.place.device, torch.float64)
        info = self.info(fqn)
        k = max(1, info.max_rank // 2)
        b32, b64 = self._compute(fqn, "fasc", p32), self._compute(fqn, "fasc", p64)
        w64 = self._workspace(fqn, p64)
        wh64 = self.whitening(fqn, p64)
        _, V32 = b32.factors(self.weight(fqn, p32), k)
        achieved = map_loss(w64["C_h"], wh64.Cx_d, p64.put(b32.whitened(k)), p64.put(V32))
        res = precision_check(b32.curve, b64.curve, achieved, k)
        ok = res["curve_rel_err"] <= self.linalg.tol and res["achieved_rel_err"] <= self.linalg.tol
        res.update(module=fqn, dtype="float32" if ok else "float64")
        self.precision_checks[info.in_features] = res
        if not ok:
            log.warning("float32 linear algebra is off by %.2g (ΔL curve) / %.2g (rank-%d map) on %s; computing "
                        "inputs of width %d in float64", res["curve_rel_err"], res["achieved_rel_err"], k, fqn,
                        info.in_features)
        self._white = OrderedDict((key, v) for key, v in self._white.items() if key[1] == (p32 if ok else p64).dtype)
        self._work.clear()
        return p32 if ok else p64

    def _summary(self, fqn: str, method: str) -> Summary:
        key = (fqn, method if method == "fisher" else self._base(method))
        if key not in self.summaries:
            if method != "fisher":
                self.basis(fqn, method)
            elif self.cfg.gamma == 0:
                self.basis(fqn, "fasc")
            else:  # a diagnostic (Spectra page, report): not computed when a basis is only compressed with
                place = self.place_of(fqn)
                wh = self.whitening(fqn, place)
                ws = self._wide(fqn, place, wh)
                w = self._workspace(fqn, place)
                lam = fisher_spectrum_wide(ws, self.info(fqn).in_features) if ws is not None else \
                    fisher_spectrum(w["C_h"], wh.B, self._S(w, wh))
                self.summaries[key] = Summary(None, lam.to(*CPU64))
        return self.summaries[key]

    def decomposed(self, methods: tuple[str, ...] = ("pca", "fasc")) -> bool:
        """True when every module's summary for `methods` (and the diagnostics `precompute` adds) is
        already here, i.e. `precompute(methods)` and `report()` would run no eigen-decomposition."""
        return all(self._done(f, m, True) for f in self.stats.fqns for m in methods)

    def precompute(self, methods: tuple[str, ...] = ("pca", "fasc"),
                   progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                   diagnostics: bool = True) -> None:
        """Decompose every module for `methods` now (with progress), so later queries are instant.

        With `diagnostics` (the default) fasc also gets its Fisher spectrum and misalignment — what the
        dashboard and `fasc report` draw; the misalignment needs the eigen-decomposition of C_x, which
        fasc's own basis (whitened by Cholesky) does not, so `fasc compress` passes False. When pca or
        the diagnostics will eigen-decompose C_x anyway, the analysis whitens by B = V diag(μ^{1/2})
        from those eigenpairs instead (`eigen_whitening`: no Cholesky, and pca's curve and the
        misalignment reuse asvd/fasc's products; same maps and curves up to rounding).

        On the CPU the layers are shared out over `workers` threads (default: `default_workers`), each
        running its eigen-decompositions single-threaded: for matrices of a few thousand rows that
        keeps every core busy, where one multi-threaded LAPACK call does not. Results are the same as
        a serial run (each module's arithmetic is unchanged); `progress` is called from this thread.
        """
        fqns = sorted(self.stats.fqns, key=lambda f: self.stats.group[f])  # group order: whitening LRU hits
        order = sorted(methods, key=lambda m: m == "pca")   # pca last: it reads asvd/fasc's Bᵀ C_h B
        todo = [(f, m) for f in fqns for m in order if not self._done(f, m, diagnostics)]
        if not todo:
            return
        if "pca" in methods or (diagnostics and "fasc" in methods):   # C_x's eigenpairs will be needed
            self._use_eigen_whitening()
        for f in {self.info(f).in_features: f for f, _ in todo}.values():
            self.place_of(f)  # the float32 check, once per input width, before any worker starts
        units: OrderedDict[int, list[tuple[str, str]]] = OrderedDict()
        for f, m in todo:
            units.setdefault(self.info(f).layer, []).append((f, m))
        workers = min(len(units), self.default_workers() if workers is None else max(1, workers))
        if workers <= 1:
            for i, (f, m) in enumerate(todo):
                self._decompose(f, m, diagnostics)
                if progress is not None:
                    progress(i + 1, len(todo))
            return
        def merge(res: dict) -> int:
            self._merge(res)
            return res["n"]

        _in_threads(workers, "fasc-eigh", [partial(self._fork()._decompose_all, items, diagnostics)
                                          for items in units.values()], merge, len(todo), progress)

    def _use_eigen_whitening(self) -> None:
        """Whiten by C_x's eigenpairs from now on (their work is shared with pca and misalignment)."""
        if not self.eigen_whitening:
            self.eigen_whitening = True
            self._white.clear()
            self._work.clear()

    def default_workers(self) -> int:
        """Threads for `precompute`: one per intra-op thread on the CPU (at most 8), as many as ~8 GiB of
        per-thread workspace (≈ 10 n×n matrices of the widest input) allows; 1 on a GPU."""
        if self.place.device.type != "cpu":
            return 1
        n = max((i.in_features for i in self.modules), default=1)
        per_worker = 10 * n * n * torch.empty((), dtype=self.place.dtype).element_size()
        return max(1, min(torch.get_num_threads(), 8, (8 << 30) // per_worker))

    def _done(self, fqn: str, method: str, diagnostics: bool) -> bool:
        base = self._base(method)
        if (fqn, base) not in self.summaries:
            return False
        return not (diagnostics and base == "fasc"
                    and ((fqn, "fisher") not in self.summaries or fqn not in self.misalignments))

    def _decompose(self, fqn: str, method: str, diagnostics: bool = True) -> None:
        self._summary(fqn, method)
        if diagnostics and self._base(method) == "fasc":  # while basis and whitening are LRU-cached
            self.fisher_spectrum(fqn)
            self.misalignment(fqn)

    def _fork(self) -> "Analysis":
        """A worker's view: the same weights, statistics and places, its own caches and results."""
        w = copy.copy(self)
        w._white, w._bases, w._work = OrderedDict(), OrderedDict(), OrderedDict()
        w.summaries, w.variance, w.misalignments = {}, {}, {}
        w.max_cached_bases = 2
        return w

    def _decompose_all(self, items: list[tuple[str, str]], diagnostics: bool = True) -> dict:
        for f, m in items:
            self._decompose(f, m, diagnostics)
        return {"summaries": self.summaries, "variance": self.variance, "misalignments": self.misalignments,
                "n": len(items)}

    def _merge(self, res: dict) -> None:
        self.summaries.update(res["summaries"])
        self.misalignments.update(res["misalignments"])
        for g, v in res["variance"].items():
            self.variance.setdefault(g, v)

    def curve(self, fqn: str, method: str) -> np.ndarray:
        """Predicted ΔL(k), k = 0..min(m,n), nats per token."""
        return self._summary(fqn, method).curve[: self.info(fqn).max_rank + 1].numpy()

    def predicted(self, fqn: str, method: str, k: int) -> float:
        return float(self.curve(fqn, method)[k])

    def factors(self, fqn: str, method: str, k: int) -> tuple[Tensor, Tensor]:
        """(U (m,k), V (n,k)) with W' = U Vᵀ, on the linear-algebra device in its dtype
        (`module_place` says where the module itself lives)."""
        info = self.info(fqn)
        if not 1 <= k <= info.max_rank:
            raise FascError(f"Rank {k} for {fqn} is out of range; it must be in [1, {info.max_rank}].")
        return self.basis(fqn, method).factors(self.weight(fqn), k)

    def factors_many(self, items: list[tuple[str, str, int]], progress: Callable[[int, int], object] | None = None,
                     workers: int | None = None, cholesky: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
        """{fqn: `factors(fqn, method, k)`} for (fqn, method, k) `items`, in their order. On the CPU the
        layers are shared out over `workers` threads (default: `default_workers`) as in `precompute`, each
        computing its modules single-threaded — the same factors as one at a time; `progress` is called
        from this thread. `cholesky` whitens by Cholesky even where this analysis whitens by C_x's
        eigenpairs (after pca or the diagnostics): the same maps W' up to rounding, without an n×n eigh per
        input group. The summaries computed on the way are kept."""
        def fork() -> "Analysis":
            w = self._fork()
            if cholesky:
                w.eigen_whitening = False
            return w

        def keep(summaries: dict) -> None:
            for key, v in summaries.items():   # kept like precompute's, never overwritten
                self.summaries.setdefault(key, v)

        units: OrderedDict[int, list[tuple[str, str, int]]] = OrderedDict()
        for it in items:
            units.setdefault(self.info(it[0]).layer, []).append(it)
        workers = min(len(units), self.default_workers() if workers is None else max(1, workers))
        if workers <= 1:
            a = fork() if cholesky and self.eigen_whitening else self
            out = {}
            for i, (f, m, k) in enumerate(items):
                out[f] = a.factors(f, m, k)
                if progress is not None:
                    progress(i + 1, len(items))
            if a is not self:
                keep(a.summaries)
            return out
        for f in {self.info(f).in_features: f for f, _, _ in items}.values():
            self.place_of(f)  # the float32 check, once per input width, before any worker starts

        def unit(w: "Analysis", todo: list[tuple[str, str, int]]) -> tuple[dict, dict]:
            return {f: w.factors(f, m, k) for f, m, k in todo}, w.summaries

        out = {}

        def merge(got: tuple[dict, dict]) -> int:
            out.update(got[0])
            keep(got[1])
            return len(got[0])

        _in_threads(workers, "fasc-factors", [partial(unit, fork(), todo) for todo in units.values()], merge,
                    len(items), progress)
        return {f: out[f] for f, _, _ in items}

    # ---------------------------------------------------------------- diagnostics
    def variance_spectrum(self, fqn: str) -> Tensor:
        """μ: eigenvalues of C_x (undamped), descending."""
        g = self.stats.group[fqn]
        if g not in self.variance:
            self._note_variance(g, self.whitening(fqn))
        return self.variance[g]

    def fisher_spectrum(self, fqn: str) -> Tensor:
        """λ: eigenvalues of C_x^{1/2} C_h C_x^{1/2} (γ = 0, damped C_x), descending."""
        return self._summary(fqn, "fisher").values

    def fisher_basis(self, fqn: str) -> Basis:
        """The unshrunk (γ = 0) Fisher basis (for ρ along Fisher directions); not cached."""
        return self._compute(fqn, "fasc", self.place_of(fqn), gamma=0.0)

    def misalignment(self, fqn: str) -> np.ndarray:
        """Subspace misalignment between pca and fasc at k = 1..n (entry k−1)."""
        if fqn not in self.misalignments:  # a diagnostic: not computed when a basis is only compressed with
            b, k = self.basis(fqn, "fasc"), self.info(fqn).max_rank
            wh = b.white
            mis = misalignment_curve_eigen(wh.mu, b, k) if wh.by_eigenpairs else \
                misalignment_curve(wh.V, b, k)
            self.misalignments[fqn] = mis.to(*CPU64)
        return self.misalignments[fqn].numpy()

    def rho(self, fqn: str) -> tuple[float, float]:
        """(mean |ρ(u)|, signed mean ρ(u)) over the random sketch directions (spec §4)."""
        return _rho_means(self.stats.sketch.get(fqn))

    def rho_fisher(self, fqn: str, sketches: dict[str, Tensor] | None = None) -> tuple[float, float] | None:
        """(mean |ρ|, signed mean ρ) along the top Fisher directions, from `sketches` (a
        `fasc.rho.measure_rho_fisher` result) or else the statistics' own; None until measured."""
        sk = (self.stats.sketch_fisher if sketches is None else sketches).get(fqn)
        return None if sk is None else _rho_means(sk)

    def report(self, ratio: float = 0.5, decompose: bool = True,
               sketch_fisher: dict[str, Tensor] | None = None) -> list[ModuleReport]:
        """Diagnostics of every module at rank round(ratio·min(m,n)) (ρ along Fisher directions from
        `sketch_fisher` when given, else from the statistics).

        `decompose=False` runs no eigen-decomposition: ρ comes from the calibration sketch alone (spec
        §4), and the decomposition fields are filled only for modules already decomposed (else None).
        """
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise FascError(f"The reference rank ratio must be in (0, 1], got {ratio!r}; e.g. 0.5 is half the rank.")
        if decompose and not all(self._has_diagnostics(i.fqn) for i in self.modules):
            self._use_eigen_whitening()   # pca and misalignment eigen-decompose C_x anyway
        rows = []
        for info in self.modules:
            f = info.fqn
            k = max(1, min(info.max_rank, round(ratio * info.max_rank)))
            rf = self.rho_fisher(f, sketch_fisher)
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


def _in_threads(workers: int, name: str, jobs: list[Callable[[], object]], merge: Callable[[object], int],
                total: int, progress: Callable[[int, int], object] | None) -> None:
    """Run `jobs` on `workers` threads, torch's own ops single-threaded; each result goes to `merge` (in
    this thread), which returns how many items it completed, and `progress(done, total)` follows. A
    failure, or a progress callback that raises (a cancel), stops the queue and propagates."""
    done = 0
    with single_threaded_ops(), ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for fut in as_completed(futures):
                done += merge(fut.result())
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


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
