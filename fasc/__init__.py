"""FASC — knowledge-aware low-rank compression of language models.

    model, tok = fasc.load_model("demo")
    batches = fasc.make_batches(tok, fasc.load_source(path), fasc.CalibConfig(n_tokens=16384))
    stats = fasc.calibrate(model, batches, cfg)                      # leaves the model as it was
    an = fasc.Analysis(model, stats, fasc.CompressConfig(gamma=1.0))  # spectra, ρ, predicted ΔL
    plan = fasc.allocate(an, method="fasc", param_ratio=0.5)         # {fqn: rank}
    fasc.compress_(copy, an, plan)                                  # in place, returns None
    fasc.save_compressed(copy, tok, "out/demo-fasc50")
"""

from .version import __version__

from .allocate import Plan, allocate, base_method, load_plan, validate_plan
from .analysis import Analysis, ModuleReport
from .calibrate import Calibrator, calibrate
from .config import METHODS, CalibConfig, CompressConfig
from .data import Batch, Example, load_probe, load_source, make_batches
from .errors import FascError
from .evaluate import RecallResult, fact_recall, perplexity
from .export import load_compressed, save_compressed
from .layers import LowRankLinear
from .loading import load_model, model_source, model_summary
from .modules import ModuleInfo, find_linears, model_fingerprint
from .pipeline import analysis_cached, batches_from_files, calibrate_cached, compress_and_save, model_defaults
from .stats import CalibStats
from .surgery import compress_

__all__ = [
    "Analysis", "analysis_cached", "base_method", "Batch", "CalibConfig", "CalibStats", "Calibrator", "CompressConfig", "Example", "FascError",
    "LowRankLinear", "METHODS", "ModuleInfo", "ModuleReport", "Plan", "RecallResult", "allocate",
    "batches_from_files", "calibrate", "calibrate_cached", "compress_", "compress_and_save", "fact_recall",
    "find_linears", "load_compressed", "load_model", "load_plan", "load_probe", "load_source", "make_batches",
    "model_defaults", "model_fingerprint", "model_source", "model_summary", "perplexity", "save_compressed", "validate_plan",
]
