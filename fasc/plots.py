"""Plotly figures shared by the dashboard, the CLI (`fasc report --html`) and notebooks."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .modules import kinds_in_order

VALUE_LABELS = {
    "rho": "ρ (mean |ρ(u)|, random directions)",
    "rho_signed": "ρ signed mean",
    "rho_fisher": "ρ along Fisher directions",
    "misalignment": "subspace misalignment (pca vs fasc)",
    "dl_fasc": "predicted ΔL fasc (nats/token)",
    "dl_pca": "predicted ΔL pca (nats/token)",
}


def layer_kind_grid(rows, value: str) -> tuple[np.ndarray, list[int], list[str], list[list[str]]]:
    """(Z (layers × kinds) with NaN where absent, layer indices, kinds, fqn per cell)."""
    kinds = kinds_in_order(rows)
    layers = sorted({r.layer for r in rows})
    Z = np.full((len(layers), len(kinds)), np.nan)
    names = [["" for _ in kinds] for _ in layers]
    li = {l: i for i, l in enumerate(layers)}
    ki = {k: j for j, k in enumerate(kinds)}
    for r in rows:
        v = getattr(r, value)
        Z[li[r.layer], ki[r.kind]] = np.nan if v is None else float(v)
        names[li[r.layer]][ki[r.kind]] = r.fqn
    return Z, layers, kinds, names


def rho_heatmap(rows, value: str = "rho", selected: str | None = None, title: str | None = None) -> go.Figure:
    """Layers × module kind heatmap of a `ModuleReport` field; hover shows module and value."""
    Z, layers, kinds, names = layer_kind_grid(rows, value)
    signed = value == "rho_signed"
    fig = go.Figure(go.Heatmap(
        z=Z, x=kinds, y=layers, customdata=names, colorscale="RdBu_r" if signed else "Viridis",
        zmid=0 if signed else None, colorbar=dict(title=VALUE_LABELS.get(value, value)[:18]),
        hovertemplate="%{customdata}<br>layer %{y}, %{x}<br>" + VALUE_LABELS.get(value, value)
                      + ": %{z:.4g}<extra></extra>"))
    if selected:
        for i, row in enumerate(names):
            for j, n in enumerate(row):
                if n == selected:
                    fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=layers[i] - 0.5, y1=layers[i] + 0.5,
                                  line=dict(color="red", width=3))
    fig.update_layout(title=title or VALUE_LABELS.get(value, value), xaxis_title="module kind",
                      yaxis_title="layer", yaxis=dict(autorange="reversed", dtick=1), height=max(300, 28 * len(layers) + 120),
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig
