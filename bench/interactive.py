"""Interactive speed: after calibration, how long does changing one rank take to re-read the predicted
ΔL, the parameter totals and the heatmap values? (The dashboard's Ranks page does exactly this.)

    python -m bench.interactive                     # 32 layers × 7 kinds, Llama-7B widths (4096 / 11008)

Statistics are synthetic (the model is built on the meta device: no weights, no eigen-decomposition);
each module's O(n) summary — predicted ΔL curve, spectrum, misalignment — is what the real Analysis
keeps after its one-time decomposition. Ends with `rank_update_ms=<median>`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

import fasc
from fasc.app import table
from fasc.analysis import Analysis, Summary


def synthetic_analysis(layers=32, hidden=4096, intermediate=11008, heads=32, seed=0) -> Analysis:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=heads, vocab_size=32000))
    infos = fasc.find_linears(model)
    g = torch.Generator().manual_seed(seed)
    sketch = {i.fqn: torch.rand(3, 64, generator=g, dtype=torch.float64) + 0.5 for i in infos}
    stats = fasc.CalibStats(modules=infos, group={i.fqn: i.fqn for i in infos}, cx={}, ch={}, fw={},
                            sketch=sketch, n_tokens=1, config=fasc.CalibConfig())
    an = Analysis(model, stats)
    for i in infos:
        n = i.in_features
        lam = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values ** 4
        curve = 0.5 * torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)])
        for m in ("fasc", "pca"):
            an.summaries[(i.fqn, m)] = Summary(curve * (1.0 if m == "fasc" else 1.3), lam)
        an.summaries[(i.fqn, "fisher")] = Summary(curve, lam)
        an.misalignments[i.fqn] = torch.rand(n, generator=g, dtype=torch.float64)
        an.variance[i.fqn] = lam
    return an


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interactive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--updates", type=int, default=300)
    a = p.parse_args(argv)
    t = time.perf_counter()
    an = synthetic_analysis(a.layers, a.hidden, a.intermediate)
    setup = time.perf_counter() - t
    plan = fasc.allocate(an, "fasc", param_ratio=0.5)
    t = time.perf_counter()
    fasc.allocate(an, "fasc", param_ratio=0.5)
    alloc_ms = 1000 * (time.perf_counter() - t)
    rng = random.Random(0)
    times, table_times = [], []
    fqns = list(plan.ranks)
    for _ in range(a.updates):
        f = rng.choice(fqns)
        k = rng.randint(1, an.info(f).max_rank)
        t = time.perf_counter()
        plan = plan.with_rank(an, f, k)        # one rank changed
        totals = plan.totals(an)         # parameters kept, Σ predicted ΔL
        values = table.plan_values(plan, an)         # heatmap values at the current ranks
        times.append(1000 * (time.perf_counter() - t))
        assert len(values) == len(fqns) and totals.kept > 0
    for _ in range(20):
        t = time.perf_counter()
        table.plan_table(plan, an)
        table_times.append(1000 * (time.perf_counter() - t))
    t = time.perf_counter()
    rows = an.report(0.5)
    report_ms = 1000 * (time.perf_counter() - t)
    med = statistics.median(times)
    print(f"{len(an.modules)} modules ({a.layers} layers × {len(an.modules) // a.layers} kinds, widths "
          f"{a.hidden}/{a.intermediate}); setup {setup:.1f}s; per rank change (set_rank + totals + heatmap values): "
          f"median {med:.2f} ms, p95 {sorted(times)[int(0.95 * len(times))]:.2f} ms, max {max(times):.2f} ms; "
          f"full editable table {statistics.median(table_times):.1f} ms; ρ/misalignment report "
          f"({len(rows)} rows) {report_ms:.1f} ms; automatic allocation at 50 % {alloc_ms:.0f} ms")
    print(f"rank_update_ms={med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
