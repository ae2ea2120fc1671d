"""This browser session's durable state (`st.session_state`; nothing here is shared between sessions).

Durable keys survive page switches: the calibration settings and other widget values (`set.*`, with
widget keys `w.*` rebuilt from them when a page is revisited), `model_spec`, `calib` ({model ident: run
info}), the plan store (`plan`, `plan_ver`), the selected `module`, evaluation results (`evals`,
the last few) and ρ measured along Fisher directions (`rho_fisher`, by calibration key).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from ..allocate import Plan, allocate
from ..analysis import Analysis

MAX_EVALS = 8  # evaluation results kept per session


# ------------------------------------------------------------------------------------------ durable widgets
def bind(name: str, default: Any) -> dict:
    """Keyword arguments for a widget whose value survives page switches.

    The widget key is `w.<name>`; its value is initialised from the durable key `set.<name>` (or
    `default`) when the widget is (re)created. Call `commit(name, value)` with what it returns.
    """
    wkey, dkey = f"w.{name}", f"set.{name}"
    if wkey not in st.session_state:
        st.session_state[wkey] = st.session_state.get(dkey, default)
    return {"key": wkey}


def commit(name: str, value: Any) -> Any:
    st.session_state[f"set.{name}"] = value
    return value


def setting(name: str, default: Any) -> Any:
    """A durable setting (the value its widget had last), or `default`."""
    return st.session_state.get(f"set.{name}", default)


# ------------------------------------------------------------------------------------------ calibration runs
def calib_info(spec: str | None) -> dict | None:
    return (st.session_state.get("calib") or {}).get(spec) if spec else None


def set_calib_info(spec: str, info: dict) -> None:
    st.session_state.setdefault("calib", {})[spec] = info


# ------------------------------------------------------------------------------------------ plan store
class PlanStore:
    """The session's rank plan for one (model, calibration, γ); `version` changes whenever the plan
    is replaced, so widgets that show a copy of it (editor, sliders) are redrawn from it."""

    def __init__(self, owner: list):
        self.owner = owner

    def get(self, an: Analysis, model_fp: str = "") -> Plan:
        """The stored plan, or the default one (fasc at half the parameters) the first time."""
        d = st.session_state.get("plan")
        if d and d.get("for") == self.owner:
            plan = Plan.from_dict(d["plan"])
            if plan.fits(an):
                return plan
        plan = allocate(an, "fasc", param_ratio=0.5, model_fp=model_fp)
        self.put(plan)
        return plan

    def put(self, plan: Plan, bump: bool = True) -> None:
        st.session_state["plan"] = {"for": self.owner, "plan": plan.to_dict()}
        if bump:
            st.session_state["plan_ver"] = self.version + 1

    @property
    def version(self) -> int:
        return st.session_state.get("plan_ver", 0)


# ------------------------------------------------------------------------------------------ selection
def selected_module(an: Analysis) -> str:
    """The selected fqn (durable across pages); the module with the highest ρ at first."""
    fqn = st.session_state.get("module")
    names = [i.fqn for i in an.modules]
    if fqn not in names:
        fqn = max(names, key=lambda f: an.rho(f)[0])
        st.session_state["module"] = fqn
    return fqn


def select_module(fqn: str) -> None:
    st.session_state["module"] = fqn


# ------------------------------------------------------------------------------------------ results
def evaluation(key: tuple) -> list[dict] | None:
    return (st.session_state.get("evals") or {}).get(key)


def put_evaluation(key: tuple, rows: list[dict]) -> None:
    store = st.session_state.setdefault("evals", {})
    store[key] = rows
    while len(store) > MAX_EVALS:
        store.pop(next(iter(store)))


def rho_fisher(calib_key: str) -> dict:
    """ρ sketches along Fisher directions measured in this session for a calibration ({} if none)."""
    return (st.session_state.get("rho_fisher") or {}).get(calib_key, {})


def put_rho_fisher(calib_key: str, sketches: dict) -> None:
    st.session_state["rho_fisher"] = {calib_key: sketches}  # only the current calibration's
