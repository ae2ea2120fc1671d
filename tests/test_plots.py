"""`fasc.plots`: every figure is built from plain data, on real report rows of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

import fasc
from fasc import plots


@pytest.fixture(scope="module")
def an(llama, llama_stats):
    return fasc.Analysis(llama, llama_stats)


@pytest.fixture(scope="module")
def rows(an):
    return an.report(0.5)


def test_layer_kind_grid(rows):
    Z, layers, kinds, names = plots.layer_kind_grid(rows, "rho")
    assert Z.shape == (2, 7) and layers == [0, 1] and kinds == ["q", "k", "v", "o", "gate", "up", "down"]
    r = rows[3]
    i, j = layers.index(r.layer), kinds.index(r.kind)
    assert Z[i, j] == pytest.approx(r.rho) and names[i][j] == r.fqn
    # a missing module is a NaN cell, and `values` overrides the field
    Z2, *_ , names2 = plots.layer_kind_grid(rows[1:], "rho", values={x.fqn: 7.0 for x in rows[1:]})
    assert np.isnan(Z2[0, 0]) and names2[0][0] == "" and np.nanmax(Z2) == 7.0


def test_rho_heatmap_cells_hover_and_selection(rows):
    fig = plots.rho_heatmap(rows, value="rho", selected=rows[5].fqn)
    heat, cells = fig.data
    assert heat.type == "heatmap" and heat.hoverinfo == "skip"
    # one invisible, clickable marker per module carries the fqn and the value (hover + on_select)
    assert cells.type == "scatter" and len(cells.x) == len(rows)
    cd = {c[0]: c[1] for c in cells.customdata}
    assert cd[rows[2].fqn] == pytest.approx(rows[2].rho)
    assert "%{customdata[0]}" in cells.hovertemplate
    assert fig.layout.clickmode == "event+select" and fig.layout.hoverdistance == -1
    (rect,) = fig.layout.shapes
    assert rect.line.color == "red" and rect.y0 == rows[5].layer - 0.5
    assert tuple(fig.layout.yaxis.range) == (1.5, -0.5)  # layer 0 on top, no margin beyond the cells


def test_rho_heatmap_values_and_signed(rows, an):
    plan = fasc.allocate(an, "fasc", rank_ratio=0.5)
    vals = {f: an.predicted(f, plan.methods[f], k) for f, k in plan.ranks.items()}
    fig = plots.rho_heatmap(rows, value="dl_plan", values=vals)
    assert np.nanmax(np.array(fig.data[0].z, dtype=float)) == pytest.approx(max(vals.values()))
    assert "current ranks" in fig.layout.title.text
    signed = plots.rho_heatmap(rows, value="rho_signed")
    assert signed.data[0].zmid == 0 and signed.data[0].colorscale[0][1].startswith("rgb")
    assert plots.rho_heatmap(rows, value="rho", title="T").layout.title.text == "T"


def test_rho_heatmap_writes_html_for_the_cli(rows, tmp_path):
    plots.rho_heatmap(rows, value="rho").write_html(tmp_path / "rho.html", include_plotlyjs="cdn")
    html = (tmp_path / "rho.html").read_text()
    assert "heatmap" in html and rows[0].fqn in html


def test_spectra_and_energy(an):
    f = an.modules[0].fqn
    mu, lam = an.variance_spectrum(f).numpy(), an.fisher_spectrum(f).numpy()
    fig = plots.spectra_figure(mu, lam, k=5)
    v, fi = fig.data
    assert fig.layout.yaxis.type == "log"
    assert np.nanmax(v.y) == pytest.approx(1.0) and np.nanmax(fi.y) == pytest.approx(1.0)
    assert list(v.customdata) == pytest.approx(list(np.clip(mu, 0, None)))
    assert any(s.x0 == 5 for s in fig.layout.shapes)
    assert fig.layout.yaxis.range[0] >= np.log10(plots.FLOOR) - 0.2  # round-off is not drawn
    e = plots.energy_figure(mu, lam, k=5)
    for tr in e.data:
        assert tr.y[0] == 0 and tr.y[-1] == pytest.approx(1.0) and np.all(np.diff(tr.y) >= -1e-12)
    # all-zero spectra (dead inputs) draw without NaN shares
    z = plots.energy_figure(np.zeros(4), np.zeros(4))
    assert np.all(np.isfinite(z.data[0].y))


def test_dl_curves_marks_the_rank(an):
    f = an.modules[4].fqn
    curves = {m: an.curve(f, m) for m in ("pca", "fasc")}
    fig = plots.dl_curves_figure(curves, k=3)
    lines = [t for t in fig.data if t.mode == "lines"]
    marks = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in lines] == ["pca", "fasc"]
    assert [m.y[0] for m in marks] == pytest.approx([curves["pca"][3], curves["fasc"][3]])
    assert curves["fasc"][3] <= curves["pca"][3] + 1e-12  # spec §3: FASC is optimal for the surrogate
    assert plots.dl_curves_figure(curves, k=3, log=True).layout.yaxis.type == "log"


def test_training_and_eval_figures():
    fig = plots.training_figure([0, 10, 50], [0.0, 0.4, None], [0.05, None, 0.2], current=1,
                                labels=["a", "b", "c"])
    rec, rho = fig.data
    assert rho.yaxis == "y2" and np.isnan(rec.y[2])
    assert fig.layout.shapes[0].x0 == 10
    rows = [{"model": "uncompressed", "recall": 0.8, "perplexity": 10.0},
            {"model": "plan (fasc)", "recall": 0.7, "perplexity": 11.0},
            {"model": "asvd (same budget)", "recall": 0.5, "perplexity": 12.0}]
    e = plots.eval_figure(rows)
    assert len(e.data) == 2 and list(e.data[0].x) == [r["model"] for r in rows]
    assert list(e.data[1].y) == [10.0, 11.0, 12.0]
    assert list(e.data[0].text) == ["80.0%", "70.0% (-10.0 pt)", "50.0% (-30.0 pt)"]
    assert list(e.data[1].text) == ["10.00", "11.00 (1.100×)", "12.00 (1.200×)"]
    # close values look apart: the recall axis spans them instead of starting at 0
    close = [dict(r, recall=v) for r, v in zip(rows, (1.0, 0.998, 0.993))]
    lo, hi = plots.eval_figure(close).layout.yaxis.range
    assert 0.98 < lo < 0.993 and 1.0 < hi < 1.02
    lo, hi = plots.eval_figure(rows).layout.yaxis2.range
    assert 9 < lo < 10 and 12 < hi < 13.5
