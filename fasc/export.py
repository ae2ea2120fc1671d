"""Export (spec §7): a compressed model as an ordinary Hugging Face folder plus `fasc_config.json`.

Factored: `model.safetensors` holds each compressed module as `<fqn>.U` (out,k) and `<fqn>.V` (in,k);
`fasc.load_compressed` rebuilds the architecture from `config.json`, swaps in `LowRankLinear` shells
and loads strictly; the folder also carries `modeling_fasc.py` (see `fasc.hf_code`), so plain
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the same factored
model. Merged (`merge=True`): dense W' in the original layers, loadable by plain
`AutoModelForCausalLM.from_pretrained`. Both are written to a temporary folder renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import FascError
from .hf_code import base_config, write_remote_code
from .layers import LowRankLinear
from .allocate import Plan, validate_plan
from .analysis import Analysis
from .loading import FASC_CONFIG, _quiet_transformers, _read_fasc_config, resolve
from .surgery import compress_, replace_module

EXPORT_FORMAT = 1


def _version() -> str:
    from . import __version__
    return __version__


def prepare_destination(out: str | Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FascError(f"{out} exists and is a file; choose a folder name for the export.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FascError(f"{out} exists and is not empty; choose another folder or pass --overwrite.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FascError(f"Cannot create the folder {out.parent} ({e.strerror}); choose another --out.") from None
    return out


def atomic_folder(out: Path, write) -> Path:
    """Run write(tmp) into a temporary sibling folder, then swap it in place of `out` atomically."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FascError(f"Export to {out} failed ({e.strerror or e}); nothing was changed there — free disk "
                            f"space or choose another folder.") from None
        raise
    return out


def save_compressed(model: nn.Module, tokenizer, out: str | Path, *, meta: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write a compressed model (factored if it holds `LowRankLinear` layers, else merged/dense).

    Args:
        meta: extra fields for `fasc_config.json` (method, ranks, ρ, calibration key, source ...).
    """
    out = prepare_destination(out, overwrite)
    factored = {f: [m.in_features, m.out_features, m.rank, m.bias is not None]
                for f, m in model.named_modules() if isinstance(m, LowRankLinear)}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    fc = {"format": EXPORT_FORMAT, "fasc_version": _version(), "merged": not factored, "factored": factored,
          "dtype": dtype, **(meta or {})}

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            if factored:
                from safetensors.torch import save_model
                write_remote_code(tmp, model.config, factored)  # loadable by from_pretrained(trust_remote_code)
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        (tmp / FASC_CONFIG).write_text(json.dumps(fc, indent=1))

    return atomic_folder(out, write)


def load_compressed(path: str | Path, device: str = "cpu"):
    """Rebuild a folder written by `save_compressed` exactly: (model, tokenizer)."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    fc = _read_fasc_config(path)
    dtype = getattr(torch, fc.get("dtype", "float32"), torch.float32)
    with _quiet_transformers():
        config = base_config(path)  # given to the tokenizer too: no remote-code prompt
        tok = AutoTokenizer.from_pretrained(path, config=config)
        if fc.get("merged"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            for fqn, (n, m, k, bias) in fc["factored"].items():
                replace_module(model, fqn, LowRankLinear(n, m, k, bias=bias, dtype=dtype))
            wfile = path / "model.safetensors"
            if not wfile.is_file():
                raise FascError(f"{path} has no model.safetensors; re-export the model.")
            try:
                load_model(model, str(wfile), strict=True)
            except RuntimeError as e:
                raise FascError(f"{wfile} does not match {FASC_CONFIG} ({str(e).splitlines()[0][:120]}); "
                                f"re-export the model.") from None
    model.to(device).eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_meta(an: Analysis, plan: Plan, *, method: str, source_model: str, calibration: str,
                model_fp: str) -> dict:
    """The `fasc_config.json` fields `fasc compress` writes beside the weights (spec §7)."""
    try:
        builtin = resolve(source_model).builtin
    except FascError:
        builtin = None
    return {"method": method, "methods": plan.methods, "ranks": plan.ranks,
            "rho": {f: an.rho(f)[0] for f in plan.ranks}, "source_model": source_model,
            "source_builtin": builtin, "source_fingerprint": model_fp, "calibration": calibration,
            "compress_config": asdict(an.cfg), "predicted_delta_loss": plan.predicted(an)}


def compress_and_save(model, tok, an: Analysis, plan: Plan, out: str | Path, *, merge: bool = False,
                      overwrite: bool = False, method: str = "fasc", source_model: str = "",
                      calibration: str = "", model_fp: str = "",
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Compress a deep copy of `model` with `plan` and export it (what `fasc compress` does).

    Returns a summary: folder, sizes, parameter counts, predicted ΔL, files (name → bytes).
    """
    from .modules import parameter_count

    prepare_destination(out, overwrite)  # fail before any work
    validate_plan(plan, an, model_fp or None)
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    compress_(work, an, plan, merge=merge, progress=progress)
    meta = export_meta(an, plan, method=method, source_model=source_model, calibration=calibration,
                       model_fp=model_fp)
    path = save_compressed(work, tok, out, meta=meta, overwrite=overwrite)
    kept, orig = plan.params(an)
    files = {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}
    return {"out": str(path), "merged": merge, "method": method, "modules": len(plan.ranks),
            "params_kept_in_modules": kept, "params_original_in_modules": orig, "param_ratio": kept / orig,
            "model_params_before": parameter_count(model), "model_params_after": parameter_count(work),
            "predicted_delta_loss": plan.predicted(an), "export_bytes": folder_size(path), "files": files,
            "seconds": round(time.perf_counter() - t0, 2)}
