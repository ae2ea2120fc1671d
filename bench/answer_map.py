"""Where a compressed model loses its generated answers: one group of its compressed modules restored at a time.

`bench.knowledge_map` measures a first-token cloze, where the attention modules barely matter; 5-shot closed-book
answers are lost elsewhere. Here each group of an export's compressed modules (a module kind, a third of the
layers, the query projections of a third) is put back to the dense model's weights, the others stay compressed,
and the selection slice's closed-book answers are scored (`bench.selection`: probe questions 200 to the end,
Jeopardy clues 400–799; never the scored items):

    kept      of the answers the dense model gets right, how many this model still gets right
    Δ log P   the mean change of the gold answer's log-likelihood (nats), against the dense model, on those items

The row `none` is the export itself. A group whose restoration takes Δ log P much closer to 0 holds answers the
plan cut; the groups overlap (a kind and a third), so their recoveries do not add up.

    python -m bench.answer_map --model /tmp/ex/fasc90 [--dense smollm2] [--groups kinds,thirds,q]
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

from torch import nn

GROUPS = ("kinds", "thirds", "q")


def compressed_modules(ranks: dict[str, int], dense: nn.Module) -> list[str]:
    """The modules of an export's `ranks` (fasc_config.json) kept below their full rank."""
    mods = dict(dense.named_modules())
    return [f for f, k in ranks.items() if k < min(mods[f].weight.shape)]


def _layer(fqn: str) -> int | None:
    parts = fqn.split(".")
    return next((int(p) for p in parts if p.isdigit()), None)


def module_groups(names: list[str], n_layers: int, which: tuple[str, ...] = GROUPS) -> dict[str, list[str]]:
    """{group: modules}: 'kinds' (one per module kind: q_proj, o_proj …), 'thirds' (layers in three equal
    spans), 'q' (the query projections of each third); empty groups are left out."""
    bounds = [(round(i * n_layers / 3), round((i + 1) * n_layers / 3) - 1) for i in range(3)]
    out: dict[str, list[str]] = {}
    if "kinds" in which:
        for kind in dict.fromkeys(n.rsplit(".", 1)[-1] for n in names):
            out[kind] = [n for n in names if n.rsplit(".", 1)[-1] == kind]
    for a, b in bounds:
        span = [n for n in names if (lay := _layer(n)) is not None and a <= lay <= b]
        if "thirds" in which:
            out[f"layers {a}–{b}"] = span
        if "q" in which:
            out[f"q_proj, layers {a}–{b}"] = [n for n in span if n.endswith("q_proj")]
    return {g: m for g, m in out.items() if m}


def restored(comp: nn.Module, dense: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `comp` with the modules `names` taken back from `dense`."""
    from fasc.surgery import replace_module

    model, mods = copy.deepcopy(comp), dict(dense.named_modules())
    for n in names:
        replace_module(model, n, copy.deepcopy(mods[n]))
    return model


def answer_map(comp: nn.Module, dense: nn.Module, tok, groups: dict[str, list[str]], sets: dict,
               progress: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, dict]]:
    """{'dense' | 'none' | group: {set: fasc.qa.known_kept against the dense model}}; `sets`: {name: (QASet,
    offset, limit)}. The dense row is the dense model against itself."""
    from fasc.qa import known_kept, run_qa

    def score(model):
        return {s: run_qa(model, tok, qs, offset=off, limit=lim, batch_size=32).to_dict()
                for s, (qs, off, lim) in sets.items()}

    ref = score(dense)
    res = {"dense": {s: known_kept(ref[s], ref[s]) for s in sets}}
    for g, names in {"none": [], **groups}.items():
        got = score(restored(comp, dense, names) if names else comp)
        res[g] = {s: known_kept(ref[s], got[s]) for s in sets}
        progress(g)
    return res


def table(res: dict[str, dict[str, dict]], groups: dict[str, list[str]]) -> str:
    sets = list(res["dense"])
    head = "| restored to dense | modules | " + " | ".join(f"{s} kept | {s} Δ log P" for s in sets) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(sets))]
    for g, r in res.items():
        n = "–" if g == "dense" else str(len(groups.get(g, [])))
        name = "every module (the dense model)" if g == "dense" else ("none (the export)" if g == "none" else g)
        cells = [f"{r[s]['kept']} / {r[s]['dense_correct']} | {r[s]['delta_logp_known']:+.3f}" for s in sets]
        rows.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from fasc.errors import FascError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a compressed export folder (its fasc_config.json names the ranks)")
    p.add_argument("--dense", default="smollm2", help="its uncompressed model (known answers are its right ones)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    a = p.parse_args(argv)
    try:
        from bench.selection import Slices, comma_choices

        which = comma_choices(a.groups, GROUPS, "group")
        import fasc
        from fasc.export import read_fasc_config
        from fasc.pipeline import model_defaults
        from fasc.qa import qa_set

        ranks = read_fasc_config(a.model).get("ranks") or {}
        dense, tok = fasc.load_model(a.dense)
        comp, _ = fasc.load_model(a.model)
        names = compressed_modules(ranks, dense)
        if not names:
            raise FascError(f"{a.model} keeps every module at full rank: nothing to restore.")
        groups = module_groups(names, dense.config.num_hidden_layers, which)
        probe = model_defaults(a.dense).probe
        sets = {s: (qa_set(s, probe), off, lim) for s, (off, lim) in Slices().qa.items()}
        res = answer_map(comp, dense, tok, groups, sets, progress=lambda g: print(g, file=sys.stderr, flush=True))
    except FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res, groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
