"""Sequential (error-aware) compression (spec §5).

Layers are compressed in order. For each layer l, two streams of hidden states run through the
calibration batches side by side: the dense model's (X) and the partly compressed model's (X̃,
layers < l already compressed). Within the layer, modules are compressed in execution order, one
input group at a time (q/k/v, then o, then gate/up, then down), so each module is fitted to the
inputs it will really see. Per group, over the calibration tokens (streaming, no per-token storage):
    C_x̃x̃ = E[x̃ x̃ᵀ]  and  C_xx̃ = E[x x̃ᵀ]            (n×n each, float64)
The right factor V is the method's own (recomputed on C_x̃x̃ with `rebasis`, C_h staying the dense
model's), and the left factor is the closed-form least-squares refit (SVD-LLM's update)
    U = argmin_U E‖W x − U Vᵀ x̃‖² = W C_xx̃ V (Vᵀ C_x̃x̃,δ V)⁻¹.
Weighting the output error by any positive-definite C_g (the Fisher-weighted objective of spec §2)
gives the same U, so the refit serves every method. Predicted ΔL stays that of the plan.

Cost: two forward passes of the model over the calibration text (one dense, one compressed, layer by
layer; hidden states of both streams are kept, 2 × tokens × d floats), plus, per layer, a partial
layer forward per input group. Gradient statistics are not recollected (that would take a full
backward pass per layer).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from .allocate import Plan, is_factored, validate_plan
from .analysis import Analysis
from .calibrate import Cancelled
from .data import Batch
from .errors import FascError
from .layers import LowRankLinear
from .linalg import LINALG_DTYPE, damp
from .stats import CalibStats
from .surgery import dense_module, replace_module


def refit_left(W: Tensor, V: Tensor, C_cross: Tensor, C_tt: Tensor, damping: float = 1e-4) -> Tensor:
    """Least-squares left factor U = W C_xx̃ V (Vᵀ C_x̃x̃,δ V)⁻¹ (spec §5), float64.

    Args:
        W: (m, n) dense weight.
        V: (n, k) right factor (W' = U Vᵀ).
        C_cross: (n, n) E[x x̃ᵀ], dense inputs x against the compressed model's inputs x̃.
        C_tt: (n, n) E[x̃ x̃ᵀ]; damped by δ·tr/n (a ridge) before the k×k solve.
    Returns:
        U (m, k) minimising E‖W x − U Vᵀ x̃‖² (+ ridge).
    """
    W, V = W.to(LINALG_DTYPE), V.to(LINALG_DTYPE)
    G = V.T @ damp(C_tt.to(LINALG_DTYPE), damping) @ V            # (k, k) SPD
    R = W @ (C_cross.to(LINALG_DTYPE) @ V)                         # (m, k)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(R.T, L).T
    return torch.linalg.lstsq(G, R.T).solution.T                   # rank-deficient V: least-norm fallback


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, attention_mask: Tensor,
                 missing: str) -> tuple[Tensor, list[tuple[tuple, dict]]]:
    """One forward pass of `model`, stopped at its last decoder block: the first block's input hidden
    states (detached) and, per block, the other arguments it receives (attention mask, position
    embeddings …; hidden states given by name are taken out of them). `missing` is the error when a
    block did not run (the model is not a plain block stack)."""
    per: list = [None] * len(blocks)
    first: list[Tensor] = []
    last = len(blocks) - 1

    def make(i):
        def hook(mod, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")   # positional or by name
            if i == 0:
                first.append(h.detach())
            per[i] = (tuple(args[1:]), kwargs)
            if i == last:
                raise _Stop
        return hook

    handles = [blk.register_forward_pre_hook(make(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    try:
        model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not first or any(c is None for c in per):
        raise FascError(missing)
    return first[0], per


def decoder_layers(model: nn.Module, fqns: list[str]) -> tuple[str, nn.ModuleList]:
    """(prefix, ModuleList) of the numbered decoder layers holding `fqns` (e.g. 'model.layers')."""
    mods = dict(model.named_modules())
    for f in fqns:
        parts = f.split(".")
        for i, p in enumerate(parts):
            parent = ".".join(parts[:i])
            if p.isdigit() and isinstance(mods.get(parent), nn.ModuleList):
                return parent, mods[parent]
    raise FascError("Sequential compression needs the decoder layers in a numbered nn.ModuleList; this model has "
                    "none — compress without --sequential.")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _Streams:
    """Per batch: the layer's input hidden states of the dense and the compressed model, and the
    arguments every decoder layer receives (attention mask, position embeddings …), captured once."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, batches: list[Batch]):
        self.rows: list[Tensor] = []           # per batch: flat indices of counted tokens
        self.dense: list[Tensor] = []          # per batch: (B, L, d)
        self.comp: list[Tensor] = []
        self.ctx: list[list[tuple[tuple, dict]]] = []   # per batch, per layer: (extra args, kwargs)
        dev = next(model.parameters()).device
        for b in batches:
            h, per_layer = block_inputs(
                model, layers, b.input_ids.to(dev), b.attention_mask.to(dev),
                "Not every decoder layer ran in the calibration forward pass; sequential compression needs a "
                "plain layer stack — compress without --sequential.")
            self.dense.append(h)
            self.ctx.append(per_layer)
            self.rows.append(b.stat_mask.reshape(-1).nonzero().squeeze(1).to(dev))
        self.comp = [h.clone() for h in self.dense]

    def run(self, layer: nn.Module, l: int, b: int, h: Tensor) -> Tensor:
        args, kwargs = self.ctx[b][l]
        return _first(layer(h, *args, **kwargs))


def _capture(layer: nn.Module, module: nn.Module, streams: _Streams, l: int, b: int, h: Tensor) -> Tensor:
    """The input of `module` (tokens, n) when `layer` runs on h, up to that module only."""
    got = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise _Stop
    handle = module.register_forward_pre_hook(hook)
    try:
        streams.run(layer, l, b, h)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise FascError("A planned module did not run in its layer's forward pass; compress without --sequential.")
    x = got[0]
    return x.reshape(-1, x.shape[-1]).index_select(0, streams.rows[b]).to(LINALG_DTYPE)


def _new_module(old: nn.Module, info, k: int, U: Tensor, V: Tensor, merge: bool, factors: str) -> nn.Module:
    if merge or not is_factored(info, k, factors):
        return dense_module(old, U @ V.T)
    dev = old.weight.device
    return LowRankLinear.from_factors(U.to(dev), V.to(dev), None if old.bias is None else old.bias.detach(),
                                      dtype=old.weight.dtype)


def _execution_order(layer: nn.Module, names: list[str], streams: _Streams, l: int, h: Tensor) -> list[str]:
    """`names` (relative to the layer) sorted by when they first run in a forward of the layer."""
    order: list[str] = []
    sub = dict(layer.named_modules())
    handles = [sub[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        with torch.no_grad():
            streams.run(layer, l, 0, h)
    finally:
        for hd in handles:
            hd.remove()
    return order + [n for n in names if n not in order]


def compress_sequential_(model: nn.Module, an: Analysis, plan: Plan, batches: list[Batch], *,
                         rebasis: bool = True, refit: bool = True, merge: bool = False,
                         progress: Callable[[int, int], object] | None = None) -> None:
    """Compress `model` in place (returns None), layer by layer, each module fitted to its real inputs.

    Args:
        model: a fresh copy of the model `an` was built on (dense at the planned modules).
        an: the analysis of the dense model (its C_h, γ, damping; its weights are the targets W).
        plan: ranks and methods, as for `compress_`.
        batches: the calibration batches (statistics over their counted tokens).
        rebasis: recompute each module's basis on C_x̃x̃ (the compressed model's inputs); False keeps
            the dense model's V and only refits U.
        refit: refit U by least squares against the dense outputs W x (undoing upstream error);
            False takes the method's own U from C_x̃x̃ (each module fitted to its new inputs x̃ alone,
            the spec's "statistics collected on the partly compressed model"; needs `rebasis`).
        merge: store dense W' = U Vᵀ everywhere (as `compress_(merge=True)`).
        progress: called as progress(layers_done, layers); returning False cancels (`Cancelled`),
            leaving the model as it was.
    Modules at full rank keep their weight. On any error the model is restored.
    """
    validate_plan(plan, an)
    if not (rebasis or refit):
        raise FascError("Sequential compression with neither rebasis nor refit is one-shot compression; use "
                        "fasc.compress_.")
    batches = list(batches)
    if not batches:
        raise FascError("Sequential compression needs calibration batches; pass the calibration data.")
    mods = dict(model.named_modules())
    for f in plan.ranks:
        if f not in mods or not hasattr(mods[f], "weight") or isinstance(mods[f], LowRankLinear):
            raise FascError(f"Module {f} is not a dense layer in this model (already compressed?); compress a "
                            f"fresh copy of the model.")
    prefix, layers = decoder_layers(model, list(plan.ranks))
    by_layer: dict[int, list[str]] = {}
    for f in plan.ranks:
        rest = f[len(prefix) + 1:]
        idx, _, rel = rest.partition(".")
        by_layer.setdefault(int(idx), []).append(rel)
    last = max(by_layer)
    swapped: dict[str, nn.Module] = {}
    training = {n: m.training for n, m in model.named_modules()}
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    model.eval()
    try:
        with torch.no_grad():
            streams = _Streams(model, layers, batches)
            if progress is not None and progress(0, last + 1) is False:
                raise Cancelled("Sequential compression cancelled; the model is unchanged.")
            for l in range(last + 1):
                layer = layers[l]
                names = by_layer.get(l, [])
                if names:
                    dense_layer = copy.deepcopy(layer)
                    _compress_layer(model, an, plan, streams, l, f"{prefix}.{l}", layer, dense_layer, names,
                                    rebasis, refit, merge, swapped)
                else:
                    dense_layer = layer
                if l < last:
                    for b in range(len(batches)):
                        streams.dense[b] = streams.run(dense_layer, l, b, streams.dense[b])
                        streams.comp[b] = streams.run(layer, l, b, streams.comp[b])
                del dense_layer
                if progress is not None and progress(l + 1, last + 1) is False:
                    raise Cancelled("Sequential compression cancelled; the model is unchanged.")
    except BaseException:
        for f, old in swapped.items():
            replace_module(model, f, old)
        raise
    finally:
        for n, m in model.named_modules():
            if n in training:
                m.training = training[n]
        if use_cache is not None:
            model.config.use_cache = use_cache


def _compress_layer(model, an: Analysis, plan: Plan, streams: _Streams, l: int, layer_fqn: str,
                    layer: nn.Module, dense_layer: nn.Module, names: list[str], rebasis: bool, refit: bool,
                    merge: bool, swapped: dict[str, nn.Module]) -> None:
    """Compress the planned modules `names` of one layer, one input group at a time."""
    stats = an.stats
    order = _execution_order(dense_layer, names, streams, l, streams.dense[0])
    groups: dict[str, list[str]] = {}
    for rel in order:
        groups.setdefault(stats.group[f"{layer_fqn}.{rel}"], []).append(rel)
    dense_sub = dict(dense_layer.named_modules())
    for rels in groups.values():
        live = dict(layer.named_modules())
        n = an.info(f"{layer_fqn}.{rels[0]}").in_features
        C_tt = torch.zeros(n, n, dtype=LINALG_DTYPE)
        C_cross = torch.zeros(n, n, dtype=LINALG_DTYPE)
        N = 0
        for b in range(len(streams.dense)):
            x = _capture(dense_layer, dense_sub[rels[0]], streams, l, b, streams.dense[b]).cpu()
            xt = _capture(layer, live[rels[0]], streams, l, b, streams.comp[b]).cpu()
            C_tt.addmm_(xt.T, xt)
            C_cross.addmm_(x.T, xt)
            N += x.shape[0]
        if N == 0:
            raise FascError("The calibration batches hold no counted tokens; give a longer calibration text.")
        C_tt, C_cross = C_tt / N, C_cross / N
        C_tt = (C_tt + C_tt.T) / 2
        sub_an = _input_analysis(model, an, [f"{layer_fqn}.{r}" for r in rels], C_tt, N) if rebasis else an
        for rel in rels:
            f = f"{layer_fqn}.{rel}"
            info, k = an.info(f), plan.ranks[f]
            if k >= info.max_rank:
                continue                                             # kept whole: nothing to fit
            U, V = sub_an.factors(f, plan.methods[f], k)
            if refit:  # float64, whatever the analysis' linear-algebra dtype (`--linalg-dtype float32`)
                U = refit_left(an.weight(f), V, C_cross, C_tt, an.cfg.damping)
                V = V.to(U.dtype)
            if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
                raise FascError(f"Non-finite factors for {f} in sequential compression; raise --damping or "
                                f"compress without --sequential.")
            old = live[rel]
            replace_module(model, f, _new_module(old, info, k, U, V, merge, plan.factors))
            swapped[f] = old


def _input_analysis(model: nn.Module, an: Analysis, fqns: list[str], C_tt: Tensor, N: int) -> Analysis:
    """An Analysis of `fqns` (one input group) with C_x replaced by the compressed model's C_x̃x̃."""
    st = an.stats
    g = st.group[fqns[0]]
    sub = CalibStats(modules=[st.info(f) for f in fqns], group={f: g for f in fqns}, cx={g: C_tt},
                     ch={f: st.ch[f] for f in fqns}, fw={f: st.fw[f] for f in fqns},
                     sketch={f: st.sketch[f] for f in fqns if f in st.sketch}, n_tokens=N, config=st.config)
    return Analysis(model, sub, an.cfg, linalg=an.linalg)
