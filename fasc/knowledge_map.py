"""The measured knowledge map: where a model keeps the facts of a probe, module by module.

For each module j, the module alone is replaced by its rank-k_j version (the others stay dense), the
probe is scored, and the module is restored. Per fact i this gives

    nll[j, i] = −log P(answer_i | prompt_i)   (nats, Σ over the answer's tokens, teacher-forced)
    correct[j, i] = the answer's first token is the top-1 prediction

and per module the two figures of the map: `knowledge_loss` = mean_i (nll[j, i] − nll_dense[i])
(nats per fact) and `recall_drop` = recall_dense − recall_j. The matrices are kept (float32,
modules × facts) so that one fact can be looked at later without measuring again.

Beside it, the statistics that claim to say where facts live: ρ (spec §4), predicted ΔL (spec §3)
and the *Fisher energy* E_j = ½ tr(C_h C_x) — the decoupled predicted loss of removing module j
entirely (spec §2 with M = 0) — of the general calibration text and of the probe's answers
(calibration with targets='answers'); `spearman` ranks them against the measured map.

Cost. The exact map re-runs, for a module of layer l, only layers l … L on the probe's hidden states at
layer l's input (captured once) and the output head at the answer positions only, facts batched by
length (`_Replay`); its FLOPs (`exact_flops`) are its floor, about half of a full forward per module
plus the head. Each module is decomposed once (`map_factors`, threads over layers, stored beside the
statistics) for the exact map and the **fast map** (`fast_map`): one forward and backward pass over the
probe gives, per module and fact, the first-order change of the answer loss and its coupled Fisher
(spec §2 on the answers), a prediction ranked against the exact map by `fast_vs_exact`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import cache
from .allocate import Plan, base_method
from .analysis import Analysis
from .config import CalibConfig
from .data import Example, encode_example, pad_rows
from .errors import FascError
from .evaluate import answer_scores
from .linalg import LINALG_DTYPE
from .model_state import eval_mode
from .modules import ModuleInfo
from .stats import CalibStats
from .surgery import dense_module, replace_module

MAP_FORMAT = 1


@dataclass
class KnowledgeMap:
    """Per-fact answer losses with one module compressed at a time.

    Attributes:
        fqns, ranks, methods: the modules measured, in order, with their rank and base method.
        base_nll (F,) float32, base_correct (F,) bool: the uncompressed model.
        nll (M, F) float32, correct (M, F) bool: row j = only module j compressed.
    """

    fqns: list[str]
    ranks: list[int]
    methods: list[str]
    base_nll: Tensor
    base_correct: Tensor
    nll: Tensor
    correct: Tensor

    @property
    def n_facts(self) -> int:
        return int(self.base_nll.numel())

    def knowledge_loss(self) -> Tensor:
        """(M,) mean increase of −log P(answer | prompt) over the facts, nats per fact."""
        return (self.nll.double() - self.base_nll.double()).mean(1)

    def recall_drop(self) -> Tensor:
        """(M,) first-token recall of the dense model minus recall with module j compressed."""
        return self.base_correct.double().mean() - self.correct.double().mean(1)

    def rows(self) -> list[dict]:
        kl, rd = self.knowledge_loss(), self.recall_drop()
        return [{"fqn": f, "rank": k, "method": m, "knowledge_loss": float(kl[j]), "recall_drop": float(rd[j])}
                for j, (f, k, m) in enumerate(zip(self.fqns, self.ranks, self.methods))]

    def fact_effects(self, i: int) -> list[tuple[str, float, bool]]:
        """For fact i: (module, increase of −log P(answer), still top-1) with that module alone
        compressed, most harmful first."""
        if not 0 <= i < self.n_facts:
            raise FascError(f"Fact {i} is out of range; the map has {self.n_facts} facts (0 … {self.n_facts - 1}).")
        d = self.nll[:, i].double() - float(self.base_nll[i])
        order = torch.argsort(d, descending=True)
        return [(self.fqns[j], float(d[j]), bool(self.correct[j, i])) for j in order.tolist()]

    def subset(self, fqns: list[str]) -> "KnowledgeMap":
        """The rows of `fqns` (each measured here), in that order."""
        idx = [self.fqns.index(f) for f in fqns]
        return KnowledgeMap(list(fqns), [self.ranks[i] for i in idx], [self.methods[i] for i in idx],
                            self.base_nll, self.base_correct, self.nll[idx], self.correct[idx])

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> None:
        """Atomic: written beside `path` and renamed into place."""
        tensors = {"base_nll": self.base_nll.float().contiguous(), "nll": self.nll.float().contiguous(),
                   "base_correct": self.base_correct.to(torch.uint8).contiguous(),
                   "correct": self.correct.to(torch.uint8).contiguous()}
        meta = {"format": str(MAP_FORMAT), "fqns": json.dumps(self.fqns), "ranks": json.dumps(self.ranks),
                "methods": json.dumps(self.methods)}
        _save_atomic(tensors, meta, path)

    @classmethod
    def load(cls, path: Path) -> "KnowledgeMap":
        meta, t = _load_checked(path, None)
        km = cls(json.loads(meta["fqns"]), json.loads(meta["ranks"]), json.loads(meta["methods"]),
                 t["base_nll"], t["base_correct"].bool(), t["nll"], t["correct"].bool())
        if km.nll.shape != (len(km.fqns), km.n_facts) or km.correct.shape != km.nll.shape:
            raise FascError(f"{path.name} is damaged (shapes disagree); it will be measured again.")
        return km


def merge_maps(a: KnowledgeMap | None, b: KnowledgeMap, order: list[str]) -> KnowledgeMap:
    """The rows of `a` and `b` (b's where both have one) in the order of `order` (the map's modules):
    subsets measured one after the other on the same probe, shown as one map."""
    if a is None:
        return b
    if a.n_facts != b.n_facts:
        raise FascError("The two knowledge maps were measured on different probes; measure again on one probe.")
    rows = {f: (a, i) for i, f in enumerate(a.fqns)} | {f: (b, i) for i, f in enumerate(b.fqns)}
    fq = [f for f in order if f in rows]
    pick = [rows[f] for f in fq]
    return KnowledgeMap(fq, [m.ranks[i] for m, i in pick], [m.methods[i] for m, i in pick], b.base_nll,
                        b.base_correct, torch.stack([m.nll[i] for m, i in pick]),
                        torch.stack([m.correct[i] for m, i in pick]))


def _save_atomic(tensors: dict[str, Tensor], meta: dict[str, str], path: Path) -> None:
    cache.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_checked(path: Path, kind: str | None) -> tuple[dict, dict[str, Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != str(MAP_FORMAT) or meta.get("kind") != kind:
        raise FascError(f"{path.name} is not a knowledge map of format {MAP_FORMAT}; it will be measured again.")
    return meta, load_file(str(path))


# ---------------------------------------------------------------------- ranks
def share_ranks(infos: list[ModuleInfo], share: float) -> dict[str, int]:
    """Every module keeps the share c of its parameters: k = round(c·mn/(m+n)) in [1, min(m,n)]
    (the uniform baseline of spec §6)."""
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise FascError(f"The reference parameter share must be in (0, 1], got {share!r}; e.g. 0.5 keeps half.")
    return {i.fqn: max(1, min(i.max_rank, round(share * i.params / (i.out_features + i.in_features))))
            for i in infos}


def _targets(an: Analysis, plan: Plan | None, share: float | None, method: str) -> tuple[list[str], list[int], list[str]]:
    if (plan is None) == (share is None):
        raise FascError("Give exactly one of a plan (its planned ranks) or a reference parameter share.")
    if plan is not None:
        known = {i.fqn for i in an.modules}
        unknown = sorted(set(plan.ranks) - known)
        if unknown:
            raise FascError(f"The plan names {len(unknown)} modules without statistics, e.g. {unknown[0]}; "
                            f"allocate the plan on this calibration.")
        if not plan.ranks:
            raise FascError("The plan compresses no module; allocate ranks first.")
        order = [i.fqn for i in an.modules if i.fqn in plan.ranks]
        return order, [plan.ranks[f] for f in order], [base_method(an, f, plan.methods[f]) for f in order]
    ranks = share_ranks(an.modules, share)
    order = [i.fqn for i in an.modules]
    return order, [ranks[f] for f in order], [base_method(an, f, method) for f in order]


def encode_probe(tokenizer, examples: list[Example]) -> list[tuple[list[int], int]]:
    if not examples:
        raise FascError("The probe has no facts; give a JSONL file with prompt/answer lines.")
    return [encode_example(tokenizer, ex) for ex in examples]


def probe_subset(examples: list[Example], max_facts: int | None) -> list[Example]:
    """At most `max_facts` facts, evenly spaced through the file (deterministic; keeps every relation)."""
    if max_facts is None or max_facts >= len(examples):
        return list(examples)
    if max_facts < 1:
        raise FascError(f"--max-facts must be ≥ 1, got {max_facts}.")
    step = len(examples) / max_facts
    return [examples[int(i * step)] for i in range(max_facts)]


# ---------------------------------------------------------------------- module subsets
def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int] | None:
    """'0-3,7' (or a list) -> sorted layer indices, each checked against the model's `n_layers`."""
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            try:
                a, _, b = part.partition("-")
                lo, hi = int(a), int(b or a)
            except ValueError:
                raise FascError(f"Layers {spec!r} are not a list like 0-3,7; give layer numbers and ranges.") from None
            out.update(range(lo, hi + 1))
        layers = sorted(out)
    else:
        layers = sorted({int(x) for x in spec})
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise FascError(f"Layer {bad[0] if bad else spec!r} is not in this model; its layers are 0 … {n_layers - 1}.")
    return layers


def select_modules(fqns: list[str], infos: list[ModuleInfo], *, layers: list[int] | None = None,
                   kinds: list[str] | None = None, top: int | None = None,
                   fast: "FastMap | None" = None) -> list[str]:
    """The map's modules (`fqns`, in order) restricted to `layers`, `kinds` and the `top` modules of the
    fast map's prediction (the highest predicted knowledge loss); every filter given must keep one."""
    by = {i.fqn: i for i in infos}
    keep = list(fqns)
    if kinds:
        have = [k for k in dict.fromkeys(by[f].kind for f in fqns)]
        unknown = [k for k in kinds if k not in have]
        if unknown:
            raise FascError(f"Module kind {unknown[0]!r} is not in the map; its kinds are {', '.join(have)}.")
        keep = [f for f in keep if by[f].kind in kinds]
    if layers:
        keep = [f for f in keep if by[f].layer in set(layers)]
    if top is not None:
        if not (isinstance(top, int) and top >= 1):
            raise FascError(f"The top-N of the fast map must be a whole number ≥ 1, got {top!r}.")
        if fast is None:
            raise FascError("Choosing the top modules needs the fast map; compute it first (fasc report "
                            "--knowledge-map --fast).")
        pred = dict(zip(fast.fqns, fast.predicted().tolist()))
        ranked = sorted((f for f in keep if f in pred), key=lambda f: -pred[f])[:top]
        keep = [f for f in keep if f in set(ranked)]
    if not keep:
        raise FascError("No module of the map matches the chosen layers and kinds; widen the selection.")
    return keep


# ---------------------------------------------------------------------- factors (decomposed once, shared)
def map_factors(an: Analysis, fqns: list[str], methods: list[str], ranks: list[int],
                progress: Callable[[int, int], object] | None = None,
                workers: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """{fqn: (U, V)} of every module's compression in the map (W' = U Vᵀ), as `fasc.surgery.compute_factors`
    stores them (the module's device, float32 at least). Each module is decomposed once; the fast and the
    exact map share the result. On the CPU the layers are shared out over threads
    (`Analysis.factors_many`, whitened by Cholesky), and the methods' summaries (predicted ΔL curves) are
    kept in `an`. `progress` returning False cancels (FascError)."""
    from .surgery import placed_factors

    items = list(zip(fqns, methods, ranks))
    for f, m, k in items:
        if not 1 <= k <= an.info(f).max_rank:
            raise FascError(f"Rank {k} for {f} is out of range; it must be in [1, {an.info(f).max_rank}].")

    def tick(done: int, total: int) -> None:
        if progress is not None and progress(done, total) is False:
            raise FascError("Knowledge map cancelled; nothing was stored.")

    raw = an.factors_many(items, tick, workers=workers, cholesky=True)
    return {f: placed_factors(an, f, U, V) for f, (U, V) in raw.items()}


# ---------------------------------------------------------------------- the probe, batched
@dataclass
class _Batch:
    facts: list[int]        # fact indices, one per row
    ids: Tensor             # (B, W) prompt + answer without its last token, right-padded
    mask: Tensor            # (B, W)
    rows: Tensor            # (A,) row of each answer target
    pos: Tensor             # (A,) position whose logits predict it
    tgt: Tensor             # (A,) the answer token
    owner: Tensor           # (A,) batch-local fact (row) of each target
    first: Tensor           # (B,) index into the A targets of each fact's first answer token


def _probe_batches(encoded: list[tuple[list[int], int]], max_tokens: int = 2048,
                   max_pad: float = 0.25) -> list[_Batch]:
    """Facts sorted by length (longest first), in batches of at most `max_tokens` padded tokens whose
    shortest row is at least (1 − max_pad) of the longest: little padding, large matrix products. The
    last answer token is never an input (no logit reads it)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    groups: list[list[int]] = []
    for i in order:
        n = len(encoded[i][0]) - 1
        if groups:
            g = groups[-1]
            w = len(encoded[g[0]][0]) - 1
            if (len(g) + 1) * w <= max(max_tokens, w) and n >= (1 - max_pad) * w:
                g.append(i)
                continue
        groups.append([i])
    out = []
    for g in groups:
        rows = [encoded[i][0][:-1] for i in g]
        ids, mask = pad_rows(rows)
        r_, p_, t_, o_, first = [], [], [], [], []
        for r, i in enumerate(g):
            full, start = encoded[i]
            first.append(len(p_))
            for p in range(start - 1, len(full) - 1):
                r_.append(r)
                p_.append(p)
                t_.append(full[p + 1])
                o_.append(r)
        out.append(_Batch(g, ids, mask, torch.tensor(r_), torch.tensor(p_), torch.tensor(t_), torch.tensor(o_),
                          torch.tensor(first)))
    return out


def _scores(logits: Tensor, b: _Batch) -> tuple[Tensor, Tensor]:
    """(−log P(answer) per row, first answer token top-1 per row) from the answer targets' logits (A, V)."""
    logp = logits.float().log_softmax(-1)
    tgt = b.tgt.to(logp.device)
    lp = logp.gather(-1, tgt[:, None])[:, 0]
    nll = torch.zeros(len(b.facts), dtype=torch.float64, device=lp.device).index_add_(
        0, b.owner.to(lp.device), -lp.double())
    first = b.first.to(lp.device)
    ok = logp[first].argmax(-1) == tgt[first]
    return nll.float().cpu(), ok.cpu()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Fallback(Exception):
    """The model does not run as a plain stack of decoder layers and a per-position head."""


class _Replay:
    """The probe's dense hidden states at every decoder layer's input, captured in one forward pass, with
    the arguments each layer receives (masks, position embeddings); `scores(l)` re-runs layers l.. only and
    the final norm and the output head at the answer positions only."""

    def __init__(self, model: nn.Module, encoded: list[tuple[list[int], int]], fqns: list[str],
                 max_tokens: int = 2048):
        from .sequential import decoder_layers

        try:
            self.prefix, self.layers = decoder_layers(model, fqns)
        except FascError:
            raise _Fallback("no numbered decoder layers") from None
        self.model = model
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise _Fallback("no output embeddings")
        self.dev = next(model.parameters()).device
        self.batches = _probe_batches(encoded, max_tokens)
        self.hidden: list[list[Tensor]] = []          # per batch, per layer: (B, W, d) input
        self.ctx: list[list[tuple[tuple, dict, bool]]] = []
        self.tail: list[nn.Module] = []
        self.base: list[tuple[Tensor, Tensor]] = []
        self._capture()

    def layer_of(self, fqn: str) -> int:
        return int(fqn[len(self.prefix) + 1:].split(".")[0])

    def _capture(self) -> None:
        L = len(self.layers)
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        leaves = [m for m in self.model.modules() if id(m) not in inside and m is not self.head
                  and not list(m.children())]
        for b in self.batches:
            hs: list = [None] * L
            ctx: list = [None] * L
            state = {"after": False, "tail": [], "last": None, "z": None}

            def pre(i):
                def hook(mod, args, kwargs):
                    kw = dict(kwargs)
                    if args:
                        hs[i], ctx[i] = args[0].detach(), (tuple(args[1:]), kw, True)
                    else:
                        hs[i] = kw.pop("hidden_states").detach()
                        ctx[i] = ((), kw, False)
                return hook

            def last(mod, args, out):
                state["last"] = _first(out).detach()
                state["after"] = True

            def leaf(mod, args, out):
                if state["after"]:
                    state["tail"].append(mod)

            def head(mod, args):
                state["z"] = args[0].detach()
                state["after"] = False

            handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
            handles.append(self.layers[L - 1].register_forward_hook(last))
            handles += [m.register_forward_hook(leaf) for m in leaves]
            handles.append(self.head.register_forward_pre_hook(head))
            try:
                logits = self.model(input_ids=b.ids.to(self.dev), attention_mask=b.mask.to(self.dev),
                                    use_cache=False).logits
            finally:
                for h in handles:
                    h.remove()
            if any(h is None for h in hs) or state["last"] is None or state["z"] is None:
                raise _Fallback("a decoder layer or the head did not run")
            if not self.tail:
                self.tail = state["tail"]
            elif [id(m) for m in self.tail] != [id(m) for m in state["tail"]]:
                raise _Fallback("the final modules differ between batches")
            rows, pos = b.rows.to(self.dev), b.pos.to(self.dev)
            z = self._tail(state["last"][rows, pos])
            if z.shape != state["z"][rows, pos].shape or not torch.allclose(z, state["z"][rows, pos], rtol=1e-4,
                                                                             atol=1e-5):
                raise _Fallback("the final norm is not a chain of modules")
            sel = self.head(z)
            if not torch.allclose(sel.float(), logits[rows, pos].float(), rtol=1e-3, atol=1e-3):
                raise _Fallback("the logits are post-processed after the head")
            self.hidden.append(hs)
            self.ctx.append(ctx)
            self.base.append(_scores(sel, b))

    def _tail(self, h: Tensor) -> Tensor:
        for m in self.tail:
            h = _first(m(h))
        return h

    def scores(self, start: int) -> list[tuple[Tensor, Tensor]]:
        """Per batch (nll, first-token top-1) with layers `start`.. re-run on the captured inputs."""
        out = []
        for b, hs, ctx in zip(self.batches, self.hidden, self.ctx):
            h = hs[start]
            for i in range(start, len(self.layers)):
                args, kw, positional = ctx[i]
                h = _first(self.layers[i](h, *args, **kw) if positional else self.layers[i](hidden_states=h, **kw))
            rows, pos = b.rows.to(self.dev), b.pos.to(self.dev)
            out.append(_scores(self.head(self._tail(h[rows, pos])), b))
        return out

    def gather(self, per_batch: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
        nll = torch.empty(n, dtype=torch.float32)
        ok = torch.empty(n, dtype=torch.bool)
        for b, (x, y) in zip(self.batches, per_batch):
            idx = torch.tensor(b.facts)
            nll[idx], ok[idx] = x, y
        return nll, ok


# ---------------------------------------------------------------------- measurement (exact)
def knowledge_map(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
                  plan: Plan | None = None, share: float | None = None, method: str = "fasc",
                  modules: list[str] | None = None, factors: dict[str, tuple[Tensor, Tensor]] | None = None,
                  batch_size: int = 32, progress: Callable[[int, int], object] | None = None,
                  engine: str = "auto") -> KnowledgeMap:
    """Measure the knowledge map (see the module docstring), exactly.

    Args:
        model: the uncompressed model `an` was built on; each module is swapped for its rank-k
            version in place and restored (in `finally`), so the model is left as it was.
        an: the analysis giving the factors.
        examples: the probe.
        plan: measure each planned module at its planned rank and method; or
        share: measure every module at the uniform parameter share `share` with `method`.
        modules: only these modules of the map (e.g. from `select_modules`); all by default.
        factors: {fqn: (U, V)} from `map_factors` (shared with the fast map); without them each
            module is decomposed when it is measured (one module's factors in memory at a time).
        progress: called (done, total) after each evaluation (total = modules + 1); returning
            False cancels (FascError, the model restored).
        engine: 'replay' — the probe's hidden states at each layer's input are captured once and, for a
            module of layer l, only layers l.. re-run, the output head at the answer positions only;
            'loop' — a full forward of the padded probe per module (the reference); 'auto' — replay
            where the model is a plain stack of decoder layers (checked on the probe), else loop.
    """
    fqns, ranks, methods = _targets(an, plan, share, method)
    if modules is not None:
        fqns, ranks, methods = _subset(fqns, ranks, methods, modules)
    encoded = encode_probe(tokenizer, examples)
    if engine not in ("auto", "replay", "loop"):
        raise FascError(f"Unknown map engine {engine!r}; choose auto, replay or loop.")
    total = len(fqns) + 1

    def tick(done: int) -> None:
        if progress is not None and progress(done, total) is False:
            raise FascError("Knowledge map cancelled; nothing was stored.")

    mods = dict(model.named_modules())
    for f in fqns:
        if f not in mods or not hasattr(mods[f], "weight"):
            raise FascError(f"Module {f} is not a dense layer in this model (already compressed?); measure the map "
                            f"on the uncompressed model.")
    nll = torch.empty(len(fqns), len(encoded), dtype=torch.float32)
    ok = torch.empty(len(fqns), len(encoded), dtype=torch.bool)
    with torch.no_grad(), eval_mode(model):
        rep = None
        if engine != "loop":
            try:
                rep = _Replay(model, encoded, fqns)
            except _Fallback as e:
                if engine == "replay":
                    raise FascError(f"This model cannot be re-run layer by layer ({e}); use engine='loop'.") from None
        if rep is not None:
            base_nll, base_ok = rep.gather(rep.base, len(encoded))
        else:
            base_nll, base_ok = answer_scores(model, encoded, batch_size)
        tick(1)
        for j, f in enumerate(fqns):
            old = mods[f]
            # without shared factors, one module's at a time (memory of one module, as compress_ would)
            U, V = factors[f] if factors is not None else map_factors(an, [f], [methods[j]], [ranks[j]])[f]
            replace_module(model, f, dense_module(old, U @ V.T))
            try:
                if rep is not None:
                    nll[j], ok[j] = rep.gather(rep.scores(rep.layer_of(f)), len(encoded))
                else:
                    nll[j], ok[j] = answer_scores(model, encoded, batch_size)
            finally:
                replace_module(model, f, old)
            tick(j + 2)
    return KnowledgeMap(fqns, ranks, methods, base_nll, base_ok, nll, ok)


def _subset(fqns: list[str], ranks: list[int], methods: list[str], modules: list[str]):
    unknown = [f for f in modules if f not in fqns]
    if unknown:
        raise FascError(f"Module {unknown[0]} is not in the map's modules; choose among the {len(fqns)} it measures.")
    if not modules:
        raise FascError("The chosen subset of modules is empty; pick at least one module.")
    keep = set(modules)
    idx = [i for i, f in enumerate(fqns) if f in keep]
    return [fqns[i] for i in idx], [ranks[i] for i in idx], [methods[i] for i in idx]


# ---------------------------------------------------------------------- the fast map (one pass)
FAST_PREDICTORS = {
    "first_fisher": "Σ_t g_tᵀ ΔW x_t + ½ Σ_t (g_tᵀ ΔW x_t|T)² per fact (first order + coupled Fisher at T)",
    "fisher_token": "½ Σ_t (g_tᵀ ΔW x_t|T)² per fact (coupled Fisher on the answers at T)",
    "fisher_fact": "½ (Σ_t g_tᵀ ΔW x_t|T)² per fact (Fisher of the fact's own gradient at T)",
    "first_order": "Σ_t g_tᵀ ΔW x_t per fact (first order)",
    "first_second": "first order + ½ (its square)",
}
# first order of the loss measured (T = 1) plus the curvature at the calibration's temperature: the best
# Spearman with the exact map over both built-in models together (BENCHMARKS.md); Fisher alone ranks the
# demo's saturated facts as well but SmolLM2's worse
DEFAULT_FAST = "first_fisher"


@dataclass
class FastMap:
    """The knowledge map predicted from one forward and backward pass over the probe.

    With ΔW_j = W'_j − W_j the module's compression at the map's rank and g_t the gradient of the fact's
    answer loss (teacher-forced) at the module's output, per fact i:
        s[j, i] = Σ_{t ∈ i} g_tᵀ ΔW_j x_t      (the first-order change of −log P(answer_i))
        q[j, i] = Σ_{t ∈ i} (g_tᵀ ΔW_j x_t)²   (½ q: the coupled Fisher estimate of spec §2 on the answers)
    s, q with the loss itself (T = 1); s_t, q_t with the loss at `temperature` (CE(logits/T), which counters
    the saturated gradients of facts known with p ≈ 1, spec §1; the same tensors when T = 1).
    Attributes: fqns, ranks, methods as in `KnowledgeMap`; s, q, s_t, q_t (M, F) float32; base_nll (F,);
    temperature; forward_seconds / forward_flops: the dense forward part of the pass (for time estimates)."""

    fqns: list[str]
    ranks: list[int]
    methods: list[str]
    s: Tensor
    q: Tensor
    s_t: Tensor
    q_t: Tensor
    base_nll: Tensor
    temperature: float
    forward_seconds: float = math.nan
    forward_flops: float = math.nan

    @property
    def n_facts(self) -> int:
        return int(self.base_nll.numel())

    def predicted(self, name: str = DEFAULT_FAST) -> Tensor:
        """(M,) the predicted knowledge loss of compressing each module alone (nats per fact)."""
        s, st = self.s.double(), self.s_t.double()
        qt = self.q_t.double()
        if name not in FAST_PREDICTORS:
            raise FascError(f"Unknown fast predictor {name!r}; choose one of {', '.join(FAST_PREDICTORS)}.")
        return {"first_fisher": lambda: (s + 0.5 * qt).mean(1), "fisher_token": lambda: 0.5 * qt.mean(1),
                "fisher_fact": lambda: 0.5 * (st * st).mean(1), "first_order": lambda: s.mean(1),
                "first_second": lambda: (s + 0.5 * s * s).mean(1)}[name]()

    def values(self, name: str = DEFAULT_FAST) -> dict[str, float]:
        return dict(zip(self.fqns, self.predicted(name).tolist()))

    def save(self, path: Path) -> None:
        tensors = {k: getattr(self, k).float().contiguous() for k in ("s", "q", "s_t", "q_t", "base_nll")}
        meta = {"format": str(MAP_FORMAT), "kind": "fast", "fqns": json.dumps(self.fqns),
                "ranks": json.dumps(self.ranks), "methods": json.dumps(self.methods),
                "temperature": repr(float(self.temperature)), "forward_seconds": repr(float(self.forward_seconds)),
                "forward_flops": repr(float(self.forward_flops))}
        _save_atomic(tensors, meta, path)

    @classmethod
    def load(cls, path: Path) -> "FastMap":
        meta, t = _load_checked(path, "fast")
        fm = cls(json.loads(meta["fqns"]), json.loads(meta["ranks"]), json.loads(meta["methods"]), t["s"], t["q"],
                 t["s_t"], t["q_t"], t["base_nll"], float(meta["temperature"]), float(meta["forward_seconds"]),
                 float(meta["forward_flops"]))
        if any(x.shape != (len(fm.fqns), fm.n_facts) for x in (fm.s, fm.q, fm.s_t, fm.q_t)):
            raise FascError(f"{path.name} is damaged (shapes disagree); it will be computed again.")
        return fm


def fast_map(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
             plan: Plan | None = None, share: float | None = None, method: str = "fasc",
             temperature: float | None = None, factors: dict[str, tuple[Tensor, Tensor]] | None = None,
             max_tokens: int = 1024, progress: Callable[[int, int], object] | None = None) -> FastMap:
    """Predict the knowledge map from one forward and backward pass over the probe (see `FastMap`).

    Args as `knowledge_map`; `temperature`: of the answer loss whose gradients give s_t and q_t (default:
    the calibration's, which counters saturated gradients of facts known with p ≈ 1, spec §1; a second
    backward pass when it is not 1). The model's
    parameters are not changed (their `requires_grad` flags are restored); `progress` counts batches.
    Memory: every module's factors at once (about the compressed modules' parameters, float32), and one
    batch's ΔW x per module until its backward pass."""
    fqns, ranks, methods = _targets(an, plan, share, method)
    encoded = encode_probe(tokenizer, examples)
    T = float(an.stats.config.temperature if temperature is None else temperature)
    if not (math.isfinite(T) and T > 0):
        raise FascError(f"The fast map's temperature must be > 0, got {temperature!r}.")
    if factors is None:
        factors = map_factors(an, fqns, methods, ranks)
    mods = dict(model.named_modules())
    dev = next(model.parameters()).device
    batches = _probe_batches(encoded, max_tokens)
    M, F = len(fqns), len(encoded)
    acc_ = {k: torch.zeros(M, F, dtype=torch.float64) for k in ("s", "q", "s_t", "q_t")}
    base = torch.zeros(F, dtype=torch.float32)
    cur: dict = {}

    def hook(j: int, f: str):
        U, V = factors[f]
        bias = getattr(mods[f], "bias", None)

        def fwd(mod, args, out):
            if not out.requires_grad:
                return None
            with torch.no_grad():
                x = args[0]
                d = (x.to(V.dtype) @ V) @ U.T - (out - bias if bias is not None else out).to(U.dtype)   # ΔW x_t
            out.register_hook(lambda g: acc(j, g, d))
            return None
        return fwd

    def acc(j: int, g: Tensor, d: Tensor) -> None:
        mask = cur["mask"]
        r = (g.to(d.dtype) * d).sum(-1).reshape(mask.shape) * mask               # (B, W): g_tᵀ ΔW x_t
        idx, tag = cur["facts"], cur["tag"]
        acc_["s" + tag][j].index_add_(0, idx, r.sum(1).double().cpu())
        acc_["q" + tag][j].index_add_(0, idx, (r * r).sum(1).double().cpu())

    emb = model.get_input_embeddings()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    handles = [emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))]
    handles += [mods[f].register_forward_hook(hook(j, f)) for j, f in enumerate(fqns)]
    t_fwd, done = 0.0, 0
    keep_arg = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with eval_mode(model), torch.enable_grad():
            for b in batches:
                cur["mask"] = b.mask.to(dev).to(torch.float32)
                cur["facts"] = torch.tensor(b.facts)
                t0 = time.perf_counter()
                if keep_arg:   # logits at the answer positions only (their union over the batch's rows)
                    cols, inv = torch.unique(b.pos, return_inverse=True)
                    logits = model(input_ids=b.ids.to(dev), attention_mask=b.mask.to(dev), use_cache=False,
                                   logits_to_keep=cols.to(dev)).logits
                    sel = logits[b.rows.to(dev), inv.to(dev)].float()
                else:
                    logits = model(input_ids=b.ids.to(dev), attention_mask=b.mask.to(dev), use_cache=False).logits
                    sel = logits[b.rows.to(dev), b.pos.to(dev)].float()
                t_fwd += time.perf_counter() - t0
                with torch.no_grad():
                    nll, _ = _scores(sel.detach(), b)
                    base[torch.tensor(b.facts)] = nll
                # the loss itself (T = 1), then at T: one forward, a second backward only when T ≠ 1
                for tag, temp in [("", 1.0)] + ([("_t", T)] if T != 1.0 else []):
                    cur["tag"] = tag
                    lp = (sel / temp).log_softmax(-1).gather(-1, b.tgt.to(dev)[:, None])[:, 0]
                    (-lp.sum()).backward(retain_graph=T != 1.0 and tag == "")
                done += 1
                if progress is not None and progress(done, len(batches)) is False:
                    raise FascError("Fast knowledge map cancelled; nothing was stored.")
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    flops = forward_flops(model, encoded, fqns)
    if T == 1.0:
        acc_["s_t"], acc_["q_t"] = acc_["s"], acc_["q"]
    return FastMap(fqns, ranks, methods, *(acc_[k].float() for k in ("s", "q", "s_t", "q_t")), base, T, t_fwd, flops)


# ---------------------------------------------------------------------- cost, floor, estimates
def _layer_params(model: nn.Module, fqns: list[str]) -> tuple[list[int], int, int]:
    """(weights per decoder layer, output-head weights, hidden width): the matrix parameters each token meets."""
    from .sequential import decoder_layers

    try:
        _, layers = decoder_layers(model, fqns)
        per = [sum(p.numel() for p in layer.parameters() if p.dim() == 2) for layer in layers]
    except FascError:
        per = [sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)]
    head = model.get_output_embeddings()
    w = head.weight if head is not None else None
    return per, (w.numel() if w is not None else 0), (w.shape[-1] if w is not None else 0)


def forward_flops(model: nn.Module, encoded: list[tuple[list[int], int]], fqns: list[str]) -> float:
    """FLOPs of one dense forward of the probe (each fact alone, no padding, logits at every position):
    2 × matrix parameters per token per layer, attention 4·n²·d per layer, the head."""
    per, head, d = _layer_params(model, fqns)
    tok = sum(len(ids) - 1 for ids, _ in encoded)
    att = sum(4 * (len(ids) - 1) ** 2 * d for ids, _ in encoded)
    return float(sum(2 * p * tok + att for p in per) + 2 * head * tok)


def exact_flops(model: nn.Module, encoded: list[tuple[list[int], int]], fqns: list[str], modules: list[str],
                engine: str = "replay") -> float:
    """FLOPs of the exact map of `modules`: with 'replay', per module its layer and the ones after it and
    the head at the answer positions (the floor of the re-run); with 'loop', a full forward per module."""
    from .sequential import decoder_layers

    per, head, d = _layer_params(model, fqns)
    tok = sum(len(ids) - 1 for ids, _ in encoded)
    att = sum(4 * (len(ids) - 1) ** 2 * d for ids, _ in encoded)
    full = forward_flops(model, encoded, fqns)
    if engine == "loop":
        return full * (len(modules) + 1)
    ans = sum(len(ids) - s for ids, s in encoded)
    try:
        prefix, _ = decoder_layers(model, fqns)
    except FascError:
        return full * (len(modules) + 1)
    suffix = [0.0] * (len(per) + 1)
    for l in range(len(per) - 1, -1, -1):
        suffix[l] = suffix[l + 1] + 2 * per[l] * tok + att
    total = full
    for f in modules:
        total += suffix[int(f[len(prefix) + 1:].split(".")[0])] + 2 * head * ans
    return float(total)


def measure_gflops(model: nn.Module, encoded: list[tuple[list[int], int]], fqns: list[str],
                   max_tokens: int = 1024) -> float:
    """Achieved GFLOP/s of a dense no-grad forward over the probe's facts (evenly spaced, at most about
    `max_tokens` input tokens), batched as the map."""
    per = max(1.0, sum(len(ids) - 1 for ids, _ in encoded) / len(encoded))
    enc = probe_subset_encoded(encoded, max(1, int(max_tokens / per)))
    dev = next(model.parameters()).device
    batches = _probe_batches(enc)
    with torch.no_grad(), eval_mode(model):
        model(input_ids=batches[0].ids[:1].to(dev), attention_mask=batches[0].mask[:1].to(dev), use_cache=False)
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=b.ids.to(dev), attention_mask=b.mask.to(dev), use_cache=False)
        dt = time.perf_counter() - t0
    return forward_flops(model, enc, fqns) / max(dt, 1e-9) / 1e9


def probe_subset_encoded(encoded: list, n: int) -> list:
    if n >= len(encoded):
        return list(encoded)
    step = len(encoded) / n
    return [encoded[int(i * step)] for i in range(n)]


def estimate_seconds(model: nn.Module, encoded: list[tuple[list[int], int]], fqns: list[str], modules: list[str],
                     gflops: float) -> float:
    """Estimated wall time of the exact map of `modules` at `gflops` (e.g. `measure_gflops` or the fast map's)."""
    return exact_flops(model, encoded, fqns, modules) / max(gflops, 1e-9) / 1e9


def map_key(an: Analysis, encoded: list[tuple[list[int], int]], fqns: list[str], ranks: list[int],
            methods: list[str], extra: dict | None = None) -> str:
    """Content address: statistics key + subspace config + ranks/methods + probe token ids (+ `extra`,
    e.g. the fast map's temperature)."""
    probe = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()
    payload = {"stats": an.stats.key, "damping": an.cfg.damping, "gamma": an.cfg.gamma,
               "modules": [fqns, ranks, methods], "probe": probe, "format": MAP_FORMAT, **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _cache_folder(an: Analysis, root: Path | None) -> Path | None:
    return Path(root or cache.default_root()) / an.stats.key if an.stats.key else None


def _load_or_none(cls, path: Path | None):
    if path is not None and path.is_file():
        try:
            return cls.load(path)
        except Exception:  # noqa: BLE001 - a damaged map is measured again
            path.unlink(missing_ok=True)
    return None


def knowledge_map_cached(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
                         plan: Plan | None = None, share: float | None = None, method: str = "fasc",
                         modules: list[str] | None = None, factors: dict[str, tuple[Tensor, Tensor]] | None = None,
                         batch_size: int = 32, progress: Callable[[int, int], object] | None = None,
                         root: Path | None = None, cached_only: bool = False) -> tuple[KnowledgeMap | None, bool]:
    """(map, from_cache): stored beside the statistics' cache entry as `kmap-<key>.safetensors`
    (keyed by statistics, damping, γ, ranks, methods, the modules measured and the probe's token ids;
    written atomically). A subset (`modules`) is also cut from a stored map of every module.
    With `cached_only`, returns (None, False) instead of measuring."""
    fqns, ranks, methods = _targets(an, plan, share, method)
    encoded = encode_probe(tokenizer, examples)
    folder = _cache_folder(an, root)
    full = folder / f"kmap-{map_key(an, encoded, fqns, ranks, methods)}.safetensors" if folder else None
    path = full
    if modules is not None:
        sub = _subset(fqns, ranks, methods, modules)
        if sub[0] != fqns:
            km = _load_or_none(KnowledgeMap, full)
            if km is not None:
                return km.subset(sub[0]), True
            path = folder / f"kmap-{map_key(an, encoded, *sub)}.safetensors" if folder else None
    km = _load_or_none(KnowledgeMap, path)
    if km is not None:
        return km, True
    if cached_only:
        return None, False
    km = knowledge_map(model, tokenizer, an, examples, plan=plan, share=share, method=method, modules=modules,
                       factors=factors, batch_size=batch_size, progress=progress)
    if path is not None and folder.is_dir():
        km.save(path)
    return km, False


FACTORS_MAX_BYTES = 1 << 30   # factors larger than this (big models) are recomputed, not stored


def map_factors_cached(an: Analysis, fqns: list[str], methods: list[str], ranks: list[int],
                       progress: Callable[[int, int], object] | None = None, root: Path | None = None,
                       ) -> tuple[dict[str, tuple[Tensor, Tensor]], bool]:
    """(`map_factors`, from_cache): stored beside the statistics as `factors-<key>.safetensors` (keyed by
    statistics, damping, γ, modules, ranks and methods; written atomically) when they take at most
    `FACTORS_MAX_BYTES`, so a later fast or exact map in another process decomposes nothing."""
    folder = _cache_folder(an, root)
    payload = {"stats": an.stats.key, "damping": an.cfg.damping, "gamma": an.cfg.gamma,
               "modules": [fqns, ranks, methods], "format": MAP_FORMAT, "factors": True}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"factors-{key}.safetensors" if folder else None
    if path is not None and path.is_file():
        try:
            t = load_file(str(path))
            out = {f: (t[f"{f}.U"], t[f"{f}.V"]) for f in fqns}
            for f, (U, V) in out.items():
                dev, dt = an.module_place(f)
                out[f] = (U.to(dev), V.to(dev))
            return out, True
        except Exception:  # noqa: BLE001 - a damaged entry is computed again
            path.unlink(missing_ok=True)
    out = map_factors(an, fqns, methods, ranks, progress=progress)
    size = sum(U.numel() * U.element_size() + V.numel() * V.element_size() for U, V in out.values())
    if path is not None and folder.is_dir() and size <= FACTORS_MAX_BYTES:
        tensors = {f"{f}.{n}": x.detach().cpu().contiguous() for f, (U, V) in out.items() for n, x in (("U", U), ("V", V))}
        _save_atomic(tensors, {"format": str(MAP_FORMAT), "kind": "factors"}, path)
    return out, False


def fast_map_cached(model: nn.Module, tokenizer, an: Analysis, examples: list[Example], *,
                    plan: Plan | None = None, share: float | None = None, method: str = "fasc",
                    temperature: float | None = None, factors: dict[str, tuple[Tensor, Tensor]] | None = None,
                    progress: Callable[[int, int], object] | None = None, root: Path | None = None,
                    cached_only: bool = False) -> tuple[FastMap | None, bool]:
    """(fast map, from_cache), stored as `fmap-<key>.safetensors` beside the statistics (as
    `knowledge_map_cached`; the key adds the temperature)."""
    fqns, ranks, methods = _targets(an, plan, share, method)
    encoded = encode_probe(tokenizer, examples)
    T = float(an.stats.config.temperature if temperature is None else temperature)
    folder = _cache_folder(an, root)
    path = folder / f"fmap-{map_key(an, encoded, fqns, ranks, methods, {'fast': T})}.safetensors" if folder else None
    fm = _load_or_none(FastMap, path)
    if fm is not None:
        return fm, True
    if cached_only:
        return None, False
    fm = fast_map(model, tokenizer, an, examples, plan=plan, share=share, method=method, temperature=T,
                  factors=factors, progress=progress)
    if path is not None and folder.is_dir():
        fm.save(path)
    return fm, False


def fast_vs_exact(fm: FastMap, km: KnowledgeMap) -> list[dict]:
    """Spearman of each fast predictor (and its default) with the exact map, over the modules both hold."""
    common = [f for f in km.fqns if f in set(fm.fqns)]
    kl = dict(zip(km.fqns, km.knowledge_loss().tolist()))
    rd = dict(zip(km.fqns, km.recall_drop().tolist()))
    out = []
    for name, what in FAST_PREDICTORS.items():
        v = fm.values(name)
        out.append({"predictor": name, "what": what, "default": name == DEFAULT_FAST,
                    "spearman_knowledge_loss": spearman([v[f] for f in common], [kl[f] for f in common]),
                    "spearman_recall_drop": spearman([v[f] for f in common], [rd[f] for f in common]),
                    "n_modules": len(common)})
    return out


# ---------------------------------------------------------------------- predictors
def fisher_energy(stats: CalibStats) -> dict[str, float]:
    """E_j = ½ tr(C_h C_x) per module: the decoupled predicted loss of removing it (spec §2, M = 0),
    nats per statistics token. Undamped; O(n²) per module, no decomposition."""
    out = {}
    for f in stats.fqns:
        C_x = stats.cx[stats.group[f]].to(LINALG_DTYPE)
        C_h = stats.ch[f].to(LINALG_DTYPE)
        out[f] = 0.5 * float((C_h * C_x.T).sum())
    return out


def energy_shares(energy: dict[str, float]) -> dict[str, float]:
    tot = sum(max(v, 0.0) for v in energy.values())
    return {f: (max(v, 0.0) / tot if tot > 0 else 0.0) for f, v in energy.items()}


def focus_ratio(facts: dict[str, float], general: dict[str, float]) -> dict[str, float]:
    """Each module's share of the facts' Fisher energy over its share of the general text's
    (1 = as much as for language in general; > 1 = the loss of facts concentrates here)."""
    sf, sg = energy_shares(facts), energy_shares(general)
    return {f: (sf[f] / sg[f] if sg.get(f, 0) > 0 else math.nan) for f in sf}


def answer_config(cfg: CalibConfig, encoded: list[tuple[list[int], int]]) -> CalibConfig:
    """The general calibration config moved onto the probe: loss on the answers only, a token budget
    that holds the facts given (each fact one row, cut at `seq_len`)."""
    n = sum(min(len(ids), cfg.seq_len) for ids, _ in encoded)
    return replace(cfg, targets="answers", n_tokens=max(n, 2), layers=None)


def facts_within(tokenizer, examples: list[Example], n_tokens: int) -> list[Example]:
    """The most facts, evenly spaced through the probe, whose tokens fit in `n_tokens` (the general
    calibration's budget: the fact-focused statistics are not estimated from more data)."""
    lengths = [len(ids) for ids, _ in encode_probe(tokenizer, examples)]
    if sum(lengths) <= n_tokens:
        return list(examples)
    lo, hi = 1, len(examples)
    while lo < hi:  # largest m whose evenly spaced subset fits
        m = (lo + hi + 1) // 2
        step = len(examples) / m
        if sum(lengths[int(i * step)] for i in range(m)) <= n_tokens:
            lo = m
        else:
            hi = m - 1
    return probe_subset(examples, lo)


def spearman(a, b) -> float:
    """Spearman rank correlation (ties get average ranks; Pearson of the ranks). NaN when fewer than
    3 pairs or either side is constant. Pairs with a NaN on either side are dropped."""
    x = torch.as_tensor(list(a), dtype=torch.float64)
    y = torch.as_tensor(list(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}.")
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(torch.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of x, ties sharing their average rank. (n,) -> (n,) float64."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def predictor_table(km: KnowledgeMap, an: Analysis, energy_general: dict[str, float] | None = None,
                    energy_facts: dict[str, float] | None = None,
                    sketch_fisher: dict[str, Tensor] | None = None) -> list[dict]:
    """Spearman of each statistic with the measured map (knowledge loss and recall drop), over the
    map's modules. A statistic not available (ρ along Fisher directions not measured — from
    `sketch_fisher` or the statistics' own —, no probe calibration) is left out."""
    kl, rd = km.knowledge_loss().tolist(), km.recall_drop().tolist()
    stats: list[tuple[str, list[float]]] = [
        ("ρ (random directions)", [an.rho(f)[0] for f in km.fqns])]
    if all(an.rho_fisher(f, sketch_fisher) is not None for f in km.fqns):
        stats.append(("ρ along Fisher directions", [an.rho_fisher(f, sketch_fisher)[0] for f in km.fqns]))
    stats.append(("predicted ΔL at the map's ranks",
                  [an.predicted(f, m, k) for f, m, k in zip(km.fqns, km.methods, km.ranks)]))
    if energy_general is not None:
        stats.append(("Fisher energy, general text", [energy_general[f] for f in km.fqns]))
    if energy_facts is not None:
        stats.append(("Fisher energy, probe answers", [energy_facts[f] for f in km.fqns]))
    if energy_general is not None and energy_facts is not None:
        ratio = focus_ratio(energy_facts, energy_general)
        stats.append(("facts/general energy share", [ratio[f] for f in km.fqns]))
    return [{"statistic": name, "spearman_knowledge_loss": spearman(v, kl),
             "spearman_recall_drop": spearman(v, rd), "n_modules": len(v)} for name, v in stats]


def probe_calibration(model: nn.Module, tokenizer, examples: list[Example], cfg: CalibConfig,
                      progress: Callable[[int, int], object] | None = None,
                      root: Path | None = None) -> tuple[CalibStats, bool]:
    """(statistics, from_cache) of the probe with the loss on its answers only (`answer_config`),
    through the same content-addressed cache as any calibration. At most `cfg.n_tokens` tokens of
    facts (evenly spaced through the probe, `facts_within`)."""
    from .data import make_batches
    from .pipeline import calibrate_cached

    examples = facts_within(tokenizer, examples, cfg.n_tokens)
    acfg = answer_config(cfg, encode_probe(tokenizer, examples))
    batches = make_batches(tokenizer, list(examples), acfg, name="the probe")
    return calibrate_cached(model, batches, acfg, progress=progress, root=root)
