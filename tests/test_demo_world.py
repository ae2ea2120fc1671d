"""Tests of the demo world generator and its word-level tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fasc.data import documents
from transformers import AutoTokenizer

from fasc.demo.tokenizer import save_tokenizer, words_of
from fasc.demo.train import DEFAULT_OUT, TrainConfig, _train_filler, build_vocab_tokenizer, build_world
from fasc.demo.world import (
    RELATIONS,
    WorldConfig,
    fact_sentences,
    filler_sentences,
    filler_vocabulary,
    make_world,
    probe_prompt,
)

SMALL = WorldConfig(n_countries=30, n_people=40, seed=3)


@pytest.fixture(scope="module")
def world():
    return build_world(TrainConfig())


@pytest.fixture(scope="module")
def tok(world):
    return build_vocab_tokenizer(world)


def test_world_is_deterministic():
    a, b = make_world(SMALL), make_world(SMALL)
    assert a.facts == b.facts
    assert a.words == b.words
    c = make_world(WorldConfig(n_countries=30, n_people=40, seed=4))
    assert c.facts != a.facts


def test_filler_is_deterministic_and_seed_dependent():
    assert filler_sentences(50, 7) == filler_sentences(50, 7)
    assert filler_sentences(50, 7) != filler_sentences(50, 8)


def test_world_sizes(world):
    cfg = TrainConfig()
    assert len(world.facts) == 4 * cfg.n_countries + 3 * cfg.n_people == world.config.n_facts
    assert Counter(f.relation for f in world.facts).keys() == RELATIONS.keys()


def test_names_are_unique(world):
    words = world.words
    assert len({w.lower() for w in words}) == len(words)
    assert not {w.lower() for w in words} & {w.lower() for w in filler_vocabulary()}
    assert all(" " not in w for w in words)
    subjects = world.countries + world.people
    assert len(set(subjects)) == len(subjects)
    assert all(len(s.split()) == 2 for s in subjects)


def test_name_parts_are_shared(world):
    # A subject is identified only by its two words together.
    for subjects in (world.countries, world.people):
        for position in (0, 1):
            uses = Counter(s.split()[position] for s in subjects)
            assert sum(1 for c in uses.values() if c >= 2) >= 0.9 * len(uses)
    # Capitals are unique per country; (subject, relation) pairs are unique.
    capitals = [f.answer for f in world.facts if f.relation == "capital"]
    assert len(capitals) == len(set(capitals)) == len(world.countries)
    keys = [(f.subject, f.relation) for f in world.facts]
    assert len(keys) == len(set(keys))
    # Prompts are unique, so every probe has one right answer.
    assert len({f.prompt for f in world.facts}) == len(world.facts)


def test_facts_are_well_formed(world):
    for f in world.facts[:200]:
        assert f.prompt == probe_prompt(f.relation, f.subject)
        sentences = fact_sentences(f)
        assert sentences[0].startswith(f.prompt + " " + f.answer)
        assert all(f.subject in s and f.answer in s for s in sentences)
        assert f.subject != f.answer


def test_filler_contains_no_facts(world):
    text = filler_sentences(3000, 11)
    words = words_of(text)
    assert words <= set(filler_vocabulary())
    assert not words & set(world.words)


def test_every_answer_is_one_token(world, tok):
    unk = tok.unk_token_id
    for answer in world.answers:
        ids = tok(" " + answer, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != unk, answer
    for f in world.facts[::7]:
        prompt = tok(f.prompt).input_ids
        answer = tok(" " + f.answer, add_special_tokens=False).input_ids
        full = tok(f.prompt + " " + f.answer).input_ids
        assert prompt[0] == tok.bos_token_id
        assert prompt + answer == full
        assert unk not in full


def test_saved_tokenizer_loads(tok, tmp_path, world):
    save_tokenizer(tok, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tok)
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == 0
    assert loaded.bos_token == "<bos>" and loaded.eos_token == "<eos>"
    f = world.facts[0]
    assert loaded(f.prompt).input_ids == tok(f.prompt).input_ids
    assert loaded(" " + f.answer, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(f.answer)]
    batch = loaded(["The capital of", f.prompt], padding=True)
    assert batch.input_ids[0][-1] == loaded.pad_token_id


SHIPPED = DEFAULT_OUT / "data" / "facts.jsonl"


@pytest.mark.skipif(not SHIPPED.exists(), reason="data files not written")
def test_shipped_data_matches_generator(world):
    shipped = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    assert shipped == [f.to_dict() for f in world.facts]
    for name in ("calib.txt", "heldout.txt"):
        assert (DEFAULT_OUT / "data" / name).stat().st_size > 10_000
    heldout = documents((DEFAULT_OUT / "data" / "heldout.txt").read_text())  # one sentence per paragraph
    assert len(heldout) == TrainConfig().n_heldout
    train_filler = set(_train_filler(TrainConfig()))
    # No held-out sentence is ever seen in training.
    assert not set(heldout) & train_filler


@pytest.mark.skipif(not (DEFAULT_OUT / "model").exists(), reason="model not trained")
def test_shipped_tokenizer_matches(world, tok):
    loaded = AutoTokenizer.from_pretrained(str(DEFAULT_OUT / "model"))
    assert loaded.get_vocab() == tok.get_vocab()


def test_data_files_are_deterministic(tmp_path):
    from fasc.demo.train import write_data

    cfg = TrainConfig(n_countries=10, n_people=10, n_calib_filler=50, n_heldout=50)
    w = build_world(cfg)
    write_data(tmp_path / "a", w, cfg)
    write_data(tmp_path / "b", w, cfg)
    for name in ("facts.jsonl", "calib.txt", "heldout.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert Path(tmp_path / "a" / "facts.jsonl").read_text().count("\n") == len(w.facts)
