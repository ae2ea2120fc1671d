"""Measured anchors for the rank allocation (spec §6, the LEMS idea without an ILP solver).

The decoupled predicted ΔL is a good total but ranks single modules less well. One measured point
per module fixes its scale: compress only module j at a reference rank (the rank that keeps a share
`share` of its parameters), measure the loss increase on held-out calibration tokens, and scale the
module's whole predicted curve by a_j = measured / predicted. The scaled curves stay non-increasing,
so the greedy allocation on each module's hull stays optimal for the scaled (separable) costs.

Cost: one forward pass over the anchor tokens per module (210 on SmolLM2), plus one for the base
loss; keep the anchor slice small (1–4 k tokens).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import cache
from .allocate import base_method, uniform_ranks
from .analysis import Analysis
from .config import ANCHOR_SHARE, HYBRID_FALLBACK, HYBRID_TAU, CalibConfig
from .data import Batch, _pad_id, data_fingerprint, make_batches, text_rows
from .errors import FascError
from .evaluate import target_loss
from .layers import LowRankLinear
from .surgery import replace_module

ANCHORS_FORMAT = 1
SCALE_BOUNDS = (0.1, 10.0)   # a_j is clipped here: a measured ΔL ≤ 0 (noise) must not zero a curve


@dataclass
class Anchors:
    """One measured point per module. `scales[fqn]` = a_j multiplies that module's predicted curve."""

    method: str
    share: float
    n_tokens: int
    base_loss: float
    ranks: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def scales(self) -> dict[str, float]:
        return {f: anchor_scale(self.predicted[f], self.measured[f]) for f in self.ranks}

    def to_dict(self) -> dict:
        return {"format": ANCHORS_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Anchors":
        if not isinstance(d, dict) or d.get("format") != ANCHORS_FORMAT:
            raise FascError("Not a FASC anchors file (format differs); measure the anchors again.")
        d = {k: v for k, v in d.items() if k != "format"}
        return cls(**d)


def anchor_scale(predicted: float, measured: float, bounds: tuple[float, float] = SCALE_BOUNDS) -> float:
    """a_j = measured / predicted, clipped to `bounds`; 1 where nothing is predicted."""
    if not predicted > 1e-12:
        return 1.0
    return float(min(max(measured / predicted, bounds[0]), bounds[1]))


def heldout_batches(tokenizer, sources, cfg: CalibConfig, n_tokens: int) -> list[Batch]:
    """Batches of about `n_tokens` (split evenly over the sources) taken from the *end* of each source
    (its last token windows / last prompt-answer lines), while calibration reads sources from the
    start: disjoint as long as each source is longer than its share of the calibration budget plus
    this slice (`overlap` checks it)."""
    if n_tokens < 2:
        raise FascError(f"The anchor slice needs at least 2 tokens, got {n_tokens}; e.g. --anchor-tokens 2048.")
    sources = [sources] if isinstance(sources, str) else list(sources)
    share = max(2, n_tokens // len(sources))
    out: list[Batch] = []
    for src in sources:
        sub = replace(cfg, n_tokens=share)
        if not isinstance(src, str):
            out += make_batches(tokenizer, list(reversed(src)), sub, name="anchor slice")
            continue
        rows, _ = text_rows(tokenizer, src, cfg.seq_len)
        kept, n = [], 0
        for ids in reversed(rows):
            if n >= share:
                break
            kept.append(ids)
            n += len(ids)
        out += rows_to_batches(kept, cfg.batch_size, _pad_id(tokenizer))
    return out


def rows_to_batches(rows: list[list[int]], batch_size: int, pad: int) -> list[Batch]:
    """Right-padded batches of token rows, every position but the last of a row a target."""
    rows = sorted(rows, key=len)
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        L = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), L), dtype=torch.long)
        tm = torch.zeros((len(chunk), L), dtype=torch.bool)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = torch.tensor(r)
            attn[b, :len(r)] = 1
            tm[b, :len(r) - 1] = True
        out.append(Batch(ids, attn, tm))
    return out


def overlap(a: list[Batch], b: list[Batch]) -> float:
    """Share of the token rows of `a` that also occur as rows of `b` (0 = disjoint slices)."""
    def rows(batches):
        out = []
        for bt in batches:
            for ids, m in zip(bt.input_ids, bt.attention_mask):
                out.append(tuple(ids[m.bool()].tolist()))
        return out
    ra, rb = rows(a), set(rows(b))
    return sum(r in rb for r in ra) / max(len(ra), 1)


def measure_anchors(model: nn.Module, an: Analysis, method: str, batches: list[Batch],
                    share: float = ANCHOR_SHARE, temperature: float = 1.0,
                    progress: Callable[[int, int], None] | None = None, *, tau: float = HYBRID_TAU,
                    fallback: str = HYBRID_FALLBACK) -> Anchors:
    """Compress one module at a time at the rank keeping `share` of its parameters and measure the
    loss increase on `batches` (nats per token, the calibration loss at `temperature`).

    The model is modified temporarily and always restored (also when `progress` raises to cancel).
    """
    if not 0 < share < 1:
        raise FascError(f"The anchor reference share must be in (0, 1), got {share}; e.g. 0.5.")
    t0 = time.perf_counter()
    mods = dict(model.named_modules())
    ref = uniform_ranks(an.modules, share)
    base = target_loss(model, batches, temperature)
    out = Anchors(method=method, share=share, n_tokens=sum(int(b.stat_mask.sum()) for b in batches),
                  base_loss=base)
    n = len(an.modules)
    for i, info in enumerate(an.modules):
        f, k = info.fqn, ref[info.fqn]
        m = base_method(an, f, method, tau, fallback)
        U, V = an.factors(f, m, k)
        old = mods[f]
        bias = None if getattr(old, "bias", None) is None else old.bias.detach()
        replace_module(model, f, LowRankLinear.from_factors(U.to(old.weight.device), V.to(old.weight.device), bias,
                                                            dtype=old.weight.dtype))
        try:
            out.measured[f] = target_loss(model, batches, temperature) - base
        finally:
            replace_module(model, f, old)
        out.ranks[f] = k
        out.predicted[f] = an.predicted(f, m, k)
        if progress is not None:
            progress(i + 1, n)
    out.seconds = time.perf_counter() - t0
    return out


def anchors_cached(model: nn.Module, an: Analysis, method: str, batches: list[Batch],
                   share: float = ANCHOR_SHARE, temperature: float = 1.0,
                   progress: Callable[[int, int], None] | None = None,
                   root: Path | None = None, *, tau: float = HYBRID_TAU,
                   fallback: str = HYBRID_FALLBACK) -> tuple[Anchors, bool]:
    """(anchors, from_cache): stored as JSON beside the statistics' cache entry, keyed by method,
    damping, γ, τ, share, temperature and the anchor tokens."""
    folder = Path(root or cache.default_root()) / an.stats.key if an.stats.key else None
    tag = hashlib.sha256(json.dumps([method, an.cfg.damping, an.cfg.gamma, tau, fallback, share,
                                     temperature, data_fingerprint(batches), ANCHORS_FORMAT]).encode()).hexdigest()[:16]
    path = folder / f"anchors-{tag}.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            return Anchors.from_dict(json.loads(path.read_text())), True
        except (ValueError, TypeError, FascError):
            path.unlink(missing_ok=True)  # damaged: measured again
    res = measure_anchors(model, an, method, batches, share, temperature, progress, tau=tau, fallback=fallback)
    if path is not None and folder.is_dir():
        cache.write_text_atomic(path, json.dumps(res.to_dict()))
    return res, False


__all__ = ["Anchors", "anchor_scale", "anchors_cached", "heldout_batches", "measure_anchors", "overlap"]
