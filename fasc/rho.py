"""ρ along the top Fisher directions (spec §4): a second, sketch-only calibration pass."""

from __future__ import annotations

from torch import nn

from .analysis import Analysis
from .calibrate import Calibrator, Progress
from .data import Batch
from .errors import FascError


def rho_fisher_pass(model: nn.Module, batches: list[Batch], an: Analysis, top: int | None = None,
                    progress: Progress | None = None) -> None:
    """Measure ρ along each module's top Fisher directions B q_i (γ = 0) and store the sketch in
    `an.stats.sketch_fisher` (in place). Costs one more forward+backward over `batches`."""
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
    res = cal.result()
    stats.sketch_fisher.update(res.sketch)
