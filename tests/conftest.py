"""Shared fixtures (the helpers they use are in helpers.py), and a guard: no test leaves files behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fasc
from helpers import make_text, make_tokenizer, random_batches, tiny_model

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI shares the cores

ROOT = Path(__file__).resolve().parent.parent
WATCHED = [ROOT, ROOT / "cache", ROOT / "out", ROOT / "fasc", ROOT / "fasc" / "demo"]  # where a stray write lands
HALF_WRITTEN = (".incomplete", ".tmp-", ".old-")  # names of the atomic writers' temporary files


def _listing() -> set[str]:
    return {str(d / n) for d in WATCHED if d.is_dir() for n in os.listdir(d) if n not in ("__pycache__", ".pytest_cache")}


def _half_written(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if any(m in p.name for m in HALF_WRITTEN))


@pytest.fixture(autouse=True)
def no_files_left_behind(request):
    """Fail a test that leaves new files in the repository, or half-written files (an atomic
    writer's temporary) in its tmp_path — the README promises nothing half-written."""
    before = _listing()
    yield
    new = sorted(_listing() - before)
    assert not new, f"the test left files in the repository: {new[:5]}"
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None and Path(tmp).is_dir():
        left = _half_written(Path(tmp))
        assert not left, f"the test left half-written files: {left[:5]}"


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text():
    return make_text()


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def llama_stats(llama):
    return fasc.calibrate(llama, random_batches(3), fasc.CalibConfig(n_tokens=10_000, seq_len=24))


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory, tokenizer, text):
    """A tiny Llama saved as a normal HF folder with a tokenizer, plus calibration/eval files."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text(text)
    (root / "heldout.txt").write_text(make_text(800, seed=1))
    probe = [{"prompt": "the cat sat on the", "answer": "mat", "relation": "r1"},
             {"prompt": "the king of the", "answer": "land", "relation": "r2"},
             {"prompt": "a big red", "answer": "apple", "relation": "r1"}]
    (root / "probe.jsonl").write_text("\n".join(json.dumps(p) for p in probe) + "\n")
    return root


@pytest.fixture()
def common(saved_llama, tmp_path):
    """CLI arguments shared by the CLI tests: the tiny saved Llama, its text, a private cache."""
    return ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
            "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
