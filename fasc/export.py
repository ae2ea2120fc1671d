"""Export (spec §7): a compressed model as an ordinary Hugging Face folder plus `fasc_config.json`.

Factored: `model.safetensors` holds each compressed module as `<fqn>.U` (out,k) and `<fqn>.V` (in,k), or
pivoted (`factors="pivoted"`) as `<fqn>.R` (k,in), `<fqn>.P` (out−k,k) and `<fqn>.order` (`fasc.layers`);
`fasc.load_compressed` rebuilds the architecture from `config.json`, swaps in `LowRankLinear` shells
and loads strictly; the folder also carries `modeling_fasc.py` (see `fasc.hf_code`), so plain
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the same factored
model. Merged (`merge=True`): dense W' in the original layers, loadable by plain
`AutoModelForCausalLM.from_pretrained`. Both are written to a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .allocate import check_factors
from .config import DEFAULT_FACTORS
from .errors import FascError, disk_error
from .hf_code import base_config, write_remote_code
from .layers import FACTORED, LowRankLinear, PivotedLowRankLinear, pivoted
from .quiet import quiet_transformers
from .surgery import replace_module
from .version import __version__

FASC_CONFIG = "fasc_config.json"   # beside the weights of every export; this module owns it
EXPORT_FORMAT = 1                  # its format version


def read_fasc_config(folder: str | Path) -> dict:
    """The `fasc_config.json` of an export folder, checked for this format version."""
    path = Path(folder) / FASC_CONFIG
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        raise FascError(f"{path} is unreadable or not JSON; re-export the model.") from None
    if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
        raise FascError(f"{path} has an unknown format; re-export with this version of fasc.")
    return d


def write_fasc_config(folder: str | Path, fields: dict) -> None:
    """Write `fasc_config.json` (format version and fasc version first, then `fields`)."""
    fc = {"format": EXPORT_FORMAT, "fasc_version": __version__, **fields}
    (Path(folder) / FASC_CONFIG).write_text(json.dumps(fc, indent=1))


def prepare_destination(out: str | Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FascError(f"{out} exists and is a file; choose a folder name for the export.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FascError(f"{out} exists and is not empty; choose another folder or pass --overwrite.")
        if not (out / FASC_CONFIG).is_file():   # overwriting swaps the whole folder out and deletes it
            raise FascError(f"{out} is not empty and is not a FASC export (no {FASC_CONFIG}); --overwrite only "
                            f"replaces an earlier export, choose a new folder.")
    _writable_folder(out.parent, "--out")
    return out


def _writable_folder(folder: Path, option: str) -> None:
    """Make `folder` if needed and check that a file can be made in it, by making and removing one
    (permissions, read-only or virtual file systems): before long work, so that it does not fail at the end."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FascError(f"Cannot create the folder {folder} ({e.strerror}); choose another {option}.") from None
    probe = folder / f".fasc-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise FascError(f"Cannot write in {folder} ({e.strerror or e}); choose another {option}.") from None


def check_output_file(path: str | Path, option: str) -> Path:
    """A file the command will write at its end (`--html`, `--save-plan`): not a folder, and its folder
    exists (or is made) and is writable — one line naming `option` otherwise, before any work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FascError(f"{option} {path} is a folder; give a file name.")
    _writable_folder(path.parent, option)
    return path


def atomic_folder(out: Path, write) -> Path:
    """Run write(tmp) into a temporary sibling folder, then swap it in place of `out` atomically."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise FascError(f"Cannot write in {out.parent} ({e.strerror or e}); choose another folder.") from None
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
        if why := disk_error(e):
            raise FascError(f"Export to {out} failed ({why}); nothing was changed there — free disk "
                            f"space or choose another folder.") from None
        raise
    return out


def save_compressed(model: nn.Module, tokenizer, out: str | Path, *, meta: dict | None = None,
                    overwrite: bool = False, factors: str = DEFAULT_FACTORS) -> Path:
    """Write a compressed model (factored if it holds `LowRankLinear` layers, else merged/dense).

    Args:
        meta: extra fields for `fasc_config.json` (method, ranks, ρ, calibration key, source ...).
        factors: 'pivoted' writes each `LowRankLinear` as a `PivotedLowRankLinear` (the same map in k(m+n−k)
            parameters; the default, as `allocate` prices it), 'uv' as it is; pass the plan's `factors`.
    """
    out = prepare_destination(out, overwrite)
    check_factors(factors)
    layers = {f: m for f, m in model.named_modules() if isinstance(m, FACTORED)}
    to_pivot = {f for f, m in layers.items() if factors == "pivoted" and isinstance(m, LowRankLinear)}
    factored = {f: [m.in_features, m.out_features, m.rank, m.bias is not None]
                + (["pivoted"] if f in to_pivot or isinstance(m, PivotedLowRankLinear) else [])
                for f, m in layers.items()}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    fields = {"merged": not factored, "factored": factored, "dtype": dtype, **(meta or {})}

    def write(tmp: Path) -> None:
        with quiet_transformers():
            if factored:
                from safetensors.torch import save_model
                write_remote_code(tmp, model.config, factored)  # loadable by from_pretrained(trust_remote_code)
                try:      # the pivoted layers only while writing: the model in memory keeps U, V (healing trains them)
                    for f in to_pivot:
                        replace_module(model, f, pivoted(layers[f]))
                    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                finally:
                    for f in to_pivot:
                        replace_module(model, f, layers[f])
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        write_fasc_config(tmp, fields)

    return atomic_folder(out, write)


def load_compressed(path: str | Path, device: str = "cpu"):
    """Rebuild a folder written by `save_compressed` exactly: (model, tokenizer)."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    fc = read_fasc_config(path)
    dtype = getattr(torch, fc.get("dtype", "float32"), torch.float32)
    with quiet_transformers():
        config = base_config(path)  # given to the tokenizer too: no remote-code prompt
        tok = AutoTokenizer.from_pretrained(path, config=config)
        if fc.get("merged"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            for fqn, (n, m, k, bias, *stored) in fc["factored"].items():
                shell = PivotedLowRankLinear if stored == ["pivoted"] else LowRankLinear
                replace_module(model, fqn, shell(n, m, k, bias=bias, dtype=dtype))
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
