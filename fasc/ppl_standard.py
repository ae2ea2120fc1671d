"""Perplexity by the protocol compressed-LLM papers report for WikiText-2 (SVD-LLM, LEMS, ASVD …).

The whole text is tokenized once (`tokenizer(text)`, as `tokenizer("\\n\\n".join(test["text"]))` in
their code), cut into non-overlapping windows of `seq_len` = 2048 tokens (capped at the model's
maximum), the remainder dropped; ppl = exp(Σ NLL / (windows · (seq_len − 1))) over every next-token
prediction inside the windows. `fasc.evaluate.perplexity` (the project's protocol) instead tokenizes
each paragraph on its own and keeps short last windows; the two agree on a single paragraph whose
length is a multiple of the window.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_seq_len
from .errors import FascError

STANDARD_SEQ_LEN = 2048


def model_max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 1:
            return v
    return None


def standard_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of `seq_len` tokens over the whole text tokenized once (remainder dropped),
    over its first `max_tokens` tokens when given."""
    from .quiet import quiet_transformers

    with quiet_transformers():  # no "longer than the maximum length" notice: we cut windows ourselves
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise FascError(f"The text has {ids.numel()} tokens, fewer than one window of {seq_len}; give a longer "
                        f"text (WikiText-2 test has ~290k) or a smaller --seq-len.")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


@torch.no_grad()
def perplexity_standard(model: nn.Module, tokenizer, text: str, seq_len: int = STANDARD_SEQ_LEN,
                        batch_size: int = 1, progress: Callable[[int, int], None] | None = None,
                        max_tokens: int | None = None) -> dict:
    """Standard-protocol perplexity; returns {"perplexity", "seq_len", "windows", "tokens_scored"}.

    `seq_len` is capped at the model's maximum positions (the cap is reported in "seq_len")."""
    check_seq_len(seq_len)
    cap = model_max_positions(model)
    seq_len = min(seq_len, cap) if cap else seq_len
    windows = standard_windows(tokenizer, text, seq_len, max_tokens)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            x = torch.stack(windows[i:i + batch_size]).to(dev)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                         reduction="sum"))
            count += x[:, 1:].numel()
            if progress is not None:
                progress(min(i + batch_size, len(windows)), len(windows))
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(nll / count), "seq_len": seq_len, "windows": len(windows),
            "tokens_scored": count}
