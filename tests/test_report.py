"""Per-sample reports and the summary across samples (scsnn.report, scsnn.pl)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scsnn import pl
from scsnn.errors import InputError
from scsnn.report import read_annotations, sample_report, summarize


def test_report_with_truth(pbmc_annotated, tmp_path):
    a = pbmc_annotated.copy()
    s = sample_report(a, tmp_path / "s1", truth_key="cell_type")
    for f in ("report.md", "report.html", "report.json", "labels.csv", "per_class.csv",
              "confusion.csv", "composition.png", "confidence.png", "f1.png", "confusion.png",
              "recall.png", "dotplot.png", "reliability.png", "latency.png",
              "spike_rates.png"):
        assert (tmp_path / "s1" / f).is_file(), f
    assert s["sample"] == "s1" and s["n_cells"] == 700
    truth = a.obs["cell_type"].astype(str).to_numpy()
    pred = a.obs["scsnn"].astype(str).to_numpy()
    assert s["accuracy"] == pytest.approx((truth == pred).mean())
    labels = pd.read_csv(tmp_path / "s1/labels.csv", index_col=0)
    assert labels["cells"].sum() == 700
    assert labels.loc[pred[0], "cells"] == (pred == pred[0]).sum()
    md = (tmp_path / "s1/report.md").read_text()
    assert "macro-F1" in md and "![f1.png](f1.png)" in md
    assert json.loads((tmp_path / "s1/report.json").read_text())["macro_f1"] == s["macro_f1"]
    ev = json.loads((tmp_path / "s1/evaluation.json").read_text())
    assert s["ece"] == pytest.approx(ev["calibration"]["ece"]) and 0 <= s["ece"] <= 1
    assert "![reliability.png](reliability.png)" in md
    # no X_umap and no flag: no UMAP; nothing left out either
    assert not (tmp_path / "s1/umap.png").exists()
    assert "Left out" not in (tmp_path / "s1/report.html").read_text()


def test_report_without_truth_and_summary(pbmc_annotated, tmp_path):
    sample_report(pbmc_annotated.copy(), tmp_path / "a", truth_key="cell_type")
    s = sample_report(pbmc_annotated.copy(), tmp_path / "b", sample="unlabelled")
    assert "macro_f1" not in s
    assert not (tmp_path / "b/per_class.csv").exists()
    table = summarize([tmp_path / "a", tmp_path / "b"], tmp_path / "summary")
    assert list(table["sample"]) == ["a", "unlabelled"]
    assert np.isnan(table.loc[1, "macro_f1"]) or table.loc[1, "macro_f1"] is None
    comp = pd.read_csv(tmp_path / "summary/composition.tsv", sep="\t", index_col=0)
    assert comp["a"].sum() == comp["unlabelled"].sum() == 700
    md = (tmp_path / "summary/summary.md").read_text()
    assert "| unlabelled | 700 | n/a |" in md
    assert (tmp_path / "summary/summary.html").is_file()
    tsv = pd.read_csv(tmp_path / "summary/summary.tsv", sep="\t")
    assert "ece" in tsv.columns and tsv["ece"].notna().tolist() == [True, False]
    # without truth: no evaluation plots
    for f in ("recall.png", "reliability.png", "dotplot.png", "latency.png"):
        assert not (tmp_path / "b" / f).exists()


def test_summarize_refuses_missing_report(tmp_path):
    with pytest.raises(InputError, match="no report.json"):
        summarize([tmp_path], tmp_path / "out")


def test_read_annotations_reads_no_expression(pbmc_annotated, tmp_path):
    p = tmp_path / "a.h5ad"
    src = pbmc_annotated.copy()
    src.obsm["X_umap"] = np.zeros((src.n_obs, 2))
    src.obsm["X_other"] = np.zeros((src.n_obs, 2))
    src.write_h5ad(p)
    a = read_annotations(p)
    assert a.n_vars == 0 and a.n_obs == 700
    assert "scsnn_probabilities" in a.obsm and "scsnn" in a.uns
    assert "X_umap" in a.obsm and "X_other" not in a.obsm  # the UMAP panels can draw
    bare = pbmc_annotated.copy()
    del bare.obs["scsnn"]
    bare.write_h5ad(tmp_path / "bare.h5ad")
    with pytest.raises(InputError, match="run scsnn annotate first"):
        read_annotations(tmp_path / "bare.h5ad")


def test_plots_are_figures():
    counts = pd.Series({"B": 5, "T": 10})
    assert pl.composition(counts).axes
    assert pl.confidence(np.linspace(0, 1, 50), min_confidence=0.5).axes
    per_class = [{"label": "B", "f1": 0.5, "rare": True, "support": 3},
                 {"label": "T", "f1": 0.9, "rare": False, "support": 30}]
    assert pl.f1_per_class(per_class).axes
    fig = pl.confusion(["B", "T", "Unassigned"], np.array([[2, 1, 0], [0, 30, 0], [0, 0, 0]]),
                       true_labels=["B", "T"])
    assert fig.axes[0].images[0].get_array().shape == (2, 3)


def test_report_umap_flag_and_neuron_parameters(pbmc_annotated, pbmc_model, tmp_path):
    a = pbmc_annotated.copy()
    a.obsm.pop("X_umap", None)
    # umap=True: computed from the expression (on a subsample), the AnnData left as it is
    sample_report(a, tmp_path / "u", truth_key="cell_type", umap=True, umap_max_cells=300,
                  model=pbmc_model)
    assert (tmp_path / "u/umap.png").is_file() and (tmp_path / "u/neurons.png").is_file()
    assert "X_umap" not in a.obsm
    # umap=False: never, even with X_umap
    a.obsm["X_umap"] = np.random.default_rng(0).normal(size=(a.n_obs, 2))
    sample_report(a, tmp_path / "off", umap=False)
    assert not (tmp_path / "off/umap.png").exists()
    sample_report(a, tmp_path / "auto")  # default: drawn when X_umap is there
    assert (tmp_path / "auto/umap.png").is_file()
    # asked for, but no expression and no X_umap (as read by read_annotations): noted
    bare = ad.AnnData(obs=a.obs.copy(), uns=dict(a.uns))
    sample_report(bare, tmp_path / "bare", umap=True)
    assert not (tmp_path / "bare/umap.png").exists()
    assert "Left out: UMAP" in (tmp_path / "bare/report.html").read_text()


def test_a_failing_plot_does_not_fail_the_report(pbmc_annotated, tmp_path):
    s = sample_report(pbmc_annotated.copy(), tmp_path / "m", model=tmp_path / "no-model")
    assert s["n_cells"] == 700 and not (tmp_path / "m/neurons.png").exists()
    assert "Left out: Learned neuron parameters" in (tmp_path / "m/report.html").read_text()
