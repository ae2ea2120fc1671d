"""The evaluation suite of `fasc eval --tasks`: the field's tasks through lm-eval (`fasc.harness`) and
knowledge in generation (`fasc.qa`: `qa_facts`, `jeopardy`), merged into one result per model in the
form of `fasc.harness.run_tasks` (results, stderr, n_samples, per-document samples, few-shot counts, and
for the QA sets the generated answers under "qa")."""

from __future__ import annotations

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


def _lm_tokens(tokenizer, names: list[str], limit: int | None, sample: int = 16) -> dict[str, int]:
    """Tokens each lm-eval task sends through the model for its first `limit` documents (estimated from
    the requests of its first `sample` documents: each distinct context once, plus every continuation)."""
    from .lm_tasks.standard import build_task

    out = {}
    for name in names:
        task = build_task(name)
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        n_docs = len(list(task.eval_docs))
        n = min(sample, n_docs, limit or n_docs)
        task.build_all_requests(limit=n)
        ctxs, conts = set(), 0
        for inst in task.instances:
            ctx, cont = inst.args[0], inst.args[1] if len(inst.args) > 1 else ""
            ctxs.add(ctx)
            conts += len(tokenizer(cont, add_special_tokens=False)["input_ids"])
        toks = sum(len(tokenizer(c)["input_ids"]) for c in ctxs) + conts
        out[name] = int(toks * min(limit or n_docs, n_docs) / max(n, 1))
    return out


DECODE_TOKENS = 20  # a generated answer's decoding costs about as much as this many tokens of one forward


def estimate_tokens(tokenizer, tasks: list[str], limit: int | None, probe=None, shots: int = SHOTS) -> dict[str, int]:
    """{task: ≈ tokens of forward passes one model needs} for `run_suite(tasks, limit)`."""
    from .qa import qa_set

    lm, qa = split_tasks(tasks)
    out = _lm_tokens(tokenizer, lm, limit)
    for name in qa:
        qs = qa_set(name, probe)
        items = list(qs.items[:limit] if limit else qs.items)
        sample = items[:32]
        per = sum(2 * len(tokenizer(it.question)["input_ids"]) + len(tokenizer(" " + it.answer)["input_ids"])
                  for it in sample) / max(len(sample), 1) + DECODE_TOKENS
        out[name] = int(per * len(items))
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
