"""The GPU paths, run where a CUDA device is visible (skipped elsewhere; `bench/gpu_check.sh` runs this
file on a lent GPU machine). The CPU side of the same logic is tested without a GPU in
test_linalg_device.py (meta device, mixed dtypes, a mocked CUDA runtime)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fasc
from fasc.linalg_device import LinalgConfig
from helpers import random_batches, run_cli, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
CUDA = torch.device("cuda", 0)
METHODS = ("pca", "asvd", "fasc")


@pytest.fixture(scope="module")
def cpu_run():
    model = tiny_model("llama")
    stats = fasc.calibrate(model, random_batches(3), fasc.CalibConfig(n_tokens=10_000, seq_len=24))
    an = fasc.Analysis(model, stats, linalg=LinalgConfig(device="cpu", dtype="float64"))
    an.precompute(METHODS)
    return model, stats, an


def _logits(model, device):
    ids = random_batches(1, seed=5)[0].input_ids.to(device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_calibration_on_the_gpu_matches_the_cpu(cpu_run):
    """Statistics accumulated beside each module on the GPU (float32, TF32 off) equal the CPU's
    float64 sums to float32 accuracy, whether they stay on the GPU or go to the CPU."""
    model, stats, _ = cpu_run
    gpu = copy.deepcopy(model).to(CUDA)
    for where in ("cuda", "cpu"):
        s = fasc.calibrate(gpu, random_batches(3), fasc.CalibConfig(n_tokens=10_000, seq_len=24, device=where))
        assert s.n_tokens == stats.n_tokens
        for g in stats.cx:
            torch.testing.assert_close(s.cx[g].double().cpu(), stats.cx[g], rtol=1e-4, atol=1e-6)
        for f in stats.ch:
            torch.testing.assert_close(s.ch[f].double().cpu(), stats.ch[f], rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_analysis_on_the_gpu_matches_the_cpu(cpu_run, dtype):
    """CPU statistics (as read from the cache) with the linear algebra on the GPU: the same curves,
    spectra and misalignment as the CPU's float64 analysis (float32: within its own check's tolerance)."""
    model, stats, ref = cpu_run
    an = fasc.Analysis(model, stats, linalg=LinalgConfig(device="cuda", dtype=dtype))
    an.precompute(METHODS)
    tol = 1e-8 if dtype == "float64" else 2e-3
    for key, s in ref.summaries.items():
        got = an.summaries[key]
        if s.curve is not None:
            scale = max(float(s.curve[0]), 1e-30)
            assert float((got.curve - s.curve).abs().max()) / scale <= tol, key


def test_compression_of_a_gpu_model_with_cpu_statistics(cpu_run):
    """The second run from the cache: model on the GPU in bfloat16, statistics on the CPU in float64,
    linear algebra on the GPU. Factors land on each module's device in its dtype, and the compressed
    model computes what the CPU-compressed one does (to bf16 accuracy)."""
    model, stats, ref = cpu_run
    plan = fasc.allocate(ref, "fasc", param_ratio=0.6)
    small_cpu = copy.deepcopy(model)
    fasc.compress_(small_cpu, ref, plan)
    gpu = copy.deepcopy(model).to(CUDA, torch.bfloat16)
    an = fasc.Analysis(gpu, stats, linalg=LinalgConfig(device="auto"))
    assert an.place.device.type == "cuda"
    fasc.compress_(gpu, an, plan)
    for name, p in gpu.named_parameters():
        assert p.device.type == "cuda" and p.dtype == torch.bfloat16, name
    want, got = _logits(small_cpu, "cpu"), _logits(gpu, CUDA)
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


def test_cli_on_the_gpu_twice_and_with_statistics_on_the_cpu(capsys, saved_llama, tmp_path):
    """`fasc report --device cuda` computes, the second run reads the cache (statistics come back on the
    CPU), `--stats-device cpu` works, and `fasc compress --device cuda` writes an export the CPU loads."""
    common = ["--model", str(saved_llama / "model"), "--data", str(saved_llama / "calib.txt"), "--tokens", "512",
              "--seq-len", "32", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--device", "cuda"]
    runs = []
    for extra in ([], [], ["--stats-device", "cpu", "--cache-dir", str(tmp_path / "cache2")]):
        code, out, err = run_cli(capsys, "report", *common, *extra, "--json")
        assert code == 0, err
        runs.append(json.loads(out))
    assert [r["from_cache"] for r in runs] == [False, True, False]
    for other in runs[1:]:
        for a, b in zip(runs[0]["modules"], other["modules"]):
            assert a["fqn"] == b["fqn"] and a["dl_fasc"] == pytest.approx(b["dl_fasc"], rel=1e-3, abs=1e-9)
    out = tmp_path / "export"
    code, res, err = run_cli(capsys, "compress", *common, "--method", "fasc", "--param-ratio", "0.6", "--out", str(out),
                             "--json")
    assert code == 0, err
    res = json.loads(res)   # --heal-tokens auto heals on a GPU
    assert res["heal_tokens"] == fasc.config.HEAL_TOKENS_GPU and res["heal"]["tokens"] >= res["heal_tokens"]
    model, _ = fasc.load_compressed(out)
    assert next(model.parameters()).device.type == "cpu"
