"""Evaluation: held-out perplexity and fact recall on a probe."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_seq_len
from .data import Example, encode_example, next_tokens, pad_rows, text_rows
from .errors import FascError
from .model_state import eval_mode


@dataclass
class RecallResult:
    """Fact recall: `first_token` = share of facts whose answer's first token is the top-1 prediction
    after the prompt; `exact` = share whose whole answer is the greedy continuation."""

    first_token: float
    exact: float
    n: int
    per_relation: dict[str, float] = field(default_factory=dict)
    correct: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"recall": self.first_token, "exact_match": self.exact, "n_facts": self.n,
                "per_relation": self.per_relation}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 256, batch_size: int = 8,
               max_tokens: int | None = None, progress: Callable[[int, int], None] | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens of each paragraph of
    `text` (paragraphs = blank-line separated; see `fasc.data.text_rows`), up to `max_tokens`."""
    check_seq_len(seq_len)
    windows, _ = text_rows(tokenizer, text, seq_len)
    if max_tokens is not None:
        kept, n = [], 0
        for w in windows:
            if n >= max_tokens:
                break
            kept.append(w[: max_tokens - n] if max_tokens - n >= 2 else w)
            n += len(kept[-1])
        windows = kept
    if not windows:
        raise FascError("The evaluation text has fewer than 2 tokens; give a longer held-out text.")
    dev = _device(model)
    nll, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            x, mask = pad_rows(chunk)
            logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
            tgt = x[:, 1:].to(dev)
            valid = mask[:, 1:].bool().to(dev)
            lp = F.cross_entropy(logits[:, :-1][valid], tgt[valid], reduction="sum")
            nll += float(lp)
            count += int(valid.sum())
            if progress is not None:
                progress(min(i + batch_size, len(windows)), len(windows))
    return math.exp(nll / count)


def _probe_logits(model: nn.Module, encoded: list[tuple[list[int], int]], batch_size: int):
    """The one batched, padded forward over encoded probe facts: yields (facts done so far, chunk,
    padded ids (B, L) on the CPU, logits (B, L, V) on the model's device), in eval mode."""
    dev = _device(model)
    with eval_mode(model):
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            x, mask = pad_rows([ids for ids, _ in chunk])
            logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            yield min(i + batch_size, len(encoded)), chunk, x, logits


@torch.no_grad()
def fact_recall(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None) -> RecallResult:
    """Top-1 first-token recall and greedy exact match (teacher-forced argmax = greedy decoding)."""
    if not examples:
        raise FascError("The probe has no facts; give a JSONL file with prompt/answer lines.")
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    first, exact = [], []
    for done, chunk, _, logits in _probe_logits(model, encoded, batch_size):
        pred = logits.argmax(-1).cpu()
        for b, (ids, start) in enumerate(chunk):
            hits = pred[b, start - 1: len(ids) - 1] == torch.tensor(ids[start:])
            first.append(bool(hits[0]))
            exact.append(bool(hits.all()))
        if progress is not None:
            progress(done, len(encoded))
    by_rel: dict[str, list[bool]] = defaultdict(list)
    for ex, ok in zip(examples, first):
        by_rel[ex.relation or "all"].append(ok)
    return RecallResult(first_token=sum(first) / len(first), exact=sum(exact) / len(exact), n=len(first),
                        per_relation={r: sum(v) / len(v) for r, v in sorted(by_rel.items())}, correct=first)


@torch.no_grad()
def target_loss(model: nn.Module, batches, temperature: float = 1.0) -> float:
    """Σ CE(logits/T) over the batches' target tokens divided by their statistics tokens N — the
    quantity whose increase the predicted ΔL estimates (nats per token, spec §2)."""
    dev = _device(model)
    total, n = 0.0, 0
    with eval_mode(model):
        for b in batches:
            ids = b.input_ids.to(dev)
            logits = model(input_ids=ids, attention_mask=b.attention_mask.to(dev), use_cache=False).logits
            tm = b.target_mask.to(dev)
            nxt = next_tokens(ids)
            total += float(F.cross_entropy(logits[tm].float() / temperature, nxt[tm], reduction="sum"))
            n += int(b.stat_mask.sum())
    return total / max(n, 1)


@torch.no_grad()
def answer_scores(model: nn.Module, encoded: list[tuple[list[int], int]],
                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact: −log P(answer | prompt) in nats (Σ over its answer tokens, teacher-forced) and
    whether the answer's first token is the top-1 prediction. `encoded` from `encode_example`.
    Returns ((n,) float32, (n,) bool)."""
    nll, first = [], []
    for _, chunk, x, logits in _probe_logits(model, encoded, batch_size):
        dev = logits.device
        logp = logits[:, :-1].float().log_softmax(-1)                             # (B, L-1, V)
        tgt = x[:, 1:].to(dev)
        lp = logp.gather(-1, tgt[..., None])[..., 0]                              # (B, L-1)
        pos = torch.arange(x.shape[1] - 1, device=dev)[None]
        start = torch.tensor([s for _, s in chunk], device=dev)[:, None]
        end = torch.tensor([len(ids) for ids, _ in chunk], device=dev)[:, None]
        ans = (pos >= start - 1) & (pos < end - 1)                                # answer-token targets
        nll.extend((-(lp * ans).sum(1)).tolist())
        rows = torch.arange(len(chunk), device=dev)
        first.extend((logp[rows, start[:, 0] - 1].argmax(-1) == tgt[rows, start[:, 0] - 1]).tolist())
    return torch.tensor(nll, dtype=torch.float32), torch.tensor(first, dtype=torch.bool)
