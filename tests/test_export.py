"""Export (spec §7): factored round trip bit for bit, merged loads with plain from_pretrained, atomicity."""

import copy

import pytest
from safetensors import SafetensorError
import torch

import fasc
from fasc.layers import LowRankLinear

from helpers import VOCAB, compress_tiny


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def compressed(request, tokenizer):
    return compress_tiny(request.param)


IDS = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def test_factored_round_trip_is_exact(compressed, tokenizer, tmp_path):
    _, an, plan, m2 = compressed    # stored as U, V: bit for bit (pivoted, the default, in test_pivoted)
    out = fasc.save_compressed(m2, tokenizer, tmp_path / "out", meta={"method": "fasc", "ranks": plan.ranks},
                               factors="uv")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "fasc_config.json",
                                               "tokenizer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    m3, tok3 = fasc.load_compressed(out)
    assert any(isinstance(m, LowRankLinear) for m in m3.modules())
    assert torch.equal(logits(m3), logits(m2))
    m4, _ = fasc.load_model(str(out))  # load_model recognises an export folder
    assert torch.equal(logits(m4), logits(m2))
    assert tok3("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    # factored is smaller than the original
    orig = sum(p.numel() for p in compressed[0].parameters())
    assert sum(p.numel() for p in m3.parameters()) < orig


def test_merged_export_loads_with_plain_transformers(compressed, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    model, an, plan, m2 = compressed
    m_merged = copy.deepcopy(model)
    fasc.compress_(m_merged, an, plan, merge=True)
    assert not any(isinstance(m, LowRankLinear) for m in m_merged.modules())
    out = fasc.save_compressed(m_merged, tokenizer, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(plain), logits(m2), atol=1e-4)


def test_export_refuses_non_empty_folder_and_overwrites_only_an_export(compressed, tokenizer, tmp_path):
    """--overwrite swaps the whole folder out and deletes it, so it replaces an earlier export only: a
    folder of other files (a home or project folder given by mistake) is refused and left as it was."""
    _, _, _, m2 = compressed
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    with pytest.raises(fasc.FascError, match="--overwrite"):
        fasc.save_compressed(m2, tokenizer, dest)
    with pytest.raises(fasc.FascError, match="is not a FASC export"):
        fasc.save_compressed(m2, tokenizer, dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "precious"
    again = tmp_path / "again"
    fasc.save_compressed(m2, tokenizer, again)
    (again / "stale.txt").write_text("from the last export")
    fasc.save_compressed(m2, tokenizer, again, overwrite=True)
    assert not (again / "stale.txt").exists() and (again / "fasc_config.json").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])   # what safetensors raises on a full disk
def test_failed_export_leaves_destination_as_it_was(compressed, tokenizer, tmp_path, monkeypatch, error):
    _, _, _, m2 = compressed
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    (dest / "fasc_config.json").write_text("{}")   # an earlier export: --overwrite may replace it
    import safetensors.torch

    def disk_full(*a, **k):
        raise error
    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(fasc.FascError, match=r"\(No space left on device.*nothing was changed there — free disk"):
        fasc.save_compressed(m2, tokenizer, dest, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["fasc_config.json", "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_export_creates_missing_parent_folders(compressed, tokenizer, tmp_path):
    _, _, _, m2 = compressed
    dest = tmp_path / "runs" / "2026" / "fasc50"
    out = fasc.save_compressed(m2, tokenizer, dest)
    assert out == dest and (dest / "fasc_config.json").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["fasc50"]  # no temp folder left beside it
