"""Streaming calibration (spec §1): forward + backward over text, hooks that accumulate statistics.

One `Calibrator` owns every hook (keyed by FQN) and removes them in `__exit__`, whatever happens.
Per batch and per module, with X (tokens, n) the inputs, G (tokens, m) the output gradients and
H = G W (tokens, n) the input gradients through this module alone (taken from autograd's grad_input):
    C_x[group] += XᵀX,  C_h += HᵀH,  r += (G²)ᵀ ‖X‖²,  sketch += Σ (XΩ)², (HΩ)², (XΩ)²(HΩ)².
Only positions in the batch's statistics mask count. Parameters' `requires_grad` is switched off for
the run (no weight gradients are computed: only activation gradients flow) and restored afterwards.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CalibConfig
from .data import Batch, data_fingerprint, next_tokens
from .errors import Cancelled, FascError
from .linalg_device import resolve_device
from .model_state import calibration_state
from .modules import ModuleInfo, find_linears, model_fingerprint, weight_matrix
from .stats import CalibStats

log = logging.getLogger("fasc")

ProgressFn = Callable[[int, int], None]  # progress(done, total)


def stats_dtypes(cfg: CalibConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(product dtype, accumulator dtype). 'auto': on CPU each batch's XᵀX is a float32 product
    added into a float64 sum (half the cost of float64 products, float64 accumulation across
    batches); on GPU both float32 (TF32 off)."""
    if cfg.stats_dtype == "float64":
        return torch.float64, torch.float64
    if cfg.stats_dtype == "float32" or device.type == "cuda":
        return torch.float32, torch.float32
    return torch.float32, torch.float64


def sketch_directions(n: int, s: int, seed: int, dtype=torch.float64) -> Tensor:
    """s random Gaussian unit directions in R^n, (n, s), reproducible from (seed, n) (spec §4)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    om = torch.randn(n, s, generator=g, dtype=torch.float64)
    return (om / om.norm(dim=0, keepdim=True)).to(dtype)


def gram_blocks(n: int) -> list[int]:
    """Edges of the column blocks used for the upper-triangular Gram product (≈ 400 wide, ≤ 4)."""
    nb = max(1, min(4, n // 384))
    return [round(i * n / nb) for i in range(nb + 1)]


def _add_gram_(C: Tensor, X: Tensor) -> None:
    """Upper block triangle of C (n,n) += XᵀX for X (tokens, n), products in X's dtype summed in C's.

    Only blocks on or above the diagonal are computed (≈ (b+1)/2b of the full product for b
    blocks); `symmetrize_blocks_` fills the lower triangle once at the end.
    """
    e = gram_blocks(X.shape[1])
    for i in range(len(e) - 1):
        Xi = X[:, e[i]:e[i + 1]]
        P = Xi.T @ X[:, e[i]:]
        C[e[i]:e[i + 1], e[i]:] += P if P.dtype == C.dtype else P.to(C.dtype)


def symmetrize_blocks_(C: Tensor) -> Tensor:
    """Fill the lower block triangle from the upper one written by `_add_gram_`, in place (no copy
    of the n×n matrix: the statistics' peak memory is the accumulators themselves). Returns C."""
    e = gram_blocks(C.shape[0])
    for i in range(len(e) - 1):
        for j in range(i + 1, len(e) - 1):
            C[e[j]:e[j + 1], e[i]:e[i + 1]] = C[e[i]:e[i + 1], e[j]:e[j + 1]].T
    return C


class Calibrator:
    """Context manager that hooks the target modules and accumulates statistics.

    Args:
        model: a causal LM (transformers `PreTrainedModel` or any module returning `.logits`).
        cfg: calibration config.
        modules: the modules to hook (default: all compressible ones, restricted to `cfg.layers`).
        directions: fqn -> (n, s) unit directions for the ρ sketch instead of random ones.
        covariances: collect C_x, C_h and r (False = only the ρ sketch, for the Fisher-direction pass).
    """

    def __init__(self, model: nn.Module, cfg: CalibConfig, modules: list[ModuleInfo] | None = None,
                 directions: dict[str, Tensor] | None = None, covariances: bool = True):
        self.model, self.cfg = model, cfg
        mods = modules if modules is not None else find_linears(model)
        if cfg.layers is not None:
            mods = [i for i in mods if i.layer in cfg.layers]
            if not mods:
                raise FascError(f"No compressible modules in layers {list(cfg.layers)}; the model has layers "
                                f"0..{max(i.layer for i in find_linears(model))}.")
        self.infos = mods
        self.directions = directions
        self.covariances = covariances
        self._handles: list = []
        self._state = None  # the ExitStack restoring the model (eval mode, KV cache, grads, TF32)
        self.n_tokens_ = 0
        self.group_: dict[str, str] = {}
        self._first_step = True
        self._reduced = False
        self._done = False
        self._fired: set[str] = set()

    # ---------------------------------------------------------------- state
    def __enter__(self) -> "Calibrator":
        model = self.model
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # without a known embedding, let every gradient flow; else only activation gradients
        self._state = calibration_state(model, trainable=emb is None)
        try:
            self._setup(emb)
        except BaseException:
            self._restore()
            raise
        return self

    def _setup(self, emb: nn.Module | None) -> None:
        model = self.model
        if emb is not None:
            self._handles.append(emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
        mods = dict(model.named_modules())
        # statistics live beside each module (works with device_map="auto") unless a device is forced
        forced = None if self.cfg.device == "auto" else resolve_device(self.cfg.device, "--stats-device")
        self._dev = {i.fqn: mods[i.fqn].weight.device if forced is None else forced for i in self.infos}
        self.dtype, self.acc_dtype = stats_dtypes(self.cfg, mods[self.infos[0].fqn].weight.device)
        s = self.cfg.sketch_size
        self._omega: dict[str, Tensor] = {}
        by_n: dict[tuple, Tensor] = {}
        for info in self.infos:
            n, dev = info.in_features, self._dev[info.fqn]
            if self.directions is not None:
                self._omega[info.fqn] = self.directions[info.fqn].to(dev, self.dtype)
            else:
                if (n, dev) not in by_n:
                    by_n[(n, dev)] = sketch_directions(n, s, self.cfg.seed, self.dtype).to(dev)
                self._omega[info.fqn] = by_n[(n, dev)]
        dt = self.acc_dtype
        self.cx_: dict[str, Tensor] = {}
        self.ch_ = {i.fqn: torch.zeros(i.in_features, i.in_features, device=self._dev[i.fqn], dtype=dt)
                    for i in self.infos} if self.covariances else {}
        self.fw_ = {i.fqn: torch.zeros(i.out_features, device=self._dev[i.fqn], dtype=dt)
                    for i in self.infos} if self.covariances else {}
        self.sketch_ = {i.fqn: torch.zeros(3, self._omega[i.fqn].shape[1], device=self._dev[i.fqn], dtype=dt)
                        for i in self.infos}
        self._slot = None          # (input tensor, group key, selected rows) of the last forward hook
        self._fwd: dict[str, tuple[Tensor, Tensor]] = {}  # fqn -> (XΩ (t,s), ‖x‖² (t,)) awaiting backward
        self._idx: Tensor | None = None
        for info in self.infos:
            mod = mods[info.fqn]
            self._handles.append(mod.register_forward_pre_hook(self._make_fwd(info)))
            self._handles.append(mod.register_full_backward_hook(self._make_bwd(info, mod)))

    def _restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._state is not None:
            self._state.close()
            self._state = None
        self._slot, self._fwd = None, {}

    def __exit__(self, *exc) -> None:
        self._restore()

    # ---------------------------------------------------------------- hooks
    def _rows(self, t: Tensor, device: torch.device) -> Tensor:
        """(B, L, d) -> (tokens in the stat mask, d) in the statistics dtype, on `device`."""
        flat = t.detach().reshape(-1, t.shape[-1])
        return flat.index_select(0, self._idx.to(flat.device)).to(device, self.dtype)

    def _make_fwd(self, info: ModuleInfo):
        fqn = info.fqn
        dev = self._dev[fqn]

        def hook(module, inputs):  # a pre-hook: sees the input before the backward-hook wrapper copies it
            x = inputs[0]
            slot = self._slot
            if slot is not None and slot[0] is x:
                group, X = slot[1], slot[2].to(dev)
            else:
                group, X = fqn, self._rows(x, dev)
                self._slot = (x, group, X)
                if self.covariances:
                    C = self.cx_.get(group)
                    if C is None:
                        C = self.cx_[group] = torch.zeros(X.shape[1], X.shape[1], device=dev, dtype=self.acc_dtype)
                    _add_gram_(C, X)
            if self._first_step:
                self.group_[fqn] = group
            elif self.group_.get(fqn) != group:
                raise FascError(f"Module {fqn} read a different input than at the first batch; the model's "
                                f"forward is not static. Calibrate with batch_size covering the data at once.")
            self._fired.add(fqn)
            self._fwd[fqn] = (X @ self._omega[fqn], X.square().sum(1))
            return None
        return hook

    def _make_bwd(self, info: ModuleInfo, module: nn.Module):
        fqn = info.fqn
        dev = self._dev[fqn]

        def hook(mod, grad_input, grad_output):
            saved = self._fwd.pop(fqn, None)
            if saved is None:
                return None
            xp, xn2 = saved
            G = self._rows(grad_output[0], dev)
            h = grad_input[0] if grad_input else None
            if h is None:  # input does not require grad: h = Wᵀ g recomputed
                H = G @ weight_matrix(module).to(dev, self.dtype)
            else:
                H = self._rows(h, dev)
            if self.covariances:
                _add_gram_(self.ch_[fqn], H)
                self.fw_[fqn] += G.square().T @ xn2
            hp = H @ self._omega[fqn]
            xp2, hp2 = xp.square(), hp.square()
            sk = self.sketch_[fqn]
            sk[0] += xp2.sum(0)
            sk[1] += hp2.sum(0)
            sk[2] += (xp2 * hp2).sum(0)
            return None
        return hook

    # ---------------------------------------------------------------- driving
    def step(self, batch: Batch, generator: torch.Generator | None = None) -> float:
        """One forward + backward on `batch`; returns the (tempered) summed loss."""
        model, cfg = self.model, self.cfg
        stat = batch.stat_mask
        self._idx = stat.reshape(-1).nonzero().squeeze(1)
        n_b = int(self._idx.numel())
        if n_b == 0:
            return 0.0
        dev = next(model.parameters()).device
        ids = batch.input_ids.to(dev)
        out = model(input_ids=ids, attention_mask=batch.attention_mask.to(dev), use_cache=False)
        self._slot = None
        logits = out.logits if hasattr(out, "logits") else out[0]
        tm = batch.target_mask.to(dev)
        z = logits[tm].float() / cfg.temperature                      # (targets, vocab)
        if cfg.fisher == "sampled":
            probs = torch.softmax(z.detach(), -1).cpu()
            tgt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(dev)
        else:
            nxt = next_tokens(ids)
            tgt = nxt[tm]
        loss = F.cross_entropy(z, tgt, reduction="sum")            # summed: per-token gradients unscaled
        if not torch.isfinite(loss):
            self._check_finite()  # names the first module whose inputs went non-finite, if any
            raise FascError("The calibration loss is not finite (NaN/Inf logits); load the model in float32 "
                            "or lower the --temperature.")
        loss.backward()
        # modules the loss never reached: their x-part still counts, with h = 0
        for fqn, (xp, _) in self._fwd.items():
            self.sketch_[fqn][0] += xp.square().sum(0)
        self._fwd.clear()
        if self._first_step:
            missing = [i.fqn for i in self.infos if i.fqn not in self._fired]
            if missing:
                raise FascError(f"Hooks did not fire for {len(missing)} modules (e.g. {missing[0]}); a fused "
                                f"kernel bypasses them. Load the model with attn_implementation='eager'.")
        self._check_finite()
        self._first_step = False
        self.n_tokens_ += n_b
        return float(loss.detach())

    def _check_finite(self) -> None:
        for name, d in (("activations", self.cx_), ("gradients", self.ch_)):
            for key, C in d.items():
                if not bool(torch.isfinite(C.diagonal()).all()):
                    raise FascError(f"Non-finite {name} in {key} during calibration (fp16/bf16 overflow?); "
                                    f"load the model in float32 or lower the --temperature.")

    def _all_reduce(self) -> None:
        """Sum the accumulators over data-parallel processes (torch.distributed, gloo or nccl)."""
        if self._reduced or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        import torch.distributed as dist

        for d in (self.cx_, self.ch_, self.fw_, self.sketch_):
            for key in sorted(d):
                dist.all_reduce(d[key])
        n = torch.tensor([self.n_tokens_], dtype=torch.float64)
        dist.all_reduce(n)
        self.n_tokens_ = int(n.item())
        self._reduced = True

    def result(self, model_fp: str = "", data_fp: str = "") -> CalibStats:
        """Statistics as means over the N tokens seen (call once, after the `with` block). The
        accumulators become the statistics in place, so memory is not doubled."""
        if self._done:
            raise FascError("Calibrator.result() was already taken; run a new Calibrator for new statistics.")
        self._done = True
        self._all_reduce()
        if self.n_tokens_ == 0:
            raise FascError("Calibration saw no tokens; give a longer calibration text.")
        N = float(self.n_tokens_)
        warnings = []
        cpu = torch.device("cpu")
        if self.covariances:
            for fqn, C in self.ch_.items():
                if float(C.diagonal().sum()) == 0.0:
                    warnings.append(f"{fqn}: zero gradients (the loss does not reach it); FASC falls back "
                                    f"to the variance subspace there.")
            for key, C in self.cx_.items():
                if float(C.diagonal().sum()) == 0.0:
                    warnings.append(f"{key}: all-zero activations (dead inputs); any rank keeps it exact.")
        for w in warnings:
            log.warning(w)
        return CalibStats(
            modules=list(self.infos), group=dict(self.group_),
            cx={k: symmetrize_blocks_(v).div_(N).to(cpu) for k, v in self.cx_.items()},
            ch={k: symmetrize_blocks_(v).div_(N).to(cpu) for k, v in self.ch_.items()},
            fw={k: v.div_(N).to(cpu) for k, v in self.fw_.items()},
            sketch={k: v.div_(N).to(cpu) for k, v in self.sketch_.items()},
            n_tokens=self.n_tokens_, config=self.cfg, model_fingerprint=model_fp, data_fingerprint=data_fp,
            warnings=warnings)


def calibrate(model: nn.Module, batches: Iterable[Batch], cfg: CalibConfig,
              progress: ProgressFn | None = None, *, modules: list[ModuleInfo] | None = None,
              model_fp: str | None = None) -> CalibStats:
    """Run calibration over `batches` and return the statistics; the model is left as it was.

    Args:
        progress: called as progress(tokens_done, tokens_total) after every batch; if it returns
            False the run stops with `Cancelled`.

    Under `torch.distributed` (e.g. `torchrun`), every process passes the same `batches`, takes
    every world-size-th one, and the statistics are all-reduced: each process returns the result
    of the whole data.
    """
    batches = list(batches)
    mine = batches
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mine = batches[rank::world]                     # data parallel: each process its share
    total = sum(int(b.stat_mask.sum()) for b in mine)
    gen = torch.Generator().manual_seed(cfg.seed)
    with Calibrator(model, cfg, modules=modules) as cal:
        if progress is not None and progress(0, total) is False:
            raise Cancelled("Calibration cancelled; nothing was cached.")
        for b in mine:
            cal.step(b, generator=gen)
            if progress is not None and progress(cal.n_tokens_, total) is False:
                raise Cancelled("Calibration cancelled; nothing was cached.")
    return cal.result(model_fp if model_fp is not None else model_fingerprint(model), data_fingerprint(batches))
