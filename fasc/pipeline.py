"""Orchestration shared by the CLI, the app and the benchmarks: built-in data, cached calibration."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from . import cache
from .analysis import Analysis
from .calibrate import Progress, calibrate
from .config import CalibConfig, CompressConfig
from .data import Batch, data_fingerprint, load_source, make_batches
from .errors import FascError
from .loading import PACKAGE_DIR, resolve
from .modules import model_fingerprint
from .stats import CalibStats

DATA_DIR = PACKAGE_DIR / "data"
DEMO_DATA = PACKAGE_DIR / "demo" / "data"
KNOWLEDGE_TEXT = DATA_DIR / "knowledge_en.txt"  # encyclopedic facts, none of the probe's (fasc/data/README.md)


@dataclass(frozen=True)
class DataPaths:
    """The built-in texts for a model: calibration text, held-out text, fact probe, and a general
    text that holds none of the probe's facts (to calibrate on part of the facts only) — plus the
    calibration settings measured best for it (BENCHMARKS.md): the demo model knows its facts with
    p ≈ 1, so its gradients saturate and T = 2 recovers them (+7 to +9 recall points at 50 % rank);
    SmolLM2 is best at T = 1 (T = 2: −2 points, within noise; T = 4: −4 to −5)."""

    calib: Path
    heldout: Path
    probe: Path
    text: Path
    temperature: float = 1.0
    seq_len: int = 256
    calib_extra: tuple[Path, ...] = ()   # more calibration files, interleaved with `calib`

    @property
    def calib_files(self) -> list[Path]:
        """Every default calibration file (read interleaved, row by row, by `make_batches`)."""
        return [self.calib, *self.calib_extra]


def default_data(model_spec: str | None) -> DataPaths:
    """Demo data for the demo model (and anything compressed from it); for real models general English
    mixed with the knowledge text (facts in encyclopedic sentences, none of the probe's), half each."""
    builtin = None
    if model_spec:
        try:
            builtin = resolve(model_spec).builtin
        except FascError:
            builtin = None
    if builtin == "demo":
        return DataPaths(DEMO_DATA / "calib.txt", DEMO_DATA / "heldout.txt", DEMO_DATA / "facts.jsonl",
                         DEMO_DATA / "filler.txt", temperature=2.0, seq_len=64)
    general = DATA_DIR / "general_en.txt"
    return DataPaths(general, DATA_DIR / "general_en_heldout.txt", DATA_DIR / "real_facts.jsonl", general,
                     calib_extra=(KNOWLEDGE_TEXT,))


def batches_from_files(tokenizer, paths: list[str | Path], cfg: CalibConfig) -> list[Batch]:
    """Read and tokenize calibration files (text or prompt/answer JSONL), interleaved."""
    if not paths:
        raise FascError("No calibration data given; pass --data FILE (text or JSONL).")
    names = ", ".join(Path(p).name for p in paths)
    return make_batches(tokenizer, [load_source(p) for p in paths], cfg, name=names)


def calibrate_in_passes(model: nn.Module, batches: list[Batch], cfg: CalibConfig, layers_per_pass: int,
                        progress: Progress | None = None, model_fp: str | None = None) -> CalibStats:
    """Calibrate `layers_per_pass` layers at a time (one forward+backward over the data per group)
    and merge: accumulator memory during a pass is that of the group only (spec §1 statistics are
    per module, so the result equals a single pass up to float rounding)."""
    from dataclasses import replace

    from .modules import find_linears

    if layers_per_pass < 1:
        raise FascError(f"--layers-per-pass must be ≥ 1, got {layers_per_pass}.")
    layers = sorted({i.layer for i in find_linears(model)} & set(cfg.layers or range(10**6)))
    groups = [tuple(layers[i:i + layers_per_pass]) for i in range(0, len(layers), layers_per_pass)]
    total = sum(int(b.stat_mask.sum()) for b in batches) * len(groups)
    parts = []
    for j, g in enumerate(groups):
        done = j * total // len(groups)
        inner = None if progress is None else (lambda i, n, d=done: progress(d + i, total))
        parts.append(calibrate(model, batches, replace(cfg, layers=g), inner, model_fp=model_fp))
    merged = CalibStats.merge(parts)
    merged.config = cfg
    return merged


def calibrate_cached(model: nn.Module, batches: list[Batch], cfg: CalibConfig,
                     progress: Progress | None = None, root: Path | None = None,
                     model_fp: str | None = None, layers_per_pass: int | None = None) -> tuple[CalibStats, bool]:
    """(stats, from_cache): calibration re-used when the same model/data/config ran before.
    `layers_per_pass` bounds memory (see `calibrate_in_passes`) and does not change the key."""
    mfp = model_fp or model_fingerprint(model)
    dfp = data_fingerprint(batches)
    key = cache.cache_key(mfp, dfp, cfg)
    if layers_per_pass:
        return cache.get_or_compute(
            key, lambda: calibrate_in_passes(model, batches, cfg, layers_per_pass, progress, mfp), root)
    return cache.get_or_compute(key, lambda: calibrate(model, batches, cfg, progress, model_fp=mfp), root)


def analysis_cached(model: nn.Module, stats: CalibStats, cfg: CompressConfig = CompressConfig(),
                    methods: tuple[str, ...] = ("pca", "fasc"), progress: Progress | None = None,
                    root: Path | None = None) -> tuple[Analysis, bool]:
    """(analysis, from_cache): the O(n) summaries (ΔL curves, spectra, misalignment) of every module
    are stored beside the statistics' cache entry, so the eigen-decompositions run once per
    (statistics, damping, γ). Bases themselves are recomputed only for modules being compressed."""
    an = Analysis(model, stats, cfg)
    folder = Path(root or cache.default_root()) / stats.key if stats.key else None
    tag = hashlib.sha256(json.dumps([cfg.damping, cfg.gamma]).encode()).hexdigest()[:12]
    path = folder / f"summary-{tag}.safetensors" if folder is not None else None
    hit = False
    if path is not None and path.is_file():
        try:
            an.load_summary_tensors(load_file(str(path)))
            hit = True
        except Exception:  # noqa: BLE001 - a damaged summary is simply recomputed
            path.unlink(missing_ok=True)
    before = len(an.summaries)
    an.precompute(methods, progress=progress)
    if path is not None and folder.is_dir() and len(an.summaries) != before:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
        try:
            save_file(an.summary_tensors(), str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return an, hit and len(an.summaries) == before
