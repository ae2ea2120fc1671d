"""Healing text the dense model writes itself (`fasc compress --heal-data generated`).

Healing distils the dense model into the compressed one on some text (`fasc.heal`); on the calibration
text it pulls the compressed model toward that text's style. Here the text is the dense model's own:
the first tokens of each calibration row, continued by sampling from the dense model (temperature 1) to
the row's length, so the student is fitted where the teacher puts its probability mass."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .data import Batch, pad_rows
from .errors import FascError
from .generate import sampled_continuations
from .heal import used_batches

PROMPT_TOKENS = 32
ROWS_PER_PASS = 32


def generated_batches(dense_model: nn.Module, batches: list[Batch], tokens: int, *,
                      prompt_tokens: int = PROMPT_TOKENS, temperature: float = 1.0, seed: int = 0,
                      eos: int | None = None, rows_per_pass: int = ROWS_PER_PASS,
                      progress: Callable[[int, int], None] | None = None) -> list[Batch]:
    """Batches shaped like the first `tokens` real tokens of `batches` (rows, lengths, batch size), each
    row its first `prompt_tokens` tokens (at most half the row) followed by the dense model's sampled
    continuation; a row that samples `eos` ends there. `rows_per_pass` rows decode together;
    `progress(done, total)` counts decode steps."""
    if tokens < 1:
        raise FascError(f"Generated healing text needs a positive number of tokens, got {tokens!r}.")
    if prompt_tokens < 1:
        raise FascError(f"The prompt of a generated row needs at least one token, got {prompt_tokens!r}.")
    used = used_batches(batches, tokens)
    if not used:
        raise FascError("No calibration rows to start generated healing text from; give calibration text.")
    rows = [b.input_ids[r][b.attention_mask[r].bool()].tolist() for b in used for r in range(b.input_ids.shape[0])]
    rows = [r for r in rows if len(r) >= 2]
    rows.sort(key=len)
    chunks = [rows[i:i + rows_per_pass] for i in range(0, len(rows), rows_per_pass)]  # sorted: chunk[0] is shortest
    prompts = [min(prompt_tokens, len(c[0]) // 2) for c in chunks]
    steps = [len(c[-1]) - p for c, p in zip(chunks, prompts)]
    total, done = sum(steps), 0
    out_rows: list[list[int]] = []
    for j, (chunk, p, n) in enumerate(zip(chunks, prompts, steps)):
        inner = None if progress is None else (lambda i, _n, d=done: progress(d + i, total))
        new = sampled_continuations(dense_model, [r[:p] for r in chunk], n, temperature=temperature,
                                    seed=seed + j, eos=eos, progress=inner)
        out_rows += [(r[:p] + t)[:len(r)] for r, t in zip(chunk, new)]
        done += n
        if progress is not None:
            progress(done, total)
    size = used[0].input_ids.shape[0]
    out = []
    for i in range(0, len(out_rows), size):
        ids, mask = pad_rows(out_rows[i:i + size])
        target = mask.bool().clone()
        target[:, :-1] &= mask[:, 1:].bool()  # a position predicts the next real token
        target[:, -1] = False
        out.append(Batch(ids, mask, target))
    return out
