"""Optional healing: a short distillation of the low-rank factors only (issue 12, item 5).

Every `LowRankLinear` factor (U, V) of the compressed model is trained, all other weights stay
frozen, to minimise KL(dense ‖ compressed) of the next-token distributions over the real tokens of
the calibration text (never a probe). Before training, each factor pair is rebalanced
(U ← U S, V ← V S⁻¹ with equal column norms), which leaves U Vᵀ unchanged and puts both factors
on one scale for Adam.

With `heldout` batches (text the healing does not train on: by default the tail of the calibration
sources, disjoint from the calibration rows), the KL is measured there before training, at
`checks` evenly spaced points and at the end, and the factors of the lowest held-out KL are kept —
early stopping, so healing never leaves the model further from the dense one on unseen text than
it found it. The teacher's logits on the held-out text are computed once (`teacher_logits`, on the
CPU) and serve every check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import Cancelled
from .config import HEAL_TOKENS_GPU
from .data import Batch
from .errors import FascError
from .layers import LowRankLinear


@dataclass
class HealResult:
    """What healing did: tokens trained on, optimizer steps, KL (nats/token) over the first and the
    last step's batch, and wall time. With held-out batches also: the held-out KL before healing and
    of the factors kept, the tokens at which those factors were reached (0: healing did not help on
    held-out text and the factors are as they were), and the (tokens, held-out KL) curve."""

    tokens: int
    steps: int
    kl_first: float
    kl_last: float
    seconds: float
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    kept_tokens: int | None = None
    heldout_curve: list[tuple[int, float]] | None = None

    def to_dict(self) -> dict:
        """The fields and the `summary` line (what fasc_config.json, the CLI and the dashboard show)."""
        out = {"tokens": self.tokens, "steps": self.steps, "kl_first": self.kl_first, "kl_last": self.kl_last,
               "seconds": self.seconds, "summary": self.summary()}
        if self.heldout_curve is not None:
            out.update({"heldout_kl_before": self.heldout_kl_before, "heldout_kl_after": self.heldout_kl_after,
                        "kept_tokens": self.kept_tokens, "heldout_curve": [list(x) for x in self.heldout_curve]})
        return out

    def summary(self) -> str:
        """One line for logs, the CLI and the dashboard."""
        s = (f"{self.tokens:,} tokens in {self.steps} steps, {self.seconds:.1f} s; KL to the dense model "
             f"{self.kl_first:.4g} → {self.kl_last:.4g} nats/token (first vs last step's batch)")
        if self.heldout_curve is not None:
            kept = ("the unhealed factors kept: no check beat them" if not self.kept_tokens
                    else f"factors after {self.kept_tokens:,} tokens kept")
            s += (f"; held-out KL {self.heldout_kl_before:.4g} → {self.heldout_kl_after:.4g} nats/token ({kept})")
        return s


def auto_heal_tokens(device: torch.device | str, merge: bool = False, need_bytes: int = 0,
                     free_bytes: int | None = None) -> tuple[int, str]:
    """The healing budget when none is given (`--heal-tokens auto`, the dashboard's default), and why
    it is 0: (tokens, one line naming the flag, or '').

    `HEAL_TOKENS_GPU` for a factored export of a model on a GPU, where it costs seconds to minutes, if
    the `need_bytes` it needs there (`heal_memory_bytes`) fit in `free_bytes` (default: what the GPU has
    free now); 0 on the CPU, where it is the longest step (≈ 16 min for SmolLM2 on one core) and stays
    opt-in, for merged exports (healing trains the factors; no reason given) and when it would not fit
    (Adam over the factors of an 8B bf16 model at 80 % needs ≈ 118 GiB beside the dense model,
    `heal_memory_bytes`). What it buys, measured on SmolLM2 at 80 % of the parameters: perplexity
    1.28× → 1.14× dense, known facts kept 0.749 → 0.821.
    """
    device = torch.device(device)
    if merge:
        return 0, ""
    if device.type != "cuda":
        return 0, (f"off on the CPU (--heal-tokens auto heals {HEAL_TOKENS_GPU:,} tokens on a GPU only); "
                   f"--heal-tokens {HEAL_TOKENS_GPU} trains the factors here too (SmolLM2 at 80 %: perplexity "
                   "1.28x -> 1.14x dense, ≈ 16 min on one core)")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if need_bytes <= free_bytes:
        return HEAL_TOKENS_GPU, ""
    return 0, (f"skipped by --heal-tokens auto: it needs ≈ {need_bytes / 2**30:.1f} GiB on the GPU beside the dense "
               f"model (the compressed copy, Adam over its factors), {free_bytes / 2**30:.1f} GiB are free; "
               f"--heal-tokens {HEAL_TOKENS_GPU} tries anyway")


def heal_memory_bytes(model: nn.Module, factor_params: int, replaced_params: int, seq_len: int,
                      micro_batch: int = 2) -> int:
    """Device memory healing needs beside the dense `model` (an estimate, from sizes only): the
    compressed copy (`factor_params` in its factors instead of the `replaced_params` of the dense
    weights they replace), then per factor parameter its gradient, Adam's two float32 moments and,
    for bf16/fp16 factors, a float32 master copy and its float32 gradient, and the logits of one
    micro-batch (teacher and student, and the float32 copies of the KL: six (micro_batch, seq_len,
    vocab) float32 tensors)."""
    p = next(model.parameters())
    size = p.element_size()
    total = sum(q.numel() for q in model.parameters())
    copy = (total - replaced_params + factor_params) * size
    state = factor_params * (size + 8 + (8 if p.dtype in (torch.bfloat16, torch.float16) else 0))
    vocab = model.get_output_embeddings().weight.shape[0]
    return copy + state + 6 * micro_batch * seq_len * vocab * 4


def balance_factors_(layer: LowRankLinear) -> None:
    """U ← U S, V ← V S⁻¹ with s_j = sqrt(‖v_j‖/‖u_j‖): equal column norms, same U Vᵀ. In place."""
    with torch.no_grad():
        U, V = layer.U.float(), layer.V.float()   # in float32 at least: bf16 norms and products round early
        nu, nv = U.norm(dim=0), V.norm(dim=0)
        s = torch.where((nu > 0) & (nv > 0), (nv / nu.clamp_min(1e-30)).sqrt(), torch.ones_like(nu))
        layer.U.copy_(U * s)
        layer.V.copy_(V / s)


def kl_per_token(teacher_logits, student_logits, mask) -> torch.Tensor:
    """Σ over masked positions of KL(p_teacher ‖ p_student), float32; (B,L,V),(B,L,V),(B,L) -> ()."""
    return kl_rows(teacher_logits[mask], student_logits[mask])


def kl_rows(teacher_logits, student_logits) -> torch.Tensor:
    """Σ over rows of KL(p_teacher ‖ p_student), float32; (N,V),(N,V) -> ()."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum()


def _micro_batches(b: Batch, micro_batch: int, dev):
    """(input_ids, attention_mask, mask) of each slice of `micro_batch` rows of `b` that has real tokens, on `dev`."""
    for r in range(0, b.input_ids.shape[0], micro_batch):
        ids, am = b.input_ids[r:r + micro_batch].to(dev), b.attention_mask[r:r + micro_batch].to(dev)
        mask = am.bool()
        if mask.any():
            yield ids, am, mask


def _kl_sum(model: nn.Module, dense_model: nn.Module, ids, am, mask) -> torch.Tensor:
    """Σ KL(dense ‖ model) over the real tokens of one micro-batch; gradients flow into `model` only."""
    with torch.no_grad():
        tl = dense_model(input_ids=ids, attention_mask=am, use_cache=False).logits
    return kl_per_token(tl, model(input_ids=ids, attention_mask=am, use_cache=False).logits, mask)


def master_weights(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """What Adam updates: each parameter itself if float32/float64, else a float32 copy of it.

    Adam's steps are about `lr` in size whatever the gradient; in bfloat16 (8 significant bits) a
    factor entry of 0.05 moves in units of 2e-4, so steps of lr = 1e-4 round away and healing
    stalls (measured on a tiny Llama: held-out KL −6 % in bfloat16 against −17 % in float32 over
    the same 40k tokens). The float32 copies accumulate the steps; the model's own low-precision
    factors are rewritten from them after every step (`_step`).
    """
    return [p if p.dtype in (torch.float32, torch.float64) else p.detach().float().requires_grad_(True)
            for p in params]


def _step(params: list[nn.Parameter], masters: list[torch.Tensor], opt: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler) -> None:
    """One Adam step on the masters with the model's gradients, then the model's factors from them."""
    for p, q in zip(params, masters):
        if q is not p:
            q.grad = None if p.grad is None else p.grad.float()
            p.grad = None
    scaler.step(opt)          # unscales; skips the step when a scaled float16 gradient overflowed
    scaler.update()
    with torch.no_grad():
        for p, q in zip(params, masters):
            if q is not p:
                p.copy_(q)


def teacher_logits(dense_model: nn.Module, batches: list[Batch], micro_batch: int = 2) -> list[torch.Tensor]:
    """The teacher's logits at the real tokens of each micro-batch of `batches` (in `heldout_kl`'s order),
    kept on the CPU: computed once for the held-out text, they serve every check of a healing run (the
    teacher does not change), which then runs the student only. (n_real, vocab) per micro-batch."""
    dev = next(dense_model.parameters()).device
    with torch.no_grad():
        return [dense_model(input_ids=ids, attention_mask=am, use_cache=False).logits[mask].cpu()
                for b in batches for ids, am, mask in _micro_batches(b, micro_batch, dev)]


def heldout_kl(model: nn.Module, dense_model: nn.Module, batches: list[Batch], micro_batch: int = 2,
               teacher: list[torch.Tensor] | None = None) -> float:
    """Mean KL(dense ‖ model) per real token over `batches` (no gradients); `teacher`: the dense model's
    logits from `teacher_logits` if already computed (a healing run's checks share them)."""
    teacher = teacher_logits(dense_model, batches, micro_batch) if teacher is None else teacher
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    with torch.no_grad():
        mbs = (mb for b in batches for mb in _micro_batches(b, micro_batch, dev))
        for t, (ids, am, mask) in zip(teacher, mbs, strict=True):
            student = model(input_ids=ids, attention_mask=am, use_cache=False).logits[mask]
            tot += float(kl_rows(t.to(dev), student))
            n += int(mask.sum())
    return tot / max(n, 1)


def heal_(model: nn.Module, dense_model: nn.Module, batches: list[Batch], tokens: int, lr: float = 1e-4,
          micro_batch: int = 2, progress: Callable[[int, int], object] | None = None,
          heldout: list[Batch] | None = None, checks: int = 8) -> HealResult:
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
        heldout: batches healing does not train on; when given, the held-out KL is measured before
            training, after every `tokens / checks` tokens and at the end, and the factors with the
            lowest held-out KL are kept (possibly the unhealed ones).
        checks: number of evenly spaced held-out checks during training (≥ 1).
    """
    if not isinstance(tokens, int) or tokens <= 0:
        raise FascError(f"The healing token budget must be a positive integer, got {tokens!r}; e.g. 16384.")
    batches = [b for b in batches if int(b.attention_mask.sum()) > 0]
    if not batches:
        raise FascError("Healing needs calibration text; give a longer calibration text.")
    heldout = [b for b in heldout if int(b.attention_mask.sum()) > 0] if heldout is not None else None
    if heldout is not None and not heldout:
        raise FascError("The held-out text for healing's checks is empty; give longer calibration sources or turn "
                        "the checks off (--heal-check-tokens 0).")
    if not isinstance(checks, int) or checks < 1:
        raise FascError(f"Healing needs at least one held-out check, got checks={checks!r}.")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    if not layers:
        raise FascError("The model has no low-rank factors to heal (merged or not compressed); heal a factored "
                        "model.")
    saved = [(m.U.detach().to("cpu", copy=True), m.V.detach().to("cpu", copy=True)) for m in layers]  # off the GPU
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    t_training = dense_model.training
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    done, steps, kl_first, kl_last = 0, 0, float("nan"), float("nan")
    curve: list[tuple[int, float]] | None = None
    best = None  # (held-out KL, tokens, factors on the CPU or None = the saved, unhealed ones)
    try:
        for m in layers:
            balance_factors_(m)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for m in layers for p in (m.U, m.V)]
        for p in params:
            p.requires_grad_(True)
        masters = master_weights(params)
        opt = torch.optim.Adam(masters, lr=lr)
        # float16 gradients underflow without a loss scale; bfloat16 and float32 need none
        scaler = torch.amp.GradScaler(dev.type, enabled=any(p.dtype == torch.float16 for p in params))
        model.eval()          # no dropout: the teacher and the student see the same function
        dense_model.eval()
        if progress is not None and progress(0, tokens) is False:
            raise Cancelled("Healing cancelled; the factors are as they were.")
        if heldout is not None:
            teacher = teacher_logits(dense_model, heldout, micro_batch)   # once, for every check
            curve = [(0, heldout_kl(model, dense_model, heldout, micro_batch, teacher))]
            best = (curve[0][1], 0, None)
        next_check = tokens / checks
        i = 0
        while done < tokens:
            b = batches[i % len(batches)]
            i += 1
            mask_all = b.attention_mask.bool()
            n_b = int(mask_all.sum())
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for ids, am, mask in _micro_batches(b, micro_batch, dev):
                loss = _kl_sum(model, dense_model, ids, am, mask) / n_b
                scaler.scale(loss).backward()
                total += float(loss.detach())
            if not torch.isfinite(torch.tensor(total)):
                raise FascError("Healing diverged (non-finite KL); lower the learning rate.")
            _step(params, masters, opt, scaler)
            steps += 1
            kl_first = total if steps == 1 else kl_first
            kl_last = total
            done += n_b
            if heldout is not None and (done >= next_check or done >= tokens):
                while next_check <= done:
                    next_check += tokens / checks
                curve.append((done, heldout_kl(model, dense_model, heldout, micro_batch, teacher)))
                if curve[-1][1] < best[0]:
                    best = (curve[-1][1], done, [(m.U.detach().to("cpu", copy=True), m.V.detach().to("cpu", copy=True))
                                                 for m in layers])
            if progress is not None and progress(min(done, tokens), tokens) is False:
                raise Cancelled("Healing cancelled; the factors are as they were.")
        if best is not None and best[1] != done:   # an earlier point (or no healing) did better on held-out text
            with torch.no_grad():
                for m, (U, V) in zip(layers, best[2] if best[2] is not None else saved):
                    m.U.copy_(U)
                    m.V.copy_(V)
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
    res = HealResult(tokens=done, steps=steps, kl_first=kl_first, kl_last=kl_last, seconds=time.perf_counter() - t0)
    if curve is not None:
        res.heldout_kl_before, res.heldout_kl_after, res.kept_tokens, res.heldout_curve = curve[0][1], best[0], best[1], curve
    return res
