"""The standard (SVD-LLM / LEMS WikiText-2) perplexity protocol on a known text."""

import math

import pytest
import torch
import torch.nn.functional as F

import fasc
from fasc.ppl_standard import perplexity_standard, standard_windows

from helpers import make_text, tiny_model


def reference(model, ids: list[int], L: int) -> float:
    """exp of the mean per-window mean NLL, written the way SVD-LLM's evaluation loop does it."""
    n = len(ids) // L
    nlls = []
    for i in range(n):
        x = torch.tensor([ids[i * L:(i + 1) * L]])
        with torch.no_grad():
            logits = model(input_ids=x).logits
        nlls.append(F.cross_entropy(logits[0, :-1], x[0, 1:]) * L)
    return math.exp(float(torch.stack(nlls).sum() / (n * L)))


def test_standard_protocol_on_a_known_text(tokenizer):
    model = tiny_model("llama")
    text = make_text(700, seed=5) + "\n\n" + make_text(300, seed=6)
    ids = tokenizer(text)["input_ids"]
    res = perplexity_standard(model, tokenizer, text, seq_len=32, batch_size=3)
    assert res["seq_len"] == 32 and res["windows"] == len(ids) // 32
    assert res["tokens_scored"] == res["windows"] * 31
    assert res["perplexity"] == pytest.approx(reference(model, ids, 32), rel=1e-5)
    # windows cross the blank line (the project's protocol does not) and the remainder is dropped
    assert len(ids) % 32 != 0
    assert torch.equal(torch.cat(standard_windows(tokenizer, text, 32)), torch.tensor(ids[: res["windows"] * 32]))


def test_equals_the_paragraph_protocol_on_one_paragraph_of_whole_windows(tokenizer):
    model = tiny_model("llama")
    text = " ".join(make_text(400, seed=2).split()[:320])  # 320 word tokens = 10 windows of 32
    assert len(tokenizer(text)["input_ids"]) == 320
    std = perplexity_standard(model, tokenizer, text, seq_len=32)["perplexity"]
    assert std == pytest.approx(fasc.perplexity(model, tokenizer, text, seq_len=32), rel=1e-6)


def test_window_capped_at_model_length_and_short_text_is_one_line(tokenizer):
    model = tiny_model("gpt2")  # n_positions 128
    res = perplexity_standard(model, tokenizer, make_text(600), seq_len=2048)
    assert res["seq_len"] == 128
    with pytest.raises(fasc.FascError, match="fewer than one window"):
        perplexity_standard(model, tokenizer, "the cat sat", seq_len=64)


def test_cli_eval_standard_protocol(saved_llama, capsys):
    import json

    from fasc.cli import main

    args = ["eval", "--model", str(saved_llama / "model"), "--text", str(saved_llama / "heldout.txt"),
            "--probe", str(saved_llama / "probe.jsonl"), "--json", "--quiet"]
    assert main(args + ["--ppl-protocol", "standard", "--seq-len", "32"]) == 0
    std = json.loads(capsys.readouterr().out)
    assert std["ppl_protocol"] == "standard" and std["seq_len"] == 32 and std["windows"] >= 1
    assert main(args) == 0
    par = json.loads(capsys.readouterr().out)
    assert par["ppl_protocol"] == "paragraphs" and std["perplexity"] != par["perplexity"]
