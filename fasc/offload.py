"""Statistics that stay on disk until a module needs them (memory for 7–8B models).

A Llama-3-8B decoder layer has 4.19 GiB of float64 statistics (the README formula), 134 GiB for the
model: more than a 64 GB machine holds. `LazyTensors` is a read-only mapping whose tensors are read
from safetensors files one at a time, on access; `write_safetensors` writes a file tensor by tensor
(peak memory: one tensor), so calibration in passes (`--layers-per-pass`) can offload each pass
to disk and the cache entry can be written from the offloaded parts; `Analysis` then holds only the
statistics of the module it decomposes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

# statistics files above this size are opened lazily by `CalibStats.load`
LAZY_BYTES = 4 << 30

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class LazyTensors(Mapping):
    """{key: tensor} whose values are read from safetensors files on access (never cached).

    Args:
        refs: key -> (file path, tensor name in that file).
    """

    def __init__(self, refs: dict[str, tuple[str, str]]):
        self._refs = dict(refs)

    @classmethod
    def from_file(cls, path: str | Path, prefix: str) -> "LazyTensors":
        """The tensors of `path` named `<prefix>/<key>`."""
        with safe_open(str(path), "pt") as f:
            names = [n for n in f.keys() if n.startswith(prefix + "/")]
        return cls({n[len(prefix) + 1:]: (str(path), n) for n in names})

    def __getitem__(self, key: str) -> Tensor:
        path, name = self._refs[key]
        with safe_open(path, "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def refs(self) -> dict[str, tuple[str, str]]:
        return dict(self._refs)

    def nbytes(self) -> int:
        """Bytes of all tensors, from the files' headers (nothing is read)."""
        total = 0
        for path, name in self._refs.values():
            with safe_open(path, "pt") as f:
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _itemsize(sl.get_dtype())
        return total


def _itemsize(code: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}[code]


def tensor_meta(value: Tensor | tuple[str, str]) -> tuple[list[int], str]:
    """(shape, safetensors dtype code) of a tensor or of a (file, name) reference, without reading data."""
    if isinstance(value, Tensor):
        return list(value.shape), _DTYPES[value.dtype]
    with safe_open(value[0], "pt") as f:
        sl = f.get_slice(value[1])
        return list(sl.get_shape()), sl.get_dtype()


def write_safetensors(path: str | Path, items: Iterable[tuple[str, list[int], str, Callable[[], Tensor]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: items are (name, shape, dtype code, load()), and only
    one loaded tensor is alive at a time. Readable by `safetensors.torch.load_file`."""
    items = list(items)
    header, offset = {}, 0
    for name, shape, code, _ in items:
        n = 1
        for d in shape:
            n *= d
        size = n * _itemsize(code)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, code, load in items:
            t = load().detach().cpu().contiguous()
            if list(t.shape) != shape or _DTYPES[t.dtype] != code:
                raise ValueError(f"{name}: expected {shape} {code}, got {list(t.shape)} {t.dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
