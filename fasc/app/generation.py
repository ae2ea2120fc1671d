"""Side-by-side generations on the Ranks page: free prompts continued greedily by the uncompressed
model, the plan and the baseline at the same budget, streamed token by token into three columns
(text wraps, nothing is cut), with the cost estimated before it starts, progress with an ETA and a
Cancel button. The compressed copies come from `fasc.app.copies` (built once per plan, shared with
Evaluate, Compare and Export)."""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import streamlit as st

from . import copies as CP
from . import ui
from ..allocate import Plan
from ..data import load_probe
from ..errors import FascError
from ..generate import seconds_per_new_token, stream_continuations
from ..pipeline import model_defaults

MAX_RESULTS = 16   # generations kept in memory (small: text)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>$~])")


def md_escape(text: str) -> str:
    """`text` shown literally by st.markdown (a model's output may hold *, #, <, $ …); line breaks kept."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def block(prompt: str, continuation: str, finished: bool = True) -> str:
    """One prompt and its continuation, as markdown: the prompt in bold, then the model's text."""
    tail = md_escape(continuation) if continuation else ("*(end of text at once)*" if finished else "…")
    return f"**{md_escape(prompt)}** {tail}"


@st.cache_resource(show_spinner=False)
def _results() -> OrderedDict:
    """{key: {model name: [continuation per prompt]}}: the last `MAX_RESULTS` generations."""
    return OrderedDict()


@st.cache_data(show_spinner=False, max_entries=16)
def _step_seconds(ident: str, batch: int, _model, _tok) -> float:
    return seconds_per_new_token(_model, _tok, batch=batch)


def generation_seconds(ctx, n_models: int, n_prompts: int, n_tokens: int) -> float:
    """≈ seconds of greedy decoding: models × (tokens + the prompts' pass) × this model's measured seconds
    per step for the prompts decoded together (timed once per model, device and number of prompts), the
    models side by side over the CPU's threads (`fasc.generate.stream_continuations`)."""
    import torch

    side = min(n_models, torch.get_num_threads()) if next(ctx.lm.model.parameters()).device.type == "cpu" else 1
    return n_models / max(1, side) * (n_tokens + 1) * _step_seconds(ctx.lm.ident, n_prompts, ctx.lm.model, ctx.lm.tok)


def cost_line(ctx, plan: Plan, baseline: str, n_prompts: int, n_tokens: int) -> str:
    """'≈ 40 s: builds 2 compressed copies (≈ 31 s), then 3 models × 3 prompts × 32 tokens (≈ 9 s)'."""
    todo, build = CP.pair_cost(ctx, plan, baseline)
    gen = generation_seconds(ctx, 3, n_prompts, n_tokens)
    work = f"3 models × {n_prompts} prompt{'s' * (n_prompts != 1)} × {n_tokens} tokens"
    if todo:
        return (f"≈ {ui.minutes(build + gen)}: builds {todo} compressed cop{'ies' if todo > 1 else 'y'} "
                f"(≈ {ui.minutes(build)}), then {work} (≈ {ui.minutes(gen)})")
    return f"≈ {ui.minutes(gen)}: {work} (the compressed copies are built)"


def default_prompt(spec: str) -> str:
    ex = load_probe(model_defaults(spec).probe)[:2]
    return "\n".join(e.prompt for e in ex)


def columns(names: list[str], prompts: list[str], texts: dict[str, list[str]] | None = None) -> dict:
    """Three columns (one per model), one bordered block per prompt; returns {name: [placeholder per
    prompt]} for streaming, filled from `texts` when given."""
    slots = {}
    for col, name in zip(st.columns(len(names), gap="small"), names):
        col.markdown(f"**{name}**")
        slots[name] = []
        for i, p in enumerate(prompts):
            slot = col.container(border=True).empty()
            slot.markdown(block(p, texts[name][i]) if texts else block(p, "", finished=False))
            slots[name].append(slot)
    return slots


def run(ctx, models_for, names: list[str], prompts: list[str], n_tokens: int) -> dict[str, list[str]]:
    """Build what is missing (progress bars), then stream the three models' tokens into the columns with
    a progress bar (tokens done / total, ETA) and a Cancel button; returns the texts (only when complete)."""
    cancel = st.empty()   # cleared when the work ends: no Cancel left on screen
    cancel.button("Cancel", key="w.gen_cancel", icon=":material/cancel:")   # a click reruns: the run stops
    bar = None
    try:
        models = dict(zip(names, models_for()))
        texts = {name: [""] * len(prompts) for name in names}
        slots = columns(names, prompts)
        bar = ui.ProgressBar("Generating", unit="tokens")
        total = len(names) * len(prompts) * n_tokens
        for i, name, text, done in stream_continuations(models, ctx.lm.tok, prompts, n_tokens):
            texts[name][i] = text
            slots[name][i].markdown(block(prompts[i], text, finished=False))
            bar(done, total)
        for name in names:   # a model that stopped at once says so
            for i, p in enumerate(prompts):
                if not texts[name][i]:
                    slots[name][i].markdown(block(p, ""))
        return texts
    finally:
        if bar is not None:
            bar.clear()
        cancel.empty()


def generation_panel(ctx, plan: Plan, baseline: str) -> None:
    """Free prompts completed greedily by the dense model, the plan and the baseline at the same budget."""
    st.markdown("**Side-by-side generations** — greedy, the same prompts for each model")
    c = st.columns([5, 1, 1], vertical_alignment="bottom")
    text = c[0].text_area("Prompts (one per line)", height=80, **ui.bind("gen_prompts", default_prompt(ctx.lm.spec)))
    ui.commit("gen_prompts", text)
    n = int(c[1].number_input("Tokens", 1, 256, step=8, **ui.bind("gen_tokens", 24)))
    ui.commit("gen_tokens", n)
    go = c[2].button("Generate", key="w.generate", icon=":material/play_arrow:")
    prompts = [p.strip() for p in text.splitlines() if p.strip()]
    names = ["uncompressed", "plan", f"{baseline} (same budget)"]
    key = json.dumps(["gen", CP.key(ctx, plan), baseline, prompts, n])
    store = _results()
    if st.session_state.get("w.gen_cancel"):
        st.warning("Generation cancelled; nothing was kept.", icon=":material/cancel:")
    if go and key not in store:
        if not prompts:
            raise FascError("No prompt given; write at least one line of text to continue.")
        st.caption(cost_line(ctx, plan, baseline, len(prompts), n))
        store[key] = run(ctx, lambda: list(CP.three_models(ctx, plan, baseline).values()), names, prompts, n)
        while len(store) > MAX_RESULTS:
            store.popitem(last=False)
        return
    if key in store:
        columns(names, prompts, store[key])
    elif prompts:
        st.caption(cost_line(ctx, plan, baseline, len(prompts), n) + ". The compressed copies are kept for "
                   "Evaluate, Compare and Export too.")
