"""lm-evaluation-harness on a loaded model (dense, factored export or merged): `fasc eval --tasks`.

The model object goes to lm-eval's Hugging Face class (`HFLM(pretrained=model, tokenizer=tok)`), so a
factored export is scored as the small model it is. `fasc_facts` (the fact probe, see
`fasc/lm_tasks/facts.py`) is built here from the probe file and the model's tokenizer and needs no
network; standard tasks (wikitext, lambada, mmlu …) load through lm-eval's own registry and need their
data in the local Hugging Face datasets cache or a network. Without a reachable hub, the run is made
offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) so that missing data fails at once, in one line.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .errors import FascError

FACTS_TASK = "fasc_facts"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


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


def _load_task(name: str, manager, probe, tokenizer, offline: bool):
    """{name: Task} for one task name; missing data or an unknown name → one FascError line."""
    if name == FACTS_TASK:
        from .data import load_probe
        from .lm_tasks.facts import FactsTask

        return {name: FactsTask(examples=load_probe(probe), tokenizer=tokenizer)}
    from lm_eval.tasks import get_task_dict

    if name not in manager.all_tasks:
        raise FascError(f"lm-eval has no task {name!r}; see `lm_eval ls tasks` for names (FASC adds {FACTS_TASK}).")
    try:
        return get_task_dict([name], manager)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not cached, no network"
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        where = "the local Hugging Face datasets cache (HF_DATASETS_CACHE)" + (
            " and the hub is unreachable (offline)" if offline else "")
        raise FascError(f"lm-eval task {name!r} needs its dataset, which is not in {where} ({msg}); run it once "
                        f"where a network exists to cache it, or use {FACTS_TASK}.") from None


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], *, probe: str | Path, limit: int | None = None,
              batch_size: int = 16, num_fewshot: int | None = None) -> dict:
    """Run lm-eval `tasks` on `model`; returns {"results": {task: {metric: value}}, "n_samples": {task: n}}.

    Args:
        probe: the fact probe JSONL for `fasc_facts`.
        limit: at most this many documents per task (lm-eval's `--limit`).
    """
    _import_lm_eval()
    if not tasks:
        raise FascError("No lm-eval task given; pass --tasks fasc_facts[,wikitext,…].")
    for name in ("lm_eval", "lm-eval"):  # lm-eval logs at INFO; the library never prints
        logging.getLogger(name).setLevel(logging.ERROR)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .lm_tasks import TASK_DIR

    with _offline_unless_reachable() as offline:
        # indexing lm-eval's ~14k built-in task files takes ~1 min: only when a standard task is asked for
        manager = TaskManager(include_path=str(TASK_DIR), include_defaults=any(t != FACTS_TASK for t in tasks))
        task_objs = {}
        for name in tasks:
            task_objs.update(_load_task(name, manager, probe, tokenizer, offline))
        dev = next(model.parameters()).device
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))
        out = simple_evaluate(model=lm, tasks=list(task_objs.values()), limit=limit, num_fewshot=num_fewshot,
                              task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    n = {t: d.get("effective", d.get("original")) for t, d in (out.get("n-samples") or {}).items()}
    return {"results": results, "n_samples": n}
