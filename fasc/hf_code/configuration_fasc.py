"""Configuration of a FASC factored export (written into the export folder; needs only transformers).

`config.json` of a factored export is the original model's configuration with four changes:
`model_type` is "fasc" (so a loader without `trust_remote_code` stops with transformers' own error
instead of building the dense architecture with missing weights), `base_model_type` keeps the
original type, `fasc_factored` lists the low-rank modules {fqn: [in, out, rank, bias]}, and
`auto_map` points AutoConfig / AutoModelForCausalLM at these two files.
"""

from transformers import AutoConfig, PretrainedConfig

FASC_KEYS = ("base_model_type", "base_architectures", "fasc_factored", "auto_map")


class FascConfig(PretrainedConfig):
    """The original configuration's fields plus `base_model_type` and `fasc_factored`."""

    model_type = "fasc"

    def to_base(self):
        """The original architecture's configuration (e.g. a `LlamaConfig`) without the FASC fields."""
        d = {k: v for k, v in self.to_dict().items() if k not in FASC_KEYS + ("model_type", "architectures")}
        base = AutoConfig.for_model(self.base_model_type, **d)
        base.architectures = getattr(self, "base_architectures", None)
        return base
