"""Train the embedded demo model on the invented world.

Run ``python -m fasc.demo.train --help`` for the command line. The function
:func:`train` writes, under ``out_dir``::

    data/facts.jsonl        all facts (prompt, answer, relation, subject)
    data/calib.txt          calibration text (fact sentences + filler)
    data/heldout.txt        held-out filler text (never trained on)
    checkpoints/ckpt-000 …  Hugging Face folders at 0/10/25/50/100 % of training
    model/                  the final model (same weights as ckpt-100)
    training_log.json       step, loss and fact recall per checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fasc.data import pad_rows
from fasc.demo.check import _encode_prompts, fact_recall, load_facts, svd_recall_drop, svd_truncate_  # noqa: F401
from fasc.demo.tokenizer import build_tokenizer, save_tokenizer, words_of
from fasc.demo.world import (
    World,
    WorldConfig,
    fact_sentences,
    filler_sentences,
    filler_vocabulary,
    make_world,
)

__all__ = [
    "CHECKPOINT_PERCENTS",
    "DEFAULT_OUT",
    "TrainConfig",
    "build_vocab_tokenizer",
    "build_world",
    "fact_recall",
    "load_facts",
    "svd_recall_drop",
    "svd_truncate_",
    "train",
    "write_data",
]

#: Default output root: the package folder itself.
DEFAULT_OUT = Path(__file__).resolve().parent
#: Checkpoints written along training, in percent of the planned steps.
CHECKPOINT_PERCENTS = (0, 10, 25, 50, 100)

# Seeds of the text streams, offset from the run seed.
_SEED_TRAIN_FILLER = 1
_SEED_CALIB = 2
_SEED_HELDOUT = 3


@dataclass
class TrainConfig:
    """Configuration of the demo world, model and training run.

    Attributes:
        n_countries: Countries in the world (4 facts each).
        n_people: People (3 facts each).
        world_seed: Seed of the world generator.
        hidden_size: Model width.
        intermediate_size: MLP width.
        num_layers: Decoder layers.
        num_heads: Attention heads.
        steps: Planned optimisation steps.
        batch_size: Sentences per step.
        filler_fraction: Fraction of each batch that is filler text.
        probe_fraction: Probability that a fact sentence uses the probe template.
        lr: Peak learning rate (AdamW).
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        n_train_filler: Size of the training filler pool (sentences).
        n_calib_filler: Filler sentences in ``calib.txt``.
        n_heldout: Sentences in ``heldout.txt``.
        eval_every: Steps between recall evaluations (for the log and the
            optional early stop).
        target_recall: Stop early once recall reaches this value (``None``:
            train all planned steps).
        max_minutes: Wall-time budget; training stops when it is spent.
        threads: Torch CPU threads. One thread is the default: on a shared
            2-core machine two threads were 3-4x slower per step than one.
        seed: Seed of initialisation and batch sampling.
    """

    n_countries: int = 400
    n_people: int = 1200
    world_seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    steps: int = 1500
    batch_size: int = 256
    filler_fraction: float = 0.2
    probe_fraction: float = 0.5
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.0
    n_train_filler: int = 20000
    n_calib_filler: int = 1000
    n_heldout: int = 1500
    eval_every: int = 250
    target_recall: float | None = None
    max_minutes: float = 14.0
    threads: int = 1
    seed: int = 0

    def world_config(self) -> WorldConfig:
        """Return the world part of the configuration."""
        return WorldConfig(n_countries=self.n_countries, n_people=self.n_people, seed=self.world_seed)


# ---------------------------------------------------------------------------
# World, tokenizer and data files
# ---------------------------------------------------------------------------


def build_world(cfg: TrainConfig) -> World:
    """Generate the world of a configuration."""
    return make_world(cfg.world_config())


def build_vocab_tokenizer(world: World):
    """Build the tokenizer covering the world's sentences and all filler words.

    Args:
        world: The world.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    words = words_of(s for f in world.facts for s in fact_sentences(f))
    words |= set(filler_vocabulary())
    words |= set(world.words)
    return build_tokenizer(words)


def _train_filler(cfg: TrainConfig) -> list[str]:
    """The filler sentences that training samples from."""
    return filler_sentences(cfg.n_train_filler, cfg.seed * 1000 + _SEED_TRAIN_FILLER)


def write_data(data_dir: str | Path, world: World, cfg: TrainConfig) -> dict[str, int]:
    """Write ``facts.jsonl``, ``calib.txt``, ``filler.txt`` and ``heldout.txt``.

    Args:
        data_dir: Target folder (created if missing).
        world: The world.
        cfg: The configuration (seeds and text sizes).

    Returns:
        Number of lines written per file.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "facts.jsonl", "w") as fh:
        fh.writelines(json.dumps(fact.to_dict()) + "\n" for fact in world.facts)
    rng = random.Random(cfg.seed * 1000 + _SEED_CALIB)
    lines = [rng.choice(fact_sentences(f)) for f in world.facts]
    filler = filler_sentences(cfg.n_calib_filler, cfg.seed * 1000 + _SEED_CALIB)
    lines += filler
    rng.shuffle(lines)
    # one sentence per paragraph: the model was trained on single sentences (<bos> … <eos>)
    (data_dir / "calib.txt").write_text("\n\n".join(lines) + "\n")
    # the same filler without the facts: general text for calibrating on part of the facts only
    (data_dir / "filler.txt").write_text("\n\n".join(filler) + "\n")
    # Held-out text: filler sentences of the same grammar that never occur in
    # the training filler pool (short patterns such as additions all do).
    seen = set(_train_filler(cfg))
    heldout: list[str] = []
    rng_seed = cfg.seed * 1000 + _SEED_HELDOUT
    while len(heldout) < cfg.n_heldout:
        batch = filler_sentences(4 * cfg.n_heldout, rng_seed)
        heldout += [x for x in batch if x not in seen][: cfg.n_heldout - len(heldout)]
        rng_seed += 7919
    (data_dir / "heldout.txt").write_text("\n\n".join(heldout) + "\n")
    return {"facts.jsonl": len(world.facts), "calib.txt": len(lines), "filler.txt": len(filler),
            "heldout.txt": len(heldout)}


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, t)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_model(cfg: TrainConfig, tokenizer) -> LlamaForCausalLM:
    """Create a freshly initialised Llama model for a configuration.

    Args:
        cfg: The configuration (model sizes and seed).
        tokenizer: The tokenizer (vocabulary size and special ids).

    Returns:
        The model, in float32.
    """
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


def _save(model, tokenizer, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the library never prints
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    save_tokenizer(tokenizer, folder)


def train(
    out_dir: str | Path,
    cfg: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the demo model and write data, checkpoints and the log.

    Args:
        out_dir: Output root (see the module docstring for the layout).
        cfg: Configuration.
        progress: Optional callback ``progress(step, total)`` called after
            every step.

    Returns:
        The training log (also written to ``out_dir/training_log.json``):
        config, per-checkpoint step/loss/recall, evaluation history, final
        recall, number of steps done and wall time.
    """
    start_time = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    world = build_world(cfg)
    tokenizer = build_vocab_tokenizer(world)
    write_data(out_dir / "data", world, cfg)

    # Pre-tokenise every template of every fact and the filler pool.
    eos = [tokenizer.eos_token_id]
    fact_rows = [
        [tokenizer(s).input_ids + eos for s in fact_sentences(f)] for f in world.facts
    ]
    filler_rows = [tokenizer(s).input_ids + eos for s in _train_filler(cfg)]
    n_templates = len(fact_rows[0])
    probes = _encode_prompts(tokenizer, world.facts)
    pad = tokenizer.pad_token_id

    model = make_model(cfg, tokenizer)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(cfg.seed)
    n_filler = round(cfg.batch_size * cfg.filler_fraction)
    n_fact = cfg.batch_size - n_filler
    order: list[int] = []

    ckpt_steps = {round(p / 100 * cfg.steps): p for p in CHECKPOINT_PERCENTS}
    log: dict = {
        "config": asdict(cfg),
        "n_facts": len(world.facts),
        "vocab_size": len(tokenizer),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "checkpoints": [],
        "history": [],
    }
    budget_s = cfg.max_minutes * 60.0
    recent_loss: list[float] = []
    stopped = "planned steps done"

    def checkpoint(step: int, percent: int | None) -> float:
        recall = fact_recall(model, tokenizer, world.facts, _encoded=probes)
        loss = sum(recent_loss) / len(recent_loss) if recent_loss else None
        if percent is not None:
            name = f"ckpt-{percent:03d}"
            _save(model, tokenizer, out_dir / "checkpoints" / name)
            log["checkpoints"].append(
                {
                    "name": name,
                    "percent": percent,
                    "step": step,
                    "loss": loss,
                    "recall": recall,
                    "elapsed_s": round(time.perf_counter() - start_time, 1),
                }
            )
        return recall

    step = 0
    checkpoint(0, 0)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        rows = []
        for _ in range(n_fact):
            if not order:
                order = list(range(len(fact_rows)))
                rng.shuffle(order)
            fi = order.pop()
            if rng.random() < cfg.probe_fraction:
                rows.append(fact_rows[fi][0])
            else:
                rows.append(fact_rows[fi][rng.randrange(1, n_templates)])
        for _ in range(n_filler):
            rows.append(filler_rows[rng.randrange(len(filler_rows))])
        ids, _ = pad_rows(rows, pad)
        labels = ids.clone()
        labels[ids == pad] = -100
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent_loss.append(float(out.loss.detach()))
        recent_loss = recent_loss[-50:]
        if progress is not None:
            progress(step, cfg.steps)

        elapsed = time.perf_counter() - start_time
        if step in ckpt_steps and ckpt_steps[step] != 100:
            checkpoint(step, ckpt_steps[step])
        if step % cfg.eval_every == 0 and step < cfg.steps:
            recall = fact_recall(model, tokenizer, world.facts, _encoded=probes)
            log["history"].append(
                {"step": step, "loss": recent_loss[-1], "recall": recall, "elapsed_s": round(elapsed, 1)}
            )
            (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
            if cfg.target_recall is not None and recall >= cfg.target_recall:
                stopped = f"target recall {cfg.target_recall} reached"
                break
        if elapsed > budget_s:
            stopped = "time budget spent"
            break

    final_recall = checkpoint(step, 100)
    if (out_dir / "model").exists():
        shutil.rmtree(out_dir / "model")
    shutil.copytree(out_dir / "checkpoints" / "ckpt-100", out_dir / "model")
    log["final_recall"] = final_recall
    log["steps_done"] = step
    log["stopped"] = stopped
    log["wall_time_s"] = round(time.perf_counter() - start_time, 1)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m fasc.demo.train",
        description=(
            "Train the FASC demo model (a small Llama) from scratch on CPU on an "
            "invented world of facts plus filler text. Writes data/, "
            "checkpoints/ckpt-000..ckpt-100, model/ and training_log.json under --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root folder")
    p.add_argument("--minutes", type=float, default=d.max_minutes,
                   help="wall-time budget: training stops (and still saves ckpt-100/model) when spent")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation, sampling and text")
    p.add_argument("--steps", type=int, default=d.steps, help="planned optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--hidden", type=int, default=d.hidden_size, help="hidden size")
    p.add_argument("--intermediate", type=int, default=d.intermediate_size, help="MLP size")
    p.add_argument("--layers", type=int, default=d.num_layers, help="decoder layers")
    p.add_argument("--heads", type=int, default=d.num_heads, help="attention heads")
    p.add_argument("--countries", type=int, default=d.n_countries, help="countries (4 facts each)")
    p.add_argument("--people", type=int, default=d.n_people, help="people (3 facts each)")
    p.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="stop early once fact recall reaches this value (None: train all planned steps)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--write-data", action="store_true",
                   help="only write data/ (facts.jsonl, calib.txt, heldout.txt) and exit")
    p.add_argument("--check", action="store_true",
                   help="after training, report recall after truncated SVD at 25/50/75 %% rank")
    return p


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        n_countries=args.countries,
        n_people=args.people,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        target_recall=args.target_recall,
        max_minutes=args.minutes,
        threads=args.threads,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    cfg = _config_from_args(args)
    if args.write_data:
        counts = write_data(args.out / "data", build_world(cfg), cfg)
        print(json.dumps(counts))
        return 0
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc="training", unit="step")

    def progress(step: int, total: int) -> None:
        bar.update(step - bar.n)

    log = train(args.out, cfg, progress)
    bar.close()
    for c in log["checkpoints"]:
        loss = "  n/a" if c["loss"] is None else f"{c['loss']:.3f}"
        print(f"{c['name']}: step {c['step']:5d}  loss {loss}  recall {c['recall']:.3f}")
    print(f"facts {log['n_facts']}, parameters {log['n_parameters']}, steps {log['steps_done']} "
          f"({log['stopped']}), wall time {log['wall_time_s']:.0f} s, final recall {log['final_recall']:.3f}")
    if args.check:
        from fasc.demo.check import main as check_main

        check_main(["--model", str(args.out / "model"), "--facts", str(args.out / "data" / "facts.jsonl")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
