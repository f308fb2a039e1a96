"""scsnn.evaluate: per-class report, rare classes, files and uns."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line

import scsnn
from scsnn.errors import InputError
from scsnn.evaluate import classification_report, format_table, per_class_table

pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")

TRUTH = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "Unassigned", "c"]


def test_classification_report_hand_made():
    r = classification_report(TRUTH, PRED, rare_threshold=0.2)
    assert r["n_cells"] == 6
    assert r["accuracy"] == pytest.approx(4 / 6)
    pc = {x["label"]: x for x in r["per_class"]}
    assert list(pc) == ["a", "b", "c"]  # true classes only, sorted
    assert pc["a"]["precision"] == pytest.approx(1.0)
    assert pc["a"]["recall"] == pytest.approx(2 / 3)
    assert pc["a"]["f1"] == pytest.approx(0.8)
    assert pc["b"]["precision"] == pytest.approx(0.5)
    assert pc["b"]["recall"] == pytest.approx(0.5)
    assert pc["b"]["f1"] == pytest.approx(0.5)
    assert pc["c"]["precision"] == pc["c"]["recall"] == pc["c"]["f1"] == pytest.approx(1.0)
    assert [pc[k]["support"] for k in "abc"] == [3, 2, 1]
    assert pc["a"]["fraction"] == pytest.approx(0.5)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    # "Unassigned" counts as an error and appears in the confusion matrix
    assert r["confusion"]["labels"] == ["a", "b", "c", "Unassigned"]
    assert r["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    # rare: c is 1/6 < 0.2
    assert r["rare_classes"] == ["c"]
    assert [pc[k]["rare"] for k in "abc"] == [False, False, True]
    assert r["rare_mean_recall"] == pytest.approx(1.0)
    assert all(x["in_model"] is None for x in r["per_class"])


def test_rare_threshold_boundary_and_model_classes():
    # b is exactly 2/6: not rare under a threshold of 1/3 (strictly below counts)
    r = classification_report(TRUTH, PRED, rare_threshold=2 / 6, model_classes=["a", "b"])
    assert r["rare_classes"] == ["c"]
    r = classification_report(TRUTH, PRED, rare_threshold=0.34, model_classes=["a", "b"])
    assert r["rare_classes"] == ["b", "c"]
    assert r["rare_mean_recall"] == pytest.approx(0.75)
    assert {x["label"]: x["in_model"] for x in r["per_class"]} == {"a": True, "b": True,
                                                                 "c": False}
    r = classification_report(TRUTH, PRED, rare_threshold=0.0)
    assert r["rare_classes"] == [] and r["rare_mean_recall"] is None


def test_classification_report_empty():
    with pytest.raises(InputError, match="no cells"):
        classification_report([], [])


def test_format_table():
    r = classification_report(TRUTH, PRED, rare_threshold=0.2)
    text = format_table(r)
    assert "accuracy 0.667" in text and "macro-F1 0.767" in text
    assert "rare classes (< 20% of cells): c" in text
    assert list(per_class_table(r)["label"]) == ["a", "b", "c"]


def _annotated_toy(n_rep=10) -> ad.AnnData:
    truth = TRUTH * n_rep
    pred = PRED * n_rep
    a = ad.AnnData(X=np.ones((len(truth), 2), dtype=np.float32))
    a.obs_names = [f"c{i}" for i in range(len(truth))]
    a.obs["truth"] = pd.Categorical(truth)
    a.obs["scsnn"] = pd.Categorical(pred, categories=["a", "b", "c", "Unassigned"])
    a.uns["scsnn"] = {"classes": np.array(["a", "b", "c"], dtype=object), "model": "abc123"}
    return a


def test_evaluate_writes_files_and_uns(tmp_path):
    a = _annotated_toy()
    out = tmp_path / "report"
    r = scsnn.evaluate(a, "truth", rare_threshold=0.2, out=out)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["model"] == "abc123" and r["truth_key"] == "truth" and r["n_cells_skipped"] == 0
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["macro_f1"] == pytest.approx(r["macro_f1"])
    assert on_disk["per_class"][0].keys() >= {"label", "support", "precision", "recall", "f1",
                                              "rare"}
    pc = pd.read_csv(out / "per_class.csv")
    assert list(pc.columns) == ["label", "support", "fraction", "precision", "recall", "f1",
                                "rare"]
    assert list(pc["support"]) == [30, 20, 10]
    assert list(pc["rare"]) == [False, False, True]
    cm = pd.read_csv(out / "confusion.csv", index_col=0)
    assert list(cm.columns) == ["a", "b", "c", "Unassigned"]
    assert cm.loc["a", "b"] == 10 and cm.loc["b", "Unassigned"] == 10
    ev = a.uns["scsnn_evaluation"]
    assert ev["accuracy"] == pytest.approx(4 / 6)
    assert list(ev["rare_classes"]) == ["c"]
    assert list(ev["per_class"]["label"]) == ["a", "b", "c"]
    # the AnnData still writes and reads back
    p = tmp_path / "a.h5ad"
    scsnn.write_h5ad_atomic(a, p)
    b = ad.read_h5ad(p)
    np.testing.assert_array_equal(b.uns["scsnn_evaluation"]["confusion"], cm.to_numpy())
    assert b.uns["scsnn_evaluation"]["macro_f1"] == pytest.approx(r["macro_f1"])


def test_evaluate_no_rare_class_still_writes(tmp_path):
    a = _annotated_toy()
    scsnn.evaluate(a, "truth", rare_threshold=0.0)
    scsnn.write_h5ad_atomic(a, tmp_path / "a.h5ad")
    assert len(ad.read_h5ad(tmp_path / "a.h5ad").uns["scsnn_evaluation"]["rare_classes"]) == 0


def test_evaluate_skips_missing_truth_and_restricts():
    a = _annotated_toy()
    t = np.array(a.obs["truth"], dtype=object)
    t[:6] = None
    a.obs["truth"] = pd.Categorical(t)
    r = scsnn.evaluate(a, "truth")
    assert r["n_cells_skipped"] == 6 and r["n_cells"] == 54
    a.uns["scsnn"]["classes"] = np.array(["a", "b"], dtype=object)
    r = scsnn.evaluate(a, "truth", restrict_to_model_classes=True)
    assert r["n_cells"] == 45 and [x["label"] for x in r["per_class"]] == ["a", "b"]


def test_evaluate_missing_keys():
    a = _annotated_toy()
    with pytest.raises(InputError, match="truth key 'nope' not in obs") as ei:
        scsnn.evaluate(a, "nope")
    assert_one_line(str(ei.value))
    with pytest.raises(InputError, match=r"no predictions in obs\['other'\]"):
        scsnn.evaluate(a, "truth", key_added="other")
    a.obs["none"] = pd.Categorical([None] * a.n_obs, categories=["a"])
    with pytest.raises(InputError, match="no cell has a usable true label"):
        scsnn.evaluate(a, "none")


def test_evaluate_real_annotation(pbmc_annotated, tmp_path):
    a = pbmc_annotated.copy()
    r = scsnn.evaluate(a, "cell_type", out=tmp_path / "ev")
    acc = (a.obs["scsnn"].astype(str) == a.obs["cell_type"].astype(str)).mean()
    assert r["accuracy"] == pytest.approx(acc)
    assert r["model"] == a.uns["scsnn"]["model"]
    assert {x["label"] for x in r["per_class"]} == set(a.obs["cell_type"].astype(str))
    assert all(x["in_model"] for x in r["per_class"])
    # pbmc68k_reduced: 8 and 13 of 700 cells are under 3%
    assert {"CD4+/CD45RA+/CD25- Naive T", "CD34+"} <= set(r["rare_classes"])
    scsnn.write_h5ad_atomic(a, tmp_path / "a.h5ad")
    assert "scsnn_evaluation" in ad.read_h5ad(tmp_path / "a.h5ad").uns


def test_unassigned_predictions_do_not_warn():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = classification_report(TRUTH, PRED)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert not [w for w in rec if issubclass(w.category, UserWarning)]


# -- energy and latency ----------------------------------------------------------------------
def test_energy_estimate_exact_counts():
    from scsnn.evaluate import E_AC_PJ, E_MAC_PJ, energy_estimate

    sizes = [10, 4, 3, 2]  # genes, hidden 4, hidden 3, classes
    ann_macs = 10 * 4 + 4 * 3 + 3 * 2
    # two cells, T = 2: 6 input spikes, 5 spikes in layer 1, 2 in layer 2 (totals)
    e = energy_estimate(sizes, timesteps=2, analog_input=False, spiking=True, n_cells=2,
                        input_events=6, layer_spikes=[5, 2])
    sops = (6 / 2) * 4 + (5 / 2) * 3 + (2 / 2) * 2
    assert e["sops_per_cell"] == pytest.approx(sops)
    assert e["macs_per_cell"] == 0
    assert e["snn_pj_per_cell"] == pytest.approx(E_AC_PJ * sops)
    assert e["ann_pj_per_cell"] == pytest.approx(E_MAC_PJ * ann_macs)
    assert e["ratio_ann_over_snn"] == pytest.approx(E_MAC_PJ * ann_macs / (E_AC_PJ * sops))
    assert e["spike_rate_per_layer"] == pytest.approx([5 / 2 / (4 * 2), 2 / 2 / (3 * 2)])
    assert e["input_spike_rate"] == pytest.approx(6 / 2 / (10 * 2))
    # analog input: the first layer costs its MACs once per cell, no input SOPs
    d = energy_estimate(sizes, timesteps=2, analog_input=True, spiking=True, n_cells=2,
                        layer_spikes=[5, 2])
    assert d["macs_per_cell"] == 40
    assert d["snn_pj_per_cell"] == pytest.approx(E_MAC_PJ * 40 + E_AC_PJ * (2.5 * 3 + 1 * 2))
    ann = energy_estimate(sizes, timesteps=1, analog_input=True, spiking=False, n_cells=2)
    assert ann["ratio_ann_over_snn"] == 1.0


def test_latency_report_curve_and_steps():
    from scsnn.evaluate import latency_report

    classes = ["a", "b"]
    truth = np.array(["a", "a", "b", "b"])
    # step 1: all "a"; step 2: 3 right; step 3: all right
    steps = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1]])
    r = latency_report(truth, steps, classes, decision_steps=np.array([1, 1, 2, 3]))
    assert r["accuracy_by_step"] == pytest.approx([0.5, 0.75, 1.0])
    assert r["macro_f1_by_step"][-1] == pytest.approx(1.0)
    assert r["macro_f1_by_step"][0] == pytest.approx((2 / 3 + 0) / 2)
    assert r["steps_to_99pct"] == 3
    assert r["mean_steps_early_exit"] == pytest.approx(7 / 4)
    flat = latency_report(truth, np.array([[0, 0], [0, 0], [1, 1], [1, 1]]), classes)
    assert flat["steps_to_99pct"] == 1 and flat["mean_steps_early_exit"] is None


def test_report_has_energy_and_latency(pbmc_annotated, tmp_path):
    import json

    a = pbmc_annotated.copy()
    rep = scsnn.evaluate(a, "cell_type", out=tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    e = on_disk["energy"]
    assert {"ratio_ann_over_snn", "snn_pj_per_cell", "ann_pj_per_cell",
            "spike_rate_per_layer"} <= set(e)
    assert e["ratio_ann_over_snn"] > 0 and all(0 <= r <= 1 for r in e["spike_rate_per_layer"])
    lat = on_disk["latency"]
    T = a.obsm["scsnn_step_labels"].shape[1]
    assert len(lat["macro_f1_by_step"]) == T and 1 <= lat["steps_to_99pct"] <= T
    assert lat["macro_f1_by_step"][-1] == pytest.approx(rep["macro_f1"], abs=1e-9)
    a.write_h5ad(tmp_path / "a.h5ad")  # energy/latency in uns still write


# -- Unassigned cells, counted apart ---------------------------------------------------------
def test_unassigned_counted_and_metrics_over_assigned_cells():
    r = classification_report(TRUTH, PRED)
    assert r["n_unassigned"] == 1 and r["fraction_unassigned"] == pytest.approx(1 / 6)
    a = r["assigned"]
    # over the 5 assigned cells: a a a b c predicted as a a b b c
    assert a["n_cells"] == 5 and a["accuracy"] == pytest.approx(4 / 5)
    assert a["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    f1_a, f1_b = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5
    assert a["macro_f1"] == pytest.approx((f1_a + f1_b + 1) / 3)
    text = format_table(r)
    assert ("Unassigned: 1 of 6 cells (16.7%) counted as errors above; over the 5 assigned "
            "cells: accuracy 0.800") in text
    none = classification_report(TRUTH, TRUTH)
    assert none["n_unassigned"] == 0 and none["assigned"]["accuracy"] == 1.0
    assert "Unassigned: 0 of 6 cells (0.0%)" in format_table(none)
    every = classification_report(TRUTH, ["Unassigned"] * 6)
    assert every["fraction_unassigned"] == 1.0 and every["assigned"]["accuracy"] is None
    assert "no cell is assigned" in format_table(every)


def test_evaluate_reports_unassigned_and_writes(tmp_path):
    a = _annotated_toy()
    r = scsnn.evaluate(a, "truth", out=tmp_path / "rep")
    assert r["n_unassigned"] == 10 and r["assigned"]["n_cells"] == 50
    on_disk = json.loads((tmp_path / "rep/report.json").read_text())
    assert on_disk["assigned"]["accuracy"] == pytest.approx(40 / 50)
    assert a.uns["scsnn_evaluation"]["assigned"]["accuracy"] == pytest.approx(40 / 50)
    scsnn.write_h5ad_atomic(a, tmp_path / "a.h5ad")  # the report in uns still writes
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert b.uns["scsnn_evaluation"]["n_unassigned"] == 10


def test_latency_report_takes_label_names_or_indices():
    from scsnn.evaluate import latency_report

    classes = ["a", "b", "c"]
    idx = np.array([[0, 0], [1, 0], [2, 2]])
    names = np.asarray(classes, dtype=object)[idx]
    truth = ["a", "a", "c"]
    assert latency_report(truth, idx, classes) == latency_report(truth, names, classes)


# -- calibration -----------------------------------------------------------------------------
def test_calibration_report_hand_made():
    from scsnn.evaluate import calibration_report

    conf = [0.0, 0.2, 0.5, 0.6, 0.9, 1.0]
    hit = [False, True, False, True, True, True]
    c = calibration_report(conf, hit, n_bins=2)
    assert c["n_bins"] == 2 and c["n_cells"] == 6
    b = c["bins"]
    assert b["lower"] == [0.0, 0.5] and b["upper"] == [0.5, 1.0]
    # bins are (lo, hi]: 0.5 belongs to the first, 0 joins the first
    assert b["count"] == [3, 3]
    assert b["mean_confidence"] == pytest.approx([0.7 / 3, 2.5 / 3])
    assert b["accuracy"] == pytest.approx([1 / 3, 1.0])
    ece = 0.5 * abs(0.7 / 3 - 1 / 3) + 0.5 * abs(2.5 / 3 - 1.0)
    assert c["ece"] == pytest.approx(ece)
    # an empty bin has no mean: None (JSON null), and is left out of the ECE
    e = calibration_report([0.95, 0.96], [True, False], n_bins=4)
    assert e["bins"]["count"] == [0, 0, 0, 2]
    assert e["bins"]["accuracy"][:3] == [None, None, None]
    assert e["ece"] == pytest.approx(abs(0.955 - 0.5))
    assert calibration_report([], [])["ece"] is None
    with pytest.raises(ValueError, match="differ in length"):
        calibration_report([0.5], [True, False])


def test_calibration_ece_equals_training_ece():
    from scsnn.evaluate import calibration_report
    from scsnn.training import expected_calibration_error

    rng = np.random.default_rng(1)
    z = rng.normal(size=(500, 6)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 6, size=500)
    c = calibration_report(p.max(1), p.argmax(1) == y)
    assert c["ece"] == pytest.approx(expected_calibration_error(p, y), abs=1e-12)
    assert sum(c["bins"]["count"]) == 500


def test_evaluate_reports_calibration(pbmc_annotated, tmp_path):
    from scsnn.training import expected_calibration_error

    a = pbmc_annotated.copy()
    r = scsnn.evaluate(a, "cell_type", out=tmp_path)
    cal = r["calibration"]
    classes = [str(c) for c in a.uns["scsnn"]["classes"]]
    y = np.array([classes.index(t) for t in a.obs["cell_type"].astype(str)])
    proba = np.asarray(a.obsm["scsnn_probabilities"], dtype=np.float64)
    assert cal["source"] == "probabilities" and cal["n_cells"] == a.n_obs
    assert cal["ece"] == pytest.approx(expected_calibration_error(proba, y), abs=1e-6)
    assert sum(cal["bins"]["count"]) == a.n_obs
    # the accuracy of all bins, weighted by their cells, is the accuracy of the top class
    acc = sum(n * x for n, x in zip(cal["bins"]["count"], cal["bins"]["accuracy"]) if n)
    assert acc / a.n_obs == pytest.approx(r["accuracy"])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["calibration"]["ece"] == pytest.approx(cal["ece"])
    assert "expected calibration error" in format_table(r)
    scsnn.write_h5ad_atomic(a, tmp_path / "a.h5ad")  # NaN bins write to .h5ad
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["scsnn_evaluation"]["calibration"]
    assert back["ece"] == pytest.approx(cal["ece"])
    assert list(back["bins"]["count"]) == cal["bins"]["count"]


def test_calibration_without_probabilities_counts_unassigned_wrong():
    a = _annotated_toy(n_rep=1)
    a.obs["scsnn_confidence"] = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.95], dtype=np.float32)
    r = scsnn.evaluate(a, "truth")
    cal = r["calibration"]
    assert cal["source"] == "labels" and cal["n_cells"] == 6
    # right: cells 0, 1, 3, 5; the Unassigned cell (0.3) counts as wrong
    from scsnn.evaluate import calibration_report

    hits = [True, True, False, True, False, True]
    assert cal["ece"] == pytest.approx(calibration_report(
        a.obs["scsnn_confidence"], hits)["ece"])
    # with probabilities, an Unassigned cell is judged by its top class
    proba = np.eye(3, dtype=np.float32)[[0, 0, 1, 1, 1, 2]]
    a.obsm["scsnn_probabilities"] = proba
    assert scsnn.evaluate(a, "truth")["calibration"]["source"] == "probabilities"
    # no confidence column: no calibration
    del a.obs["scsnn_confidence"]
    assert "calibration" not in scsnn.evaluate(a, "truth")
