"""The measured knowledge map: where a model keeps the facts of a probe, module by module.

For each module j, the module alone is replaced by its rank-k_j version (the others stay dense), the
probe is scored, and the module is restored. Per fact i this gives

    nll[j, i] = −log P(answer_i | prompt_i)   (nats, Σ over the answer's tokens, teacher-forced)
    correct[j, i] = the answer's first token is the top-1 prediction

and per module the two figures of the map: `knowledge_loss` = mean_i (nll[j, i] − nll_dense[i])
(nats per fact) and `recall_drop` = recall_dense − recall_j. The matrices are kept (float32,
modules × facts) so that one fact can be looked at later without measuring again.

Beside it, the statistics that claim to say where facts live: ρ (spec §4), predicted ΔL (spec §3)
and the *Fisher energy* E_j = ½ tr(C_h C_x) — the decoupled predicted loss of removing module j
entirely (spec §2 with M = 0) — of the general calibration text and of the probe's answers
(calibration with targets='answers'); `spearman` ranks them against the measured map.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import cache
from .allocate import Plan, base_method
from .analysis import Analysis
from .config import CalibConfig
from .data import Example, encode_example
from .errors import FascError
from .evaluate import answer_scores
from .linalg import LINALG_DTYPE
from .modules import ModuleInfo
from .stats import CalibStats
from .surgery import dense_module, replace_module

MAP_FORMAT = 1


@dataclass
class KnowledgeMap:
    """Per-fact answer losses with one module compressed at a time.

    Attributes:
        fqns, ranks, methods: the modules measured, in order, with their rank and base method.
        base_nll (F,) float32, base_correct (F,) bool: the uncompressed model.
        nll (M, F) float32, correct (M, F) bool: row j = only module j compressed.
    """

    fqns: list[str]
    ranks: list[int]
    methods: list[str]
    base_nll: Tensor
    base_correct: Tensor
    nll: Tensor
    correct: Tensor

    @property
    def n_facts(self) -> int:
        return int(self.base_nll.numel())

    def knowledge_loss(self) -> Tensor:
        """(M,) mean increase of −log P(answer | prompt) over the facts, nats per fact."""
        return (self.nll.double() - self.base_nll.double()).mean(1)

    def recall_drop(self) -> Tensor:
        """(M,) first-token recall of the dense model minus recall with module j compressed."""
        return self.base_correct.double().mean() - self.correct.double().mean(1)

    def rows(self) -> list[dict]:
        kl, rd = self.knowledge_loss(), self.recall_drop()
        return [{"fqn": f, "rank": k, "method": m, "knowledge_loss": float(kl[j]), "recall_drop": float(rd[j])}
                for j, (f, k, m) in enumerate(zip(self.fqns, self.ranks, self.methods))]

    def fact_effects(self, i: int) -> list[tuple[str, float, bool]]:
        """For fact i: (module, increase of −log P(answer), still top-1) with that module alone
        compressed, most harmful first."""
        if not 0 <= i < self.n_facts:
            raise FascError(f"Fact {i} is out of range; the map has {self.n_facts} facts (0 … {self.n_facts - 1}).")
        d = self.nll[:, i].double() - float(self.base_nll[i])
        order = torch.argsort(d, descending=True)
        return [(self.fqns[j], float(d[j]), bool(self.correct[j, i])) for j in order.tolist()]

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Atomic: written beside `path` and renamed into place."""
        tensors = {"base_nll": self.base_nll.float().contiguous(), "nll": self.nll.float().contiguous(),
                   "base_correct": self.base_correct.to(torch.uint8).contiguous(),
                   "correct": self.correct.to(torch.uint8).contiguous()}
        meta = {"format": str(MAP_FORMAT), "fqns": json.dumps(self.fqns), "ranks": json.dumps(self.ranks),
                "methods": json.dumps(self.methods)}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> "KnowledgeMap":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != str(MAP_FORMAT):
            raise FascError(f"{path.name} is not a knowledge map of format {MAP_FORMAT}; it will be measured again.")
        t = load_file(str(path))
        km = cls(json.loads(meta["fqns"]), json.loads(meta["ranks"]), json.loads(meta["methods"]),
                 t["base_nll"], t["base_correct"].bool(), t["nll"], t["correct"].bool())
        if km.nll.shape != (len(km.fqns), km.n_facts) or km.correct.shape != km.nll.shape:
            raise FascError(f"{path.name} is damaged (shapes disagree); it will be measured again.")
        return km


# ---------------------------------------------------------------------- ranks
def share_ranks(infos: list[ModuleInfo], share: float) -> dict[str, int]:
    """Every module keeps the share c of its parameters: k = round(c·mn/(m+n)) in [1, min(m,n)]
    (the uniform baseline of spec §6)."""
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise FascError(f"The reference parameter share must be in (0, 1], got {share!r}; e.g. 0.5 keeps half.")
    return {i.fqn: max(1, min(i.max_rank, round(share * i.params / (i.out_features + i.in_features))))
            for i in infos}


def _targets(an: Analysis, plan: Plan | None, share: float | None, method: str) -> tuple[list[str], list[int], list[str]]:
    if (plan is None) == (share is None):
        raise FascError("Give exactly one of a plan (its planned ranks) or a reference parameter share.")
    if plan is not None:
        known = {i.fqn for i in an.modules}
        unknown = sorted(set(plan.ranks) - known)
        if unknown:
            raise FascError(f"The plan names {len(unknown)} modules without statistics, e.g. {unknown[0]}; "
                            f"allocate the plan on this calibration.")
        if not plan.ranks:
            raise FascError("The plan compresses no module; allocate ranks first.")
        order = [i.fqn for i in an.modules if i.fqn in plan.ranks]
        return order, [plan.ranks[f] for f in order], [base_method(an, f, plan.methods[f]) for f in order]
    ranks = share_ranks(an.modules, share)
    order = [i.fqn for i in an.modules]
    return order, [ranks[f] for f in order], [base_method(an, f, method) for f in order]


def encode_probe(tokenizer, examples: list[Example]) -> list[tuple[list[int], int]]:
    if not examples:
        raise FascError("The probe has no facts; give a JSONL file with prompt/answer lines.")
    return [encode_example(tokenizer, ex) for ex in examples]


def probe_subset(examples: list[Example], max_facts: int | None) -> list[Example]:
    """At most `max_facts` facts, evenly spaced through the file (deterministic; keeps every relation)."""
    if max_facts is None or max_facts >= len(examples):
        return list(examples)
    if max_facts < 1:
        raise FascError(f"--max-facts must be ≥ 1, got {max_facts}.")
    step = len(examples) / max_facts
    return [examples[int(i * step)] for i in range(max_facts)]


# ---------------------------------------------------------------------- measurement
def knowledge_map(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
                  plan: Plan | None = None, share: float | None = None, method: str = "fasc",
                  batch_size: int = 32, progress: Callable[[int, int], object] | None = None) -> KnowledgeMap:
    """Measure the knowledge map (see the module docstring).

    Args:
        model: the uncompressed model `an` was built on; each module is swapped for its rank-k
            version in place and restored (in `finally`), so the model is left as it was.
        an: the analysis giving the factors.
        examples: the probe.
        plan: measure each planned module at its planned rank and method; or
        share: measure every module at the uniform parameter share `share` with `method`.
        progress: called (done, total) after each evaluation (total = modules + 1); returning
            False cancels (FascError, the model restored).
    """
    fqns, ranks, methods = _targets(an, plan, share, method)
    encoded = encode_probe(tokenizer, examples)
    total = len(fqns) + 1

    def tick(done: int) -> None:
        if progress is not None and progress(done, total) is False:
            raise FascError("Knowledge map cancelled; nothing was stored.")

    base_nll, base_ok = answer_scores(model, encoded, batch_size)
    tick(1)
    mods = dict(model.named_modules())
    nll = torch.empty(len(fqns), len(encoded), dtype=torch.float32)
    ok = torch.empty(len(fqns), len(encoded), dtype=torch.bool)
    for j, (f, k, m) in enumerate(zip(fqns, ranks, methods)):
        old = mods.get(f)
        if old is None or not hasattr(old, "weight"):
            raise FascError(f"Module {f} is not a dense layer in this model (already compressed?); measure the map "
                            f"on the uncompressed model.")
        U, V = an.factors(f, m, k)
        with torch.no_grad():
            new = dense_module(old, U @ V.T)
        replace_module(model, f, new)
        try:
            nll[j], ok[j] = answer_scores(model, encoded, batch_size)
        finally:
            replace_module(model, f, old)
        tick(j + 2)
    return KnowledgeMap(fqns, ranks, methods, base_nll, base_ok, nll, ok)


def map_key(an: Analysis, encoded: list[tuple[list[int], int]], fqns: list[str], ranks: list[int],
            methods: list[str]) -> str:
    """Content address: statistics key + subspace config + ranks/methods + probe token ids."""
    probe = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()
    payload = {"stats": an.stats.key, "damping": an.cfg.damping, "gamma": an.cfg.gamma,
               "modules": [fqns, ranks, methods], "probe": probe, "format": MAP_FORMAT}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def knowledge_map_cached(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
                         plan: Plan | None = None, share: float | None = None, method: str = "fasc",
                         batch_size: int = 32, progress: Callable[[int, int], object] | None = None,
                         root: Path | None = None, cached_only: bool = False) -> tuple[KnowledgeMap | None, bool]:
    """(map, from_cache): stored beside the statistics' cache entry as `kmap-<key>.safetensors`
    (keyed by statistics, damping, γ, ranks, methods and the probe's token ids; written atomically).
    With `cached_only`, returns (None, False) instead of measuring."""
    fqns, ranks, methods = _targets(an, plan, share, method)
    encoded = encode_probe(tokenizer, examples)
    folder = Path(root or cache.default_root()) / an.stats.key if an.stats.key else None
    path = folder / f"kmap-{map_key(an, encoded, fqns, ranks, methods)}.safetensors" if folder else None
    if path is not None and path.is_file():
        try:
            return KnowledgeMap.load(path), True
        except Exception:  # noqa: BLE001 - a damaged map is measured again
            path.unlink(missing_ok=True)
    if cached_only:
        return None, False
    km = knowledge_map(model, tokenizer, an, examples, plan=plan, share=share, method=method,
                       batch_size=batch_size, progress=progress)
    if path is not None and folder.is_dir():
        km.save(path)
    return km, False


# ---------------------------------------------------------------------- predictors
def fisher_energy(stats: CalibStats) -> dict[str, float]:
    """E_j = ½ tr(C_h C_x) per module: the decoupled predicted loss of removing it (spec §2, M = 0),
    nats per statistics token. Undamped; O(n²) per module, no decomposition."""
    out = {}
    for f in stats.fqns:
        C_x = stats.cx[stats.group[f]].to(LINALG_DTYPE)
        C_h = stats.ch[f].to(LINALG_DTYPE)
        out[f] = 0.5 * float((C_h * C_x.T).sum())
    return out


def energy_shares(energy: dict[str, float]) -> dict[str, float]:
    tot = sum(max(v, 0.0) for v in energy.values())
    return {f: (max(v, 0.0) / tot if tot > 0 else 0.0) for f, v in energy.items()}


def focus_ratio(facts: dict[str, float], general: dict[str, float]) -> dict[str, float]:
    """Each module's share of the facts' Fisher energy over its share of the general text's
    (1 = as much as for language in general; > 1 = the loss of facts concentrates here)."""
    sf, sg = energy_shares(facts), energy_shares(general)
    return {f: (sf[f] / sg[f] if sg.get(f, 0) > 0 else math.nan) for f in sf}


def answer_config(cfg: CalibConfig, encoded: list[tuple[list[int], int]]) -> CalibConfig:
    """The general calibration config moved onto the probe: loss on the answers only, a token budget
    that holds the facts given (each fact one row, cut at `seq_len`)."""
    n = sum(min(len(ids), cfg.seq_len) for ids, _ in encoded)
    return replace(cfg, targets="answers", n_tokens=max(n, 2), layers=None)


def facts_within(tokenizer, examples: list[Example], n_tokens: int) -> list[Example]:
    """The most facts, evenly spaced through the probe, whose tokens fit in `n_tokens` (the general
    calibration's budget: the fact-focused statistics are not estimated from more data)."""
    lengths = [len(ids) for ids, _ in encode_probe(tokenizer, examples)]
    if sum(lengths) <= n_tokens:
        return list(examples)
    lo, hi = 1, len(examples)
    while lo < hi:  # largest m whose evenly spaced subset fits
        m = (lo + hi + 1) // 2
        step = len(examples) / m
        if sum(lengths[int(i * step)] for i in range(m)) <= n_tokens:
            lo = m
        else:
            hi = m - 1
    return probe_subset(examples, lo)


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get average ranks; Pearson of the ranks). NaN when fewer than
    3 pairs or either side is constant. Pairs with a NaN on either side are dropped."""
    x = torch.as_tensor(list(a), dtype=torch.float64)
    y = torch.as_tensor(list(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}.")
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of x, ties sharing their average rank. (n,) -> (n,) float64."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def predictor_table(km: KnowledgeMap, an: Analysis, energy_general: dict[str, float] | None = None,
                    energy_facts: dict[str, float] | None = None,
                    sketch_fisher: dict[str, Tensor] | None = None) -> list[dict]:
    """Spearman of each statistic with the measured map (knowledge loss and recall drop), over the
    map's modules. A statistic not available (ρ along Fisher directions not measured — from
    `sketch_fisher` or the statistics' own —, no probe calibration) is left out."""
    kl, rd = km.knowledge_loss().tolist(), km.recall_drop().tolist()
    stats: list[tuple[str, list[float]]] = [
        ("ρ (random directions)", [an.rho(f)[0] for f in km.fqns])]
    if all(an.rho_fisher(f, sketch_fisher) is not None for f in km.fqns):
        stats.append(("ρ along Fisher directions", [an.rho_fisher(f, sketch_fisher)[0] for f in km.fqns]))
    stats.append(("predicted ΔL at the map's ranks",
                  [an.predicted(f, m, k) for f, m, k in zip(km.fqns, km.methods, km.ranks)]))
    if energy_general is not None:
        stats.append(("Fisher energy, general text", [energy_general[f] for f in km.fqns]))
    if energy_facts is not None:
        stats.append(("Fisher energy, probe answers", [energy_facts[f] for f in km.fqns]))
    if energy_general is not None and energy_facts is not None:
        ratio = focus_ratio(energy_facts, energy_general)
        stats.append(("facts/general energy share", [ratio[f] for f in km.fqns]))
    return [{"statistic": name, "spearman_knowledge_loss": spearman(v, kl),
             "spearman_recall_drop": spearman(v, rd), "n_modules": len(v)} for name, v in stats]


def probe_calibration(model: nn.Module, tokenizer, examples: list[Example], cfg: CalibConfig,
                      progress: Callable[[int, int], object] | None = None,
                      root: Path | None = None) -> tuple[CalibStats, bool]:
    """(statistics, from_cache) of the probe with the loss on its answers only (`answer_config`),
    through the same content-addressed cache as any calibration. At most `cfg.n_tokens` tokens of
    facts (evenly spaced through the probe, `facts_within`)."""
    from .data import make_batches
    from .pipeline import calibrate_cached

    examples = facts_within(tokenizer, examples, cfg.n_tokens)
    acfg = answer_config(cfg, encode_probe(tokenizer, examples))
    batches = make_batches(tokenizer, list(examples), acfg, name="the probe")
    return calibrate_cached(model, batches, acfg, progress=progress, root=root)
