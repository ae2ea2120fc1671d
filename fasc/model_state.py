"""Context managers that put a model in a state for one job and restore it exactly afterwards (also
on an exception or a cancel): eval mode, KV cache off, frozen parameters, TF32 off. Composed where
needed, e.g. calibration enters all four, evaluation only `eval_mode`."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()`, every submodule's own training flag restored afterwards."""
    saved = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            if name in saved:
                m.training = saved[name]


@contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[nn.Module]:
    """`config.use_cache = False` (for models that have one)."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved is not None:
        config.use_cache = False
    try:
        yield model
    finally:
        if saved is not None:
            config.use_cache = saved


@contextmanager
def frozen(model: nn.Module, trainable: bool = False) -> Iterator[nn.Module]:
    """Every parameter's `requires_grad` set to `trainable` (False: no weight gradients), restored after."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(trainable)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            if name in saved:
                p.requires_grad_(saved[name])


@contextmanager
def tf32_off() -> Iterator[None]:
    """Full float32 matmuls on CUDA (statistics must not lose precision to TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def calibration_state(model: nn.Module, trainable: bool = False) -> ExitStack:
    """All four at once (an `ExitStack`: `close()` restores everything)."""
    stack = ExitStack()
    try:
        stack.enter_context(eval_mode(model))
        stack.enter_context(kv_cache_off(model))
        stack.enter_context(frozen(model, trainable))
        stack.enter_context(tf32_off())
    except BaseException:
        stack.close()
        raise
    return stack
