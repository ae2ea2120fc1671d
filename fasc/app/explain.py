"""Plain words on the pages, in the current model's own numbers (pure: no Streamlit; tested directly).

    START_HERE     page 1's opening lines: what this is, what to do first, where it leads
    rho_facts      the numbers behind the ρ map's explanation, from the current analysis' report rows
    rho_explained  what ρ does and does not tell, in those numbers
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import HYBRID_TAU

START_HERE = (
    "**What this is:** FASC compresses a language model's linear layers to low rank and keeps what the loss "
    "depends on — the Fisher-aligned directions — not just the largest ones, so facts the model knows survive.",
    "**First:** pick a model in the sidebar (the embedded demo runs in seconds on a CPU), then run the "
    "calibration below: one forward and backward pass over a text.",
    "**Then:** the ρ map shows where the model's activations and gradients depend on each other, Ranks spreads "
    "a parameter budget over the modules and evaluates it, Export writes the compressed model.",
)


@dataclass
class RhoFacts:
    """ρ over the current model's modules (`Analysis.report` rows) and, when computed, its rank
    correlation with each module's Fisher energy ½ tr(C_h C_x) (the predicted loss of removing it)."""

    n: int
    mean: float
    low: tuple[str, float]      # (module label, ρ) of the lowest ρ
    high: tuple[str, float]     # and of the highest
    above_tau: int              # modules with ρ ≥ τ
    tau: float
    negative: int               # modules whose signed mean ρ(u) < 0
    energy_spearman: float | None


def module_label(row) -> str:
    return f"L{row.layer} {row.kind}"


def rho_facts(rows, energy: dict[str, float] | None = None, tau: float = HYBRID_TAU) -> RhoFacts:
    """The numbers of `rho_explained` from report rows (fqn, layer, kind, rho, rho_signed) and the Fisher
    energy per fqn (None when not computed)."""
    from ..knowledge_map import spearman

    good = [r for r in rows if r.rho is not None and math.isfinite(r.rho)]
    if not good:
        return RhoFacts(0, math.nan, ("—", math.nan), ("—", math.nan), 0, tau, 0, None)
    lo, hi = min(good, key=lambda r: r.rho), max(good, key=lambda r: r.rho)
    sp = None
    if energy:
        pairs = [(r.rho, energy[r.fqn]) for r in good if r.fqn in energy]
        sp = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else math.nan
    return RhoFacts(n=len(good), mean=sum(r.rho for r in good) / len(good), low=(module_label(lo), lo.rho),
                    high=(module_label(hi), hi.rho), above_tau=sum(r.rho >= tau for r in good), tau=tau,
                    negative=sum((r.rho_signed or 0.0) < 0 for r in good), energy_spearman=sp)


def rho_explained(f: RhoFacts, knowledge: str) -> tuple[str, str]:
    """(what ρ tells, what it does not tell) in this model's numbers; `knowledge` is the sentence on
    where facts live (measured or not yet: `fasc.app.knowledge.rho_verdict`)."""
    if f.n == 0:
        return ("**What ρ tells:** nothing yet — no module has a ρ in these statistics.", knowledge)
    tells = (f"**What ρ tells:** how far each module's inputs and output gradients are from independent. "
             f"Near 0, the predicted ΔL behind every plan (which assumes independence) can be trusted for that "
             f"module; the larger, the less. Here ρ runs from {f.low[1]:.3f} ({f.low[0]}) to {f.high[1]:.3f} "
             f"({f.high[0]}), mean {f.mean:.3f} over {f.n} modules; {f.above_tau} of them are at or above "
             f"τ = {f.tau:g}, where the hybrid method uses fasc. In {f.negative} the signed mean is negative: "
             f"large activations there meet small gradients.")
    if f.energy_spearman is None:
        matters = ("how much a module matters for the loss (its Fisher energy is not computed here: the "
                   "statistics are held on disk)")
    elif math.isnan(f.energy_spearman):
        matters = "how much a module matters for the loss (too few modules to rank here)"
    else:
        matters = (f"how much a module matters for the loss — its rank correlation with each module's Fisher "
                   f"energy ½ tr(C_h C_x), the predicted loss of removing it, is {f.energy_spearman:+.2f} here "
                   f"(1 = the same order)")
    return tells, f"**What ρ does not tell:** {matters}; nor, by itself, where facts live. {knowledge}"
