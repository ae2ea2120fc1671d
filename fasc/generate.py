"""Greedy continuations of free prompts, to compare models at a glance (a model with a fine
perplexity can still print garbage)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import FascError
from .model_state import eval_mode

MAX_NEW_TOKENS = 512


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 32) -> str:
    """The `n_tokens` tokens that greedy decoding (argmax, no sampling) appends to `prompt`,
    decoded; stops early at the end-of-text token. The model is left in the mode it was in."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FascError("The prompt is empty; give some text to continue, e.g. --generate \"The capital of France is\".")
    if not (isinstance(n_tokens, int) and 1 <= n_tokens <= MAX_NEW_TOKENS):
        raise FascError(f"The number of tokens to generate must be in [1, {MAX_NEW_TOKENS}], got {n_tokens!r}.")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise FascError(f"The prompt {prompt!r} tokenizes to nothing; give some text.")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    eos = getattr(tokenizer, "eos_token_id", None)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    new: list[int] = []
    with eval_mode(model):
        for _ in range(n_tokens):
            if x.shape[1] >= limit:
                break
            nxt = int(model(input_ids=x[:, -limit:], use_cache=False).logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                break
            new.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]], device=dev)], 1)
    return tokenizer.decode(new, skip_special_tokens=True)


def continuations(models: dict[str, nn.Module], tokenizer, prompts: list[str], n_tokens: int = 32) -> list[dict]:
    """One row per prompt: {"prompt": …, <model name>: continuation, …}."""
    if not prompts:
        raise FascError("No prompt given; pass at least one, e.g. --generate \"The capital of France is\".")
    return [{"prompt": p, **{name: greedy_continuation(m, tokenizer, p, n_tokens) for name, m in models.items()}}
            for p in prompts]
