"""Orchestration shared by the CLI, the app and the benchmarks: built-in data, cached calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from . import cache
from .calibrate import Progress, calibrate
from .config import CalibConfig
from .data import Batch, data_fingerprint, load_source, make_batches
from .errors import FascError
from .loading import PACKAGE_DIR, resolve
from .modules import model_fingerprint
from .stats import CalibStats

DATA_DIR = PACKAGE_DIR / "data"
DEMO_DATA = PACKAGE_DIR / "demo" / "data"


@dataclass(frozen=True)
class DataPaths:
    """The built-in texts for a model: calibration text, held-out text, fact probe."""

    calib: Path
    heldout: Path
    probe: Path


def default_data(model_spec: str | None) -> DataPaths:
    """Demo data for the demo model (and anything compressed from it), general English otherwise."""
    builtin = None
    if model_spec:
        try:
            builtin = resolve(model_spec).builtin
        except FascError:
            builtin = None
    if builtin == "demo":
        return DataPaths(DEMO_DATA / "calib.txt", DEMO_DATA / "heldout.txt", DEMO_DATA / "facts.jsonl")
    return DataPaths(DATA_DIR / "general_en.txt", DATA_DIR / "general_en_heldout.txt", DATA_DIR / "real_facts.jsonl")


def batches_from_files(tokenizer, paths: list[str | Path], cfg: CalibConfig) -> list[Batch]:
    """Read and tokenize calibration files (text or prompt/answer JSONL), interleaved."""
    if not paths:
        raise FascError("No calibration data given; pass --data FILE (text or JSONL).")
    names = ", ".join(Path(p).name for p in paths)
    return make_batches(tokenizer, [load_source(p) for p in paths], cfg, name=names)


def calibrate_cached(model: nn.Module, batches: list[Batch], cfg: CalibConfig,
                     progress: Progress | None = None, root: Path | None = None,
                     model_fp: str | None = None) -> tuple[CalibStats, bool]:
    """(stats, from_cache): calibration re-used when the same model/data/config ran before."""
    mfp = model_fp or model_fingerprint(model)
    dfp = data_fingerprint(batches)
    key = cache.cache_key(mfp, dfp, cfg)
    return cache.get_or_compute(key, lambda: calibrate(model, batches, cfg, progress, model_fp=mfp), root)
