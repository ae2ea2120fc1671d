"""Peak extra memory of calibration, beyond the model and its activations, vs the README's formula.

    python -m bench.memory                 # Llama-shaped 8 × (1024 / 2816), seq 512, CPU

Each measurement runs in a fresh process and reads its peak resident memory (ru_maxrss):
  base   the model + one forward+backward with activation gradients (what calibration runs)
  calib  the same with a full calibration step (all layers)
  pass   a calibration step over the first `--pass-layers` layers only (`--layers-per-pass`)
extra = calib − base is compared with the formula
  bytes ≈ 8 · (Σ_groups n_g² + Σ_modules (n² + m + 3s))      (float64 accumulators on CPU; 4 · on GPU)
Ends with `peak_extra_mb=<calib − base>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.calibration import add_shape_args


def statistics_bytes(infos, groups: dict[str, str], bytes_per: int = 8, s: int = 64) -> int:
    """The formula: C_x once per input group, C_h + r + ρ sketch per module."""
    owners = {g for g in groups.values()}
    by = {i.fqn: i for i in infos}
    return bytes_per * (sum(by[g].in_features ** 2 for g in owners)
                        + sum(i.in_features ** 2 + i.out_features + 3 * s for i in infos))


def child(mode: str, pass_layers: int, args) -> None:
    import fasc
    from bench.calibration import bare_step, llama_shaped, make_batch

    torch.set_num_threads(args.threads)
    model = llama_shaped(args.hidden, args.intermediate, args.layers, args.heads, args.vocab, args.seq)
    batch = make_batch(args.vocab, 1, args.seq)
    out = {"mode": mode}
    if mode == "base":
        bare_step(model, batch, False)
    else:
        layers = tuple(range(pass_layers)) if mode == "pass" else None
        cfg = fasc.CalibConfig(n_tokens=10**9, seq_len=args.seq, layers=layers)
        with fasc.Calibrator(model, cfg) as cal:
            cal.step(batch)
        st = cal.result()
        out["formula_bytes"] = statistics_bytes(st.modules, st.group)
        out["stats_bytes"] = st.nbytes()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--pass-layers", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.pass_layers, a)
        return 0
    res = {}
    for mode in ("base", "calib", "pass"):
        r = subprocess.run([sys.executable, "-m", "bench.memory", "--child", mode] + (argv or sys.argv[1:]),
                           capture_output=True, text=True, check=True)
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    extra = (res["calib"]["peak_rss_bytes"] - res["base"]["peak_rss_bytes"]) / mb
    extra_pass = (res["pass"]["peak_rss_bytes"] - res["base"]["peak_rss_bytes"]) / mb
    print(f"Llama-shaped {a.layers} × ({a.hidden}/{a.intermediate}), seq {a.seq}: base peak "
          f"{res['base']['peak_rss_bytes'] / mb:.0f} MB; calibration extra {extra:.0f} MB vs formula "
          f"{res['calib']['formula_bytes'] / mb:.0f} MB (statistics object {res['calib']['stats_bytes'] / mb:.0f} MB); "
          f"{a.pass_layers} of {a.layers} layers per pass: extra {extra_pass:.0f} MB vs formula "
          f"{res['pass']['formula_bytes'] / mb:.0f} MB")
    print(f"peak_extra_mb={extra:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
