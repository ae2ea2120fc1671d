"""The built-in knowledge text (fasc/data/knowledge_en.txt) states facts, but none of the probe's:
recall on `real_facts.jsonl` must stay a measurement on facts never used in calibration."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "fasc" / "data"
STOP = {"the", "a", "an", "of", "is", "was", "were", "by", "in", "on", "to", "and", "for", "its", "it", "as",
        "at", "from", "with", "called", "often", "now", "also", "de", "da", "van", "s"}


def words(s: str) -> list[str]:
    return re.findall(r"[\w'-]+", s.lower())


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if s.strip()]


def probe_keys() -> list[tuple[set[str], str, str]]:
    """(subject words, answer, prompt) per probe line; subject = the prompt's words minus stop words and
    the relation's frame (words in at least half of that relation's prompts)."""
    rows = [json.loads(line) for line in (DATA / "real_facts.jsonl").read_text().splitlines() if line.strip()]
    by_rel: dict[str, list[dict]] = {}
    for r in rows:
        by_rel.setdefault(r["relation"], []).append(r)
    keys = []
    for rel, rs in by_rel.items():
        df = Counter(w for r in rs for w in set(words(r["prompt"])))
        frame = {w for w, c in df.items() if c >= len(rs) / 2}
        for r in rs:
            subject = {w for w in words(r["prompt"]) if w not in STOP and w not in frame}
            keys.append((subject, r["answer"].lower(), r["prompt"]))
    return keys


def violations(text: str) -> list[str]:
    bad = []
    sents = [(s, set(words(s)), s.lower()) for s in sentences(text)]
    for subject, answer, prompt in probe_keys():
        pat = re.compile(r"(?<![\w])" + re.escape(answer) + r"(?![\w])")
        for s, ws, low in sents:
            if subject and subject <= ws and pat.search(low):
                bad.append(f"{prompt!r} → {answer!r} in: {s[:120]}")
        if f"{prompt} {answer}".lower() in text.lower():
            bad.append(f"verbatim probe line {prompt!r} {answer!r}")
    return bad


def test_knowledge_text_states_no_probe_fact():
    assert violations((DATA / "knowledge_en.txt").read_text(encoding="utf-8")) == []


def test_checker_catches_a_probe_fact():
    assert violations("Many tourists visit it. The capital of France is Paris, a city on a river.")
    assert violations("Pride and Prejudice, a novel by Jane Austen, appeared in 1813.")
    assert not violations("The capital of Chile is Santiago.")


def test_knowledge_text_is_long_enough_for_half_of_a_calibration_mix():
    text = (DATA / "knowledge_en.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    assert len(paragraphs) >= 200 and len(text.split()) >= 11000


@pytest.mark.parametrize("other", ["general_en.txt", "general_en_heldout.txt"])
def test_knowledge_text_shares_no_sentence_with_other_texts(other):
    mine = {s.strip() for s in sentences((DATA / "knowledge_en.txt").read_text()) if len(s.split()) > 5}
    theirs = {s.strip() for s in sentences((DATA / other).read_text())}
    assert not mine & theirs
