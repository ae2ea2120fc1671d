"""The code a factored export carries so that plain transformers loads it (issue: load anywhere).

`write_remote_code(folder, config, factored)` writes `config.json` (model_type "fasc", `auto_map`),
`configuration_fasc.py` and `modeling_fasc.py` (the two files beside this one, copied verbatim) into
an export folder; `base_config(folder)` reads the original architecture's configuration back, for
`fasc.load_compressed`. The tensors keep FASC's names (`<fqn>.U`, `<fqn>.V`), so both loaders read
the same `model.safetensors`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_fasc.py", "modeling_fasc.py")
AUTO_MAP = {"AutoConfig": "configuration_fasc.FascConfig", "AutoModelForCausalLM": "modeling_fasc.FascForCausalLM"}


def remote_config(config: dict, factored: dict[str, list]) -> dict:
    """The factored export's config.json from the original model's config dict."""
    d = dict(config)
    d["base_model_type"] = d["model_type"]
    d["base_architectures"] = d.get("architectures")
    d.update(model_type="fasc", architectures=["FascForCausalLM"], auto_map=AUTO_MAP, fasc_factored=factored)
    return d


def write_remote_code(folder: str | Path, config, factored: dict[str, list]) -> None:
    """Write config.json and the two code files for a factored export into `folder`."""
    folder = Path(folder)
    (folder / "config.json").write_text(json.dumps(remote_config(config.to_dict(), factored), indent=2,
                                                   sort_keys=True) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(HERE / name, folder / name)


def base_config(folder: str | Path):
    """The original architecture's configuration of an export folder (a FASC remote-code config.json
    or, for older exports, the plain one)."""
    from transformers import AutoConfig

    folder = Path(folder)
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        d = {}
    if d.get("model_type") != "fasc":
        return AutoConfig.from_pretrained(folder)
    arch = d.pop("base_architectures", None)
    base_type = d.pop("base_model_type")
    for k in ("model_type", "architectures", "auto_map", "fasc_factored"):
        d.pop(k, None)
    cfg = AutoConfig.for_model(base_type, **d)
    cfg.architectures = arch
    return cfg
