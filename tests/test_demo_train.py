"""Tests of the demo-model training loop (a tiny, shortened run)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasc.demo.train import (
    CHECKPOINT_PERCENTS,
    TrainConfig,
    fact_recall,
    load_facts,
    svd_recall_drop,
    svd_truncate_,
    train,
)

TINY = TrainConfig(
    n_countries=12,
    n_people=16,
    hidden_size=32,
    intermediate_size=96,
    num_layers=1,
    num_heads=2,
    steps=150,
    batch_size=64,
    lr=1e-2,
    warmup_steps=20,
    n_train_filler=500,
    n_calib_filler=50,
    n_heldout=50,
    eval_every=50,
    max_minutes=2.0,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    calls = []
    log = train(out, TINY, progress=lambda step, total: calls.append((step, total)))
    return out, log, calls


def test_recall_rises(run):
    _out, log, _ = run
    ckpts = {c["percent"]: c for c in log["checkpoints"]}
    start, end = ckpts[0]["recall"], ckpts[100]["recall"]
    assert end >= start + 0.2, (start, end)
    assert end >= 0.5, end
    assert log["final_recall"] == end
    assert ckpts[100]["loss"] < ckpts[10]["loss"]


def test_layout_and_log(run):
    out, log, calls = run
    assert calls[-1] == (TINY.steps, TINY.steps) and len(calls) == TINY.steps
    assert [c["percent"] for c in log["checkpoints"]] == list(CHECKPOINT_PERCENTS)
    expected = [round(p / 100 * TINY.steps) for p in CHECKPOINT_PERCENTS]
    assert [c["step"] for c in log["checkpoints"]] == expected
    on_disk = json.loads((out / "training_log.json").read_text())
    assert on_disk["final_recall"] == log["final_recall"]
    for name in ("facts.jsonl", "calib.txt", "heldout.txt"):
        assert (out / "data" / name).stat().st_size > 0
    for p in CHECKPOINT_PERCENTS:
        folder = out / "checkpoints" / f"ckpt-{p:03d}"
        assert (folder / "model.safetensors").exists()
        assert not list(folder.glob("*.bin"))
    final = (out / "model" / "model.safetensors").read_bytes()
    assert final == (out / "checkpoints" / "ckpt-100" / "model.safetensors").read_bytes()


def test_saved_model_reloads_with_same_recall(run):
    out, log, _ = run
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    facts = load_facts(out / "data" / "facts.jsonl")
    assert fact_recall(model, tok, facts) == pytest.approx(log["final_recall"])


def test_svd_helpers(run):
    out, _, _ = run
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    facts = load_facts(out / "data" / "facts.jsonl")
    full = svd_recall_drop(model, tok, facts, 1.0)
    assert full["drop"] == pytest.approx(0.0, abs=0.02)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    svd_recall_drop(model, tok, facts, 0.25)
    assert torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # not modified
    n = svd_truncate_(model, 0.25)
    assert n == 7 * TINY.num_layers
    rank = torch.linalg.matrix_rank(model.model.layers[0].mlp.up_proj.weight)
    assert rank == round(0.25 * min(TINY.intermediate_size, TINY.hidden_size))
