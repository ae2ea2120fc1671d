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
