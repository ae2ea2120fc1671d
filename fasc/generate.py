"""Greedy continuations of free prompts, to compare models at a glance (a model with a fine
perplexity can still print garbage)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .errors import FascError
from .model_state import eval_mode

MAX_NEW_TOKENS = 512


def _check(prompt, n_tokens) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise FascError("The prompt is empty; give some text to continue, e.g. --generate \"The capital of France is\".")
    if not (isinstance(n_tokens, int) and 1 <= n_tokens <= MAX_NEW_TOKENS):
        raise FascError(f"The number of tokens to generate must be in [1, {MAX_NEW_TOKENS}], got {n_tokens!r}.")


@torch.no_grad()
def greedy_tokens(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 32) -> Iterator[int]:
    """Yield the token ids greedy decoding (argmax, no sampling) appends to `prompt`, one at a time, with
    a key/value cache (each step runs one token); stops at the end-of-text token or the model's maximum
    length. The model is left in the mode it was in."""
    from .prefix import cached_forward, new_cache

    _check(prompt, n_tokens)
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise FascError(f"The prompt {prompt!r} tokenizes to nothing; give some text.")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    eos = getattr(tokenizer, "eos_token_id", None)
    dev = next(model.parameters()).device
    if len(ids) >= limit:
        return
    with eval_mode(model):
        cache = new_cache(model)
        x = torch.tensor([ids], device=dev)
        mask = torch.ones_like(x)
        logits = cached_forward(model, x, mask, torch.arange(len(ids), device=dev)[None], cache, True)
        n = len(ids)
        for _ in range(n_tokens):
            nxt = int(logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                return
            yield nxt
            n += 1
            if n >= limit:
                return
            mask = torch.ones((1, n), dtype=torch.long, device=dev)
            logits = cached_forward(model, torch.tensor([[nxt]], device=dev), mask,
                                    torch.tensor([[n - 1]], device=dev), cache, True)


def greedy_continuation(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 32) -> str:
    """The `n_tokens` tokens that greedy decoding (argmax, no sampling) appends to `prompt`,
    decoded; stops early at the end-of-text token. The model is left in the mode it was in."""
    return tokenizer.decode(list(greedy_tokens(model, tokenizer, prompt, n_tokens)), skip_special_tokens=True)


def continuations(models: dict[str, nn.Module], tokenizer, prompts: list[str], n_tokens: int = 32) -> list[dict]:
    """One row per prompt: {"prompt": …, <model name>: continuation, …}."""
    if not prompts:
        raise FascError("No prompt given; pass at least one, e.g. --generate \"The capital of France is\".")
    return [{"prompt": p, **{name: greedy_continuation(m, tokenizer, p, n_tokens) for name, m in models.items()}}
            for p in prompts]


def stream_continuations(models: dict[str, nn.Module], tokenizer, prompts: list[str],
                         n_tokens: int = 32) -> Iterator[tuple[int, str, str, int]]:
    """`continuations`, streamed: for each prompt, the models take one greedy token each in turn (so
    side-by-side columns grow together). Yields (prompt index, model name, its continuation so far,
    tokens done of len(models) · len(prompts) · n_tokens); a model that stops early (end of text)
    counts its remaining tokens as done. The final texts equal `continuations`'."""
    if not prompts:
        raise FascError("No prompt given; pass at least one, e.g. --generate \"The capital of France is\".")
    for p in prompts:
        _check(p, n_tokens)
    done = 0
    for i, p in enumerate(prompts):
        gens = {name: greedy_tokens(m, tokenizer, p, n_tokens) for name, m in models.items()}
        ids: dict[str, list[int]] = {name: [] for name in models}
        while gens:
            for name in list(gens):
                try:
                    ids[name].append(next(gens[name]))
                    done += 1
                except StopIteration:
                    del gens[name]
                    done += n_tokens - len(ids[name])
                yield i, name, tokenizer.decode(ids[name], skip_special_tokens=True), done


@torch.no_grad()
def seconds_per_new_token(model: nn.Module, tokenizer, n: int = 8) -> float:
    """Seconds one greedy step with the key/value cache takes here: `n` one-token steps after a short
    prompt, timed (whatever tokens the model would pick, so an early end of text does not cut it)."""
    import time

    from .prefix import cached_forward, new_cache

    dev = next(model.parameters()).device
    ids = (tokenizer("The capital of")["input_ids"] or [0])[:8]
    with eval_mode(model):
        cache = new_cache(model)
        x = torch.tensor([ids], device=dev)
        cached_forward(model, x, torch.ones_like(x), torch.arange(len(ids), device=dev)[None], cache, True)
        t = time.perf_counter()
        for j in range(len(ids), len(ids) + n):
            cached_forward(model, x[:, -1:], torch.ones((1, j + 1), dtype=torch.long, device=dev),
                           torch.tensor([[j]], device=dev), cache, True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) / n
