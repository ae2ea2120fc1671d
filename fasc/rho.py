"""ρ along the top Fisher directions (spec §4): a second, sketch-only calibration pass."""

from __future__ import annotations

from torch import Tensor, nn

from .analysis import Analysis
from .calibrate import Calibrator, ProgressFn
from .data import Batch
from .errors import FascError


def measure_rho_fisher(model: nn.Module, batches: list[Batch], an: Analysis, top: int | None = None,
                       progress: ProgressFn | None = None) -> dict[str, Tensor]:
    """The ρ sketch along each module's top Fisher directions B q_i (γ = 0), {fqn: sketch}; `an` and
    its statistics are left as they were. Costs one more forward+backward over `batches`."""
    stats = an.stats
    cfg = stats.config
    s = top or cfg.sketch_size
    dirs = {}
    for info in stats.modules:
        b = an.fisher_basis(info.fqn)
        k = min(s, info.max_rank)
        dirs[info.fqn] = b.directions(k)
    total = sum(int(b.stat_mask.sum()) for b in batches)
    with Calibrator(model, cfg, modules=stats.modules, directions=dirs, covariances=False) as cal:
        for b in batches:
            cal.step(b)
            if progress is not None and progress(cal.n_tokens_, total) is False:
                raise FascError("ρ measurement cancelled.")
    return cal.result().sketch


def rho_fisher_pass(model: nn.Module, batches: list[Batch], an: Analysis, top: int | None = None,
                    progress: ProgressFn | None = None) -> None:
    """`measure_rho_fisher`, stored in `an.stats.sketch_fisher` (in place; what `fasc report` does)."""
    an.stats.sketch_fisher.update(measure_rho_fisher(model, batches, an, top, progress))
