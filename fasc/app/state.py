"""This browser session's durable state (`st.session_state`; nothing here is shared between sessions).

Durable keys survive page switches: the calibration settings and other widget values (`set.*`, with
widget keys `w.*` rebuilt from them when a page is revisited), `model_spec`, `calib` ({model ident: run
info}), the plan store (`plan`, `plan_ver`, earlier models' plans in `plans`), the selected `module`
(per model in `modules`), exports (`exports`, by model ident), evaluation results (`evals`, the last
few) and ρ measured along Fisher directions (`rho_fisher`, by calibration key).

State follows the model: whatever is derived from one (plans, the selected module, exports, the
budget and prompt widgets of `MODEL_SETTINGS`) is kept per model, so switching the sidebar's model
away and back shows each model its own, never another's.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from ..allocate import Plan, allocate
from ..analysis import Analysis

MAX_EVALS = 8  # evaluation results kept per session
MAX_PLANS = 8  # plans of other models / calibrations kept per session
# the budget of the plan a model starts with and of the allocation slider: the headline budget of the field's
# tables (90 / 80 / 60 % of parameters; at half of them a real model's perplexity is many times the dense one's)
DEFAULT_SHARE = 0.8
# Settings that belong to the model in the sidebar (kept per model spec): the allocation controls that
# made its plan and the free prompts (each model has its own default prompts).
MODEL_SETTINGS = frozenset({"alloc_method", "alloc_ratio", "alloc_scope", "tau", "alloc_kind", "gen_prompts"})
# Widgets that select something in one model's data (a fact of its probe, one of its modules): reset when
# the model changes.
MODEL_WIDGETS = ("w.kmap_fact", "w.rho_pick", "w.spec_module")


# ------------------------------------------------------------------------------------------ durable widgets
def _scope() -> str:
    return str(st.session_state.get("model_spec"))


def _durable(name: str) -> str:
    """`set.<name>`, or `set.<name>@<model spec>` for a setting of `MODEL_SETTINGS`."""
    return f"set.{name}@{_scope()}" if name in MODEL_SETTINGS else f"set.{name}"


def bind(name: str, default: Any) -> dict:
    """Keyword arguments for a widget whose value survives page switches.

    The widget key is `w.<name>`; its value is initialised from the durable key `set.<name>` (or
    `default`) when the widget is (re)created. Call `commit(name, value)` with what it returns. A
    setting of `MODEL_SETTINGS` is durable per model: the widget is rebuilt from the current model's
    value (or `default`) when the sidebar's model changes.
    """
    wkey, dkey = f"w.{name}", _durable(name)
    owners = st.session_state.setdefault("_bound_for", {})
    if wkey not in st.session_state or (name in MODEL_SETTINGS and owners.get(wkey) != _scope()):
        st.session_state[wkey] = st.session_state.get(dkey, default)
    if name in MODEL_SETTINGS:
        owners[wkey] = _scope()
    return {"key": wkey}


def commit(name: str, value: Any) -> Any:
    st.session_state[_durable(name)] = value
    return value


def setting(name: str, default: Any) -> Any:
    """A durable setting (the value its widget had last, for the current model when it is one of
    `MODEL_SETTINGS`), or `default`."""
    return st.session_state.get(_durable(name), default)


def model_switched(ident: str | None) -> bool:
    """Record the model drawn in the sidebar; True (once) when it differs from the last script run's.
    On a switch the widgets of `MODEL_WIDGETS` are dropped, so they are rebuilt for the new model."""
    last = st.session_state.get("_model_ident")
    st.session_state["_model_ident"] = ident
    if last is None or last == ident:
        return False
    for k in [k for k in st.session_state if isinstance(k, str) and k.startswith(MODEL_WIDGETS)]:
        del st.session_state[k]
    return True


# ------------------------------------------------------------------------------------------ calibration runs
def calib_info(spec: str | None) -> dict | None:
    return (st.session_state.get("calib") or {}).get(spec) if spec else None


def set_calib_info(spec: str, info: dict) -> None:
    st.session_state.setdefault("calib", {})[spec] = info


# ------------------------------------------------------------------------------------------ plan store
class PlanStore:
    """The session's rank plan for one (model, calibration, γ) — its owner.

    `plan` holds the current owner's plan; the plans of other owners wait in `plans` (the last
    few), so a model switched away and back finds its own plan again and never another's. `version`
    changes whenever the plan shown changes (replaced, or another owner's), so widgets that show a
    copy of it (editor, sliders) are redrawn from it. A plan the session made by itself (the default,
    before any Allocate, edit or load) is flagged `default`, so pages can say so.
    """

    def __init__(self, owner: list):
        self.owner = owner

    def _entry(self) -> dict | None:
        d = st.session_state.get("plan")
        if d and d.get("for") == self.owner:
            return d
        d = (st.session_state.get("plans") or {}).get(json.dumps(self.owner))
        if d is not None:   # this owner's plan from before a switch: current again, the other one waits
            self._store(d)
        return d

    def get(self, an: Analysis, model_fp: str = "") -> Plan:
        """The stored plan, or the default one (fasc at `DEFAULT_SHARE` of the parameters) the first time."""
        d = self._entry()
        if d:
            plan = Plan.from_dict(d["plan"])
            if plan.fits(an):
                return plan
        plan = allocate(an, "fasc", param_ratio=DEFAULT_SHARE, model_fp=model_fp)
        self.put(plan, default=True)
        return plan

    def put(self, plan: Plan, bump: bool = True, default: bool = False) -> None:
        self._store({"for": self.owner, "plan": plan.to_dict(), "default": default}, bump)

    def _store(self, entry: dict, bump: bool = True) -> None:
        old = st.session_state.get("plan")
        if old and old.get("for") != entry["for"]:
            bump = True
        st.session_state["plan"] = entry
        plans = st.session_state.setdefault("plans", {})
        plans.pop(json.dumps(entry["for"]), None)
        plans[json.dumps(entry["for"])] = entry
        while len(plans) > MAX_PLANS:
            plans.pop(next(iter(plans)))
        if bump:
            st.session_state["plan_ver"] = self.version + 1

    @property
    def is_default(self) -> bool:
        """True while the plan is the session's default one (nothing allocated, edited or loaded)."""
        d = self._entry()
        return bool(d and d.get("default"))

    @property
    def version(self) -> int:
        return st.session_state.get("plan_ver", 0)


# ------------------------------------------------------------------------------------------ selection
def _model_of(an: Analysis) -> str:
    return an.stats.model_fingerprint or an.stats.key


def selected_module(an: Analysis) -> str:
    """The selected fqn of this model (durable across pages, kept per model in `modules`); the module
    with the highest ρ at first."""
    fqn = (st.session_state.get("modules") or {}).get(_model_of(an))
    names = [i.fqn for i in an.modules]
    if fqn not in names:
        fqn = max(names, key=lambda f: an.rho(f)[0])
    select_module(fqn, an)
    return fqn


def select_module(fqn: str, an: Analysis | None = None) -> None:
    """Select `fqn` (of the analysis' model; of the model last shown when `an` is None)."""
    owner = _model_of(an) if an is not None else st.session_state.get("_module_for")
    st.session_state["module"] = fqn
    st.session_state["_module_for"] = owner
    st.session_state.setdefault("modules", {})[owner] = fqn


# ------------------------------------------------------------------------------------------ exports
def export_result(ident: str) -> dict | None:
    """This session's last export of the model `ident` (None if none)."""
    return (st.session_state.get("exports") or {}).get(ident)


def put_export_result(ident: str, res: dict) -> None:
    st.session_state.setdefault("exports", {})[ident] = res


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
