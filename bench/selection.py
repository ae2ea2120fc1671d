"""The selection slice: documents and questions the scored tables never read, to choose settings on.

The field's tables in BENCHMARKS.md score the first 500 documents of each task and the first 200 questions of
each QA set. A default, a method or a calibration mix is chosen on later items instead:

    lambada  lambada_openai documents 500–1,499: last-word accuracy and word perplexity
    mc       arc_easy, hellaswag, piqa documents 500–699 (ARC-Easy's validation split ends at 570: 70 + 200 + 200)
    real     perplexity of real held-out passages (`real_heldout`, the standard protocol, 16,384 tokens)
    qa       5-shot closed-book answers: probe questions 200 to the end, Jeopardy clues 400–799

    python -m bench.selection --models "fasc 90 %=/tmp/ex/fasc90" "asvd 90 %=/tmp/ex/asvd90" [--dense smollm2]

prints one markdown table: the dense model, then each model's figures with the paired difference against the
reference (the first model given, or --reference) and the known answers kept (of those the dense model gets
right). Each (model, part) result is kept in bench/out/selection/ under the model's weight fingerprint, so a row
added later runs only the new model; a result is written whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out" / "selection"
PARTS = ("lambada", "mc", "real", "qa")
MC_TASKS = ("arc_easy", "hellaswag", "piqa")


@dataclass(frozen=True)
class Slices:
    """(offset, limit) of each part; `None` as a limit: to the end. Tests shrink them."""

    lambada: tuple[int, int] = (500, 1000)
    mc: tuple[int, int] = (500, 200)
    real_tokens: int = 16384
    qa: dict = field(default_factory=lambda: {"qa_facts": (200, None), "jeopardy": (400, 400)})

    def tag(self, part: str) -> str:
        """The slice of `part` as a short digest (a result is reused only for the same slice)."""
        v = {"lambada": self.lambada, "mc": self.mc, "real": self.real_tokens, "qa": self.qa}[part]
        return hashlib.sha256(json.dumps([part, v], sort_keys=True).encode()).hexdigest()[:8]


def run_part(model, tok, part: str, sl: Slices, probe: str | Path | None) -> dict:
    """One part on one model: per-document values (lm-eval parts), perplexity (real) or per-item correctness (qa)."""
    from fasc.harness import run_tasks

    if part in ("lambada", "mc"):
        (offset, limit), tasks = (sl.lambada, ["lambada_openai"]) if part == "lambada" else (sl.mc, list(MC_TASKS))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # lm-eval's tables
            r = run_tasks(model, tok, tasks, probe=None, limit=limit, offset=offset)
        return {"results": r["results"], "samples": {t: r["samples"][t]["acc"] for t in tasks}}
    if part == "real":
        from fasc.data import read_text
        from fasc.ppl_standard import STANDARD_SEQ_LEN, perplexity_standard
        from fasc.real_text import resolve

        return perplexity_standard(model, tok, read_text(resolve("real_heldout")), max_tokens=sl.real_tokens,
                                   seq_len=min(STANDARD_SEQ_LEN, sl.real_tokens))
    from fasc.qa import qa_set, run_qa

    return {name: {"correct": run_qa(model, tok, qa_set(name, probe), limit=limit, offset=offset,
                                     batch_size=32).correct}
            for name, (offset, limit) in sl.qa.items()}


def evaluate(specs: dict[str, str], parts: tuple[str, ...] = PARTS, sl: Slices = Slices(), out: Path = OUT,
             probe: str | Path | None = None, log=print) -> dict[str, dict[str, dict]]:
    """{name: {part: result}} for each model spec, reusing the results kept in `out`."""
    import fasc
    from fasc.cache import write_text_atomic
    from fasc.modules import model_fingerprint

    res: dict[str, dict[str, dict]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        model, tok = fasc.load_model(spec)
        fp = model_fingerprint(model)[:16]
        res[name] = {}
        for part in parts:
            path = out / f"{fp}-{part}-{sl.tag(part)}.json"
            if path.is_file():
                res[name][part] = json.loads(path.read_text())
                continue
            t = time.perf_counter()
            res[name][part] = run_part(model, tok, part, sl, probe)
            write_text_atomic(path, json.dumps(res[name][part]))
            log(f"{name}: {part} in {time.perf_counter() - t:.0f} s")
        del model
    return res


def _paired(a: list[float], b: list[float]) -> str:
    from fasc.retention import paired_difference

    m, se = paired_difference([float(x) for x in a], [float(x) for x in b])
    return f" ({100 * m:+.1f} ± {100 * se:.1f})"


def table(res: dict[str, dict[str, dict]], dense: str, reference: str | None = None) -> str:
    """The markdown table of `evaluate`'s results: `dense` first, paired differences against `reference`."""
    names = list(res)
    ref = reference or next((n for n in names if n != dense), dense)
    head = ["model", "LAMBADA acc", "word ppl", " / ".join(MC_TASKS), "MC pooled", "real ppl"]
    qa_sets = list(res[dense].get("qa", {}))
    head += [f"{s} kept" for s in qa_sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r, cells = res[n], [n]
        diff = n not in (ref, dense)
        if "lambada" in r:
            acc = r["lambada"]["samples"]["lambada_openai"]
            cells += [f"{100 * sum(acc) / len(acc):.1f}" + (_paired(acc, res[ref]["lambada"]["samples"]["lambada_openai"])
                                                          if diff else ""),
                      f"{r['lambada']['results']['lambada_openai']['perplexity']:.1f}"]
        else:
            cells += ["–", "–"]
        if "mc" in r:
            per = r["mc"]["samples"]
            pooled = [x for t in MC_TASKS for x in per[t]]
            cells += [" / ".join(f"{100 * sum(per[t]) / len(per[t]):.1f}" for t in MC_TASKS),
                      f"{100 * sum(pooled) / len(pooled):.1f}"
                      + (_paired(pooled, [x for t in MC_TASKS for x in res[ref]["mc"]["samples"][t]]) if diff else "")]
        else:
            cells += ["–", "–"]
        cells.append(f"{r['real']['perplexity']:.2f}" if "real" in r else "–")
        for s in qa_sets:
            known = [i for i, c in enumerate(res[dense]["qa"][s]["correct"]) if c]
            c = r.get("qa", {}).get(s, {}).get("correct")
            cells.append(f"{sum(1 for i in known if c[i])} / {len(known)}" if c is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def named_models(args: list[str]) -> dict[str, str]:
    """{name: model spec} of `--models NAME=MODEL …` (a name other than 'dense'); bad input → FascError."""
    from fasc.errors import FascError

    specs = {}
    for m in args:
        name, sep, spec = m.partition("=")
        if not sep or not name or not spec or name == "dense":
            raise FascError(f"--models takes NAME=MODEL (a name other than 'dense'), got {m!r}.")
        specs[name] = spec
    return specs


def comma_choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The comma-separated names of `text`, each one of `allowed`; none or an unknown one → FascError naming them."""
    from fasc.errors import FascError

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise FascError(f"Unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}.")
    return names


def main(argv=None) -> int:
    from fasc.errors import FascError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL",
                   help="the models to compare (export folders, built-in names, hub ids), each named")
    p.add_argument("--dense", default="smollm2", help="the uncompressed model: known answers are its right ones")
    p.add_argument("--reference", help="the row the paired differences are taken against (default: the first model)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--out", type=Path, default=OUT, help="where each (model, part) result is kept")
    a = p.parse_args(argv)
    try:
        parts = comma_choices(a.parts, PARTS, "part")
        specs = {"dense": a.dense, **named_models(a.models)}
        if a.reference is not None and a.reference not in specs:
            raise FascError(f"--reference {a.reference!r} is not one of the names given: {', '.join(specs)}.")
        from fasc.pipeline import model_defaults

        res = evaluate(specs, parts, Slices(), a.out, probe=model_defaults(a.dense).probe,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    except FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res, "dense", a.reference))
    print(f"\nslices: {json.dumps(asdict(Slices()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
