"""Optional healing: a short distillation of the low-rank factors only (issue 12, item 5).

Every `LowRankLinear` factor (U, V) of the compressed model is trained, all other weights stay
frozen, to minimise KL(dense ‖ compressed) of the next-token distributions over the real tokens of
the calibration text (never a probe). Before training, each factor pair is rebalanced
(U ← U S, V ← V S⁻¹ with equal column norms), which leaves U Vᵀ unchanged and puts both factors
on one scale for Adam.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import Cancelled
from .data import Batch
from .errors import FascError
from .layers import LowRankLinear


@dataclass
class HealResult:
    """What healing did: tokens trained on, optimizer steps, KL (nats/token) over the first and the
    last step's batch, and wall time."""

    tokens: int
    steps: int
    kl_first: float
    kl_last: float
    seconds: float

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "steps": self.steps, "kl_first": self.kl_first, "kl_last": self.kl_last,
                "seconds": self.seconds}


def balance_factors_(layer: LowRankLinear) -> None:
    """U ← U S, V ← V S⁻¹ with s_j = sqrt(‖v_j‖/‖u_j‖): equal column norms, same U Vᵀ. In place."""
    with torch.no_grad():
        nu, nv = layer.U.norm(dim=0), layer.V.norm(dim=0)
        s = torch.where((nu > 0) & (nv > 0), (nv / nu.clamp_min(1e-30)).sqrt(), torch.ones_like(nu))
        layer.U.mul_(s)
        layer.V.div_(s)


def kl_per_token(teacher_logits, student_logits, mask) -> torch.Tensor:
    """Σ over masked positions of KL(p_teacher ‖ p_student), float32; (B,L,V),(B,L,V),(B,L) -> ()."""
    t = F.log_softmax(teacher_logits[mask].float(), -1)
    s = F.log_softmax(student_logits[mask].float(), -1)
    return (t.exp() * (t - s)).sum()


def heal_(model: nn.Module, dense_model: nn.Module, batches: list[Batch], tokens: int, lr: float = 1e-4,
          micro_batch: int = 2, progress: Callable[[int, int], object] | None = None) -> HealResult:
    """Distil `dense_model` into the low-rank factors of `model`, in place, for `tokens` real tokens.

    Args:
        model: a compressed model (its `LowRankLinear` factors are trained, nothing else).
        dense_model: the uncompressed teacher (left unchanged).
        batches: calibration batches, cycled until `tokens` tokens were trained on.
        tokens: token budget (> 0).
        lr: Adam learning rate.
        micro_batch: rows per forward/backward (bounds the logits' memory); one step per batch.
        progress: progress(tokens_done, tokens); returning False cancels (`Cancelled`) and restores
            the factors as they were before healing.
    """
    if not isinstance(tokens, int) or tokens <= 0:
        raise FascError(f"The healing token budget must be a positive integer, got {tokens!r}; e.g. 16384.")
    batches = [b for b in batches if int(b.attention_mask.sum()) > 0]
    if not batches:
        raise FascError("Healing needs calibration text; give a longer calibration text.")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not layers:
        raise FascError("The model has no low-rank factors to heal (merged or not compressed); heal a factored "
                        "model.")
    saved = [(m.U.detach().clone(), m.V.detach().clone()) for m in layers]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    t_training = dense_model.training
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    done, steps, kl_first, kl_last = 0, 0, float("nan"), float("nan")
    try:
        for m in layers:
            balance_factors_(m)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for m in layers for p in (m.U, m.V)]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        model.eval()          # no dropout: the teacher and the student see the same function
        dense_model.eval()
        if progress is not None and progress(0, tokens) is False:
            raise Cancelled("Healing cancelled; the factors are as they were.")
        i = 0
        while done < tokens:
            b = batches[i % len(batches)]
            i += 1
            mask_all = b.attention_mask.bool()
            n_b = int(mask_all.sum())
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for r in range(0, b.input_ids.shape[0], micro_batch):
                ids = b.input_ids[r:r + micro_batch].to(dev)
                am = b.attention_mask[r:r + micro_batch].to(dev)
                mask = am.bool()
                if not mask.any():
                    continue
                with torch.no_grad():
                    tl = dense_model(input_ids=ids, attention_mask=am, use_cache=False).logits
                sl = model(input_ids=ids, attention_mask=am, use_cache=False).logits
                loss = kl_per_token(tl, sl, mask) / n_b
                loss.backward()
                total += float(loss.detach())
            if not torch.isfinite(torch.tensor(total)):
                raise FascError("Healing diverged (non-finite KL); lower the learning rate.")
            opt.step()
            steps += 1
            kl_first = total if steps == 1 else kl_first
            kl_last = total
            done += n_b
            if progress is not None and progress(min(done, tokens), tokens) is False:
                raise Cancelled("Healing cancelled; the factors are as they were.")
    except BaseException:
        with torch.no_grad():
            for m, (U, V) in zip(layers, saved):
                m.U.copy_(U)
                m.V.copy_(V)
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
            p.grad = None
        for n, m in model.named_modules():
            if n in training:
                m.training = training[n]
        dense_model.train(t_training)
    return HealResult(tokens=done, steps=steps, kl_first=kl_first, kl_last=kl_last,
                      seconds=time.perf_counter() - t0)
