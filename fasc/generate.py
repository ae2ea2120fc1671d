"""Greedy continuations of free prompts, to compare models at a glance (a model with a fine
perplexity can still print garbage)."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Collection, Iterator

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
def greedy_steps(model: nn.Module, tokenizer, prompts: list[str], n_tokens: int = 32) -> Iterator[list[int | None]]:
    """Greedy decoding (argmax, no sampling) of all `prompts` at once with a key/value cache: yields, for
    each step, every prompt's new token id, or None once that prompt has stopped (its end-of-text token,
    or the model's maximum length reached). The prompts are left-padded to one batch with positions
    that skip the padding, so each gets the tokens it would get alone; one step serves all of them (on
    the 2-core CPU a step of three SmolLM2 prompts costs ≈ 1.7× one prompt's, bench.copies_timing). The
    model is left in the mode it was in."""
    if not prompts:
        raise FascError("No prompt given; pass at least one, e.g. --generate \"The capital of France is\".")
    for p in prompts:
        _check(p, n_tokens)
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    for p, e in zip(prompts, enc):
        if not e:
            raise FascError(f"The prompt {p!r} tokenizes to nothing; give some text.")
    yield from decode_steps(model, enc, n_tokens, greedy_pick, end=_ends(getattr(tokenizer, "eos_token_id", None)))


def greedy_pick(z: torch.Tensor) -> torch.Tensor:
    return z.argmax(-1)


def _ends(eos: int | None) -> frozenset[int]:
    return frozenset() if eos is None else frozenset({eos})


def decode_steps(model: nn.Module, enc: list[list[int]], n_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
                 *, end: Collection[int] = (), last: Collection[int] = (), prefix=None,
                 shrink: bool = True) -> Iterator[list[int | None]]:
    """The one decoding loop (greedy, sampled, the QA answers): all rows of `enc` at once, left-padded,
    with positions that skip the padding and a key/value cache; `pick(last logits (B, V)) → ids (B,)`.
    Yields each step's token per row, None once a row has stopped: a token in `end` stops its row unseen
    (end of text), one in `last` is yielded and then stops it (a line break), as does the model's maximum
    length. A stopped row leaves the batch (its cache rows too), so a step costs the rows still running:
    few-shot answers stop after a few tokens while one row may run to `n_tokens` (`shrink=False` keeps
    every row to the end: the same shapes each step; `bench.decode` compares the two). `prefix` (a
    `fasc.prefix.Prefix`) is a shared start already run: `enc` continue it."""
    from .prefix import cached_forward, new_cache

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    dev = next(model.parameters()).device
    n0 = prefix.n if prefix is not None else 0
    lens = [n0 + len(e) for e in enc]
    active = [n < limit for n in lens]
    if not any(active):
        return
    width = max(len(e) for e in enc)
    ids = torch.zeros((len(enc), width), dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[r, width - len(e):] = 1
    pos = n0 + (mask.cumsum(1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones((len(enc), n0), dtype=torch.long), mask], 1).to(dev)
    at = pos[:, -1:].to(dev)
    rows = list(range(len(enc)))      # the rows of `enc` still in the batch, in batch order
    with eval_mode(model):
        cache = new_cache(model) if prefix is None else prefix.batch(len(enc))
        logits = cached_forward(model, ids.to(dev), mask, pos.to(dev), cache, True)
        for step in range(n_tokens):
            nxt = pick(logits[:, -1])
            out: list[int | None] = [None] * len(enc)
            for r, t in zip(rows, nxt.tolist()):
                if active[r] and t in end:
                    active[r] = False
                if active[r]:
                    out[r] = t
                    lens[r] += 1
                    active[r] = lens[r] < limit and t not in last
            yield out
            keep = [b for b, r in enumerate(rows) if active[r]]
            if not keep or step == n_tokens - 1:
                return
            if shrink and len(keep) < len(rows):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, at, nxt = mask[sel], at[sel], nxt[sel]
                rows = [rows[b] for b in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], 1)
            at = at + 1
            logits = cached_forward(model, nxt[:, None], mask, at, cache, True)


@torch.no_grad()
def sampled_continuations(model: nn.Module, prompts: list[list[int]], n_tokens: int, temperature: float = 1.0,
                          seed: int = 0, eos: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Each prompt (token ids) continued by up to `n_tokens` tokens sampled from `model`'s softmax at
    `temperature` (the prompts decoded together, as `greedy_steps` does), reproducible by `seed`; a row
    stops before its `eos` token. Returns the new tokens of each prompt; `progress(step, n_tokens)`."""
    if not prompts or any(not p for p in prompts):
        raise FascError("Sampling needs at least one non-empty prompt.")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise FascError(f"The sampling temperature must be > 0, got {temperature!r}.")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)

    def pick(z: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(torch.softmax(z.float() / temperature, -1), 1, generator=gen)[:, 0]

    out: list[list[int]] = [[] for _ in prompts]
    for step, toks in enumerate(decode_steps(model, prompts, n_tokens, pick, end=_ends(eos))):
        for r, t in enumerate(toks):
            if t is not None:
                out[r].append(t)
        if progress is not None:
            progress(step + 1, n_tokens)
    return out


def greedy_tokens(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 32) -> Iterator[int]:
    """Yield the token ids greedy decoding appends to `prompt`, one at a time (`greedy_steps` of one
    prompt); stops at the end-of-text token or the model's maximum length."""
    for (t,) in greedy_steps(model, tokenizer, [prompt], n_tokens):
        if t is None:
            return
        yield t


def greedy_continuation(model: nn.Module, tokenizer, prompt: str, n_tokens: int = 32) -> str:
    """The `n_tokens` tokens that greedy decoding (argmax, no sampling) appends to `prompt`,
    decoded; stops early at the end-of-text token. The model is left in the mode it was in."""
    return tokenizer.decode(list(greedy_tokens(model, tokenizer, prompt, n_tokens)), skip_special_tokens=True)


def continuations(models: dict[str, nn.Module], tokenizer, prompts: list[str], n_tokens: int = 32) -> list[dict]:
    """One row per prompt: {"prompt": …, <model name>: continuation, …} (`stream_continuations`' final texts)."""
    rows = [{"prompt": p} for p in prompts]
    for i, name, text, _ in stream_continuations(models, tokenizer, prompts, n_tokens):
        rows[i][name] = text
    return rows


def stream_continuations(models: dict[str, nn.Module], tokenizer, prompts: list[str],
                         n_tokens: int = 32) -> Iterator[tuple[int, str, str, int]]:
    """Greedy continuations of `prompts` by each model, streamed: at each step every model decodes one
    token for all prompts at once (`greedy_steps`; on the CPU the models side by side, one thread each:
    one step of a small batch barely uses a second intra-op thread, see bench.copies_timing), and the
    events come prompt by prompt with the models taking turns (so side-by-side columns grow together).
    Yields (prompt index, model name, its continuation so far, tokens done of len(models) · len(prompts)
    · n_tokens); a prompt that stops early (end of text) counts its remaining tokens as done. Each text
    is what the model gives the prompt alone."""
    if not prompts:
        raise FascError("No prompt given; pass at least one, e.g. --generate \"The capital of France is\".")
    for p in prompts:
        _check(p, n_tokens)
    gens = {name: greedy_steps(m, tokenizer, prompts, n_tokens) for name, m in models.items()}
    ids: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in models}
    stopped = {name: [False] * len(prompts) for name in models}
    done = 0
    parallel = len(models) > 1 and all(next(m.parameters()).device.type == "cpu" for m in models.values())
    with contextlib.ExitStack() as stack:
        pool = None
        if parallel:
            from .linalg_device import single_threaded_ops

            pool = stack.enter_context(ThreadPoolExecutor(len(models), thread_name_prefix="fasc-decode"))
            stack.enter_context(single_threaded_ops())
        while gens:
            names = list(gens)
            step = dict(zip(names, pool.map(_advance, [gens[n] for n in names]) if pool else
                            [_advance(gens[n]) for n in names]))
            for name, toks in step.items():
                if toks is None:
                    del gens[name]
                    step[name] = [None] * len(prompts)
            for i in range(len(prompts)):
                for name, toks in step.items():
                    if stopped[name][i]:
                        continue
                    if toks[i] is None:
                        stopped[name][i] = True
                        done += n_tokens - len(ids[name][i])
                    else:
                        ids[name][i].append(toks[i])
                        done += 1
                    yield i, name, tokenizer.decode(ids[name][i], skip_special_tokens=True), done


def _advance(gen: Iterator) -> list | None:
    """The next item of `gen`, or None when it is exhausted."""
    return next(gen, None)


@torch.no_grad()
def seconds_per_new_token(model: nn.Module, tokenizer, n: int = 8, batch: int = 1) -> float:
    """Seconds one greedy step with the key/value cache takes here for `batch` prompts decoded together
    (`greedy_steps`): `n` one-token steps after a short prompt, timed (whatever tokens the model would
    pick, so an early end of text does not cut it)."""
    import time

    from .prefix import cached_forward, new_cache

    dev = next(model.parameters()).device
    ids = (tokenizer("The capital of")["input_ids"] or [0])[:8]
    with eval_mode(model):
        cache = new_cache(model)
        x = torch.tensor([ids] * max(1, batch), device=dev)
        cached_forward(model, x, torch.ones_like(x), torch.arange(len(ids), device=dev)[None].expand(x.shape[0], -1), cache,
                       True)
        t = time.perf_counter()
        for j in range(len(ids), len(ids) + n):
            cached_forward(model, x[:, -1:], torch.ones((x.shape[0], j + 1), dtype=torch.long, device=dev),
                           torch.full((x.shape[0], 1), j, device=dev), cache, True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) / n
