"""Discovery of the compressible linear modules of a causal LM, with layer index and kind.

Works across Llama / Mistral / Qwen2 (q,k,v,o,gate,up,down), GPT-2 (transformers' `Conv1D`,
weight stored transposed: c_attn → qkv, c_proj, c_fc), GPT-NeoX / Falcon (query_key_value, dense,
dense_h_to_4h, dense_4h_to_h), OPT / GPT-J / Phi (q,k,v,out_proj, fc1/fc2, fc_in/fc_out).
The embedding and `lm_head` are never compressed; only modules inside a numbered decoder layer are.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .errors import FascError

try:  # transformers' GPT-2 style linear, weight (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always present in practice
    Conv1D = ()

ATTENTION_KINDS = ("q", "k", "v", "qkv", "o")
MLP_KINDS = ("gate", "up", "down", "fc1", "fc2")
KIND_ORDER = ATTENTION_KINDS + MLP_KINDS

# leaf name -> kind, where the name alone decides
_KIND_BY_NAME = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "query": "q", "key": "k", "value": "v", "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv",
    "Wqkv": "qkv", "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "up",
    "fc1": "fc1", "fc2": "fc2", "fc_in": "fc1", "fc_out": "fc2", "c_fc": "fc1",
    "dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2", "w1": "gate", "w3": "up", "w2": "down",
}
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleInfo:
    """One compressible module. `out_features` = m, `in_features` = n (spec §1: W ∈ R^{m×n})."""

    fqn: str
    layer: int
    kind: str
    out_features: int
    in_features: int
    transposed: bool  # GPT-2 Conv1D: weight stored (n, m)
    has_bias: bool

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def is_mlp(self) -> bool:
        return self.kind in MLP_KINDS

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(fqn: str) -> str:
    parts = fqn.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    if leaf in ("c_proj", "dense"):  # attention output or MLP output depending on the parent
        return "fc2" if parent in ("mlp", "ffn", "feed_forward") else "o"
    return _KIND_BY_NAME.get(leaf, leaf)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True for a GPT-2 `Conv1D`, which stores its weight transposed, (in, out) (the one Conv1D boundary)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> Tensor:
    """The module's weight as (out, in) = (m, n), whatever its storage."""
    w = module.weight
    return w.T if is_transposed(module) else w


def stored_weight(module: nn.Module, W: Tensor) -> Tensor:
    """W (out, in) in the layout `module` stores its weight in (the inverse of `weight_matrix`)."""
    return W.T if is_transposed(module) else W


def find_linears(model: nn.Module) -> list[ModuleInfo]:
    """All compressible linear modules of `model`, in module order.

    Raises:
        FascError: no linear module inside a numbered layer was found.
    """
    excluded = set()
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        fn = getattr(model, getter, None)
        emb = fn() if callable(fn) else None
        if emb is not None:
            excluded.add(id(emb))
    infos = []
    for fqn, mod in model.named_modules():
        if id(mod) in excluded or not is_linear(mod):
            continue
        m = _LAYER_RE.search("." + fqn + ".")
        if m is None:
            continue
        transposed = is_transposed(mod)
        n_out, n_in = (mod.weight.shape[1], mod.weight.shape[0]) if transposed else mod.weight.shape
        infos.append(ModuleInfo(fqn=fqn, layer=int(m.group(1)), kind=_kind(fqn), out_features=int(n_out),
                                in_features=int(n_in), transposed=transposed,
                                has_bias=getattr(mod, "bias", None) is not None))
    if not infos:
        found = sorted({type(m).__name__ for _, m in model.named_modules()})[:8]
        raise FascError(f"No compressible linear layers found in {type(model).__name__} (module types: "
                        f"{', '.join(found)}); FASC supports decoder layers built from nn.Linear or Conv1D.")
    return infos


def select(infos: list[ModuleInfo], which: str | list[str] | None) -> list[ModuleInfo]:
    """Filter modules: None/'all', 'mlp', 'attention', a list of kinds, or a list of FQNs."""
    if which is None or which == "all":
        return list(infos)
    if which == "mlp":
        return [i for i in infos if i.is_mlp]
    if which in ("attn", "attention"):
        return [i for i in infos if not i.is_mlp]
    if isinstance(which, str):
        which = [w.strip() for w in which.split(",") if w.strip()]
    names = set(which)
    out = [i for i in infos if i.fqn in names or i.kind in names]
    unknown = names - {i.fqn for i in out} - {i.kind for i in out}
    if unknown:
        kinds = sorted({i.kind for i in infos})
        raise FascError(f"Unknown modules or kinds {sorted(unknown)[:3]}; use 'all', 'mlp', 'attention', "
                        f"kinds {kinds} or full module names.")
    return out


def num_layers(infos: list[ModuleInfo]) -> int:
    return max(i.layer for i in infos) + 1


def kinds_in_order(infos: list[ModuleInfo]) -> list[str]:
    present = {i.kind for i in infos}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def model_fingerprint(model: nn.Module) -> str:
    """A content digest of the model's weights and config (sampled values + exact sums), hex sha256."""
    import hashlib
    import json

    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items()
             if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // 4096)
            h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
            # numpy's pairwise sum does not depend on the thread count (torch's reduction does, which
            # gave one model two cache keys under 1 and 2 threads)
            h.update(repr(float(np.square(flat.to(torch.float64).cpu().numpy()).sum())).encode())
    return h.hexdigest()
