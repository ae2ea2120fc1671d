"""Compressed copies of a model kept in memory and reused: the dashboard's Evaluate, Generate, Compare
and Export compress the same plan with the same options into the same copy, so it is built once.

A copy is built by `fasc.pipeline.compressed_copy` (deep copy, `compress_`, optional sequential
refit and healing) and is read-only afterwards: callers run it, never modify it. The cache is
keyed by everything that changes the copy — model, calibration, γ, the plan's ranks and methods,
merge, sequential, healing tokens and mode — (`copy_key`) and bounded in memory (`CopyCache.limit`): it keeps
at most `MAX_COPIES` copies and at most `MEMORY_SHARE` of the memory available to them (the
device's free memory plus what the cached copies already hold), but always `MIN_COPIES` (a plan
and its baseline, which Generate and Compare use together); the least recently used copy goes
first.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

MAX_COPIES = 6
MIN_COPIES = 2
MEMORY_SHARE = 0.5

Built = tuple[nn.Module, dict | None]   # (compressed copy, what healing did or None)


def copy_key(model_ident: str, calib_key: str, gamma: float, plan_key: str, *, merge: bool = False,
             sequential: bool | str = False, heal_tokens: int = 0, heal_mode: str = "global") -> str:
    """The identity of a compressed copy: whatever changes its weights."""
    return json.dumps([model_ident, calib_key, float(gamma), plan_key, bool(merge), sequential or False,
                       int(heal_tokens), heal_mode if heal_tokens else None])


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def free_bytes(device: torch.device | str) -> int:
    """Memory available for new tensors on `device`: free GPU memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


class CopyCache:
    """Compressed copies by key (`copy_key`), built once and reused; LRU and memory-bounded.

    Attributes:
        builds_: how many copies were built (cache misses), for tests and timings.
        seconds_: {key: seconds its build took}.
    """

    def __init__(self, max_copies: int = MAX_COPIES, memory_share: float = MEMORY_SHARE,
                 free: Callable[[torch.device], int] = free_bytes):
        if not 1 <= max_copies:
            raise ValueError(f"`max_copies` must be ≥ 1, got {max_copies}.")
        if not 0 < memory_share <= 1:
            raise ValueError(f"`memory_share` must be in (0, 1], got {memory_share}.")
        self.max_copies, self.memory_share, self.free = max_copies, memory_share, free
        self._copies: OrderedDict[str, tuple[Built, int]] = OrderedDict()   # key -> ((model, healed), bytes)
        self._lock = threading.RLock()   # sessions are threads: one build at a time, no double builds
        self.builds_ = 0
        self.seconds_: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._copies

    def __len__(self) -> int:
        return len(self._copies)

    def held_bytes(self) -> int:
        return sum(b for _, b in self._copies.values())

    def limit(self, copy_bytes: int, device: torch.device | str = "cpu", pending: int = 0) -> int:
        """How many copies of `copy_bytes` each may be kept: `memory_share` of (free memory + what the
        cache holds + `pending`, a new copy not yet held), between `MIN_COPIES` and `max_copies`."""
        room = self.memory_share * (self.free(torch.device(device)) + self.held_bytes() + pending)
        return max(min(MIN_COPIES, self.max_copies), min(self.max_copies, int(room // max(1, copy_bytes))))

    def get(self, key: str, build: Callable[[], Built]) -> Built:
        """The copy for `key`, built by `build()` the first time. A build that raises (or is interrupted)
        stores nothing."""
        with self._lock:
            if key in self._copies:
                self._copies.move_to_end(key)
                return self._copies[key][0]
            t0 = time.perf_counter()
            built = build()
            self.seconds_[key] = time.perf_counter() - t0
            self.builds_ += 1
            size = module_bytes(built[0])
            n = self.limit(size, next(built[0].parameters()).device, pending=size)
            while self._copies and len(self._copies) >= n:
                self._copies.popitem(last=False)     # least recently used first
            self._copies[key] = (built, size)
            return built

    def clear(self) -> None:
        with self._lock:
            self._copies.clear()
