"""Forward passes that share a prefix: run what many rows have in common once, keep its key/value cache,
and run only each row's own tokens after it. The same numbers as one full forward per row (up to float
rounding), a fraction of the cost when rows share contexts (the choices of a multiple-choice question, the
few-shot examples of MMLU or of a QA set).

`loglikelihoods` scores (context, continuation) token lists as lm-eval's Hugging Face class does (sum of the
continuation's log-probabilities, and whether greedy decoding would produce it); `fasc.harness` plugs it
into lm-eval, `fasc.qa` scores gold answers with it.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

CLUSTER_TOKENS = 32       # contexts whose first tokens agree this far are batched together (few-shot prefixes)
MAX_CACHE_ROWS = 24_576   # rows × context tokens of one batch's key/value cache (memory bound)


def common_prefix(rows: list[list[int]], keep: int = 1) -> int:
    """Length of the token prefix all rows share, leaving every row at least `keep` tokens of its own."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - keep
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def cached_forward(model: nn.Module, ids, mask, pos, cache, last_only: bool = False):
    """One forward that extends `cache` (in place); logits at the last position only when asked."""
    params = _params(model)
    kw = {"logits_to_keep": 1} if last_only and "logits_to_keep" in params else {}
    kw["cache" if "cache" in params else "past_key_values"] = cache  # transformers 5 renames past_key_values
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw).logits


def _params(model):
    f = type(model).forward
    if f not in _PARAMS:
        _PARAMS[f] = set(inspect.signature(f).parameters)
    return _PARAMS[f]


_PARAMS: dict = {}


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=getattr(model, "config", None))
    except TypeError:
        return DynamicCache()


class Prefix:
    """Token ids run once (batch of one); `batch(b)` is a copy of their cache for b rows."""

    def __init__(self, model: nn.Module, ids: list[int]):
        self.n = len(ids)
        self.model = model
        self.cache = new_cache(model)
        if self.n:
            dev = next(model.parameters()).device
            x = torch.tensor([ids], device=dev)
            cached_forward(model, x, torch.ones_like(x), torch.arange(self.n, device=dev)[None], self.cache, True)

    def batch(self, b: int):
        if not self.n:
            return new_cache(self.model)
        c = copy.deepcopy(self.cache)
        c.batch_repeat_interleave(b)
        return c


def _batches(groups: list[tuple[tuple[int, ...], list]], batch_size: int) -> list[list]:
    """Groups (context, its continuations) in batches: contexts that share their first CLUSTER_TOKENS tokens
    together (so their common prefix runs once), the others by length (little padding); a batch holds at
    most `batch_size` continuations (a group with more is split) and a bounded cache."""
    clusters: dict[tuple[int, ...], list] = defaultdict(list)
    for g in groups:
        clusters[g[0][:CLUSTER_TOKENS]].append(g)
    shared = {key for key, c in clusters.items() if len(c) > 1 and all(len(g[0]) > CLUSTER_TOKENS for g in c)}
    single = sorted((g for key, c in clusters.items() if key not in shared for g in c), key=lambda g: -len(g[0]))
    ordered = [g for key in shared for g in sorted(clusters[key], key=lambda g: -len(g[0]))] + single
    out, cur, rows = [], [], 0
    for ctx, conts in ordered:
        for j in range(0, len(conts), batch_size):
            part = (ctx, conts[j:j + batch_size])
            width = max([len(c) for c, _ in cur] + [len(ctx)])
            if cur and (rows + len(part[1]) > batch_size or (rows + len(part[1])) * width > MAX_CACHE_ROWS):
                out.append(cur)
                cur, rows = [], 0
            cur.append(part)
            rows += len(part[1])
    if cur:
        out.append(cur)
    return out


def _by_context(items: list[tuple[list[int], list[int]]]) -> list[tuple[tuple[int, ...], list]]:
    """(context, [(item index, continuation), …]) for each distinct context, in first-seen order."""
    by_ctx: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for i, (c, k) in enumerate(items):
        by_ctx[tuple(c)].append((i, tuple(k)))
    return list(by_ctx.items())


def _shape(batch: list) -> tuple[list[list[int]], int, int, int]:
    """(contexts, n0, w1, w2) of one `loglikelihoods` batch: the prefix its contexts share (run once), the
    width of pass 1 (each context after it, but its last token) and of pass 2 (the longest continuation)."""
    ctxs = [list(c) for c, _ in batch]
    n0 = common_prefix(ctxs, keep=2)
    return ctxs, n0, max(len(c) - n0 - 1 for c in ctxs), max(len(k) for _, ks in batch for _, k in ks)


def forward_tokens(items: list[tuple[list[int], list[int]]], batch_size: int = 16) -> int:
    """Token positions `loglikelihoods(model, items, batch_size)` runs through the model, padding included
    (the shared prefix once, pass 1's padded contexts, pass 2's padded continuations): its cost, without a model."""
    total = 0
    for batch in _batches(_by_context(items), batch_size):
        _, n0, w1, w2 = _shape(batch)
        total += n0 + len(batch) * w1 + sum(len(ks) for _, ks in batch) * w2
    return total


@torch.no_grad()
def loglikelihoods(model: nn.Module, items: list[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[tuple[float, bool, bool]]:
    """(Σ log P(continuation | context), greedy, first token greedy) per (context, continuation) token lists
    (greedy: every continuation token is the argmax after the ones before it); contexts need ≥ 2
    tokens and continuations ≥ 1. Identical contexts run once; the prefix a batch's contexts share runs once.

    Per batch: (0) the shared prefix, once; (1) each context but its last token, right-padded, extending a
    copy of that cache; (2) the cache rows repeated for each continuation, which runs as [last context
    token] + continuation[:-1] with positions after its own context, so every logit it needs comes out of
    pass 2 (padding is masked; each row's tokens sit where a full forward would put them)."""
    from .errors import Cancelled

    if any(len(c) < 2 or not k for c, k in items):
        raise ValueError("loglikelihoods needs contexts of ≥ 2 tokens and non-empty continuations")
    dev = next(model.parameters()).device
    out: list[tuple[float, bool, bool]] = [(0.0, False, False)] * len(items)
    done = 0
    for batch in _batches(_by_context(items), batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("Evaluation cancelled.")
        ctxs, n0, w1, w2 = _shape(batch)
        prefix = Prefix(model, ctxs[0][:n0])
        g = len(batch)
        own = [c[n0:-1] for c in ctxs]                                        # pass 1: ≥ 1 token each
        ids1 = torch.zeros((g, w1), dtype=torch.long)
        m1 = torch.zeros((g, w1), dtype=torch.long)
        for r, o in enumerate(own):
            ids1[r, :len(o)] = torch.tensor(o)
            m1[r, :len(o)] = 1
        mask1 = torch.cat([torch.ones((g, n0), dtype=torch.long), m1], 1)
        cache = prefix.batch(g)
        cached_forward(model, ids1.to(dev), mask1.to(dev), (n0 + torch.arange(w1))[None].expand(g, -1).to(dev),
                       cache, True)
        rows = [(r, i, k) for r, (_, conts) in enumerate(batch) for i, k in conts]
        index = torch.tensor([r for r, _, _ in rows])
        cache.batch_select_indices(index.to(dev))
        ids2 = torch.zeros((len(rows), w2), dtype=torch.long)
        m2 = torch.zeros((len(rows), w2), dtype=torch.long)
        pos2 = torch.zeros((len(rows), w2), dtype=torch.long)
        for j, (r, _, k) in enumerate(rows):
            seq = [ctxs[r][-1], *k[:-1]]
            ids2[j, :len(seq)] = torch.tensor(seq)
            m2[j, :len(seq)] = 1
            pos2[j] = len(ctxs[r]) - 1 + torch.arange(w2)
        mask2 = torch.cat([mask1[index], m2], 1)
        logits = cached_forward(model, ids2.to(dev), mask2.to(dev), pos2.to(dev), cache)
        lp = logits.float().log_softmax(-1).cpu()
        for j, (_, i, k) in enumerate(rows):
            tgt = torch.tensor(k)
            sel = lp[j, :len(k)]
            hit = sel.argmax(-1) == tgt
            out[i] = (float(sel.gather(-1, tgt[:, None]).sum()), bool(hit.all()), bool(hit[0]))
        done += len(rows)
        if progress is not None:
            progress(done, len(items))
    return out
