"""The calibration statistics object (spec §1) and its safetensors + JSON serialization."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import offload

from .config import CalibConfig
from .errors import FascError
from .modules import ModuleInfo
from .offload import LazyTensors

FORMAT_VERSION = 1


@dataclass
class CalibStats:
    """Means over N calibration tokens, per module (keyed by FQN).

    Attributes:
        modules: the calibrated modules, in model order.
        group: fqn -> key of its C_x (the first module reading the same input).
        cx: key -> C_x = (1/N) Σ x xᵀ, (n, n).
        ch: fqn -> C_h = (1/N) Σ h hᵀ, h = Wᵀg, (n, n).
        fw: fqn -> r = (1/N) Σ g² ‖x‖², (m,), the FWSVD row weights.
        sketch: fqn -> (3, s): E[(uᵀx)²], E[(uᵀh)²], E[(uᵀx)²(uᵀh)²] along s random unit directions u.
        sketch_fisher: same along the top Fisher directions (filled by `fasc.rho.rho_fisher_pass`).
        n_tokens: N, real tokens that carried statistics.
    """

    modules: list[ModuleInfo]
    group: dict[str, str]
    cx: dict[str, Tensor]
    ch: dict[str, Tensor]
    fw: dict[str, Tensor]
    sketch: dict[str, Tensor]
    n_tokens: int
    config: CalibConfig
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    sketch_fisher: dict[str, Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    key: str = ""

    def info(self, fqn: str) -> ModuleInfo:
        by_fqn = self.__dict__.get("_by_fqn")
        if by_fqn is None or len(by_fqn) != len(self.modules):
            by_fqn = self.__dict__["_by_fqn"] = {i.fqn: i for i in self.modules}
        try:
            return by_fqn[fqn]
        except KeyError:
            raise FascError(f"Module {fqn!r} is not in these statistics; calibrate the model that contains "
                            f"it.") from None

    def C_x(self, fqn: str) -> Tensor:
        return self.cx[self.group[fqn]]

    @property
    def fqns(self) -> list[str]:
        return [i.fqn for i in self.modules]

    def nbytes(self) -> int:
        """Bytes of all statistics (those offloaded to disk counted from the files' headers)."""
        return sum(d.nbytes() if isinstance(d, LazyTensors) else sum(t.numel() * t.element_size() for t in d.values())
                   for d in (self.cx, self.ch, self.fw, self.sketch, self.sketch_fisher))

    # ---------------------------------------------------------------- serialization
    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for prefix, d in (("cx", self.cx), ("ch", self.ch), ("fw", self.fw), ("sketch", self.sketch),
                          ("sketch_fisher", self.sketch_fisher)):
            for k, t in d.items():
                out[f"{prefix}/{k}"] = t.detach().cpu().contiguous()
        return out

    def manifest(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "modules": [i.to_dict() for i in self.modules],
            "group": self.group,
            "n_tokens": self.n_tokens,
            "config": {**self.config.key_dict(), "batch_size": self.config.batch_size},
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "warnings": self.warnings,
            "key": self.key,
        }

    def save(self, folder: str | Path) -> None:
        """Write `stats.safetensors` + `manifest.json` (with the tensor file's sha256) into an existing folder.
        Statistics held on disk (`fasc.offload.LazyTensors`) are copied one tensor at a time."""
        folder = Path(folder)
        tpath = folder / "stats.safetensors"
        if any(isinstance(d, LazyTensors) for d in (self.cx, self.ch)):
            _save_streaming(self, tpath)
        else:
            save_file(self.tensors(), str(tpath))
        man = self.manifest()
        man["sha256"] = file_sha256(tpath)
        (folder / "manifest.json").write_text(json.dumps(man, indent=1))

    @classmethod
    def load(cls, folder: str | Path, lazy: bool | None = None) -> "CalibStats":
        """Read a folder written by `save`; the checksum must match (else FascError). `lazy`: keep C_x and
        C_h on disk, read per access (None: when the file exceeds `fasc.offload.LAZY_BYTES`)."""
        folder = Path(folder)
        mpath, tpath = folder / "manifest.json", folder / "stats.safetensors"
        if not mpath.is_file() or not tpath.is_file():
            raise FascError(f"{folder} is not a statistics folder (needs manifest.json + stats.safetensors); "
                            f"re-run calibration.")
        try:
            man = json.loads(mpath.read_text())
        except ValueError:
            raise FascError(f"{mpath} is corrupted (not JSON); delete the folder and re-run calibration.") from None
        if man.get("format") != FORMAT_VERSION:
            raise FascError(f"{folder} has statistics format {man.get('format')}, this version reads "
                            f"{FORMAT_VERSION}; re-run calibration.")
        if man.get("sha256") != file_sha256(tpath):
            raise FascError(f"{tpath} does not match its checksum (truncated or corrupted); delete it and "
                            f"re-run calibration.")
        dicts: dict[str, dict[str, Tensor]] = {"cx": {}, "ch": {}, "fw": {}, "sketch": {}, "sketch_fisher": {}}
        if lazy or (lazy is None and tpath.stat().st_size > offload.LAZY_BYTES):  # n×n matrices stay on disk
            dicts["cx"], dicts["ch"] = LazyTensors.from_file(tpath, "cx"), LazyTensors.from_file(tpath, "ch")
            with safe_open(str(tpath), "pt") as f:
                tensors = {n: f.get_tensor(n) for n in f.keys() if n.partition("/")[0] not in ("cx", "ch")}
        else:
            tensors = load_file(str(tpath))
        for name, t in tensors.items():
            prefix, _, key = name.partition("/")
            dicts[prefix][key] = t
        cfg = dict(man["config"])
        cfg["layers"] = tuple(cfg["layers"]) if cfg.get("layers") is not None else None
        return cls(modules=[ModuleInfo(**d) for d in man["modules"]], group=man["group"], cx=dicts["cx"],
                   ch=dicts["ch"], fw=dicts["fw"], sketch=dicts["sketch"], n_tokens=int(man["n_tokens"]),
                   config=CalibConfig(**cfg), model_fingerprint=man["model_fingerprint"],
                   data_fingerprint=man["data_fingerprint"], sketch_fisher=dicts["sketch_fisher"],
                   warnings=list(man.get("warnings", [])), key=man.get("key", ""))

    @classmethod
    def merge(cls, parts: list["CalibStats"]) -> "CalibStats":
        """Join statistics of disjoint module sets (e.g. `layers` passes) over the same data."""
        if not parts:
            raise FascError("Nothing to merge; calibrate at least one group of layers.")
        first = parts[0]
        if any(p.data_fingerprint != first.data_fingerprint or p.n_tokens != first.n_tokens for p in parts):
            raise FascError("Statistics to merge were calibrated on different data; use the same data for "
                            "every group of layers.")
        seen, mods = set(), []
        for p in parts:
            for i in p.modules:
                if i.fqn in seen:
                    raise FascError(f"Module {i.fqn} appears in two statistics parts; give disjoint layer groups.")
                seen.add(i.fqn)
                mods.append(i)
        mods.sort(key=lambda i: i.layer)  # stable: model order within a layer
        layers = sorted({i.layer for i in mods})
        cfg_d = {**first.config.key_dict(), "batch_size": first.config.batch_size, "layers": None}
        if set(layers) != set(range(max(layers) + 1)):
            cfg_d["layers"] = tuple(layers)
        merged = cls(modules=mods, group={}, cx={}, ch={}, fw={}, sketch={}, n_tokens=first.n_tokens,
                     config=CalibConfig(**cfg_d), model_fingerprint=first.model_fingerprint,
                     data_fingerprint=first.data_fingerprint)
        for d_name in ("cx", "ch"):  # parts offloaded to disk stay there
            if all(isinstance(getattr(p, d_name), LazyTensors) for p in parts):
                setattr(merged, d_name, LazyTensors({k: v for p in parts for k, v in getattr(p, d_name).refs().items()}))
        for p in parts:
            for d_name in ("group", "cx", "ch", "fw", "sketch", "sketch_fisher"):
                target = getattr(merged, d_name)
                if not isinstance(target, LazyTensors):
                    target.update(getattr(p, d_name))
            merged.warnings.extend(p.warnings)
        return merged


def _save_streaming(stats: CalibStats, tpath: Path) -> None:
    """`save_file(stats.tensors())` with one tensor in memory at a time (statistics offloaded to disk)."""
    items = []
    for prefix, d in (("cx", stats.cx), ("ch", stats.ch), ("fw", stats.fw), ("sketch", stats.sketch),
                      ("sketch_fisher", stats.sketch_fisher)):
        for k in d:
            ref = d.refs()[k] if isinstance(d, LazyTensors) else d[k]
            shape, code = offload.tensor_meta(ref)
            items.append((f"{prefix}/{k}", shape, code, lambda d=d, k=k: d[k]))
    offload.write_safetensors(tpath, items)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
