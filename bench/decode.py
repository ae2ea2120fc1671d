"""Time of generated few-shot answers (`fasc.qa.generate_answers`): a stopped row leaving the batch, against the
batch kept whole until its last row stops (`fasc.generate.decode_steps(shrink=False)`, what it did before).

Answers stop at their first line break after a few tokens, but a batch decodes until its last row stops, up to
the 24-token cap where a compressed model loops; kept whole, every step runs every row. Both variants run in
this process, interleaved, on the QA selection slices (probe questions from 200, Jeopardy clues from 400; never
the scored items), at each batch size; the answers must be the same.

    OMP_NUM_THREADS=2 python -m bench.decode --model /tmp/ex/fasc80 --items 128 --batch-sizes 16 64
"""

from __future__ import annotations

import argparse
import functools
import time


def run(model, tok, prompts: list[str], batch_size: int, shrink: bool) -> tuple[list[str], float, float]:
    """(answers, seconds, share of the decoded row-steps whose row was still running)."""
    import fasc.generate as gen
    from fasc.qa import generate_answers

    own, seen = gen.decode_steps, [0, 0]

    def counted(*a, **kw):
        for out in own(*a, **kw, shrink=shrink):
            seen[0] += sum(t is not None for t in out)
            seen[1] += len(out)
            yield out

    gen.decode_steps = functools.wraps(own)(counted)
    try:
        t = time.perf_counter()
        answers = generate_answers(model, tok, prompts, batch_size=batch_size)
        return answers, time.perf_counter() - t, seen[0] / max(seen[1], 1)
    finally:
        gen.decode_steps = own


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a built-in name, hub id or export folder")
    p.add_argument("--items", type=int, default=128, help="questions of each QA set")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--probe", default=None, help="the probe of qa_facts (default: the model's)")
    a = p.parse_args(argv)

    import torch

    from fasc.loading import load_model
    from fasc.pipeline import model_defaults
    from fasc.qa import qa_set

    torch.set_grad_enabled(False)
    model, tok = load_model(a.model)
    probe = a.probe or model_defaults(a.model).probe
    print("| set | items | batch | rows running | kept whole (s) | stopped rows leave (s) | ratio | answers differ |")
    print("|---|---|---|---|---|---|---|---|")
    for name, start in (("qa_facts", 200), ("jeopardy", 400)):
        qs = qa_set(name, probe)
        prompts = [qs.prompt(it) for it in qs.items[start:start + a.items]]
        for bs in a.batch_sizes:
            whole, t_whole, share = run(model, tok, prompts, bs, shrink=False)
            left, t_left, _ = run(model, tok, prompts, bs, shrink=True)
            differ = sum(x != y for x, y in zip(whole, left))
            print(f"| {name} | {len(prompts)} | {bs} | {share:.0%} | {t_whole:.1f} | {t_left:.1f} | "
                  f"{t_left / t_whole:.2f} | {differ} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
