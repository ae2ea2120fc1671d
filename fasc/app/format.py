"""Small text formatters of the dashboard (pure)."""

from __future__ import annotations

import math
import re

import numpy as np

# The library's messages name the CLI's options; on a page the same fix is a widget (first match wins).
CLI_TO_WIDGET = (
    (r"pass --overwrite\b", "tick Overwrite"),
    (r"--overwrite\b", "Overwrite"),
    (r"--out\b", "Target folder"),
    (r"--device\b", "Device"),
    (r"--seq-len\b", "Sequence length"),
    (r"--tokens\b", "Token budget N"),
)


def dashboard_wording(msg: str) -> str:
    """A library message with the CLI options it names replaced by the dashboard's widgets."""
    for pattern, widget in CLI_TO_WIDGET:
        msg = re.sub(pattern, widget, msg)
    return msg


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def eta_text(done: int, total: int, elapsed: float, unit: str = "tokens") -> str:
    """'1,024 / 4,096 tokens · 3 s left' (no ETA before the first step)."""
    s = f"{done:,} / {total:,} {unit}"
    if done > 0 and total > done and elapsed > 0:
        left = elapsed * (total - done) / done
        s += f" · {left:.0f} s left" if left < 120 else f" · {left / 60:.1f} min left"
    elif total and done >= total:
        s += f" · done in {elapsed:.1f} s"
    return s


def mean_rho(rows) -> float:
    vals = [r.rho for r in rows if r.rho is not None and math.isfinite(r.rho)]
    return float(np.mean(vals)) if vals else float("nan")


def gamma_label(g: float) -> str:
    if g == 0:
        return "0 · pure Fisher"
    if g >= 1000:
        return f"{g:g} · ≈ variance"
    return f"{g:g}"
