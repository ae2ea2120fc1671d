"""Optional healing: a short distillation of the low-rank factors only (issue 12, item 5).

Every factor of the compressed model — U, V of a `LowRankLinear` (the compressed copy `fasc.pipeline` builds,
however the plan is stored), R, P of a `PivotedLowRankLinear` (a loaded pivoted export; they heal less, docs/method.md
§6) — is trained, all other weights stay frozen, to minimise KL(dense ‖ compressed) of the next-token distributions
over the real tokens of the calibration text (never a probe). Before training, each U, V pair is rebalanced
(U ← U S, V ← V S⁻¹ with equal column norms), which leaves U Vᵀ unchanged and puts both factors
on one scale for Adam (a pivoted layer has no such freedom: R holds rows of W′, P their coefficients).

With `heldout` batches (text the healing does not train on: by default the tail of the calibration
sources, disjoint from the calibration rows), the KL is measured there before training, at
`checks` evenly spaced points and at the end, and the factors of the lowest held-out KL are kept —
early stopping, so healing never leaves the model further from the dense one on unseen text than
it found it. The teacher's logits on the held-out text are computed once (`teacher_logits`, on the
CPU) and serve every check.

By default one Adam step a batch; `step_tokens` sums consecutive batches' gradients into one step until they
hold that many real tokens (`step_groups`). Calibration batches are sorted by length, so a batch of eight
headings holds 40 tokens and a full one 2,048: one step a batch gives the shortest fifth of the tokens half of
the steps. Steps of 2,048 tokens fit the held-out text better and cost LAMBADA more (docs/healing-results.md).

Two modes (`heal_(mode=...)`, `--heal-mode`): 'global' trains every factor at once on that KL (Adam
state for all factors, activations of the whole model: `heal_memory_bytes`); 'block' (`heal_blocks_`)
trains one decoder block after the other to reproduce the dense block's outputs from the hidden states
the partly healed compressed model gives it (the last block on the KL through the frozen head), with
one block's optimizer state at a time: its memory (`heal_block_memory_bytes`) does not grow with the
number of blocks beyond the compressed copy's weights. `choose_heal` picks the mode that fits a GPU.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import HEAL_COPY_WEIGHT, HEAL_STEP_TOKENS, HEAL_TOKENS_GPU
from .data import Batch
from .errors import Cancelled, FascError
from .layers import FACTORED, LowRankLinear, factors_of
from .sequential import _first, block_inputs


@dataclass
class HealResult:
    """What healing did: tokens trained on, optimizer steps, KL (nats/token) over the first and the
    last step's batch, and wall time. With held-out batches also: the held-out KL before healing and
    of the factors kept, the tokens at which those factors were reached (0: healing did not help on
    held-out text and the factors are as they were), and the (tokens, held-out KL) curve. In block
    mode `tokens` are per block and `kl_first`/`kl_last` the mean over the residual-stream blocks of
    each block's error on its training tokens, over the first pass and after training."""

    tokens: int
    steps: int
    kl_first: float
    kl_last: float
    seconds: float
    heldout_kl_before: float | None = None
    heldout_kl_after: float | None = None
    kept_tokens: int | None = None
    heldout_curve: list[tuple[int, float]] | None = None
    cpu_seconds: float | None = None   # process CPU time (all threads) over the same span as `seconds`
    mode: str = "global"
    blocks: int | None = None          # block mode: decoder blocks trained (each on `tokens` tokens)
    kept_blocks: int | None = None     # block mode: the first `kept_blocks` of them keep their healed factors
    block_losses: list[tuple[float, float]] | None = None   # block mode: per trained block, its loss per token on
    # its training tokens over the first pass (each batch before its own step) and after training
    head_kl: bool = False              # block mode: the last block was trained on the KL through the head
    copy_weight: float = 1.0           # global mode: the KL's weight at copy positions (`copy_positions`)

    def to_dict(self) -> dict:
        """The fields and the `summary` line (what fasc_config.json, the CLI and the dashboard show)."""
        out = {"mode": self.mode, "tokens": self.tokens, "steps": self.steps, "kl_first": self.kl_first,
               "kl_last": self.kl_last, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
               "summary": self.summary()}
        if self.mode == "block":
            out.update({"blocks": self.blocks, "kept_blocks": self.kept_blocks, "head_kl": self.head_kl,
                        "block_losses": [list(x) for x in self.block_losses or []]})
        else:
            out["copy_weight"] = self.copy_weight
        if self.heldout_curve is not None:
            out.update({"heldout_kl_before": self.heldout_kl_before, "heldout_kl_after": self.heldout_kl_after,
                        "kept_tokens": self.kept_tokens, "heldout_curve": [list(x) for x in self.heldout_curve]})
        return out

    def summary(self) -> str:
        """One line for logs, the CLI and the dashboard."""
        if self.mode == "block":
            s = (f"block-local: {self.blocks} decoder blocks × {self.tokens:,} tokens in {self.steps} steps, "
                 f"{self.seconds:.1f} s; each block's error to the dense block's outputs on its training tokens "
                 f"{self.kl_first:.4g} → {self.kl_last:.4g} (mean over the blocks, first pass vs after training)")
            if self.head_kl and self.block_losses:
                s += (f", the last block's KL through the head {self.block_losses[-1][0]:.4g} → "
                      f"{self.block_losses[-1][1]:.4g} nats/token")
        else:
            kl = "KL" if self.copy_weight == 1 else f"KL (×{self.copy_weight:g} at copy positions)"
            s = (f"{self.tokens:,} tokens in {self.steps} steps, {self.seconds:.1f} s; {kl} to the dense model "
                 f"{self.kl_first:.4g} → {self.kl_last:.4g} nats/token (first vs last step's batch)")
        if self.heldout_curve is not None:
            if self.mode == "block":
                kept = ("the unhealed factors kept: no check beat them" if not self.kept_blocks
                        else f"the first {self.kept_blocks} healed blocks kept")
            else:
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
    (global healing of an 8B bf16 model at 80 % needs ≈ 144 GiB beside the dense model,
    `heal_memory_bytes`). What it buys: BENCHMARKS.md and docs/healing-results.md (measured figures
    live there, not in messages).
    """
    device = torch.device(device)
    if merge:
        return 0, ""
    if device.type != "cuda":
        return 0, (f"off on the CPU (--heal-tokens auto heals {HEAL_TOKENS_GPU:,} tokens on a GPU only); "
                   f"--heal-tokens {HEAL_TOKENS_GPU} trains the factors here too (≈ 16 min on one core for "
                   "SmolLM2; what it buys: docs/healing-results.md)")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if need_bytes <= free_bytes:
        return HEAL_TOKENS_GPU, ""
    return 0, (f"skipped by --heal-tokens auto: it needs ≈ {need_bytes / 2**30:.1f} GiB on the GPU beside the dense "
               f"model (the compressed copy, Adam over its factors), {free_bytes / 2**30:.1f} GiB are free; "
               f"--heal-tokens {HEAL_TOKENS_GPU} tries anyway")


KL_LOGIT_COPIES = 9   # (micro_batch, seq_len, vocab) float32 tensors alive at the KL's peak (measured)
HEAL_MODES = ("global", "block")           # `heal_(mode=...)`, `--heal-mode`
HEAL_MODE_ORDER = ("global", "block")   # `--heal-mode auto` on a GPU: the first that fits (global: measured better)
HEAL_MODE_CPU = "global"                 # `--heal-mode auto` on the CPU (see docs/healing-results.md)


def choose_heal(device: torch.device | str, tokens: int | str, mode: str, need: dict[str, int] | None = None,
                merge: bool = False, free_bytes: int | None = None) -> tuple[int, str, str]:
    """`--heal-tokens` (a count or 'auto') and `--heal-mode` ('auto', 'global', 'block') resolved for a
    model on `device`: (tokens, mode, one line saying why healing is off, or '').

    On a GPU, `need` holds each mode's device memory ({'global': `heal_memory_bytes`, 'block':
    `heal_block_memory_bytes`}) and `free_bytes` what is free (default: what the GPU has free now):
    mode 'auto' is the first of `HEAL_MODE_ORDER` that fits, so a model whose global healing does not
    fit heals block by block; 'auto' tokens are `HEAL_TOKENS_GPU` when the mode fits, else 0 with the
    reason. A given token count always heals (in the mode that fits, block-local when none does). On
    the CPU 'auto' is `HEAL_MODE_CPU` and 'auto' tokens follow `auto_heal_tokens` (off). A merged
    export is never healed (no reason given).
    """
    device = torch.device(device)
    if mode not in ("auto", *HEAL_MODES):
        raise FascError(f"Unknown healing mode {mode!r}; choose auto, {', '.join(HEAL_MODES)}.")
    if merge or tokens == 0:
        return 0, HEAL_MODE_CPU if mode == "auto" else mode, ""
    if device.type != "cuda":
        m = HEAL_MODE_CPU if mode == "auto" else mode
        if tokens != "auto":
            return tokens, m, ""
        t, why = auto_heal_tokens(device)
        return t, m, why
    modes = HEAL_MODE_ORDER if mode == "auto" else (mode,)
    need = need or {}
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    fit = [m for m in modes if need.get(m, 0) <= free_bytes]
    if tokens != "auto":
        return tokens, fit[0] if fit else modes[-1], ""
    if fit:
        return HEAL_TOKENS_GPU, fit[0], ""
    needs = ", ".join(f"{need.get(m, 0) / 2**30:.1f} GiB {m}" for m in modes)
    return 0, modes[0], (f"skipped by --heal-tokens auto: it needs ≈ {needs} on the GPU beside the dense model, "
                         f"{free_bytes / 2**30:.1f} GiB are free; --heal-tokens {HEAL_TOKENS_GPU} tries anyway")


def heal_memory_bytes(model: nn.Module, factor_params: int, replaced_params: int, seq_len: int,
                      micro_batch: int = 2) -> int:
    """Device memory global healing needs beside the dense `model` (an estimate, from sizes only): the
    compressed copy (`factor_params` in its factors instead of the `replaced_params` of the dense
    weights they replace), then per factor parameter its gradient, Adam's two float32 moments and,
    for bf16/fp16 factors, a float32 master copy and its float32 gradient; what the backward pass keeps
    of one micro-batch through every block — about each Linear's input and output, micro_batch ×
    seq_len × Σ_linears (in + out) elements of the model's dtype (measured on tiny Llamas: 1.1× that,
    the rest is attention and norms) —; and the logits at the KL's peak (`KL_LOGIT_COPIES` float32
    (micro_batch, seq_len, vocab) tensors, as in `heal_block_memory_bytes`)."""
    from .modules import find_linears

    p = next(model.parameters())
    size = p.element_size()
    total = sum(q.numel() for q in model.parameters())
    copy = (total - replaced_params + factor_params) * size
    state = factor_params * (size + 8 + (8 if p.dtype in (torch.bfloat16, torch.float16) else 0))
    act = micro_batch * seq_len * sum(i.in_features + i.out_features for i in find_linears(model)) * size
    vocab = model.get_output_embeddings().weight.shape[0]
    return copy + state + act + KL_LOGIT_COPIES * micro_batch * seq_len * vocab * 4


def block_of(fqn: str) -> str:
    """The decoder block a module belongs to: its name up to the first numbered part ('model.layers.3'),
    or '' for a module outside the numbered blocks."""
    m = re.match(r"(.*?\.\d+)(\.|$)", fqn)
    return m.group(1) if m else ""


def heal_block_memory_bytes(model: nn.Module, factor_params: dict[str, int], replaced_params: int, positions: int,
                            seq_len: int, micro_batch: int = 2) -> int:
    """Device memory block-local healing (`heal_blocks_`) needs beside the dense `model` (an estimate,
    from sizes only), the twin of `heal_memory_bytes`:

    - the compressed copy (the factors' Σ `factor_params` — {module: parameters in its factors} — in
      place of the `replaced_params` of the dense weights they replace);
    - one block's training state: per factor parameter of the largest block (`block_of`) its gradient,
      Adam's two float32 moments and, for bf16/fp16 factors, a float32 master and its gradient;
    - the two hidden-state streams of the training text (dense X_l and compressed X̃_l,
      2 × `positions` × d) and what every block is called with (rotary cos/sin: at most 2 × positions
      × head_dim), in the model's dtype;
    - one block's forward and backward for one micro-batch: about each Linear's input and output —
      micro_batch × seq_len × Σ_linears (in + out) elements of the model's dtype (the largest block;
      measured on tiny Llamas: 1.03× that);
    - the logits of one micro-batch (the last block's KL through the head; the held-out checks): nine
      (micro_batch, seq_len, vocab) float32 tensors at the KL's peak (teacher and student logits, their
      masked copies, two log-softmaxes, exp, difference, product), measured at 1/16 of Llama-3-8B's
      width (`bench.scale8b --heal-tokens`) where they are 99 % of the total.

    Nothing here grows with the number of blocks except the compressed copy; `positions` are the rows ×
    seq_len of the batches one block cycles through (`used_batches`).
    """
    p = next(model.parameters())
    size = p.element_size()
    total = sum(q.numel() for q in model.parameters())
    copy = (total - replaced_params + sum(factor_params.values())) * size
    per_block: dict[str, int] = {}
    for f, n in factor_params.items():
        per_block[block_of(f)] = per_block.get(block_of(f), 0) + n
    state = max(per_block.values(), default=0) * (size + 8 + (8 if p.dtype in (torch.bfloat16, torch.float16) else 0))
    cfg = getattr(model, "config", None)
    d = model.get_input_embeddings().weight.shape[1]
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    streams = positions * (2 * d + 2 * head_dim) * size
    from .modules import find_linears

    linears: dict[str, int] = {}
    for i in find_linears(model):
        linears[block_of(i.fqn)] = linears.get(block_of(i.fqn), 0) + i.in_features + i.out_features
    act = micro_batch * seq_len * max(linears.values(), default=0) * size
    vocab = model.get_output_embeddings().weight.shape[0]
    return copy + state + streams + act + KL_LOGIT_COPIES * micro_batch * seq_len * vocab * 4


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
    return kl_each(teacher_logits, student_logits).sum()


def kl_each(teacher_logits, student_logits) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) of each row, float32; (N,V),(N,V) -> (N,)."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def _micro_batches(b: Batch, micro_batch: int, dev):
    """(input_ids, attention_mask, mask) of each slice of `micro_batch` rows of `b` that has real tokens, on `dev`."""
    for r in range(0, b.input_ids.shape[0], micro_batch):
        ids, am = b.input_ids[r:r + micro_batch].to(dev), b.attention_mask[r:r + micro_batch].to(dev)
        mask = am.bool()
        if mask.any():
            yield ids, am, mask


def copy_positions(ids: torch.Tensor, am: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Where the next token is a copy: position t of a row whose token A = ids[t] occurred earlier, at s < t,
    followed by B = top[t] (the teacher's top-1 next token) — "… A B … A" → B, what induction heads do
    and what LAMBADA's last word mostly asks (docs/healing-results.md). Padding never matches.
    (B, L) ids, attention mask, top-1 → (B, L) bool."""
    L = ids.shape[1]
    hit = (ids[:, None, :-1] == ids[:, :, None]) & (ids[:, None, 1:] == top[:, :, None])   # (B, t, s): pair s, s+1
    hit &= (torch.arange(L - 1, device=ids.device)[None, :] < torch.arange(L, device=ids.device)[:, None])[None]
    hit &= am[:, None, 1:].bool() & am[:, None, :-1].bool()
    return hit.any(-1) & am.bool()


def kl_weights(ids: torch.Tensor, am: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               copy_weight: float) -> torch.Tensor:
    """Per-token weights of healing's KL at the real tokens (`mask`): `copy_weight` at `copy_positions`,
    1 elsewhere, scaled so that they sum to the number of tokens (the loss keeps the plain KL's size and the
    learning rate its meaning). (n_real,) float32."""
    w = 1 + (copy_weight - 1) * copy_positions(ids, am, teacher_logits.argmax(-1))[mask].float()
    return w * (w.numel() / w.sum())


def check_copy_weight(copy_weight, mode: str) -> None:
    """A copy weight (`kl_weights`) given for healing in `mode`: a number ≥ 1, global mode only; else FascError."""
    if isinstance(copy_weight, bool) or not isinstance(copy_weight, (int, float)) or not math.isfinite(copy_weight) \
            or copy_weight < 1:
        raise FascError(f"The healing copy weight must be a number ≥ 1 (1 = plain KL), got {copy_weight!r}; e.g. 20.")
    if mode == "block" and copy_weight != 1:
        raise FascError("The copy weight weights global healing's KL; block-local healing fits hidden states — "
                        "heal with --heal-mode global, or leave --heal-copy-weight out.")


def _kl_sum(model: nn.Module, dense_model: nn.Module, ids, am, mask, copy_weight: float = 1.0) -> torch.Tensor:
    """Σ KL(dense ‖ model) over the real tokens of one micro-batch — weighted (`kl_weights`) when
    `copy_weight` ≠ 1; gradients flow into `model` only."""
    with torch.no_grad():
        tl = dense_model(input_ids=ids, attention_mask=am, use_cache=False).logits
    sl = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    if copy_weight == 1:
        return kl_per_token(tl, sl, mask)
    return (kl_weights(ids, am, tl, mask, copy_weight) * kl_each(tl[mask], sl[mask])).sum()


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


def _checked_inputs(model: nn.Module, batches: list[Batch], tokens: int, heldout: list[Batch] | None,
                    checks: int) -> tuple[list[Batch], list[Batch] | None, list[nn.Module]]:
    """The batches with real tokens, the held-out batches, the factored layers; bad input → FascError."""
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
    layers = [m for m in model.modules() if isinstance(m, FACTORED)]
    if not layers:
        raise FascError("The model has no low-rank factors to heal (merged or not compressed); heal a factored "
                        "model.")
    return batches, heldout, layers


@contextmanager
def _frozen_but(model: nn.Module, dense_model: nn.Module, layers: list[nn.Module]):
    """Both models in eval mode (no dropout: teacher and student see the same function), every parameter
    of `model` frozen; on exit every flag as it was and no gradient left. On an exception the factors of
    `layers` are restored from a copy on the CPU (off the GPU)."""
    saved = _copies(layers)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    t_training = dense_model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        dense_model.eval()
        yield saved
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
            p.grad = None
        for n, m in model.named_modules():
            if n in training:
                m.training = training[n]
        dense_model.train(t_training)


def _copies(layers: list[nn.Module]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's factors (`factors_of`), copied to the CPU."""
    return [tuple(p.detach().to("cpu", copy=True) for p in factors_of(m)) for m in layers]


def _restore(layers: list[nn.Module], factors: list[tuple[torch.Tensor, ...]]) -> None:
    with torch.no_grad():
        for m, saved in zip(layers, factors):
            for p, q in zip(factors_of(m), saved):
                p.copy_(q)


class _Trainer:
    """Adam on float32 masters of `layers`' factors (`master_weights`), a loss scale for float16."""

    def __init__(self, layers: list[nn.Module], lr: float, dev: torch.device):
        self.params = [p for m in layers for p in factors_of(m)]
        for p in self.params:
            p.requires_grad_(True)
        self.masters = master_weights(self.params)
        self.opt = torch.optim.Adam(self.masters, lr=lr)
        # float16 gradients underflow without a loss scale; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(dev.type, enabled=any(p.dtype == torch.float16 for p in self.params))

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        _step(self.params, self.masters, self.opt, self.scaler)
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Free the optimizer state and gradients; the factors are frozen again."""
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        self.opt.state.clear()
        self.masters = self.opt = None


def heal_(model: nn.Module, dense_model: nn.Module, batches: list[Batch], tokens: int, lr: float = 1e-4,
          micro_batch: int = 2, progress: Callable[[int, int], object] | None = None,
          heldout: list[Batch] | None = None, checks: int = 8, mode: str = "global", copy_weight: float | None = None,
          step_tokens: int = HEAL_STEP_TOKENS, **block) -> HealResult:
    """Distil `dense_model` into the low-rank factors of `model`, in place, for `tokens` real tokens.

    Args:
        model: a compressed model (its factored layers' factors are trained, nothing else).
        dense_model: the uncompressed teacher (left unchanged).
        batches: calibration batches, cycled until `tokens` tokens were trained on.
        tokens: token budget (> 0); in block mode, per decoder block.
        lr: Adam learning rate.
        micro_batch: rows per forward/backward (bounds the logits' memory).
        step_tokens: each Adam step sums the gradients of consecutive batches until they hold this many real
            tokens (`step_groups`); 1: one step per batch.
        progress: progress(tokens_done, tokens); returning False cancels (`Cancelled`) and restores
            the factors as they were before healing.
        heldout: batches healing does not train on; when given, the held-out KL is measured before
            training, after every `tokens / checks` tokens and at the end, and the factors with the
            lowest held-out KL are kept (possibly the unhealed ones).
        checks: number of evenly spaced held-out checks during training (≥ 1).
        mode: 'global' (KL of the whole model, every factor trained at once) or 'block'
            (`heal_blocks_`: one decoder block at a time, memory bounded by one block); `block` holds
            `heal_blocks_`'s own options (`loss`, `head_kl`).
        copy_weight: global mode: the KL's weight at `copy_positions` against 1 elsewhere (`kl_weights`);
            None: `HEAL_COPY_WEIGHT`. Block mode takes none.
    """
    if copy_weight is not None:
        check_copy_weight(copy_weight, mode)
    if mode == "block":
        return heal_blocks_(model, dense_model, batches, tokens, lr=lr, micro_batch=micro_batch, progress=progress,
                            heldout=heldout, checks=checks, step_tokens=step_tokens, **block)
    if mode != "global":
        raise FascError(f"Unknown healing mode {mode!r}; choose one of {', '.join(HEAL_MODES)}.")
    if block:
        raise FascError(f"{', '.join(block)}: options of block-local healing only; pass mode='block'.")
    batches, heldout, layers = _checked_inputs(model, batches, tokens, heldout, checks)
    groups = step_groups(batches, step_tokens)
    copy_weight = float(HEAL_COPY_WEIGHT if copy_weight is None else copy_weight)
    dev = next(model.parameters()).device
    t0, c0 = time.perf_counter(), time.process_time()
    done, steps, kl_first, kl_last = 0, 0, float("nan"), float("nan")
    curve: list[tuple[int, float]] | None = None
    best = None  # (held-out KL, tokens, factors on the CPU or None = the saved, unhealed ones)
    with _frozen_but(model, dense_model, layers) as saved:
        for m in layers:
            if isinstance(m, LowRankLinear):
                balance_factors_(m)
        tr = _Trainer(layers, lr, dev)
        if progress is not None and progress(0, tokens) is False:
            raise Cancelled("Healing cancelled; the factors are as they were.")
        if heldout is not None:
            teacher = teacher_logits(dense_model, heldout, micro_batch)   # once, for every check
            curve = [(0, heldout_kl(model, dense_model, heldout, micro_batch, teacher))]
            best = (curve[0][1], 0, None)
        next_check = tokens / checks
        i = 0
        while done < tokens:
            group = [batches[j] for j in groups[i % len(groups)]]
            i += 1
            n_b = sum(int(b.attention_mask.sum()) for b in group)
            total = 0.0
            for ids, am, mask in (mb for b in group for mb in _micro_batches(b, micro_batch, dev)):
                loss = _kl_sum(model, dense_model, ids, am, mask, copy_weight) / n_b
                tr.backward(loss)
                total += float(loss.detach())
            if not math.isfinite(total):
                raise FascError("Healing diverged (non-finite KL); lower the learning rate.")
            tr.step()
            steps += 1
            kl_first = total if steps == 1 else kl_first
            kl_last = total
            done += n_b
            if heldout is not None and (done >= next_check or done >= tokens):
                while next_check <= done:
                    next_check += tokens / checks
                curve.append((done, heldout_kl(model, dense_model, heldout, micro_batch, teacher)))
                if curve[-1][1] < best[0]:
                    best = (curve[-1][1], done, _copies(layers))
            if progress is not None and progress(min(done, tokens), tokens) is False:
                raise Cancelled("Healing cancelled; the factors are as they were.")
        tr.close()
        if best is not None and best[1] != done:   # an earlier point (or no healing) did better on held-out text
            _restore(layers, best[2] if best[2] is not None else saved)
    res = HealResult(tokens=done, steps=steps, kl_first=kl_first, kl_last=kl_last, seconds=time.perf_counter() - t0,
                     cpu_seconds=time.process_time() - c0, copy_weight=copy_weight)
    if curve is not None:
        res.heldout_kl_before, res.heldout_kl_after, res.kept_tokens, res.heldout_curve = curve[0][1], best[0], best[1], curve
    return res


# ------------------------------------------------------------------------------------ block-local healing
BLOCK_LOSSES = ("rel", "mse")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")   # the decoder stack's last norm, by arch
HEAD_ATOL = 1e-3   # the rebuilt head (final norm, lm_head) must give the model's logits to this (×max|logit|)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, ModuleList) of the numbered decoder blocks that hold `model`'s low-rank factors."""
    from .sequential import decoder_layers

    fqns = [n for n, m in model.named_modules() if isinstance(m, FACTORED)]
    try:
        prefix, blocks = decoder_layers(model, fqns)
    except FascError:
        raise FascError("Block-local healing needs the decoder blocks in a numbered nn.ModuleList; this model has "
                        "none — heal with --heal-mode global.") from None
    outside = [f for f in fqns if not f.startswith(prefix + ".")]
    if outside:
        raise FascError(f"Block-local healing trains the factors inside the decoder blocks; {len(outside)} factored "
                        f"modules lie outside them (e.g. {outside[0]}); heal with --heal-mode global.")
    return prefix, blocks


def _head(model: nn.Module, prefix: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden states after the last decoder block -> logits (the final norm, OPT's projection, lm_head), or
    None when the model's layout is not one of the known ones (`FINAL_NORMS`)."""
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = next((getattr(parent, n) for n in FINAL_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
    lm = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or lm is None:
        return None
    proj = getattr(parent, "project_out", None)

    def head(h):
        h = norm(h)
        return lm(proj(h) if isinstance(proj, nn.Module) else h)
    return head


class _BlockStreams:
    """Per micro-batch of the training text: the hidden states entering the current block in the dense
    model (`dense`, X_l) and in the partly healed compressed model (`comp`, X̃_l), its real-token mask, its
    batch, and the arguments every block receives there (attention mask, position embeddings …), captured
    once from the dense model. 2 × positions × d numbers in the model's dtype, whatever the depth."""

    def __init__(self, dense_model: nn.Module, blocks: nn.ModuleList, batches: list[Batch], micro_batch: int,
                 dev: torch.device):
        self.dense: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.batch: list[int] = []
        self.ctx: list[list[tuple[tuple, dict]]] = []
        self.ids: list[tuple[torch.Tensor, torch.Tensor]] = []
        for bi, b in enumerate(batches):
            for ids, am, mask in _micro_batches(b, micro_batch, dev):
                with torch.no_grad():
                    h, per = block_inputs(dense_model, blocks, ids, am,
                                          "Not every decoder block ran in the forward pass; block-local healing "
                                          "needs a plain block stack — heal with --heal-mode global.")
                self.dense.append(h)
                self.ctx.append(per)
                self.masks.append(mask)
                self.batch.append(bi)
                self.ids.append((ids, am))
        self.comp = [h.clone() for h in self.dense]

    def run(self, block: nn.Module, l: int, j: int, h: torch.Tensor) -> torch.Tensor:
        """Block `l` on hidden states `h` of micro-batch `j`."""
        args, kwargs = self.ctx[j][l]
        return _first(block(h, *args, **kwargs))


def step_groups(batches: list[Batch], step_tokens: int) -> list[list[int]]:
    """Indices of consecutive `batches` whose real tokens reach `step_tokens`, one list per optimizer step
    (the last holds what is left); every batch in exactly one group, in order."""
    if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
        raise FascError(f"Healing's tokens per step must be a positive integer, got {step_tokens!r}; e.g. 2048.")
    groups, cur, n = [], [], 0
    for i, b in enumerate(batches):
        cur.append(i)
        n += int(b.attention_mask.sum())
        if n >= step_tokens:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        groups.append(cur)
    return groups


def used_batches(batches: list[Batch], tokens: int) -> list[Batch]:
    """The first batches whose real tokens reach `tokens` (all of them if they do not): what a healing
    run of `tokens` tokens per block reads, cycling; block mode keeps hidden states for these only.
    The first of `step_groups(batches, tokens)`."""
    return [batches[i] for i in step_groups(batches, tokens)[0]] if batches else []


def _block_loss(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, loss: str, scale: float) -> torch.Tensor:
    """Σ over the real tokens of the error of a block's output `out` to the dense block's `y`, float32:
    'rel' ‖ŷ_t − y_t‖² / ‖y_t‖² (each token on its own scale: the residual stream's outlier tokens, e.g.
    an attention sink's, do not swamp the rest), 'mse' ‖ŷ_t − y_t‖² / `scale` (mean ‖y‖² of the block)."""
    o, t = out[mask].float(), y[mask].float()     # (n, d)
    err = (o - t).pow(2).sum(-1)
    if loss == "rel":
        return (err / t.pow(2).sum(-1).clamp_min(1e-12)).sum()
    return err.sum() / scale


def heal_blocks_(model: nn.Module, dense_model: nn.Module, batches: list[Batch], tokens: int, lr: float = 1e-4,
                 micro_batch: int = 2, progress: Callable[[int, int], object] | None = None,
                 heldout: list[Batch] | None = None, checks: int = 8, loss: str = "rel",
                 head_kl: bool = True, step_tokens: int = HEAL_STEP_TOKENS) -> HealResult:
    """Block-local healing, in place: the factors of each decoder block l, one block after the other, are
    trained for `tokens` tokens so that, fed X̃_l — the hidden states the partly compressed model really
    gives it, i.e. the outputs of the compressed blocks before it, already healed — block l reproduces the
    dense block's outputs Y_l = f_l(X_l) on the same token positions (X_l: the dense model's own hidden
    states). The loss is `_block_loss` on the residual stream; with `head_kl` the last block is trained
    instead on KL(dense ‖ compressed) of the next-token distributions through the frozen head (final
    norm and lm_head; with one block this is exactly global healing, `heal_`).

    Memory beside the two models: one block's factors' optimizer state (freed before the next block),
    the two hidden-state streams X_l and X̃_l of the training text (2 × positions × d; the dense stream is
    advanced in place, X_{l+1} = Y_l), one block's activations for one micro-batch, and one micro-batch's
    logits (held-out checks; the last block with `head_kl`): `heal_block_memory_bytes`. Compute: per
    block, `tokens` tokens of one block's forward and backward plus two block forwards over the unique
    training positions — about one forward and backward of the model per token, without the lm_head.

    With `heldout`, the KL of the whole model on held-out text (as `heal_`) is measured before, after
    every `blocks / checks` trained blocks and at the end; blocks trained after the best check get their
    unhealed factors back (every check is a state of the model: blocks ≤ j healed, the rest as they were).
    Arguments as `heal_`; `loss`: 'rel' or 'mse' (`_block_loss`).
    """
    if loss not in BLOCK_LOSSES:
        raise FascError(f"Unknown block-healing loss {loss!r}; choose one of {', '.join(BLOCK_LOSSES)}.")
    batches, heldout, layers = _checked_inputs(model, batches, tokens, heldout, checks)
    batches = used_batches(batches, tokens)   # each block cycles these: only their streams are kept
    groups = step_groups(batches, step_tokens)
    prefix, blocks = decoder_blocks(model)
    try:
        dense_blocks = dense_model.get_submodule(prefix)
    except AttributeError:
        dense_blocks = None
    if not isinstance(dense_blocks, nn.ModuleList) or len(dense_blocks) != len(blocks):
        raise FascError(f"The dense model has no {len(blocks)} decoder blocks at {prefix}; pass the model the "
                        f"compressed one was made from.")
    by_block = [[m for m in blk.modules() if isinstance(m, FACTORED)] for blk in blocks]
    trained = [l for l, ms in enumerate(by_block) if ms]
    dev = next(model.parameters()).device
    t0, c0 = time.perf_counter(), time.process_time()
    total = tokens * len(trained)
    steps, done_all, losses = 0, 0, []
    curve: list[tuple[int, float]] | None = None
    best = None  # (held-out KL, trained blocks whose healed factors are kept)
    with _frozen_but(model, dense_model, layers) as saved:
        for m in layers:
            if isinstance(m, LowRankLinear):
                balance_factors_(m)
        if progress is not None and progress(0, total) is False:
            raise Cancelled("Healing cancelled; the factors are as they were.")
        if heldout is not None:
            teacher = teacher_logits(dense_model, heldout, micro_batch)
            curve = [(0, heldout_kl(model, dense_model, heldout, micro_batch, teacher))]
            best = (curve[0][1], 0)
        s = _BlockStreams(dense_model, dense_blocks, batches, micro_batch, dev)
        heads = None
        if head_kl and trained and trained[-1] == len(blocks) - 1:
            heads = (_head(dense_model, prefix), _head(model, prefix))
            if None in heads or not _head_matches(dense_model, heads[0], s, dense_blocks):
                heads = None   # an unknown head layout: the last block keeps the residual-stream loss
        by_batch = [[j for j, bj in enumerate(s.batch) if bj == bi] for bi in range(len(batches))]
        next_check = len(trained) / checks
        with torch.no_grad():
            for l in range(len(blocks)):
                for j in range(len(s.dense)):        # X_{l+1} = Y_l = f_l(X_l), in place
                    s.dense[j] = s.run(dense_blocks[l], l, j, s.dense[j])
                head = heads if l == len(blocks) - 1 else None
                if by_block[l]:
                    first, n_steps, done = _train_block(s, l, blocks[l], by_block[l], batches, groups, by_batch,
                                                        tokens, lr, dev, loss, head, progress, done_all, total)
                    steps += n_steps
                    done_all += tokens
                    scale = _mse_scale(s) if loss == "mse" and head is None else 1.0
                    after, n_after = 0.0, 0
                for j in range(len(s.comp) if (by_block[l] or l < len(blocks) - 1) else 0):
                    out = s.run(blocks[l], l, j, s.comp[j])      # the healed block on X̃_l: X̃_{l+1}
                    if by_block[l]:                               # its loss on the tokens it trained on, after
                        after += float(kl_per_token(head[0](s.dense[j]), head[1](out), s.masks[j]) if head
                                       else _block_loss(out, s.dense[j], s.masks[j], loss, scale))
                        n_after += int(s.masks[j].sum())
                    if l < len(blocks) - 1:
                        s.comp[j] = out
                if by_block[l]:
                    losses.append((first, after / max(n_after, 1)))
                if by_block[l] and heldout is not None:
                    n = trained.index(l) + 1
                    if n >= next_check or n == len(trained):
                        while next_check <= n:
                            next_check += len(trained) / checks
                        curve.append((n * done, heldout_kl(model, dense_model, heldout, micro_batch, teacher)))
                        if curve[-1][1] < best[0]:
                            best = (curve[-1][1], n)
        del s
        if best is not None and best[1] < len(trained):   # blocks after the best check: as they were
            keep = {id(m) for l in trained[:best[1]] for m in by_block[l]}
            _restore([m for m in layers if id(m) not in keep],
                     [f for m, f in zip(layers, saved) if id(m) not in keep])
    resid = losses[:-1] if heads is not None else losses     # the residual-stream blocks (not the head's KL)
    kl_first = sum(f for f, _ in resid) / len(resid) if resid else float("nan")
    kl_last = sum(x for _, x in resid) / len(resid) if resid else float("nan")
    res = HealResult(tokens=done if trained else 0, steps=steps, kl_first=kl_first, kl_last=kl_last,
                     seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, mode="block",
                     blocks=len(trained), kept_blocks=len(trained), block_losses=[tuple(x) for x in losses],
                     head_kl=heads is not None)
    if curve is not None:
        res.heldout_kl_before, res.heldout_kl_after, res.heldout_curve = curve[0][1], best[0], curve
        res.kept_blocks = best[1]
        res.kept_tokens = best[1] * done
    return res


def _head_matches(dense_model: nn.Module, head, s: _BlockStreams, dense_blocks: nn.ModuleList) -> bool:
    """Whether `head` on the last block's dense output gives the dense model's logits (first micro-batch)."""
    ids, am = s.ids[0]
    with torch.no_grad():
        h = s.dense[0]
        for l, blk in enumerate(dense_blocks):
            h = s.run(blk, l, 0, h)
        ref = dense_model(input_ids=ids, attention_mask=am, use_cache=False).logits
        got = head(h)
    return got.shape == ref.shape and bool(((got.float() - ref.float()).abs().max()
                                            <= HEAD_ATOL * ref.float().abs().max().clamp_min(1.0)))


def _train_block(s: _BlockStreams, l: int, block: nn.Module, layers: list[nn.Module], batches: list[Batch],
                 groups: list[list[int]], by_batch: list[list[int]], tokens: int, lr: float, dev: torch.device,
                 loss: str, heads, progress, done_all: int, total: int) -> tuple[float, float, int, int]:
    """Train block `l`'s factors on (X̃_l → Y_l) for `tokens` tokens, cycling the batches, one step per
    group of batches (`step_groups`); (loss per token over the first pass through the groups — each group's
    before its own step —, steps, tokens). Called under no_grad (re-enabled here)."""
    scale = _mse_scale(s) if loss == "mse" else 1.0
    tr = _Trainer(layers, lr, dev)
    done, steps, first_sum, first_n, i = 0, 0, 0.0, 0, 0
    try:
        with torch.enable_grad():
            while done < tokens:
                group = groups[i % len(groups)]
                i += 1
                n_b = sum(int(batches[bi].attention_mask.sum()) for bi in group)
                tot = 0.0
                for j in (j for bi in group for j in by_batch[bi]):
                    out = s.run(block, l, j, s.comp[j])
                    if heads is not None:
                        with torch.no_grad():
                            tl = heads[0](s.dense[j])
                        val = kl_per_token(tl, heads[1](out), s.masks[j]) / n_b
                    else:
                        val = _block_loss(out, s.dense[j], s.masks[j], loss, scale) / n_b
                    tr.backward(val)
                    tot += float(val.detach())
                if not math.isfinite(tot):
                    raise FascError("Healing diverged (non-finite loss); lower the learning rate.")
                tr.step()
                steps += 1
                if i <= len(groups):
                    first_sum, first_n = first_sum + tot * n_b, first_n + n_b
                done += n_b
                if progress is not None and progress(min(done_all + min(done, tokens), total), total) is False:
                    raise Cancelled("Healing cancelled; the factors are as they were.")
    finally:
        tr.close()
    return first_sum / max(first_n, 1), steps, done


def _mse_scale(s: _BlockStreams) -> float:
    """Mean ‖y_t‖² over the real tokens of the current dense outputs (the 'mse' loss's scale)."""
    sq = sum(float(y[m].float().pow(2).sum()) for y, m in zip(s.dense, s.masks))
    return sq / max(sum(int(m.sum()) for m in s.masks), 1)
