"""A FASC factored export as an ordinary transformers model (written into the export folder).

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the original architecture (resolved from `base_model_type` through transformers' own
AutoModelForCausalLM mapping), replaces every module listed in `fasc_factored` by a `LowRankLinear`
shell *before* the weights are read, and lets transformers' `from_pretrained` load
`model.safetensors` (tensors `<fqn>.U`, `<fqn>.V`, `<fqn>.bias`; `<fqn>.R`, `<fqn>.P`, `<fqn>.order` for
a module stored pivoted), so the model in memory holds
the low-rank factors: its parameter count is the compressed one, and generation, pipelines and
lm-evaluation-harness run on the small model. Needs only torch and transformers; the project
that wrote it is FASC (knowledge-aware low-rank compression).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_fasc import FascConfig


class LowRankLinear(nn.Module):
    """y = U (Vᵀ x) + b, U (out, k), V (in, k): the layer FASC puts in place of a dense linear."""

    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.V = nn.Parameter(torch.empty(in_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.V.T), self.U, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


class PivotedLowRankLinear(nn.Module):
    """The same rank-k map in k (out + in - k) numbers: y = [R x; P R x][order] + b, R (k, in) the pivot rows
    of W' = U Vᵀ, P (out - k, k) the other rows in terms of them, `order` (out,) a permutation."""

    def __init__(self, in_features, out_features, rank, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.R = nn.Parameter(torch.empty(rank, in_features))
        self.P = nn.Parameter(torch.empty(out_features - rank, rank))
        self.register_buffer("order", torch.arange(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):   # as the library's layer: a gather for one token, written in place for several
        z = F.linear(x, self.R)
        if x.numel() == x.shape[-1]:
            y = torch.cat([z, F.linear(z, self.P)], dim=-1).index_select(-1, self.order)
        else:
            at = torch.argsort(self.order)
            y = z.new_empty(*z.shape[:-1], self.out_features)
            y.index_copy_(-1, at[:self.rank], z).index_copy_(-1, at[self.rank:], F.linear(z, self.P))
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}, pivoted"


def factored_class(base_cls, factored):
    """A subclass of the original model class whose constructor swaps in the low-rank shells."""

    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        for fqn, (n, m, k, bias, *stored) in factored.items():
            parent, _, child = fqn.rpartition(".")
            shell = PivotedLowRankLinear if stored == ["pivoted"] else LowRankLinear
            setattr(self.get_submodule(parent) if parent else self, child, shell(n, m, k, bias))

    return type(f"Fasc{base_cls.__name__}", (base_cls,), {"__init__": __init__, "__module__": __name__})


class FascForCausalLM(PreTrainedModel):
    """Entry point named in `auto_map`: `from_pretrained` returns an instance of the original model
    class (subclassed by `factored_class`) holding the factors."""

    config_class = FascConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if not isinstance(config, FascConfig):
            config = FascConfig.from_pretrained(pretrained_model_name_or_path, **{
                k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs})
        kwargs.pop("trust_remote_code", None)
        sub, base = cls._factored(config)
        return sub.from_pretrained(pretrained_model_name_or_path, *args, config=base, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        """`AutoModelForCausalLM.from_config(config, trust_remote_code=True)`: the factored shells, no weights."""
        sub, base = cls._factored(config)
        return sub._from_config(base, **kwargs)

    @staticmethod
    def _factored(config):
        base = config.to_base()
        return factored_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(base)], config.fasc_factored), base
