"""The evaluation suite of `fasc eval --tasks`: the field's tasks through lm-eval (`fasc.harness`) and
knowledge in generation (`fasc.qa`: `qa_facts`, `jeopardy`), merged into one result per model in the
form of `fasc.harness.run_tasks` (results, stderr, n_samples, per-document samples, few-shot counts, and
for the QA sets the generated answers under "qa")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .errors import FascError
from .qa import QA_TASKS, SHOTS


def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(lm-eval task names with presets expanded, QA set names); an unknown name is one FascError line."""
    from .harness import expand_tasks

    qa = [t for t in tasks if t in QA_TASKS]
    rest = [t for t in tasks if t not in QA_TASKS]
    return (expand_tasks(rest) if rest else []), list(dict.fromkeys(qa))


def run_suite(model: nn.Module, tokenizer, tasks: list[str], *, probe: str | Path | None, limit: int | None = None,
              offset: int = 0, batch_size: int = 16, shots: int = SHOTS, progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Run `tasks` (lm-eval names, presets, `qa_facts`, `jeopardy`) on `model`, the first `limit` documents
    of each after the first `offset`. `progress(done, total)` runs over the parts (lm-eval's requests, then each QA set's items)."""
    from .harness import run_tasks
    from .qa import qa_set, run_qa

    if not tasks:
        raise FascError("No task given; pass --tasks zeroshot (or arc_easy,…, mmlu, qa_facts, jeopardy).")
    lm, qa = split_tasks(tasks)
    sets = {name: qa_set(name, probe) for name in qa}
    parts = ([("lm", None)] if lm else []) + [(name, s) for name, s in sets.items()]
    run: dict = {"results": {}, "stderr": {}, "n_samples": {}, "samples": {}, "fewshot": {}, "qa": {}}
    for j, (name, qs) in enumerate(parts):
        def step(d, n, j=j):
            if progress is not None:
                progress(j * 1000 + int(1000 * d / max(n, 1)), 1000 * len(parts))
        if qs is None:
            part = run_tasks(model, tokenizer, lm, probe=probe, limit=limit, offset=offset, batch_size=batch_size,
                             progress=step, should_stop=should_stop)
        else:
            part = run_qa(model, tokenizer, qs, k=shots, limit=limit, offset=offset, batch_size=batch_size,
                          progress=step, should_stop=should_stop).to_run()
        for key in run:
            run[key].update(part.get(key, {}))
    return run


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request as lm-eval's HF class splits them (trailing spaces
    of the context moved to the continuation, the pair encoded whole and cut after the context's tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]   # noqa: E731
    if not context:
        return [tokenizer.eos_token_id or 0], enc(continuation)
    ctx = enc(context)
    return ctx, enc(context + continuation)[len(ctx):]


def _lm_tokens(tokenizer, names: list[str], limit: int | None, sample: int = 16,
               batch_size: int = 16) -> dict[str, int]:
    """Token positions each lm-eval task runs through the model for its first `limit` documents, padding
    included (`fasc.prefix.forward_tokens` on the requests of its first `sample` documents, scaled)."""
    import contextlib
    import io

    from .harness import quiet_lm_eval_logs
    from .lm_tasks.standard import build_task
    from .prefix import forward_tokens

    quiet_lm_eval_logs()
    out = {}
    for name in names:
        with contextlib.redirect_stderr(io.StringIO()):   # lm-eval's request-building progress bars
            task = build_task(name)
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            n_docs = len(list(task.eval_docs))
            n = min(sample, n_docs, limit or n_docs)
            task.build_all_requests(limit=n)
        pairs, other = [], 0
        for inst in task.instances:
            if len(inst.args) > 1 and isinstance(inst.args[1], str):
                c, k = _encode_pair(tokenizer, inst.args[0], inst.args[1])
                pairs.append((c if len(c) >= 2 else [0, *c], k or [0]))
            else:  # a rolling or generation request: its own tokens
                other += len(tokenizer(inst.args[0])["input_ids"])
        toks = forward_tokens(pairs, batch_size) + other
        out[name] = int(toks * min(limit or n_docs, n_docs) / max(n, 1))
    return out


@dataclass(frozen=True)
class Work:
    """What one model runs for a task: token positions of batched forward passes (padding included) and
    decoding — `steps` (forward calls: a batch decodes until its last row stops) and `row_steps` (rows × steps
    while each row runs: a row leaves the batch when it stops) when answers are as long as the gold ones, up
    to `max_steps` / `max_row_steps` when every row loops to the length cap."""

    tokens: int
    steps: int = 0
    max_steps: int = 0
    row_steps: int = 0
    max_row_steps: int = 0

    def seconds(self, per_token: float, per_step: tuple[float, float], most: bool = False) -> float:
        """≈ seconds here, given `seconds_per_scored_token` and `seconds_per_step`'s (fixed, per row)."""
        steps, rows = (self.max_steps, self.max_row_steps) if most else (self.steps, self.row_steps)
        return self.tokens * per_token + steps * per_step[0] + rows * per_step[1]


def estimate_work(tokenizer, tasks: list[str], limit: int | None, probe=None, shots: int = SHOTS,
                  batch_size: int = 16) -> dict[str, Work]:
    """{task: Work} for `run_suite(tasks, limit, batch_size)` on one model, without running it."""
    from .qa import qa_set, qa_work
    from .quiet import quiet_transformers

    lm, qa = split_tasks(tasks)
    with quiet_transformers():   # prompts longer than a small model's maximum are counted, not warned about
        out = {name: Work(n) for name, n in _lm_tokens(tokenizer, lm, limit, batch_size=batch_size).items()}
        for name in qa:
            qs = qa_set(name, probe)
            out[name] = Work(*qa_work(tokenizer, qs, list(qs.items[:limit] if limit else qs.items), shots, batch_size))
    return out


def seconds_per_token(model: nn.Module, n: int = 256) -> float:
    """Forward seconds per token of `model` here (one timed batch of 4 × `n` tokens after a warm-up)."""
    import time

    import torch

    dev = next(model.parameters()).device
    x = torch.randint(0, int(getattr(model.config, "vocab_size", 100)), (4, n), device=dev)
    with torch.no_grad():
        model(input_ids=x[:1, :16], use_cache=False)
        t = time.perf_counter()
        model(input_ids=x, use_cache=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) / x.numel()


def seconds_per_scored_token(model: nn.Module, contexts: int = 8, choices: int = 4) -> float:
    """Seconds per token position of `fasc.prefix.loglikelihoods` on `model` here, timed on requests shaped like
    a multiple-choice task's (`contexts` contexts of 30–90 tokens, each with `choices` continuations of 5–25):
    the forward passes plus what scoring adds (key/value cache copies, log-softmax over the vocabulary) —
    on SmolLM2 with 2 threads 1.17× a plain batch's seconds per token."""
    import time

    from .prefix import forward_tokens, loglikelihoods

    vocab = int(getattr(model.config, "vocab_size", 100))
    fit = min(1.0, (int(getattr(model.config, "max_position_embeddings", None) or 116) - 1) / 115)  # tiny models
    ids = lambda n, seed: [(seed * 7919 + 31 * j) % (vocab - 1) + 1 for j in range(max(2, int(n * fit)))]  # noqa: E731
    items = [(ids(30 + 60 * c // max(contexts - 1, 1), c), ids(5 + 20 * k // max(choices - 1, 1), 100 * c + k))
             for c in range(contexts) for k in range(choices)]
    loglikelihoods(model, items[:choices])   # warm-up
    t = time.perf_counter()
    loglikelihoods(model, items)
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) / forward_tokens(items)


def seconds_per_step(model: nn.Module, rows: int = 16, context: int = 256) -> tuple[float, float]:
    """Seconds of one decode step of `model` here, as (fixed, per row): a step of r rows after a key/value
    cache of `context` tokens each costs ≈ fixed + r × per row, fitted to timed steps of 1 and `rows` rows
    (each the faster of two after a warm-up; on a CPU the fixed part is about a read of every weight)."""
    import time

    import torch

    from .prefix import Prefix, cached_forward

    dev = next(model.parameters()).device
    context = min(context, int(getattr(model.config, "max_position_embeddings", None) or context + 3) - 3)
    with torch.no_grad():
        prefix = Prefix(model, [1] * context)

    @torch.no_grad()
    def step(r: int) -> float:
        x = torch.ones((r, 1), dtype=torch.long, device=dev)
        cache, best = prefix.batch(r), float("inf")
        for i in range(3):
            mask = torch.ones((r, context + i + 1), dtype=torch.long, device=dev)
            t = time.perf_counter()
            cached_forward(model, x, mask, torch.full((r, 1), context + i, device=dev), cache, True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = best if i == 0 else min(best, time.perf_counter() - t)
        return best

    one, many = step(1), step(rows)
    per_row = max(many - one, 0.0) / (rows - 1)
    return max(one - per_row, 0.0), per_row
