"""Where a compressed model loses LAMBADA's last word: in the passage or at the word, copied or new.

LAMBADA's target is the passage's last word; most targets (≈ 90 %) occur earlier in the passage, so the model
has to find and copy them. For each model against the dense one, over the same documents:

    KL context   mean KL(dense ‖ model) over the passage's own next-token predictions
    KL word      mean KL(dense ‖ model) at the last word's tokens (per document)
    NLL copied   mean −log p(target word) where the word occurs earlier in the passage (dense beside it)
    NLL new      the same where it does not
    acc          greedy last-word accuracy (every target token the argmax: lm-eval's `acc`)

    python -m bench.lastword --models "fasc 80 %=/tmp/ex/fasc80" "healed=/tmp/ex/fasc80h" [--dense smollm2] \\
        [--docs 500:800]

A model can move closer to the dense one at the last word (KL word falls) and still lose the target (NLL copied
rises): the KL is spread over the many words the dense model finds plausible, the target is one of them
(docs/healing-results.md). The default documents are in the selection slice (`bench.selection`: LAMBADA
500–1,499), never the scored first 500.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.selection import named_models

DOCS = (500, 800)


@dataclass
class Item:
    ids: torch.Tensor   # (1, L): the passage's tokens, then the target's
    n_ctx: int          # tokens of the passage before the target
    n_tgt: int          # tokens of the target word
    copied: bool        # the target word occurs earlier in the passage


@dataclass
class LastWord:
    kl_context: float
    kl_word: float
    nll_copied: float
    nll_new: float
    acc: float
    n_copied: int
    n_new: int


def split(text: str) -> tuple[str, str]:
    """(passage, ' ' + last word), as lm-eval's lambada_openai splits a document."""
    ctx, _, word = text.rpartition(" ")
    return ctx, " " + word


def copied(ctx: str, word: str) -> bool:
    """The word (case and surrounding punctuation aside) occurs as a word in the passage."""
    w = word.strip().strip(".,;:!?\"'“”‘’").lower()
    return bool(w) and re.search(rf"\b{re.escape(w)}\b", ctx.lower()) is not None


def items(tok, texts: list[str]) -> list[Item]:
    out = []
    for text in texts:
        ctx, word = split(text)
        ci = tok(ctx, add_special_tokens=False).input_ids
        ti = tok(word, add_special_tokens=False).input_ids
        if ci and ti:
            out.append(Item(torch.tensor([ci + ti]), len(ci), len(ti), copied(ctx, word)))
    return out


def _log_probs(model, it: Item) -> torch.Tensor:
    return F.log_softmax(model(input_ids=it.ids, use_cache=False).logits[0, :-1].float(), -1)   # row t predicts t+1


@torch.no_grad()
def compare(dense, models: dict, its: list[Item], progress=None) -> dict[str, LastWord]:
    """{name: LastWord} of each model, and of `dense` under 'dense', over the same items."""
    from fasc.heal import kl_each

    if not its:
        from fasc.errors import FascError

        raise FascError("No LAMBADA documents in that range; give --docs START:END inside 0:5153.")
    names = ["dense", *models]
    sums = {n: {"klc": 0.0, "nc": 0, "klw": 0.0, "cop": [], "new": [], "hit": 0} for n in names}
    for i, it in enumerate(its):
        d = _log_probs(dense, it)
        tgt = it.ids[0, it.n_ctx:]
        rows = slice(it.n_ctx - 1, it.n_ctx - 1 + it.n_tgt)
        for n in names:
            s = d if n == "dense" else _log_probs(models[n], it)
            kl = kl_each(d, s)   # log-probabilities are their own log-softmax
            a = sums[n]
            a["klc"] += float(kl[:it.n_ctx - 1].sum())
            a["nc"] += it.n_ctx - 1
            a["klw"] += float(kl[rows].mean())
            a["cop" if it.copied else "new"].append(-float(s[rows].gather(-1, tgt[:, None]).sum()))
            a["hit"] += bool((s[rows].argmax(-1) == tgt).all())
        if progress is not None:
            progress(i + 1, len(its))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")   # noqa: E731
    return {n: LastWord(kl_context=a["klc"] / max(a["nc"], 1), kl_word=a["klw"] / len(its), nll_copied=mean(a["cop"]),
                        nll_new=mean(a["new"]), acc=a["hit"] / len(its), n_copied=len(a["cop"]), n_new=len(a["new"]))
            for n, a in sums.items()}


def table(res: dict[str, LastWord]) -> str:
    r0 = res["dense"]
    head = ["model", "acc", "KL context", "KL word", f"NLL copied ({r0.n_copied})", f"NLL new ({r0.n_new})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in res.items():
        lines.append(f"| {n} | {100 * r.acc:.1f} | {r.kl_context:.4f} | {r.kl_word:.4f} | {r.nll_copied:.3f} | "
                     f"{r.nll_new:.3f} |")
    return "\n".join(lines)


def _docs(s: str) -> tuple[int, int]:
    from fasc.errors import FascError

    a, sep, b = s.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        lo = hi = -1
    if not sep or not 0 <= lo < hi:
        raise FascError(f"--docs takes START:END document numbers (e.g. 500:800), got {s!r}.")
    return lo, hi


def main(argv=None) -> int:
    from fasc.errors import FascError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL",
                   help="the models to compare (export folders, built-in names, hub ids), each named")
    p.add_argument("--dense", default="smollm2", help="the uncompressed model the KL is taken against")
    p.add_argument("--docs", default=f"{DOCS[0]}:{DOCS[1]}",
                   help="LAMBADA documents START:END (default: inside the selection slice, never the scored 0:500)")
    a = p.parse_args(argv)
    try:
        lo, hi = _docs(a.docs)
        specs = named_models(a.models)
        import fasc
        from fasc.lm_tasks.standard import lambada_rows

        dense, tok = fasc.load_model(a.dense)
        models = {n: fasc.load_model(s)[0].eval() for n, s in specs.items()}
        its = items(tok, [r["text"] for r in lambada_rows()[lo:hi]])
        res = compare(dense.eval(), models, its,
                      progress=lambda i, n: print(f"\r{i}/{n} documents", end="", file=sys.stderr, flush=True))
        print(file=sys.stderr)
    except FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res))
    print(f"\nLAMBADA documents {lo}–{hi - 1} ({len(its)}); dense: {a.dense}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
