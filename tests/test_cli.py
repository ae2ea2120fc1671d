"""The CLI end to end on a tiny saved model: calibrate → report → compress → eval, errors in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_cli as run


def test_cli_end_to_end(capsys, common, saved_llama, tmp_path):
    code, out, _ = run(capsys, "calibrate", *common, "--json")
    assert code == 0
    first = json.loads(out)
    assert first["from_cache"] is False and first["n_tokens"] > 0
    code, out, _ = run(capsys, "calibrate", *common)
    assert code == 0 and out.strip() == first["cache_key"]

    code, out, _ = run(capsys, "report", *common, "--json", "--rho-fisher", "--html", str(tmp_path / "rho.html"))
    rep = json.loads(out)
    assert rep["from_cache"] is True and len(rep["modules"]) == 14
    row = rep["modules"][0]
    assert {"rho", "rho_signed", "rho_fisher", "misalignment", "dl_pca", "dl_fasc"} <= set(row)
    assert row["rho_fisher"] is not None and row["dl_pca"] >= row["dl_fasc"] - 1e-15
    assert (tmp_path / "rho.html").stat().st_size > 1000

    out_dir = tmp_path / "compressed"
    code, out, err = run(capsys, "compress", *common, "--method", "fasc", "--param-ratio", "0.5", "--stages", "1",
                         "--out", str(out_dir), "--save-plan", str(tmp_path / "plan.json"), "--json")
    assert code == 0, err
    comp = json.loads(out)
    assert comp["param_ratio"] <= 0.5 and comp["model_params_after"] < comp["model_params_before"]
    fc = json.loads((out_dir / "fasc_config.json").read_text())
    assert fc["method"] == "fasc" and fc["calibration"] == first["cache_key"] and fc["factored"]
    assert set(fc["methods"].values()) == {"fasc"}                # --qk-method same (the default)

    # the saved plan re-used with another method, merged export
    code, out, err = run(capsys, "compress", *common, "--method", "asvd", "--ranks", str(tmp_path / "plan.json"),
                         "--merge", "--out", str(tmp_path / "merged"), "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "fasc_config.json").read_text())["merged"] is True

    code, out, err = run(capsys, "eval", "--model", str(out_dir), "--text", str(saved_llama / "heldout.txt"),
                         "--probe", str(saved_llama / "probe.jsonl"), "--json", "--quiet")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["perplexity"] > 1 and 0 <= ev["recall"] <= 1 and ev["n_facts"] == 3


def test_cli_errors_are_one_line(capsys, common, saved_llama, tmp_path):
    code, out, err = run(capsys, "calibrate", "--model", str(tmp_path / "nope"), "--quiet")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err
    code, out, err = run(capsys, "compress", *common, "--method", "fasc", "--out", str(tmp_path / "x"))
    assert code == 2 and "exactly one" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    code, out, err = run(capsys, "compress", *common, "--rank-ratio", "0.5", "--out", str(tmp_path / "full"))
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    code, out, err = run(capsys, "eval", "--model", str(saved_llama / "model"), "--probe", str(bad),
                         "--text", str(saved_llama / "heldout.txt"), "--quiet")
    assert code == 2 and "line(s) 2" in err


@pytest.mark.parametrize("cmd, extra, needle", [
    ("compress", ["--param-ratio", "1.5"], "Parameter ratio must be in (0, 1]"),
    ("compress", ["--rank-ratio", "0"], "Rank ratio must be in (0, 1]"),
    ("compress", ["--allocation", "uniform", "--rank-ratio", "0.5"], "give --param-ratio"),
    ("compress", ["--param-ratio", "0.5", "--linalg-device", "cuda:7"], "--linalg-device cuda:7"),
    ("compress", ["--param-ratio", "0.5", "--device", "cuda:7"], "--device cuda:7"),
    ("report", ["--device", "mps"], "--device 'mps' is not supported"),
    ("report", ["--linalg-device", "gpu"], "Unknown --linalg-device 'gpu'"),
    ("calibrate", ["--seq-len", "0"], "`seq_len` must be an integer >= 2"),
    ("calibrate", ["--temperature", "0"], "`temperature` must be in"),
    ("calibrate", ["--layers-per-pass", "0"], "--layers-per-pass must be ≥ 1"),
    ("report", ["--ratio", "2"], "Rank ratio must be in (0, 1]"),
    ("report", ["--html", "{unwritable}/rho.html"], "choose another --html"),
    ("report", ["--html", "{tmp}"], "is a folder; give a file name"),
    ("compress", ["--param-ratio", "0.5", "--save-plan", "{unwritable}/plan.json"], "choose another --save-plan"),
    ("compress", ["--param-ratio", "0.5", "--out", "{unwritable}/export"], "choose another --out"),
    ("compress", ["--param-ratio", "0.1", "--attention-share", "1.0"], "attention share between"),
    ("compress", ["--rank-ratio", "0.5", "--attention-share", "0.8"], "--attention-share splits"),
])
def test_bad_options_fail_in_one_line_before_calibrating(capsys, common, tmp_path, unwritable, cmd, extra, needle):
    """A bad budget, device, window or pass size is one line naming it, before minutes of calibration:
    nothing is cached (a GPU named on a machine with enough GPUs is not an error, so skipped there)."""
    if "cuda:7" in extra and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    extra = [a.format(unwritable=unwritable, tmp=tmp_path) for a in extra]
    out = ["--out", str(tmp_path / "out")] if cmd == "compress" and "--out" not in extra else []
    code, _, err = run(capsys, cmd, *common, *extra, *out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.name.endswith(".safetensors") for p in cache.rglob("*")), \
        sorted(cache.rglob("*"))


@pytest.fixture
def unwritable(tmp_path):
    """A folder no file can be made in: read-only for a user; for root (who writes anyway), /proc."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield locked if not os.access(locked, os.W_OK) else Path("/proc")
    locked.chmod(0o700)


@pytest.mark.parametrize("extra, needle", [
    (["--seq-len", "0"], "`seq_len` must be an integer >= 2"),
    (["--seq-len", "1"], "`seq_len` must be an integer >= 2"),
    (["--max-tokens", "0"], "--max-tokens must be at least 2"),
    (["--tasks", "fasc_facts", "--lm-batch-size", "0"], "--lm-batch-size must be at least 1"),
])
def test_eval_bad_options_are_one_line(capsys, saved_llama, extra, needle):
    code, _, err = run(capsys, "eval", "--model", str(saved_llama / "model"), *extra, "--quiet",
                       "--text", str(saved_llama / "heldout.txt"), "--probe", str(saved_llama / "probe.jsonl"))
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_python_dash_m_and_help():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "fasc", "compress", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--param-ratio" in r.stdout and "example" in r.stdout


def test_closed_stdout_is_not_an_error():
    """`fasc report --json | head`: the reader closing the pipe ends the command quietly (141)."""
    code = ("import sys, fasc.cli as c\n"
            "def boom(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "p = c.build_parser(); c.build_parser = lambda: p\n"
            "for sub in p._subparsers._group_actions[0].choices.values(): sub.set_defaults(func=boom)\n"
            "sys.exit(c.main(['eval']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 141 and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr


def test_cli_allocations_and_rank_ratio_cost(capsys, common, tmp_path):
    plans = {}
    for alloc in ("greedy", "uniform", "anchored"):
        code, out, err = run(capsys, "compress", *common, "--param-ratio", "0.6", "--allocation", alloc,
                             "--anchor-tokens", "200", "--out", str(tmp_path / alloc),
                             "--save-plan", str(tmp_path / f"{alloc}.json"), "--json")
        assert code == 0, err
        res = json.loads(out)
        assert res["allocation"] == alloc and res["param_ratio"] <= 0.62
        plans[alloc] = json.loads((tmp_path / f"{alloc}.json").read_text())["ranks"]
    assert plans["uniform"] != plans["greedy"]
    # the anchors were measured once and cached beside the statistics
    assert len(list((tmp_path / "cache").rglob("anchors-*.json"))) == 1
    code, out, err = run(capsys, "compress", *common, "--rank-ratio", "0.5", "--out", str(tmp_path / "rr"))
    assert code == 0 and "by --rank-ratio 0.5" in out
    code, _, err = run(capsys, "compress", *common, "--rank-ratio", "0.5", "--allocation", "uniform",
                       "--out", str(tmp_path / "bad"))
    assert code == 2 and err.startswith("error:") and "--param-ratio" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_calibration_token_default_is_per_model(tmp_path):
    """Real models calibrate on 32,768 tokens by default (the built-in mix but its held-out tail:
    measured better than 16,384 on SmolLM2), the demo on 16,384; --tokens overrides both."""
    from fasc.cli import _calib_cfg, build_parser
    from fasc.pipeline import model_defaults

    p = build_parser()
    assert _calib_cfg(p.parse_args(["calibrate", "--model", "demo"])).n_tokens == 16384
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_defaults(str(folder)).tokens == 32768
    assert _calib_cfg(p.parse_args(["calibrate", "--model", str(folder)])).n_tokens == 32768
    assert _calib_cfg(p.parse_args(["calibrate", "--model", "demo", "--tokens", "512"])).n_tokens == 512


def test_gamma_default_is_per_model(capsys, saved_llama, tmp_path):
    """Real models analyse with γ = 0 by default (measured best on held-out text with their 32k calibration
    tokens), the demo with γ = 1; --gamma overrides both, and the export records the γ used."""
    from fasc.cli import _compress_cfg, build_parser

    p = build_parser()
    assert _compress_cfg(p.parse_args(["report", "--model", "demo"])).gamma == 1.0
    assert _compress_cfg(p.parse_args(["report", "--model", str(saved_llama / "model")])).gamma == 0.0
    assert _compress_cfg(p.parse_args(["report", "--model", "demo", "--gamma", "0.3"])).gamma == 0.3
    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "256",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "c"), "--quiet", "--method", "fasc", "--param-ratio", "0.6"]
    for extra, want in (([], 0.0), (["--gamma", "2"], 2.0)):
        out = tmp_path / f"out{want}"
        code, _, err = run(capsys, "compress", *common, *extra, "--out", str(out))
        assert code == 0, err
        assert json.loads((out / "fasc_config.json").read_text())["compress_config"]["gamma"] == want


def test_qk_method_whitens_queries_and_keys_and_refuses_the_anchored_allocation(capsys, common, tmp_path):
    """--qk-method asvd: the export's query/key projections are asvd, the rest fasc, the plan says so; with
    the anchored allocation (one measured basis per module) it is one line naming the fix."""
    out = tmp_path / "qk"
    code, _, err = run(capsys, "compress", *common, "--param-ratio", "0.6", "--qk-method", "asvd", "--out", str(out),
                       "--save-plan", str(tmp_path / "qk.json"))
    assert code == 0, err
    methods = json.loads((out / "fasc_config.json").read_text())["methods"]
    assert {m for f, m in methods.items() if f.endswith(("q_proj", "k_proj"))} == {"asvd"}
    assert {m for f, m in methods.items() if not f.endswith(("q_proj", "k_proj"))} == {"fasc"}
    assert json.loads((tmp_path / "qk.json").read_text())["note"]["qk_method"] == "asvd"
    code, _, err = run(capsys, "compress", *common, "--param-ratio", "0.6", "--qk-method", "asvd", "--allocation",
                       "anchored", "--out", str(tmp_path / "a"))
    assert code == 2 and "anchored allocation measures one method per module" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    code, _, err = run(capsys, "compress", *common, "--ranks", str(tmp_path / "qk.json"), "--qk-method", "asvd",
                       "--out", str(tmp_path / "b"))
    assert code == 2 and "drop --qk-method with --ranks" in err and not (tmp_path / "b").exists()


def test_device_default_is_the_first_gpu_when_one_is_visible(capsys, common, monkeypatch):
    """No --device: the CPU here; where torch reports a GPU, cuda:0 (here a GPU that torch reports but
    cannot use, so the one-line error shows which device the default picked and the fix)."""
    code, out, err = run(capsys, "calibrate", *common, "--json")
    assert code == 0, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, out, err = run(capsys, "calibrate", *common, "--json")
    assert code == 2 and err.count("\n") == 1 and "--device cuda:0" in err, err
    code, out, err = run(capsys, "calibrate", *common, "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["from_cache"] is True, err
