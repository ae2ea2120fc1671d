"""The app's choices without Streamlit: the sidebar model picker, per-model app defaults, the export
folder proposed, and the training checkpoints of the last page.

Environment (all optional; tests use them to point the app at tiny models):
    FASC_APP_MODEL        model spec preselected in the sidebar (default: demo)
    FASC_APP_DEVICE       device preselected for the model: cpu, cuda, cuda:i or auto (default: the
                          first GPU when one is visible, else cpu)
    FASC_APP_CHECKPOINTS  folder of training checkpoints `ckpt-*` (default: fasc/demo/checkpoints)
    FASC_APP_OUT          parent folder proposed for exports (default: ~/fasc-exports)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FascError
from ..loading import DEMO_CHECKPOINTS, DEMO_DIR

MODEL_CHOICES = {
    "demo": "Embedded demo model",
    "smollm2": "SmolLM2-135M-Instruct (real, bundled)",
    "folder": "Local folder",
    "hub": "Hugging Face hub id",
}
DEMO_MISSING = "The embedded demo model is not built yet; train it with `python -m fasc.demo.train` (a few minutes on CPU)."


WEIGHT_DTYPES = ("float32", "bfloat16")   # the first is the default, as `fasc --dtype`: one cache key for both


def gpu_count() -> int:
    """GPUs this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_choices(n_gpus: int) -> list[str]:
    """The devices the sidebar offers, the preferred first: each visible GPU, `auto` (the model spread
    over all of them, accelerate's device_map) when there are several, then the CPU."""
    gpus = [f"cuda:{i}" for i in range(max(0, int(n_gpus)))]
    return gpus + (["auto"] if len(gpus) > 1 else []) + ["cpu"]


def device_label(device: str) -> str:
    if device == "auto":
        return "all GPUs (auto)"
    return "CPU" if device == "cpu" else f"GPU {device}"


def initial_device(n_gpus: int, env: dict | None = None) -> tuple[str, str | None]:
    """(device preselected, note): `FASC_APP_DEVICE` when it names an offered device (`cuda` = `cuda:0`),
    else the first GPU, else the CPU; the note says why an asked-for device was not taken."""
    offered = device_choices(n_gpus)
    want = (env if env is not None else os.environ).get("FASC_APP_DEVICE", "").strip().lower()
    want = "cuda:0" if want == "cuda" else want
    if not want or want in offered:
        return (want or offered[0]), None
    return offered[0], (f"FASC_APP_DEVICE={want} is not available here (offered: {', '.join(offered)}); "
                        f"using {offered[0]}.")


def model_ident(spec: str, device: str, dtype: str) -> str:
    """One loaded model: the same spec on another device or in another dtype is another model for the
    session's calibration and analysis (its statistics and bases live elsewhere)."""
    return f"{spec} · {device} · {dtype}"


def demo_available() -> bool:
    return (DEMO_DIR / "config.json").is_file()


def initial_model_choice(env: dict | None = None) -> tuple[str, str]:
    """(choice, text) preselected in the sidebar: `FASC_APP_MODEL` if set, else the demo model."""
    spec = (env if env is not None else os.environ).get("FASC_APP_MODEL", "").strip()
    low = spec.lower()
    if not spec or low == "demo":
        return "demo", ""
    if low in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return "smollm2", ""
    if spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists():
        return "folder", spec
    return "hub", spec


def model_spec(choice: str, text: str = "") -> str:
    """The `fasc.load_model` spec of a sidebar choice."""
    if choice in ("demo", "smollm2"):
        return choice
    s = (text or "").strip()
    if not s:
        what = "a local model folder (with config.json)" if choice == "folder" else "a hub id such as HuggingFaceTB/SmolLM2-135M"
        raise FascError(f"No model given; enter {what} in the sidebar, or pick the embedded demo model.")
    return s


def default_tokens(spec: str) -> int:
    """A calibration budget that runs in seconds to a minute on a laptop CPU for this model."""
    if spec == "demo":
        return 16384  # the CLI default: `fasc calibrate --model demo` shares the cache entry
    if spec == "smollm2":
        # fewer misleads: at 80 % of parameters fasc trails asvd on 2,048 tokens (perplexity on real passages
        # 84 against 70) and leads from 8,192 (39 against 43; 32,768: 33 against 42; BENCHMARKS.md)
        return 8192
    return 4096


def model_label(spec: str) -> str:
    if spec in ("demo", "smollm2"):
        return MODEL_CHOICES[spec]
    return Path(spec).name or spec


DEFAULT_EXPORT_ROOT = "~/fasc-exports"   # outside any repository: an export is not source


def default_export_dir(spec: str, method: str, ratio: float, merged: bool, env: dict | None = None) -> str:
    """The folder proposed for an export: `<FASC_APP_OUT or ~/fasc-exports>/<model>-<method><percent>`."""
    root = (env if env is not None else os.environ).get("FASC_APP_OUT") or DEFAULT_EXPORT_ROOT
    base = spec if spec in ("demo", "smollm2") else (Path(spec).name or "model")
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in base.lower())
    return str(Path(root) / f"{name}-{method}{round(100 * ratio)}{'-merged' if merged else ''}")


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoints_root(env: dict | None = None) -> Path:
    env = env if env is not None else os.environ
    return Path(env.get("FASC_APP_CHECKPOINTS") or DEMO_CHECKPOINTS)


def list_checkpoints(root: str | Path) -> list[Path]:
    """`ckpt-*` model folders under root, in training order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("ckpt-*") if (p / "config.json").is_file())


def training_log(root: str | Path) -> dict | None:
    """The demo's `training_log.json` (beside the checkpoints folder, or inside it), if readable."""
    root = Path(root)
    for p in (root.parent / "training_log.json", root / "training_log.json"):
        if p.is_file():
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return d if isinstance(d, dict) else None
    return None


def checkpoint_entries(log: dict | None) -> dict[str, dict]:
    """name → {percent, step, loss, recall} from a training log."""
    out = {}
    for c in (log or {}).get("checkpoints", []) or []:
        if isinstance(c, dict) and "name" in c:
            out[str(c["name"])] = c
    return out


def checkpoint_label(path: Path, entry: dict | None) -> str:
    if entry and entry.get("percent") is not None:
        return f"{path.name} ({entry['percent']}%, step {entry.get('step', '?')})"
    return path.name
