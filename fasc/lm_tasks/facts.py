"""`fasc_facts`: the fact probe as an lm-evaluation-harness task, scored like `fasc eval`.

Per fact (prompt → answer) the task sends loglikelihood requests only (no generation, no network):

- `recall`: the answer's first token is the model's top-1 prediction after the prompt — `fasc eval`'s
  recall. lm-eval speaks in strings, so the first token is sent as the shortest prefix of
  " " + answer that the model's tokenizer encodes after the prompt as exactly that token;
- `exact_match`: the whole answer is the greedy continuation (lm-eval's `is_greedy`);
- `acc`: the answer is more likely than each of 3 other answers of the same relation
  (loglikelihood accuracy, as lm-eval's multiple-choice tasks score).

Loaded by file path from `fasc_facts.yaml` (lm-eval's `!function`), so imports are absolute.
"""

from __future__ import annotations

import random

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

N_DISTRACTORS = 3
METRICS = ("recall", "exact_match", "acc")


def first_piece(tokenizer, prompt: str, answer: str) -> str | None:
    """The shortest prefix s of " " + answer with tokens(prompt + s) = tokens(prompt) + [first answer
    token] (the string lm-eval must score so that its continuation is that one token); None if none."""
    target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]
    p = tokenizer(prompt)["input_ids"]
    full = " " + answer
    for c in range(1, len(full) + 1):
        w = tokenizer(prompt + full[:c])["input_ids"]
        if w[: len(p)] == p and w[len(p):] == [target]:
            return full[:c]
    return None


def facts_docs(examples, tokenizer) -> list[dict]:
    """Task documents from `fasc.data.Example`s: prompt, answer, first piece, same-relation distractors."""
    by_rel: dict[str, list[str]] = {}
    for ex in examples:
        by_rel.setdefault(ex.relation, [])
        if ex.answer not in by_rel[ex.relation]:
            by_rel[ex.relation].append(ex.answer)
    docs = []
    for i, ex in enumerate(examples):
        others = [a for a in by_rel[ex.relation] if a != ex.answer]
        distractors = random.Random(i).sample(others, min(N_DISTRACTORS, len(others)))
        piece = first_piece(tokenizer, ex.prompt, ex.answer)
        docs.append({"prompt": ex.prompt, "answer": ex.answer, "relation": ex.relation,
                     "first": piece if piece is not None else " " + ex.answer, "first_exact": piece is not None,
                     "distractors": distractors})
    return docs


class FactsTask(ConfigurableTask):
    """The `fasc_facts` task. Build it with `examples` + `tokenizer` (what `fasc eval --tasks` does), or
    from the YAML, where `metadata` names the model (`pretrained`, as lm-eval passes it) and optionally
    the `probe` file."""

    VERSION = 1

    def __init__(self, config: dict | None = None, *, examples=None, tokenizer=None):
        self._examples, self._tokenizer = examples, tokenizer
        meta = dict((config or {}).get("metadata") or {})
        meta["version"] = self.VERSION
        super().__init__(config={"task": (config or {}).get("task", "fasc_facts"), "output_type": "loglikelihood",
                                 "test_split": "test", "metadata": meta})

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        examples, tok = self._examples, self._tokenizer
        meta = self.config.metadata or {}
        if examples is None or tok is None:
            from fasc.data import load_probe
            from fasc.pipeline import model_defaults

            model = meta.get("pretrained") or meta.get("model")
            if tok is None:
                if not model:
                    raise ValueError("fasc_facts needs the model's tokenizer: run it with --model_args "
                                     "pretrained=PATH or through `fasc eval --tasks fasc_facts`.")
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(model, trust_remote_code=bool(meta.get("trust_remote_code")))
            if examples is None:
                examples = load_probe(meta.get("probe") or model_defaults(str(model) if model else None).probe)
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(facts_docs(examples, tok))})

    def has_training_docs(self) -> bool:
        return False

    def has_validation_docs(self) -> bool:
        return False

    def has_test_docs(self) -> bool:
        return True

    def test_docs(self):
        return self.dataset["test"]

    def doc_to_text(self, doc, doc_to_text=None) -> str:
        return doc["prompt"]

    def doc_to_target(self, doc, doc_to_target=None) -> str:
        return " " + doc["answer"]

    def construct_requests(self, doc, ctx, **kwargs) -> list[Instance]:
        for k in ("apply_chat_template", "chat_template"):
            kwargs.pop(k, None)
        conts = [" " + doc["answer"], doc["first"]] + [" " + d for d in doc["distractors"]]
        return [Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, c), idx=i, **kwargs)
                for i, c in enumerate(conts)]

    def process_results(self, doc, results) -> dict:
        (ll, greedy), (_, first_greedy), *others = results
        return {"recall": float(first_greedy), "exact_match": float(greedy),
                "acc": float(all(ll > o[0] for o in others))}

    def aggregation(self) -> dict:
        return {m: mean for m in METRICS}

    def higher_is_better(self) -> dict:
        return {m: True for m in METRICS}
