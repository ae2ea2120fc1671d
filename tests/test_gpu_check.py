"""bench/gpu_check.sh, the script a lent GPU machine runs (issue 14), kept working between loans: its
CPU dry run (GPU_CHECK_DRY=1) goes through the same stages, bench.scale8b included, at small shapes."""

from __future__ import annotations

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
        assert "bfloat16 weights on cpu" in whole and "whole_model_minutes=" in whole
        assert "[2 layers] calibrate:" in whole and "[2 layers] export:" in whole   # progress, step by step
        assert whole.splitlines()[-1].startswith("peak_rss_mb=")
    layer = (tmp_path / "split" / "layer.log").read_text().splitlines()
    assert layer[-2].startswith("layer_seconds=") and layer[-1].startswith("peak_rss_mb=")
