"""Per-sample reports and the summary across samples (scsnn.report, scsnn.pl)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scsnn import pl
from scsnn.errors import InputError
from scsnn.report import read_annotations, sample_report, summarize


def test_report_with_truth(pbmc_annotated, tmp_path):
    a = pbmc_annotated.copy()
    s = sample_report(a, tmp_path / "s1", truth_key="cell_type")
    for f in ("report.md", "report.json", "labels.csv", "per_class.csv", "confusion.csv",
              "composition.png", "confidence.png", "f1.png", "confusion.png"):
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


def test_summarize_refuses_missing_report(tmp_path):
    with pytest.raises(InputError, match="no report.json"):
        summarize([tmp_path], tmp_path / "out")


def test_read_annotations_reads_no_expression(pbmc_annotated, tmp_path):
    p = tmp_path / "a.h5ad"
    pbmc_annotated.write_h5ad(p)
    a = read_annotations(p)
    assert a.n_vars == 0 and a.n_obs == 700
    assert "scsnn_probabilities" in a.obsm and "scsnn" in a.uns
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
