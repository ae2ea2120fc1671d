"""Where and in which precision the basis math runs (`--linalg-device`, `--linalg-dtype`).

`Analysis` computes every basis, curve and factor on one *linear-algebra device*, from statistics
and weights moved there by `Place.put` — the one place where devices (statistics on the CPU, weights
on a GPU or spread over several) and dtypes (bf16/fp16 weights, float32 or float64 statistics) meet.
Factors go back to each module's own device and dtype at surgery (`fasc.surgery`).

Precision (`auto`): float64 on the CPU and on GPUs that compute it at full rate (A100/H100/H200/B200
class), float32 on other GPUs (float64 at 1/32–1/64 of the float32 rate). On the CPU float32 would
halve the eigen-decompositions' time (SmolLM2's analysis 34.5 s → 19.8 s, `bench.analysis`) but is
not the default: on SmolLM2 it made some rank-k maps up to 15 % worse in ΔL (modules whose C_x has a
condition number of 1e6–1e7), which the one-module-per-width check below did not see (BENCHMARKS.md).
A float32 choice is checked
against float64 on the first module of each input width (`precision_check`): if the predicted ΔL
curves or the rank-k weights differ by more than `tol`, that width is computed in float64; and each
input group whose C_x has eps₃₂·cond > `tol` is computed in float64 (`Analysis._condition_gate`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import FascError

LINALG_DTYPES = ("auto", "float64", "float32")
# compute capabilities with full-rate float64 (A100 8.0, H100/H200 9.0, B100/B200 10.0)
FAST_FLOAT64_CAPABILITIES = ((8, 0), (9, 0), (10, 0))


@dataclass(frozen=True)
class LinalgConfig:
    """Where the one-time decompositions run. Not part of any cache key except the dtype (float32
    results are stored apart)."""

    device: str = field(default="auto", metadata={
        "help": "device for bases, curves and factors: auto (the first GPU if there is one, else the CPU), "
                "cpu, cuda or cuda:i"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (float64 on the CPU and A100/H100/H200-class GPUs; float32 on other GPUs, checked "
                "against float64 on one module per input width), float64 or float32 (faster, checked; can be "
                "worse on ill-conditioned inputs)"})
    small_side: bool = field(default=True, metadata={
        "help": "solve wide modules (n > m: down_proj, GQA k/v) as m×m problems (spec §3); off = n×n as before"})
    tol: float = field(default=1e-3, metadata={
        "help": "float32 is kept when its ΔL curve and rank-k weight are within this relative error of float64"})

    def __post_init__(self):
        if self.dtype not in LINALG_DTYPES:
            raise FascError(f"`linalg_dtype` must be one of {', '.join(LINALG_DTYPES)}, got {self.dtype!r}.")
        if not isinstance(self.device, str) or not self.device:
            raise FascError(f"`linalg_device` must be auto, cpu, cuda or cuda:i, got {self.device!r}.")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise FascError(f"`tol` must be in (0, 1), got {self.tol!r}; the default is 1e-3.")


def resolve_device(spec: str, option: str = "--linalg-device") -> torch.device:
    """'auto' → cuda:0 when a GPU is visible, else cpu; 'cuda[:i]' checked against what exists.

    The one check of a device the user names (`--linalg-device`, and `--device` / `--stats-device` through
    `fasc.load_model` and the calibration): an unknown name, a GPU on a machine without one or an index
    past the last GPU is one line naming `option` and what to pass instead."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FascError(f"Unknown {option} {spec!r}; use auto, cpu, cuda or cuda:i.") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise FascError(f"{option} {spec!r} is not supported; use auto, cpu, cuda or cuda:i.")
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else "none is visible")
        raise FascError(f"{option} {spec} asks for a GPU but {why}; use {option} cpu.")
    idx = 0 if dev.index is None else dev.index
    if idx >= torch.cuda.device_count():
        raise FascError(f"{option} {spec}: only {torch.cuda.device_count()} GPU(s) visible "
                        f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}).")
    return torch.device("cuda", idx)


def fast_float64(device: torch.device) -> bool:
    """Whether `device` computes float64 at a useful rate: the CPU (half the float32 rate) and
    A100/H100/H200/B200-class GPUs; most GPUs run it at 1/32–1/64 (float32, checked, there)."""
    if device.type != "cuda":
        return True
    return tuple(torch.cuda.get_device_capability(device)) in FAST_FLOAT64_CAPABILITIES


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """float64 / float32 as asked; `auto` → float64 on the CPU and full-rate-float64 GPUs, else float32."""
    if spec == "float64":
        return torch.float64
    if spec == "float32":
        return torch.float32
    return torch.float64 if fast_float64(device) else torch.float32


@dataclass(frozen=True)
class Place:
    """A (device, dtype) where linear algebra runs."""

    device: torch.device
    dtype: torch.dtype

    def put(self, t: Tensor) -> Tensor:
        """`t` on this device in this dtype: the one conversion point for statistics and weights
        (bf16/fp16/fp32 weights on any device, float32/float64 statistics on the CPU)."""
        return t.detach().to(device=self.device, dtype=self.dtype)

    @classmethod
    def from_config(cls, cfg: LinalgConfig) -> "Place":
        dev = resolve_device(cfg.device)
        return cls(dev, resolve_dtype(cfg.dtype, dev))


def precision_check(curve32: Tensor, curve64: Tensor, achieved32: float, k: int) -> dict:
    """Errors of a float32 computation against float64 on the same module.

    Args:
        curve32, curve64: predicted ΔL(k) curves (n+1,) of the same method in both precisions.
        achieved32: the decoupled ΔL of the float32 rank-k map, evaluated in float64.
        k: the reference rank.
    Returns {"curve_rel_err": max_k |Δcurve| / ΔL64(0), "achieved_rel_err": |achieved32 − ΔL64(k)| / ΔL64(k), "k"}.
    """
    c32, c64 = curve32.to("cpu", torch.float64), curve64.to("cpu", torch.float64)
    r = min(c32.shape[0], c64.shape[0])
    ref = float(c64[k])
    return {"curve_rel_err": float((c32[:r] - c64[:r]).abs().max()) / max(float(c64[0]), 1e-300),
            "achieved_rel_err": abs(achieved32 - ref) / max(ref, 1e-300 + 1e-12 * float(c64[0])), "k": k}


@contextlib.contextmanager
def single_threaded_ops():
    """Torch's intra-op threads set to 1 for the duration (restored after): for thread pools that run
    one decomposition per core, where nested multi-threaded LAPACK calls would oversubscribe it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
