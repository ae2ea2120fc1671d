"""Rank plans (spec §6): per module ranks given directly, as a global rank ratio, or chosen
under a parameter budget — greedily on predicted ΔL (`greedy`), greedily on predicted ΔL scaled by
one measured point per module (`anchored`, see `fasc.anchors`), or the same share of parameters in
every module (`uniform`, the peers' baseline).

A module of rank k costs min(k(m+n), mn) parameters as two factors (`factors="uv"`): once k ≥ mn/(m+n)
the factorization saves nothing, so the compressed weight is stored dense (still of rank k). Stored pivoted
(`factors="pivoted"`, `fasc.layers.PivotedLowRankLinear`, the default) the same rank-k map costs k(m+n−k),
which saves parameters at every k < min(m,n).
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .analysis import Analysis
from .config import (ALLOCATIONS, BASE_METHODS, DEFAULT_FACTORS, FACTORS, HYBRID_FALLBACK, HYBRID_TAU, METHODS,
                     check_hybrid)
from .data import decode_text
from .errors import FascError
from .modules import ModuleInfo, select

PLAN_FORMAT = 1


def rank_cost(m: int, n: int, k: int, factors: str = DEFAULT_FACTORS) -> int:
    """Parameters of an m×n map of rank k stored factored (bias excluded), also its multiply-adds per token:
    k(m+n) as U, V; k(m+n−k) pivoted."""
    return k * (m + n - k) if factors == "pivoted" else k * (m + n)


def factor_cost(info: ModuleInfo, k: int, factors: str = DEFAULT_FACTORS) -> int:
    """`rank_cost` of a module."""
    return rank_cost(info.out_features, info.in_features, k, factors)


def uniform_rank(m: int, n: int, share: float, factors: str = DEFAULT_FACTORS) -> float:
    """The rank, unrounded, at which an m×n weight keeps `share` of its parameters: k(m+n) = c·mn as U, V;
    k(m+n−k) = c·mn pivoted."""
    if factors == "pivoted":
        return ((m + n) - math.sqrt(max((m + n) ** 2 - 4 * share * m * n, 0.0))) / 2
    return share * m * n / (m + n)


def module_params(info: ModuleInfo, k: int, factors: str = DEFAULT_FACTORS) -> int:
    """Parameters of the compressed weight at rank k (bias excluded): factored or dense, the smaller."""
    return min(factor_cost(info, k, factors), info.params)


def is_factored(info: ModuleInfo, k: int, factors: str = DEFAULT_FACTORS) -> bool:
    """True when the factored form is smaller than the dense weight (spec §6)."""
    return factor_cost(info, k, factors) < info.params


def max_factored_rank(info: ModuleInfo, factors: str = DEFAULT_FACTORS) -> int:
    """K: the largest rank still stored factored (at least 1)."""
    if factors == "pivoted":
        return max(1, info.max_rank - 1)
    return max(1, min(info.max_rank, (info.params - 1) // (info.out_features + info.in_features)))


def check_factors(factors: str) -> None:
    if factors not in FACTORS:
        raise FascError(f"Unknown factor storage {factors!r}; choose one of {', '.join(FACTORS)}.")


QK_KINDS = ("q", "k")   # the projections whose product is the attention pattern


def base_method(an: Analysis, fqn: str, method: str, tau: float = HYBRID_TAU,
                fallback: str = HYBRID_FALLBACK, qk_method: str | None = None) -> str:
    """The base method used for `fqn`: `qk_method` on the query and key projections when given (fused
    qkv modules are not split); else `hybrid` → fasc where ρ ≥ τ, else `fallback`; else `method`."""
    if qk_method is not None and an.info(fqn).kind in QK_KINDS:
        return qk_method
    if method == "hybrid":
        return "fasc" if an.rho(fqn)[0] >= tau else fallback
    if method not in BASE_METHODS:
        raise FascError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return method


def base_methods(method: str, fallback: str = HYBRID_FALLBACK, qk_method: str | None = None) -> tuple[str, ...]:
    """The base methods whose decompositions `method` reads (hybrid: fasc and its fallback; and
    `qk_method` when the query/key projections have their own)."""
    out = ("fasc", fallback) if method == "hybrid" else (method,)
    return out + ((qk_method,) if qk_method is not None and qk_method not in out else ())


@dataclass
class Totals:
    """Parameters kept / original over a plan's modules, Σ predicted ΔL, modules and factored ones."""

    kept: int
    original: int
    predicted: float
    modules: int
    factored: int

    @property
    def ratio(self) -> float:
        return self.kept / self.original if self.original else 1.0


@dataclass
class Plan:
    """Ranks and base method per module. One way to give ranks: `{fqn: k}`."""

    ranks: dict[str, int]
    methods: dict[str, str]
    model_fingerprint: str = ""
    note: dict = field(default_factory=dict)
    factors: str = DEFAULT_FACTORS     # how its factored modules are stored, so what each rank costs (FACTORS)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "ranks": self.ranks, "methods": self.methods,
                "model_fingerprint": self.model_fingerprint, "note": self.note, "factors": self.factors}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict, name: str = "plan") -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("ranks"), dict):
            raise FascError(f"{name} is not a rank plan (needs a \"ranks\": {{module: rank}} object); save one "
                            f"from the Ranks page or `fasc compress --save-plan`.")
        ranks, bad = {}, []
        for k, v in d["ranks"].items():
            if isinstance(v, bool) or not isinstance(v, int):
                bad.append(k)
            else:
                ranks[k] = v
        if bad:
            raise FascError(f"{name}: ranks must be integers, not for {bad[:3]}; write e.g. {{\"{bad[0]}\": 64}}.")
        if not ranks:   # would compress nothing: never what a loaded plan means
            raise FascError(f"{name} names no module (\"ranks\" is empty); save a plan from the Ranks page or "
                            f"`fasc compress --save-plan`.")
        methods = d.get("methods") or {}
        method = d.get("method")
        if method is not None:
            methods = {f: methods.get(f, method) for f in ranks}
        factors = d.get("factors", "uv")  # plans saved before pivoted factors (2026-12-07) were U, V
        if factors not in FACTORS:
            raise FascError(f"{name} stores its factors as {factors!r}; a plan's \"factors\" is one of "
                            f"{', '.join(FACTORS)}.")
        return cls(ranks=ranks, methods=methods, model_fingerprint=d.get("model_fingerprint", ""),
                   note=d.get("note", {}), factors=factors)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if p.is_dir():
            raise FascError(f"Plan file {str(path)!r} is a folder; give the plan's .json file.")
        if not p.is_file():
            raise FascError(f"Plan file {str(path)!r} does not exist; check the path.")
        return cls.parse(p.read_bytes(), p.name)

    @classmethod
    def parse(cls, raw: bytes, name: str = "plan") -> "Plan":
        """A plan from the bytes of its JSON (a file or an upload)."""
        if not raw.strip():   # not decode_text's message, which asks for a calibration text
            raise FascError(f"{name} is empty; a plan is a JSON file saved from the Ranks page or by "
                            f"`fasc compress --save-plan`.")
        text = decode_text(raw, name)
        try:
            d = json.loads(text)
        except ValueError:
            raise FascError(f"{name} is not valid JSON; a plan looks like {{\"ranks\": {{\"model.layers.0."
                            f"mlp.down_proj\": 64}}, \"method\": \"fasc\"}}.") from None
        return cls.from_dict(d, name)

    def params(self, an: Analysis) -> tuple[int, int]:
        """(parameters kept, original parameters) over the planned modules."""
        kept = sum(module_params(an.info(f), k, self.factors) for f, k in self.ranks.items())
        return kept, sum(an.info(f).params for f in self.ranks)

    def factored_params(self, an: Analysis) -> tuple[int, int]:
        """(parameters in the factors, parameters of the dense weights they replace) over the modules
        this plan factors (a module at a rank too high to save anything stays dense)."""
        fac = [(an.info(f), k) for f, k in self.ranks.items() if is_factored(an.info(f), k, self.factors)]
        return sum(module_params(i, k, self.factors) for i, k in fac), sum(i.params for i, _ in fac)

    def predicted(self, an: Analysis) -> float:
        """Σ predicted ΔL over the planned modules, nats per token."""
        return float(sum(an.predicted(f, self.methods[f], k) for f, k in self.ranks.items()))

    def totals(self, an: Analysis) -> Totals:
        """Parameters kept / original, Σ predicted ΔL and factored modules: O(modules) lookups."""
        kept, orig = self.params(an)
        n_fac = sum(is_factored(an.info(f), k, self.factors) for f, k in self.ranks.items())
        return Totals(kept, orig, self.predicted(an), len(self.ranks), n_fac)

    def key(self) -> str:
        """A canonical JSON of the ranks and methods (for caches and change detection)."""
        return json.dumps({"ranks": self.ranks, "methods": self.methods}, sort_keys=True)

    def _edited(self, ranks: dict[str, int], methods: dict[str, str]) -> "Plan":
        return Plan(ranks=ranks, methods=methods, model_fingerprint=self.model_fingerprint,
                    note=dict(self.note, edited=True), factors=self.factors)

    def with_rank(self, an: Analysis, fqn: str, k: int) -> "Plan":
        """This plan with `fqn` at rank k (fasc if it was not planned)."""
        info = an.info(fqn)
        if not 1 <= int(k) <= info.max_rank:
            raise FascError(f"Rank {k} for {fqn} is out of range; it must be in [1, {info.max_rank}].")
        methods = dict(self.methods)
        methods.setdefault(fqn, "fasc")
        return self._edited(dict(self.ranks, **{fqn: int(k)}), methods)

    def with_layer_ratio(self, an: Analysis, layer: int, ratio: float) -> "Plan":
        """Every planned module of `layer` at rank round(ratio · min(m, n)) (at least 1)."""
        if not 0 < ratio <= 1:
            raise FascError(f"A layer's rank ratio must be in (0, 1], got {ratio}; e.g. 0.5 keeps half the rank.")
        ranks = dict(self.ranks)
        for f in self.ranks:
            info = an.info(f)
            if info.layer == layer:
                ranks[f] = max(1, min(info.max_rank, round(ratio * info.max_rank)))
        return self._edited(ranks, dict(self.methods))

    def layer_ratios(self, an: Analysis) -> dict[int, float]:
        """Mean k / max_rank of the planned modules per layer."""
        acc: dict[int, list[float]] = {}
        for f, k in self.ranks.items():
            info = an.info(f)
            acc.setdefault(info.layer, []).append(k / info.max_rank)
        return {l: float(np.mean(v)) for l, v in sorted(acc.items())}

    def fits(self, an: Analysis) -> bool:
        """True when the plan names only modules of this analysis and every rank is in range."""
        try:
            validate_plan(self, an)
        except FascError:
            return False
        return True

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def validate_plan(plan: Plan, an: Analysis, model_fp: str | None = None) -> None:
    """Check the whole plan against the statistics before anything is touched."""
    known = {i.fqn for i in an.modules}
    unknown = sorted(set(plan.ranks) - known)
    if unknown:
        raise FascError(f"Plan names {len(unknown)} modules not in the model, e.g. {unknown[:3]}; re-run "
                        f"allocate on this model.")
    if model_fp and plan.model_fingerprint and plan.model_fingerprint != model_fp:
        raise FascError("This plan was made for another model (fingerprint differs); allocate a new plan for "
                        "this model.")
    for f, k in plan.ranks.items():
        info = an.info(f)
        if not 1 <= k <= info.max_rank:
            raise FascError(f"Rank {k} for {f} is out of range; it must be in [1, {info.max_rank}].")
        m = plan.methods.get(f)
        if m not in METHODS:
            raise FascError(f"Plan gives {f} the unknown method {m!r}; use one of {', '.join(METHODS)}.")


def check_request(method: str = "fasc", *, rank_ratio: float | None = None, param_ratio: float | None = None,
                  ranks: object = None, allocation: str = "greedy", tau: float = HYBRID_TAU,
                  fallback: str = HYBRID_FALLBACK, attention_share: float | None = None,
                  qk_method: str | None = None) -> None:
    """What `allocate` checks before it reads the analysis: one of the three budgets, in range, a known
    method and allocation. The CLI calls it first, so a bad budget fails before minutes of calibration."""
    if qk_method is not None and qk_method not in BASE_METHODS:
        raise FascError(f"Unknown method {qk_method!r} for the query/key projections; choose one of "
                        f"{', '.join(BASE_METHODS)}.")
    if qk_method is not None and ranks is not None:
        raise FascError("A plan JSON names each module's method; drop --qk-method with --ranks (or edit the plan's "
                        "methods).")
    if qk_method is not None and allocation == "anchored":
        raise FascError("The anchored allocation measures one method per module; drop --qk-method or use "
                        "--allocation greedy.")
    if allocation not in ALLOCATIONS:
        raise FascError(f"Unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}.")
    if allocation != "greedy" and param_ratio is None:
        raise FascError(f"The {allocation} allocation spreads a parameter budget; give --param-ratio P "
                        f"(e.g. 0.8) instead of a rank ratio or explicit ranks.")
    if sum(x is not None for x in (rank_ratio, param_ratio, ranks)) != 1:
        raise FascError("Give exactly one of a rank ratio, a parameter ratio or explicit ranks "
                        "(--rank-ratio 0.5, --param-ratio 0.5 or --ranks plan.json).")
    if method not in METHODS:
        raise FascError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    check_hybrid(tau, fallback)
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise FascError(f"Rank ratio must be in (0, 1], got {rank_ratio}; e.g. 0.5 keeps half the rank.")
    if param_ratio is not None and not 0 < param_ratio <= 1:
        raise FascError(f"Parameter ratio must be in (0, 1], got {param_ratio}; e.g. 0.5 keeps half.")
    if attention_share is not None:
        if param_ratio is None or allocation == "uniform":
            raise FascError("--attention-share splits a greedy parameter budget between attention and MLP; give "
                            "--param-ratio P with --allocation greedy (or anchored).")
        if isinstance(attention_share, bool) or not isinstance(attention_share, (int, float)) \
                or not 0 < attention_share <= 1:
            raise FascError(f"The attention share must be in (0, 1], got {attention_share!r}; e.g. 0.8 keeps 80 % "
                            f"of the attention modules' parameters.")


def allocate(an: Analysis, method: str = "fasc", *, rank_ratio: float | None = None,
             param_ratio: float | None = None, ranks: dict[str, int] | None = None,
             modules: str | list[str] | None = "all", model_fp: str = "", tau: float = HYBRID_TAU,
             fallback: str = HYBRID_FALLBACK, allocation: str = "greedy",
             anchors: dict[str, float] | None = None, attention_share: float | None = None,
             qk_method: str | None = None, factors: str = DEFAULT_FACTORS) -> Plan:
    """Make a plan: exactly one of `rank_ratio`, `param_ratio`, `ranks`.

    Args:
        an: the analysis (statistics + weights).
        method: a method name; `hybrid` is resolved per module with ρ and τ.
        rank_ratio: k = round(r·min(m,n)) on every selected module.
        param_ratio: keep this fraction of the selected modules' parameters, ranks chosen greedily to
            minimise Σ predicted ΔL of `method` (spec §6).
        ranks: explicit {fqn: k}.
        modules: which modules to compress ('all', 'mlp', 'attention', kinds or FQNs).
        tau, fallback: hybrid only: fasc where ρ ≥ τ, else `fallback` (see `base_method`).
        allocation: how `param_ratio` is spread (spec §6): 'greedy' on predicted ΔL, 'anchored' =
            greedy on predicted ΔL scaled per module by `anchors`, 'uniform' = the same share of
            parameters in every module, k = round(c·mn/(m+n)).
        anchors: {fqn: a_j} scale of each module's predicted curve (`fasc.anchors.Anchors.scales`);
            needed by 'anchored', modules without one keep a_j = 1.
        attention_share: with a greedy (or anchored) `param_ratio`, the attention modules keep this share
            of their parameters and the MLP modules the rest of the budget, each group allocated greedily
            (`split_budget`); None lets one greedy allocation trade between them.
        qk_method: the base method of the query and key projections (None: `method` there too). The
            greedy allocation prices each module with the curve of the method it will be compressed with.
        factors: how the factored modules will be stored ('uv' or 'pivoted'), so what a rank costs in a
            `param_ratio` budget.
    """
    check_factors(factors)
    check_request(method, rank_ratio=rank_ratio, param_ratio=param_ratio, ranks=ranks, allocation=allocation,
                  tau=tau, fallback=fallback, attention_share=attention_share, qk_method=qk_method)
    if allocation == "anchored" and not anchors:
        raise FascError("The anchored allocation needs measured anchors (fasc.anchors.measure_anchors); "
                        "use --allocation anchored on the CLI, which measures them.")
    infos = select(an.modules, modules)
    if ranks is not None:
        chosen = dict(ranks)
        infos = [an.info(f) for f in chosen if f in {i.fqn for i in an.modules}]
    elif rank_ratio is not None:
        chosen = {i.fqn: max(1, min(i.max_rank, round(rank_ratio * i.max_rank))) for i in infos}
    else:
        if allocation == "uniform":
            chosen = uniform_ranks(infos, param_ratio, factors)
        else:
            curves = [an.curve(i.fqn, base_method(an, i.fqn, method, tau, fallback, qk_method)) for i in infos]
            if allocation == "anchored":
                curves = [c * float(anchors.get(i.fqn, 1.0)) for i, c in zip(infos, curves)]
            if attention_share is None:
                chosen = greedy_ranks(infos, curves, param_ratio, factors)
            else:
                chosen = {}
                for group, ratio in split_budget(infos, param_ratio, attention_share):
                    chosen.update(greedy_ranks([infos[j] for j in group], [curves[j] for j in group], ratio,
                                               factors))
    known = {i.fqn for i in an.modules}
    methods = {f: base_method(an, f, method, tau, fallback, qk_method) for f in chosen if f in known}
    plan = Plan(ranks=chosen, methods=methods, model_fingerprint=model_fp, factors=factors,
                note={"method": method, "rank_ratio": rank_ratio, "param_ratio": param_ratio,
                      "allocation": allocation if param_ratio is not None else None,
                      **({"attention_share": attention_share} if attention_share is not None else {}),
                      **({"qk_method": qk_method} if qk_method is not None else {}),
                      **({"tau": tau, "fallback": fallback} if method == "hybrid" else {})})
    validate_plan(plan, an)
    return plan


def load_plan(src: str | Path | bytes, an: Analysis, model_fp: str = "", *, name: str | None = None,
              method: str | None = None, tau: float = HYBRID_TAU, fallback: str = HYBRID_FALLBACK) -> Plan:
    """A saved plan (a path, or the bytes of an upload called `name`) checked against this analysis:
    what `fasc compress --ranks` and the Ranks page load. Modules without a method of their own get
    `method`, else the plan's own `note.method`, else fasc; hybrid is resolved with τ and `fallback`."""
    if isinstance(src, (bytes, bytearray)):
        name = name or "plan"
        loaded = Plan.parse(bytes(src), name)
    else:
        name = name or Path(src).name
        loaded = Plan.load(src)
    if model_fp and loaded.model_fingerprint and loaded.model_fingerprint != model_fp:
        raise FascError(f"{name} was made for another model (fingerprint differs); allocate a new plan for "
                        f"this model.")
    note = loaded.note if isinstance(loaded.note, dict) else {}
    if method is None:
        method = note.get("method") if note.get("method") in METHODS else "fasc"
    plan = allocate(an, method, ranks=loaded.ranks, model_fp=model_fp, tau=tau, fallback=fallback,
                    factors=loaded.factors)
    plan.methods.update({f: base_method(an, f, m, tau, fallback) for f, m in loaded.methods.items()
                         if f in plan.ranks})
    plan.note = dict(note, loaded_from=name)
    validate_plan(plan, an)
    return plan


def split_budget(infos: list[ModuleInfo], param_ratio: float, attention_share: float) -> list[tuple[list[int], float]]:
    """[(indices of the attention modules, `attention_share`), (indices of the MLP modules, the share that
    keeps `param_ratio` of all their parameters)]; a group that is absent is left out. The MLP's share
    must land in (0, 1]: a FascError names the attention shares that fit."""
    attn = [j for j, i in enumerate(infos) if not i.is_mlp]
    mlp = [j for j, i in enumerate(infos) if i.is_mlp]
    a = sum(infos[j].params for j in attn)
    m = sum(infos[j].params for j in mlp)
    if not attn or not mlp:
        return [(attn or mlp, param_ratio)]
    rest = (param_ratio * (a + m) - attention_share * a) / m
    if not 0 < rest <= 1:
        lo = max(0.0, (param_ratio * (a + m) - m) / a)
        hi = min(1.0, param_ratio * (a + m) / a)
        raise FascError(f"An attention share of {attention_share} with --param-ratio {param_ratio} would leave the MLP "
                        f"modules {rest:.3f} of their parameters; choose an attention share between {lo:.3f} and {hi:.3f}.")
    return [(attn, attention_share), (mlp, rest)]


def uniform_ranks(infos: list[ModuleInfo], param_ratio: float, factors: str = DEFAULT_FACTORS) -> dict[str, int]:
    """Every module keeps the same share c of its parameters: k = round(c·mn/(m+n)), at least 1
    (spec §6, the baseline SVD-LLM / LEMS call "uniform"); pivoted, the k with k(m+n−k) = c·mn.
    c = 1 keeps every weight dense."""
    return {i.fqn: max(1, min(i.max_rank, round(uniform_rank(i.out_features, i.in_features, param_ratio, factors))))
            for i in infos}


def rank_ratio_cost(infos: list[ModuleInfo], rank_ratio: float, factors: str = DEFAULT_FACTORS) -> float:
    """Share of the modules' parameters that `--rank-ratio r` keeps (k = round(r·min(m,n)) costs
    `module_params`): e.g. 0.5 on square modules keeps 100 % as U, V (k(m+n) = mn), 75 % pivoted."""
    total = sum(i.params for i in infos)
    kept = sum(module_params(i, max(1, min(i.max_rank, round(rank_ratio * i.max_rank))), factors) for i in infos)
    return kept / total


def _step_ratio(info: ModuleInfo, curve: np.ndarray, k: int, factors: str) -> float:
    """Predicted loss saved per parameter by rank k → k+1 (a factored step costs m + n; pivoted m + n − 2k − 1)."""
    cost = factor_cost(info, k + 1, factors) - factor_cost(info, k, factors)
    return max(float(curve[k] - curve[k + 1]), 0.0) / max(cost, 1)


def greedy_ranks(infos: list[ModuleInfo], curves: list[np.ndarray], param_ratio: float,
                 factors: str = DEFAULT_FACTORS) -> dict[str, int]:
    """Minimise Σ ΔL_j(k_j) subject to Σ params_j(k_j) ≤ ratio·Σ m_j n_j (spec §6).

    Each module's options are ranks 1..K (factored, K = largest factored rank) and "full" (dense,
    ΔL = 0). Steps are merged into the upper concave hull of (cost, gain) per module (so that the
    greedy order within a module is preserved), then taken globally by gain per parameter; a hull step
    that does not fit is skipped (with that module's later ones), not the end of the allocation, and
    what budget is left is filled one rank at a time (best gain per parameter first), so that a few
    coarse hull steps — a plan of a handful of modules — do not leave the budget unused.
    Pivoted (`factors="pivoted"`), a rank's price falls as it rises (m + n − 2k − 1), so a module's hull can
    be one step too coarse to fit: the two-factor plan (which costs less pivoted) topped up by the same
    fill is the other candidate, and the one with the smaller Σ ΔL is returned.
    """
    total = sum(i.params for i in infos)
    budget = param_ratio * total
    base = sum(module_params(i, 1, factors) for i in infos)
    if base > budget + 1e-9:
        raise FascError(f"A parameter ratio of {param_ratio} is below the minimum {base / total:.4f} (rank 1 "
                        f"everywhere); raise --param-ratio.")
    ranks = _fill(infos, curves, budget, factors, _hull_ranks(infos, curves, budget, factors))
    if factors != "uv":
        other = _fill(infos, curves, budget, factors, _hull_ranks(infos, curves, budget, "uv"))
        if sum(float(c[k]) for c, k in zip(curves, other)) < sum(float(c[k]) for c, k in zip(curves, ranks)):
            ranks = other
    return {info.fqn: r for info, r in zip(infos, ranks)}


def _hull_ranks(infos: list[ModuleInfo], curves: list[np.ndarray], budget: float, factors: str) -> list[int]:
    """`greedy_ranks`' first phase: whole hull steps by gain per parameter, priced as `factors` stores them."""
    items = []  # (ratio, cost, module index, rank reached)
    for j, (info, c) in enumerate(zip(infos, curves)):
        K = max_factored_rank(info, factors)
        pts = [(module_params(info, k, factors), float(c[k]), k) for k in range(1, K + 1)]
        pts.append((info.params, 0.0, info.max_rank))      # full: original weight, no loss
        hull: list[tuple[float, float, int]] = []           # steps (cost, gain, rank reached)
        for (c0, l0, _), (c1, l1, k1) in zip(pts[:-1], pts[1:]):
            step = [float(c1 - c0), max(l0 - l1, 0.0), k1]
            while hull and step[0] > 0 and hull[-1][1] * step[0] <= step[1] * hull[-1][0]:
                prev = hull.pop()                            # merge: keep ratios decreasing
                step = [prev[0] + step[0], prev[1] + step[1], step[2]]
            hull.append(tuple(step))
        for cost, gain, k in hull:
            items.append((gain / cost if cost > 0 else np.inf, cost, j, k))
    items.sort(key=lambda t: -t[0])
    ranks = [1] * len(infos)
    spent = sum(module_params(i, 1, factors) for i in infos)
    blocked: set[int] = set()
    for ratio, cost, j, k in items:
        if j in blocked:
            continue
        if spent + cost > budget + 1e-9:
            blocked.add(j)      # this module's later hull steps build on this one
            continue
        spent += cost
        ranks[j] = k
    return ranks


def _fill(infos: list[ModuleInfo], curves: list[np.ndarray], budget: float, factors: str,
          ranks: list[int]) -> list[int]:
    """`greedy_ranks`' second phase: what budget `ranks` leave, spent one factored rank at a time, best gain
    per parameter first."""
    ranks = list(ranks)
    spent = sum(module_params(i, k, factors) for i, k in zip(infos, ranks))
    heap = []   # single factored rank steps k → k+1 inside the segments not taken
    for j, (info, c) in enumerate(zip(infos, curves)):
        K = max_factored_rank(info, factors)
        if ranks[j] < K:
            heapq.heappush(heap, (-_step_ratio(info, c, ranks[j], factors), j, K))
    while heap:
        _, j, K = heapq.heappop(heap)
        info, c = infos[j], curves[j]
        step = module_params(info, ranks[j] + 1, factors) - module_params(info, ranks[j], factors)
        if spent + step > budget + 1e-9:
            continue            # this module's next steps cost as much (pivoted: at most m + n less)
        spent += step
        ranks[j] += 1
        if ranks[j] < K:
            heapq.heappush(heap, (-_step_ratio(info, c, ranks[j], factors), j, K))
    return ranks
