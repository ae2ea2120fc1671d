"""Plotly figures shared by the dashboard, the CLI (`fasc report --html`) and notebooks.

Every function takes plain data (report rows, arrays, dicts) and returns a `go.Figure`; nothing here
reads files or knows about Streamlit.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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
    "dl_plan": "predicted ΔL at the current ranks (nats/token)",
}
SHORT_LABELS = {"rho": "ρ", "rho_signed": "ρ (signed)", "rho_fisher": "ρ Fisher", "misalignment": "misalign.",
                "dl_fasc": "ΔL fasc", "dl_pca": "ΔL pca", "dl_plan": "ΔL plan"}
METHOD_COLORS = {"pca": "#636efa", "fasc": "#ef553b", "asvd": "#00cc96", "svd": "#ab63fa", "fwsvd": "#ffa15a"}
VARIANCE_COLOR, FISHER_COLOR = "#636efa", "#ef553b"
FLOOR = 1e-12  # spectra plots: relative eigenvalues below this are float64 round-off


def layer_kind_grid(rows, value: str, values: Mapping[str, float] | None = None
                    ) -> tuple[np.ndarray, list[int], list[str], list[list[str]]]:
    """(Z (layers × kinds) with NaN where absent, layer indices, kinds, fqn per cell).

    `values` ({fqn: v}) overrides the row field `value` (e.g. predicted ΔL at a rank plan).
    """
    kinds = kinds_in_order(rows)
    layers = sorted({r.layer for r in rows})
    Z = np.full((len(layers), len(kinds)), np.nan)
    names = [["" for _ in kinds] for _ in layers]
    li = {l: i for i, l in enumerate(layers)}
    ki = {k: j for j, k in enumerate(kinds)}
    for r in rows:
        v = values.get(r.fqn) if values is not None else getattr(r, value)
        Z[li[r.layer], ki[r.kind]] = np.nan if v is None else float(v)
        names[li[r.layer]][ki[r.kind]] = r.fqn
    return Z, layers, kinds, names


def wrap(text: str, width: int) -> str:
    """`text` broken into lines of at most `width` characters at spaces (Plotly's `<br>`): titles and
    colour-bar labels are never cut."""
    lines, cur = [], ""
    for word in str(text).split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return "<br>".join(lines + ([cur] if cur else []))


def rho_heatmap(rows, value: str = "rho", selected: str | None = None, title: str | None = None,
                values: Mapping[str, float] | None = None, label: str | None = None,
                height: int | None = None, zrange: tuple[float, float] | None = None) -> go.Figure:
    """Layers × module kind heatmap of a `ModuleReport` field; hover shows module and value.

    Args:
        rows: `ModuleReport`s (anything with fqn, layer, kind and the `value` field).
        value: the field to colour by (a key of VALUE_LABELS).
        selected: an fqn outlined in red.
        values: {fqn: v} shown instead of the field (e.g. predicted ΔL at the current ranks).
        label: the colour-bar / hover label (default from VALUE_LABELS).
        zrange: fixed colour range (zmin, zmax), e.g. to compare training checkpoints.
    """
    Z, layers, kinds, names = layer_kind_grid(rows, value, values)
    signed = value == "rho_signed"
    long = label or VALUE_LABELS.get(value, value)
    short = SHORT_LABELS.get(value, wrap(long, 14)) if label is None else wrap(label, 14)
    hover = "<b>%{customdata[0]}</b><br>layer %{y} · %{x}<br>" + long + ": %{customdata[1]:.4g}<extra></extra>"
    fig = go.Figure(go.Heatmap(
        z=Z, x=kinds, y=layers, colorscale="RdBu_r" if signed else "Viridis",
        zmid=0 if signed else None, xgap=2, ygap=2, colorbar=dict(title=dict(text=short), thickness=14),
        hoverinfo="skip", name="heatmap", zmin=zrange[0] if zrange else None, zmax=zrange[1] if zrange else None))
    # Heatmap cells cannot be selected in Plotly: one invisible marker per cell carries the hover text
    # and the click (the closest centre to the pointer is the cell under it, hoverdistance = -1).
    cells = [(kinds[j], layers[i], names[i][j], Z[i, j]) for i in range(len(layers)) for j in range(len(kinds))
             if names[i][j]]
    fig.add_trace(go.Scatter(
        x=[c[0] for c in cells], y=[c[1] for c in cells], customdata=[[c[2], c[3]] for c in cells],
        mode="markers", marker=dict(size=18, opacity=0, symbol="square"), showlegend=False, name="modules",
        selected=dict(marker=dict(opacity=0)), unselected=dict(marker=dict(opacity=0)), hovertemplate=hover))
    if selected:
        for i, row in enumerate(names):
            for j, n in enumerate(row):
                if n == selected:
                    fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=layers[i] - 0.5, y1=layers[i] + 0.5,
                                  line=dict(color="red", width=3))
    head = wrap(title or long, 72)   # a long title wraps: ≈ 72 characters fit the map's column at 1280 px
    top = 30 + 20 * (head.count("<br>") + 1)
    fig.update_layout(title=dict(text=head, font=dict(size=15)), xaxis_title="module kind", hovermode="closest", hoverdistance=-1,
                      clickmode="event+select", dragmode=False,
                      yaxis_title="layer", xaxis=dict(range=[-0.5, len(kinds) - 0.5]),
                      yaxis=dict(range=[layers[-1] + 0.5, layers[0] - 0.5], dtick=1),  # layer 0 on top
                      height=(height or max(300, 28 * len(layers) + 120)) + top - 50,
                      margin=dict(l=60, r=20, t=top, b=40))
    return fig


def _share(vals: np.ndarray) -> np.ndarray:
    tot = float(vals.sum())
    return vals / tot if tot > 0 else np.zeros_like(vals)


def spectra_figure(variance: Sequence[float], fisher: Sequence[float], k: int | None = None,
                   title: str = "Variance vs Fisher spectrum") -> go.Figure:
    """Eigenvalues of C_x (variance, μ) and of C_x^{1/2} C_h C_x^{1/2} (Fisher, λ), each divided by
    its largest, on a log scale; index i = 1..n; the chosen rank k is marked."""
    fig = go.Figure()
    for vals, name, color, raw_label in ((variance, "variance μ (C_x)", VARIANCE_COLOR, "μ"),
                                         (fisher, "Fisher λ (C_x½ C_h C_x½)", FISHER_COLOR, "λ")):
        v = np.clip(np.asarray(vals, dtype=float), 0, None)
        top = float(v.max()) if v.size and v.max() > 0 else 1.0
        y = np.where(v > 0, v / top, np.nan)
        fig.add_trace(go.Scatter(x=np.arange(1, len(v) + 1), y=y, customdata=v, mode="lines", name=name,
                                 line=dict(color=color, width=2),
                                 hovertemplate=f"i=%{{x}}<br>{raw_label}/max=%{{y:.3g}}<br>{raw_label}=%{{customdata:.4g}}"
                                               "<extra></extra>"))
    if k:
        _mark_rank(fig, k)
    lows = [float(np.nanmin(t.y)) for t in fig.data if np.any(np.isfinite(np.asarray(t.y, dtype=float)))]
    floor = max(min(lows) if lows else 1e-12, FLOOR)  # below ~1e-12 of the top it is round-off, not signal
    fig.update_layout(title=title, xaxis_title="eigen-direction i (descending)",
                      yaxis=dict(title="eigenvalue ÷ largest (log)", type="log", exponentformat="power",
                                 range=[np.log10(floor) - 0.2, 0.2]),
                      height=380, margin=dict(l=60, r=20, t=50, b=40), legend=dict(x=0.99, xanchor="right", y=0.99))
    return fig


def energy_figure(variance: Sequence[float], fisher: Sequence[float], k: int | None = None,
                  title: str = "Cumulative energy") -> go.Figure:
    """Share of Σμ and Σλ in the top-i eigenvalues (i = 0..n); the chosen rank k is marked."""
    fig = go.Figure()
    for vals, name, color in ((variance, "variance Σμ", VARIANCE_COLOR), (fisher, "Fisher Σλ", FISHER_COLOR)):
        v = np.clip(np.asarray(vals, dtype=float), 0, None)
        cum = np.concatenate([[0.0], np.cumsum(_share(v))])
        fig.add_trace(go.Scatter(x=np.arange(len(cum)), y=cum, mode="lines", name=name, line=dict(color=color, width=2),
                                 hovertemplate="top %{x}: %{y:.1%}<extra>" + name + "</extra>"))
    if k:
        _mark_rank(fig, k)
    fig.update_layout(title=title, xaxis_title="directions kept", yaxis=dict(title="share of total", tickformat=".0%",
                                                                              range=[0, 1.02]),
                      height=380, margin=dict(l=60, r=20, t=50, b=40), legend=dict(x=0.99, xanchor="right", y=0.05,
                                                                                   yanchor="bottom"))
    return fig


def dl_curves_figure(curves: Mapping[str, Sequence[float]], k: int | None = None, log: bool = False,
                     title: str = "Predicted ΔL(k)") -> go.Figure:
    """Predicted loss increase ΔL(k) (nats/token) per method, k = 0..min(m,n); the value at the chosen
    rank k is marked on every curve."""
    fig = go.Figure()
    for method, c in curves.items():
        c = np.asarray(c, dtype=float)
        color = METHOD_COLORS.get(method)
        y = np.where(c > 0, c, np.nan) if log else c
        fig.add_trace(go.Scatter(x=np.arange(len(c)), y=y, mode="lines", name=method, line=dict(color=color, width=2),
                                 hovertemplate="k=%{x}<br>ΔL=%{y:.4g}<extra>" + method + "</extra>"))
        if k is not None and 0 <= k < len(c):
            fig.add_trace(go.Scatter(x=[k], y=[c[k]], mode="markers", showlegend=False, name=f"{method} at k={k}",
                                     marker=dict(color=color, size=10, line=dict(color="white", width=1)),
                                     hovertemplate=f"{method} at k={k}: ΔL=%{{y:.4g}}<extra></extra>"))
    if k is not None:
        _mark_rank(fig, k)
    fig.update_layout(title=title, xaxis_title="rank k", yaxis=dict(title="predicted ΔL (nats/token)",
                                                                    type="log" if log else "linear"),
                      height=380, margin=dict(l=60, r=20, t=50, b=40), legend=dict(x=0.99, xanchor="right", y=0.99))
    return fig


def _mark_rank(fig: go.Figure, k: int) -> None:
    fig.add_vline(x=k, line=dict(color="#444", dash="dash", width=1),
                  annotation=dict(text=f"k = {k}", font=dict(size=11)), annotation_position="top")


def training_figure(steps: Sequence[float], recall: Sequence[float | None], rho: Sequence[float | None] | None = None,
                    current: int | None = None, labels: Sequence[str] | None = None,
                    title: str = "Fact recall and ρ over training") -> go.Figure:
    """Fact recall (left axis) and mean ρ (right axis) per checkpoint; `current` (an index) is marked."""
    x = list(steps)
    fig = go.Figure()
    text = list(labels) if labels is not None else None
    fig.add_trace(go.Scatter(x=x, y=[np.nan if v is None else v for v in recall], name="fact recall",
                             mode="lines+markers", line=dict(color="#00cc96", width=2), text=text,
                             hovertemplate="%{text}<br>recall %{y:.1%}<extra></extra>" if text else None))
    if rho is not None:
        fig.add_trace(go.Scatter(x=x, y=[np.nan if v is None else v for v in rho], name="mean ρ", yaxis="y2",
                                 mode="lines+markers", line=dict(color="#ef553b", width=2, dash="dot"), text=text,
                                 connectgaps=True,
                                 hovertemplate="%{text}<br>mean ρ %{y:.3f}<extra></extra>" if text else None))
    if current is not None and 0 <= current < len(x):
        fig.add_vline(x=x[current], line=dict(color="#444", dash="dash", width=1))
    fig.update_layout(title=title, xaxis_title="training step",
                      yaxis=dict(title="fact recall", tickformat=".0%", range=[0, 1.02]),
                      yaxis2=dict(title="mean ρ", overlaying="y", side="right", rangemode="tozero", showgrid=False,
                                  tickformat=".2f"),
                      height=420, margin=dict(l=60, r=60, t=50, b=90),
                      legend=dict(orientation="h", x=0.5, xanchor="center", y=-0.22, yanchor="top"))
    return fig


def _span(values: Sequence[float], floor: float) -> list[float]:
    """An axis range around `values` (padded by 15 % of their spread, at least `floor`; more above, for the
    labels), not from 0, so close values (100 / 99.8 / 99.3 %) look apart."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return [0.0, 1.0]
    lo, hi = min(v), max(v)
    pad = max(0.15 * (hi - lo), floor)
    return [lo - pad, hi + 2 * pad]


def eval_figure(rows: Sequence[Mapping]) -> go.Figure:
    """Fact recall and held-out perplexity of the evaluation rows (uncompressed first, then the plan and the
    baseline) as points on axes that span the values, with a dotted line at the uncompressed model's value
    and each model's difference to it in the labels."""
    from plotly.subplots import make_subplots

    names = [r["model"] for r in rows]
    rec = [float(r["recall"]) for r in rows]
    ppl = [float(r["perplexity"]) for r in rows]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("fact recall (top-1, higher is better)", "held-out perplexity (lower is better)"))
    colors = ["#888888", "#ef553b", "#636efa", "#00cc96"][: len(rows)]
    rec_text = [f"{v:.1%}" + ("" if i == 0 else f" ({100 * (v - rec[0]):+.1f} pt)") for i, v in enumerate(rec)]
    ppl_text = [f"{v:.2f}" + ("" if i == 0 or not ppl[0] else f" ({v / ppl[0]:.3f}×)") for i, v in enumerate(ppl)]
    fig.add_trace(go.Scatter(x=names, y=rec, mode="markers+text", marker=dict(color=colors, size=14), text=rec_text,
                             textposition="top center", showlegend=False, name="fact recall",
                             hovertemplate="%{x}: %{text}<extra></extra>"), 1, 1)
    fig.add_trace(go.Scatter(x=names, y=ppl, mode="markers+text", marker=dict(color=colors, size=14), text=ppl_text,
                             textposition="top center", showlegend=False, name="perplexity",
                             hovertemplate="%{x}: %{text}<extra></extra>"), 1, 2)
    if rows:
        for col, ref in ((1, rec[0]), (2, ppl[0])):
            fig.add_hline(y=ref, line=dict(color="#888888", dash="dot", width=1), row=1, col=col)
    fig.update_yaxes(tickformat=".1%", range=_span(rec, 0.005), row=1, col=1)
    fig.update_yaxes(range=_span(ppl, 0.005 * max(ppl, default=1.0)), row=1, col=2)
    fig.update_xaxes(range=[-0.5, len(rows) - 0.5])
    fig.update_layout(height=340, margin=dict(l=60, r=20, t=40, b=40))
    return fig


def retention_figure(table: Mapping) -> go.Figure:
    """Per task, each compressed model's accuracy as a share of the uncompressed model's (markers with the
    paired standard error), a line at 100 %; the axis spans the values, so 99.3 % and 100 % look apart."""
    ref = table["reference"]
    others = [m for m in table["models"] if m != ref]
    colors = ["#ef553b", "#636efa", "#00cc96", "#ab63fa"]
    fig = go.Figure()
    tasks = [r["task"] for r in table["rows"]]
    lo, hi = 1.0, 1.0
    for j, m in enumerate(others):
        ys, errs, text = [], [], []
        for r in table["rows"]:
            dense = r["values"][ref]
            ret = r["retention"][m]
            pair = r["paired"].get(f"{m} − {ref}")
            err = pair[1] / dense if pair and dense else 0.0
            ys.append(ret)
            errs.append(err)
            kept = r.get("known_kept", {}).get(m)
            text.append(f"{m}<br>{r['task']}: {100 * r['values'][m]:.1f} vs {100 * dense:.1f} "
                        f"({100 * ret:.1f} %)" + (f"<br>known kept {100 * kept:.1f} %" if kept == kept and kept
                                                  is not None else ""))
            if ret == ret and abs(ret) != float("inf"):
                lo, hi = min(lo, ret - err), max(hi, ret + err)
        fig.add_trace(go.Scatter(x=tasks, y=ys, mode="markers", name=m, marker=dict(size=11, color=colors[j % 4]),
                                 error_y=dict(type="data", array=errs, visible=True), hovertext=text,
                                 hoverinfo="text"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888888", annotation_text=ref, annotation_position="top left")
    pad = max(0.01, 0.08 * (hi - lo))
    fig.update_yaxes(title="accuracy / uncompressed", tickformat=".0%", range=[lo - pad, hi + pad])
    fig.update_layout(height=360, margin=dict(l=60, r=20, t=30, b=40), legend=dict(orientation="h", y=1.12))
    return fig
