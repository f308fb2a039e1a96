"""scsnn.pl: every plot is a matplotlib Figure that draws without a screen, stays readable for
dozens of long class names, and survives empty classes and missing truth."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scsnn import pl
from scsnn.evaluate import calibration_report, classification_report

LONG = ["CD8+/CD45RA+ Naive Cytotoxic", "CD4+/CD45RA+/CD25- Naive T", "CD14+ Monocyte",
        "B", "Plasmacytoid dendritic cell"]


def _names(n: int) -> list[str]:
    return [f"{LONG[i % len(LONG)]} {i}" for i in range(n)]


def _draw(fig: Figure) -> bytes:
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    png = buf.getvalue()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return png


def _texts_inside(fig: Figure) -> None:
    """Every visible tick label and title lies inside the figure: no name is cut off."""
    canvas = FigureCanvasAgg(fig)  # Agg: no screen
    canvas.draw()
    r = canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        if not ax.axison:  # an axes switched off draws no tick labels
            continue
        texts = [*_shown(ax.xaxis), *_shown(ax.yaxis), ax.title]
        for t in texts:
            if not t.get_visible() or not t.get_text():
                continue
            e = t.get_window_extent(r)
            assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1, t.get_text()
            assert e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, t.get_text()


def _shown(axis) -> list:
    """The tick labels of an axis whose ticks lie in its view (the others are not drawn)."""
    lo, hi = sorted(axis.get_view_interval())
    return [t for loc, t in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if lo - 1e-9 <= loc <= hi + 1e-9]


def _no_overlap(labels: list) -> None:
    """Neighbouring tick labels do not overlap."""
    if not labels:
        return
    canvas = FigureCanvasAgg(labels[0].figure)
    canvas.draw()
    r = canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in labels if t.get_text()]
    for a, b in itertools.pairwise(boxes):
        assert not a.overlaps(b), "tick labels overlap"


@pytest.fixture(scope="module")
def many():
    """36 long-named classes (one without cells), predictions with errors and Unassigned."""
    rng = np.random.default_rng(0)
    names = _names(36)
    truth = rng.choice(names[:35], size=3000, p=rng.dirichlet(np.ones(35)))
    pred = np.where(rng.random(3000) < 0.8, truth, rng.choice(names + ["Unassigned"], 3000))
    return names, truth, pred


def test_pl_imports_no_pyplot():
    code = "import sys, scsnn.pl; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_confusion_has_counts_and_reads_with_many_classes(many):
    _, truth, pred = many
    r = classification_report(truth, pred)
    true_labels = [x["label"] for x in r["per_class"]]
    fig = pl.confusion(r["confusion"]["labels"], np.asarray(r["confusion"]["matrix"]),
                       true_labels=true_labels)
    ax = fig.axes[0]
    m = np.asarray(r["confusion"]["matrix"])
    shown = {t.get_text() for t in ax.texts}
    assert str(m.max()) in shown and "0" not in shown  # counts written, zeros left blank
    assert len(ax.texts) == int((m[[r["confusion"]["labels"].index(t) for t in true_labels]]
                                 > 0).sum())
    _draw(fig)
    _texts_inside(fig)
    _no_overlap(ax.get_yticklabels())
    _no_overlap(ax.get_xticklabels())
    assert not pl.confusion(["a"], np.zeros((1, 1)), true_labels=["a"]).axes[0].texts


def test_recall_marks_rare_types():
    per_class = [{"label": "CD8+/CD45RA+ Naive Cytotoxic", "recall": 0.9, "f1": 0.8,
                  "support": 300, "rare": False},
                 {"label": "CD34+", "recall": 0.2, "f1": 0.3, "support": 5, "rare": True},
                 {"label": "empty", "recall": 0.0, "f1": 0.0, "support": 0, "rare": True}]
    fig = pl.recall_per_class(per_class, rare_threshold=0.03)
    ax = fig.axes[0]
    colours = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert colours["CD34+"] == colours["empty"] != colours["CD8+/CD45RA+ Naive Cytotoxic"]
    heights = sorted(round(p.get_width(), 3) for p in ax.patches)
    assert heights == [0.0, 0.2, 0.9]
    assert any("rare (< 3% of cells)" in t.get_text() for lg in fig.legends
               for t in lg.get_texts())
    assert any("n=5" in t.get_text() for t in ax.texts)
    _draw(fig)
    _texts_inside(fig)
    assert pl.f1_per_class(per_class).axes
    _draw(pl.recall_per_class([]))


def test_recall_and_f1_read_with_many_classes(many):
    _, truth, pred = many
    r = classification_report(truth, pred)
    for fig in (pl.recall_per_class(r["per_class"]), pl.f1_per_class(r["per_class"])):
        _draw(fig)
        _texts_inside(fig)
        _no_overlap(fig.axes[0].get_yticklabels())


def test_dotplot_fractions(many):
    truth = pd.Categorical(["a", "a", "a", "b", "b"], categories=["a", "b", "never"])
    pred = ["a", "a", "b", "b", "Unassigned"]
    fig = pl.dotplot(truth, pred)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "never"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "Unassigned"]
    pts = ax.collections[0]
    xy = pts.get_offsets()
    vals = dict(zip(map(tuple, np.asarray(xy).astype(int)), pts.get_array()))
    assert vals == pytest.approx({(0, 0): 2 / 3, (1, 0): 1 / 3, (1, 1): 0.5, (2, 1): 0.5})
    _draw(fig)
    _, truth, pred = many
    big = pl.dotplot(truth, pred)
    _draw(big)
    _texts_inside(big)
    _no_overlap(big.axes[0].get_yticklabels())
    _draw(pl.dotplot([], []))


def test_reliability_diagram():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 400)
    cal = calibration_report(conf, rng.random(400) < conf, n_bins=10)
    fig = pl.reliability(cal)
    top, bottom = fig.axes
    assert "ECE" in top.get_title()
    # the diagonal, and one count written per non-empty bin
    assert any(np.allclose(line.get_xydata(), [[0, 0], [1, 1]]) for line in top.lines)
    n_full = sum(1 for n in cal["bins"]["count"] if n)
    assert sorted(int(t.get_text()) for t in bottom.texts) == sorted(
        n for n in cal["bins"]["count"] if n)
    assert len(bottom.texts) == n_full < 10
    _draw(fig)
    _texts_inside(fig)
    assert pl.reliability({"calibration": cal}).axes  # an evaluation dict works too
    _draw(pl.reliability(calibration_report([], [])))


def test_spike_rates():
    fig = pl.spike_rates({"spike_rate_per_layer": np.array([0.1, 0.25]),
                          "input_spike_rate": 0.05})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["input", "hidden 1", "hidden 2"]
    assert [round(p.get_height(), 3) for p in ax.patches] == [0.05, 0.1, 0.25]
    _draw(fig)
    ann = pl.spike_rates({"spike_rate_per_layer": []})
    assert "no spiking layers" in ann.axes[0].texts[0].get_text()
    _draw(ann)
    assert len(pl.spike_rates([0.2]).axes[0].patches) == 1


def test_latency_curve_and_composition():
    fig = pl.latency_curve({"macro-F1": [0.5, 0.7, 0.8], "accuracy": [0.6, 0.8, 0.9]},
                           ylabel="score")
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_ylabel() == "score"
    _draw(fig)
    counts = pd.Series({n: i + 1 for i, n in enumerate(_names(30))} | {"Unassigned": 4})
    comp = pl.composition(counts)
    _draw(comp)
    _texts_inside(comp)
    _no_overlap(comp.axes[0].get_yticklabels())
    _draw(pl.composition(pd.Series(dtype=int)))
    _draw(pl.confidence(np.array([0.2, 0.9]), min_confidence=0.5))


def _umap_adata(n: int = 400, with_truth: bool = True) -> ad.AnnData:
    rng = np.random.default_rng(0)
    names = _names(25)
    lab = rng.choice(names, n)
    a = ad.AnnData(obs=pd.DataFrame({"scsnn": pd.Categorical(lab),
                                     "scsnn_confidence": rng.random(n).astype(np.float32)},
                                    index=[f"c{i}" for i in range(n)]))
    if with_truth:
        a.obs["truth"] = pd.Categorical(np.where(rng.random(n) < 0.2, names[0], lab))
    a.obsm["X_umap"] = rng.normal(size=(n, 2))
    return a


def test_umap_panels_from_x_umap():
    a = _umap_adata()
    fig = pl.umap(a, truth_key="truth")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["reference: truth", "predicted: scsnn",
                                                 "confidence"]
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 25
    assert all(len(ax.collections[0].get_offsets()) == 400 for ax in panels)
    _draw(fig)
    # no truth: prediction and confidence only
    b = _umap_adata(with_truth=False)
    assert len([ax for ax in pl.umap(b).axes if ax.get_title()]) == 2
    del b.obsm["X_umap"]
    with pytest.raises(ValueError, match="no expression"):
        pl.umap(ad.AnnData(obs=b.obs))


def test_umap_computed_on_a_subsample(pbmc_annotated):
    a = pbmc_annotated.copy()
    a.obsm.pop("X_umap", None)
    fig = pl.umap(a, truth_key="cell_type", max_cells=300)
    assert "300 of 700 cells" in fig.texts[0].get_text() if fig.texts else \
        "300 of 700 cells" in fig._suptitle.get_text()
    assert "X_umap" not in a.obsm  # the user's AnnData is left as it is
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert all(len(ax.collections[0].get_offsets()) == 300 for ax in panels)
    _draw(fig)


def test_neuron_parameters(pbmc_model):
    fig = pl.neuron_parameters(pbmc_model)
    n_layers = len(pbmc_model.network.hifi_layers())
    assert len(fig.axes) == 4 * n_layers
    assert all("sd" in ax.get_title(loc="right") for ax in fig.axes)
    _draw(fig)
    _texts_inside(fig)
