"""Will a rank plan be faster than the dense model? A prediction from the ranks alone.

Every token passes through each matmul layer once, so per-token work (multiply-adds in prefill) and
weight bytes read (decode, memory-bound) both scale with the layers' parameters: a dense (m, n) layer
costs m·n, a factored one k·(m + n) — two smaller matmuls, each with its own fixed cost, so the saving
must clear a margin (`MIN_SPEEDUP`). The prediction counts every matmul layer of the model, the LM
head included (large for small models: 28 % of SmolLM2-135M's), and nothing else (attention scores,
norms, embeddings lookups), so it is an upper bound on the speed-up; `python -m bench.speed` measures
the real one.
"""

from __future__ import annotations

from torch import nn

from .allocate import rank_cost
from .config import DEFAULT_FACTORS


MIN_SPEEDUP = 1.10  # below this predicted speed-up, two matmuls per layer rarely beat one (bench.speed)


def matmul_params(model: nn.Module) -> int:
    """Σ over matmul layers (Linear, Conv1D, LowRankLinear, PivotedLowRankLinear, the LM head) of the weights a
    token uses."""
    total = 0
    for m in model.modules():
        name = type(m).__name__      # also the remote-code copies
        if name in ("LowRankLinear", "PivotedLowRankLinear"):
            total += rank_cost(m.out_features, m.in_features, m.rank,
                               "pivoted" if name == "PivotedLowRankLinear" else "uv")
        elif isinstance(m, nn.Linear) or name == "Conv1D":
            total += m.weight.numel()
    return total


def predicted_speedup(model: nn.Module, shapes: dict[str, tuple[int, int]], ranks: dict[str, int],
                      merge: bool = False, factors: str = DEFAULT_FACTORS) -> float:
    """Dense matmul work over the work after compressing `ranks` ({fqn: k}) of `model` (dense).

    Args:
        shapes: {fqn: (out m, in n)} of the planned modules.
        merge: a merged export keeps dense layers: speed-up 1.
        factors: how the factored modules are stored: 'uv' works k(m+n) per token, 'pivoted' k(m+n−k).
    """
    dense = matmul_params(model)
    if merge:
        return 1.0
    saved = 0
    for f, k in ranks.items():
        m, n = shapes[f]
        work = rank_cost(m, n, k, factors)
        if work < m * n:  # else `compress_` keeps the layer dense (spec §6)
            saved += m * n - work
    return dense / max(dense - saved, 1)


def speed_warning(speedup: float, merge: bool = False) -> str | None:
    """One line when a plan will not be faster than dense (None when it should be)."""
    if merge:
        return ("a merged export (--merge) has the dense model's size and speed; export factored (no --merge) "
                "for a smaller, faster model.")
    if speedup < MIN_SPEEDUP:
        return (f"this plan will not be faster than dense: it cuts the per-token matmul work by only "
                f"{1 - 1 / speedup:.0%} (predicted speed-up {speedup:.2f}×, below {MIN_SPEEDUP:.2f}×); keep fewer "
                f"parameters (e.g. --param-ratio 0.6) if speed matters.")
    return None


def plan_speed(model: nn.Module, an, plan, merge: bool = False) -> tuple[float, str | None]:
    """(predicted speed-up, warning or None) of compressing `model` with `plan` (an `Analysis` gives
    the modules' shapes): what `fasc compress` prints and the Export page shows."""
    shapes = {f: (an.info(f).out_features, an.info(f).in_features) for f in plan.ranks}
    speedup = predicted_speedup(model, shapes, plan.ranks, merge=merge, factors=plan.factors)
    return speedup, speed_warning(speedup, merge)
