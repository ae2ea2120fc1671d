"""The content-addressed on-disk calibration cache.

Key = sha256 of sorted JSON {model fingerprint, data fingerprint, calibration config, format}.
An entry is a folder `<root>/<key>/` (manifest.json + stats.safetensors, checksummed); it is
written to `.<key>.<uuid>.incomplete` and renamed into place, under a file lock, so an
interrupted run never leaves an entry that loads, and two processes never corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock

from .config import CalibConfig
from .errors import FascError, disk_error
from .stats import FORMAT_VERSION, CalibStats

log = logging.getLogger("fasc")


def default_root() -> Path:
    """$FASC_CACHE, else the project's `cache/` folder when run from a checkout, else ~/.cache/fasc."""
    env = os.environ.get("FASC_CACHE")
    if env:
        return Path(env).expanduser()
    repo_cache = Path(__file__).resolve().parent.parent / "cache"
    if repo_cache.is_dir():
        return repo_cache
    return Path.home() / ".cache" / "fasc"


def cache_key(model_fp: str, data_fp: str, cfg: CalibConfig) -> str:
    payload = {"model": model_fp, "data": data_fp, "config": cfg.key_dict(), "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str, root: Path | None = None) -> CalibStats | None:
    """The cached statistics for `key`, or None. A corrupted entry is deleted (and None returned)."""
    root = Path(root or default_root())
    folder = root / key
    if not folder.is_dir():
        return None
    try:
        stats = CalibStats.load(folder)
    except FascError as e:
        log.warning("Cache entry %s is invalid (%s); recomputing.", key, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    stats.key = key
    return stats


def store(stats: CalibStats, key: str, root: Path | None = None) -> Path:
    """Write `stats` as entry `key` atomically; returns the entry folder."""
    root = Path(root or default_root())
    root.mkdir(parents=True, exist_ok=True)
    stats.key = key
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.incomplete"
    tmp.mkdir()
    try:
        stats.save(tmp)
        final = root / key
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if why := disk_error(e):
            raise FascError(f"Writing the calibration cache in {root} failed ({why}); nothing was kept — "
                            f"free disk space, or set FASC_CACHE to a folder on a larger disk.") from None
        raise
    return final


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: `write(tmp)` fills a hidden `.incomplete` sibling, which is
    renamed into place (or removed if `write` fails), so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if why := disk_error(e):
            raise FascError(f"Writing {path} failed ({why}); nothing was kept — free disk space (a cache "
                            f"entry: or set FASC_CACHE to a folder on a larger disk).") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """`write_atomic` for a UTF-8 text file."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def lock(key: str, root: Path | None = None) -> FileLock:
    root = Path(root or default_root())
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / f".{key}.lock"))


def get_or_compute(key: str, compute: Callable[[], CalibStats], root: Path | None = None) -> tuple[CalibStats, bool]:
    """(stats, hit): the cached entry, or `compute()` stored under the key. Locked per key."""
    with lock(key, root):
        for stale in Path(root or default_root()).glob(f".{key}.*.incomplete"):  # a killed writer's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        hit = load(key, root)
        if hit is not None:
            return hit, True
        stats = compute()
        store(stats, key, root)
        return stats, False
