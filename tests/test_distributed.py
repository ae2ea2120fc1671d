"""Data-parallel calibration: 2 CPU processes (gloo) give the statistics of one process (spec §1)."""

import os
import socket
import subprocess
import sys


import fasc

from helpers import random_batches, tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        "tests/dist_calibrate.py", str(tmp_path / "stats")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dist_stats = fasc.CalibStats.load(tmp_path / "stats")
    single = fasc.calibrate(tiny_model("llama"), random_batches(4), fasc.CalibConfig(n_tokens=10_000, seq_len=24))
    assert dist_stats.n_tokens == single.n_tokens
    for name in ("cx", "ch", "fw", "sketch"):
        a, b = getattr(dist_stats, name), getattr(single, name)
        assert a.keys() == b.keys()
        for k in a:
            rel = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300))
            assert rel <= 1e-10, (name, k, rel)
