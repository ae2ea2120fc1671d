"""Worker for test_distributed: `python -m torch.distributed.run --nproc_per_node 2 tests/dist_calibrate.py OUT`."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from helpers import random_batches, tiny_model  # noqa: E402

import fasc  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
model = tiny_model("llama")
stats = fasc.calibrate(model, random_batches(4), fasc.CalibConfig(n_tokens=10_000, seq_len=24))
if dist.get_rank() == 0:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    stats.save(out)
dist.barrier()
# Skip interpreter teardown: gloo's background threads occasionally abort at exit
# ("terminate called without an active exception", ~1 run in 10 here); the work is done.
os._exit(0)
