"""Per-cell-type evaluation of predictions against known labels, rare classes called out."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from .errors import InputError

logger = logging.getLogger("scsnn")

RARE_THRESHOLD = 0.03

#: Equal-width confidence bins of the reliability diagram (as in training's calibration).
CALIBRATION_BINS = 15

#: The label of cells left unassigned (top probability under ``min_confidence``).
UNASSIGNED = "Unassigned"


def classification_report(
    truth: ArrayLike,
    pred: ArrayLike,
    *,
    rare_threshold: float = RARE_THRESHOLD,
    model_classes: list[str] | None = None,
    unassigned: str = UNASSIGNED,
) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy and a per-class table.

    Averages run over the true classes present (support > 0). A class is *rare* when it is
    under ``rare_threshold`` of the evaluated cells. Predicted labels that are no true class
    (including "Unassigned") count as errors for the cells that carry them.

    Cells predicted ``unassigned`` are also counted apart: ``n_unassigned`` and
    ``fraction_unassigned``, and ``assigned`` holds ``n_cells``, ``accuracy``, ``macro_f1``
    and ``balanced_accuracy`` over the assigned cells only (``None`` when every cell is
    unassigned), so that a strict ``min_confidence`` is seen for what it does: fewer cells
    called, and those called more often right.
    """
    # scikit-learn loads in seconds: only where a report is made, not on every import
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    t = np.asarray(pd.Series(truth).astype(str))
    p = np.asarray(pd.Series(pred).astype(str))
    if t.size == 0:
        raise InputError("no cells to evaluate")
    true_labels = sorted(np.unique(t).tolist())
    all_labels = true_labels + sorted(set(np.unique(p).tolist()) - set(true_labels))
    prec, rec, f1, sup = precision_recall_fscore_support(
        t, p, labels=true_labels, zero_division=0
    )
    n = t.size
    per_class = []
    for i, lab in enumerate(true_labels):
        per_class.append(
            {
                "label": lab,
                "support": int(sup[i]),
                "fraction": float(sup[i] / n),
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "rare": bool(sup[i] / n < rare_threshold),
                "in_model": None if model_classes is None else lab in model_classes,
            }
        )
    rare = [r for r in per_class if r["rare"]]
    cm = confusion_matrix(t, p, labels=all_labels)
    report = {
        "n_cells": int(n),
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(np.mean(f1)),
        # mean recall over the true classes (predicted-only labels such as "Unassigned"
        # count as misses), i.e. balanced accuracy
        "balanced_accuracy": float(np.mean(rec)),
        "rare_threshold": float(rare_threshold),
        "rare_classes": [r["label"] for r in rare],
        "rare_mean_recall": float(np.mean([r["recall"] for r in rare])) if rare else None,
        "per_class": per_class,
        "confusion": {"labels": all_labels, "matrix": cm.tolist()},
    }
    report.update(_assigned_figures(t, p, unassigned))
    return report


def _assigned_figures(t: np.ndarray, p: np.ndarray, unassigned: str) -> dict[str, Any]:
    """Unassigned cells counted, and the summary metrics over the assigned cells only."""
    kept = p != unassigned
    n_un = int((~kept).sum())
    assigned: dict[str, Any] = {"n_cells": int(kept.sum()), "accuracy": None,
                                "macro_f1": None, "balanced_accuracy": None}
    if kept.any():
        from sklearn.metrics import precision_recall_fscore_support

        ta, pa = t[kept], p[kept]
        labels = sorted(np.unique(ta).tolist())
        _, rec, f1, _ = precision_recall_fscore_support(ta, pa, labels=labels,
                                                        zero_division=0)
        assigned.update(accuracy=float(np.mean(ta == pa)), macro_f1=float(np.mean(f1)),
                        balanced_accuracy=float(np.mean(rec)))
    return {"unassigned_label": unassigned, "n_unassigned": n_un,
            "fraction_unassigned": float(n_un / t.size), "assigned": assigned}



def evaluate(
    adata: ad.AnnData,
    truth_key: str,
    *,
    key_added: str = "scsnn",
    rare_threshold: float = RARE_THRESHOLD,
    restrict_to_model_classes: bool = False,
    out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compare ``obs[key_added]`` (from :func:`scsnn.tl.annotate`) with ``obs[truth_key]``.

    Parameters
    ----------
    restrict_to_model_classes
        Evaluate only cells whose true label is one of the model's classes (for a query
        that holds cell types the reference lacks).
    out
        Folder to write ``report.json``, ``per_class.csv`` and ``confusion.csv`` into.

    Returns
    -------
    The report dict (``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``per_class``, ...),
    also stored in ``uns[f"{key_added}_evaluation"]``. The summary metrics run over all the
    evaluated cells, "Unassigned" ones counted as errors; ``n_unassigned``,
    ``fraction_unassigned`` and ``assigned`` (the same metrics over the assigned cells only)
    say how many cells ``min_confidence`` left out and how the others fared.
    ``calibration`` (with ``obs[f"{key_added}_confidence"]``): the expected calibration error
    of the confidences against the truth and the reliability-diagram bins, see
    :func:`calibration_report`.
    """
    if key_added not in adata.obs.columns:
        raise InputError(f"no predictions in obs['{key_added}']: run scsnn annotate first")
    if truth_key not in adata.obs.columns:
        raise InputError(f"truth key '{truth_key}' not in obs")
    truth = adata.obs[truth_key]
    pred = adata.obs[key_added].astype(str)
    mask = truth.notna().to_numpy()
    model_classes = None
    if key_added in adata.uns and "classes" in adata.uns[key_added]:
        model_classes = [str(c) for c in adata.uns[key_added]["classes"]]
    if restrict_to_model_classes and model_classes is not None:
        mask &= truth.astype(str).isin(model_classes).to_numpy()
    if not mask.any():
        raise InputError("no cell has a usable true label")
    report = classification_report(
        truth[mask].astype(str), pred[mask], rare_threshold=rare_threshold,
        model_classes=model_classes,
    )
    report["truth_key"] = truth_key
    report["key_added"] = key_added
    info = adata.uns.get(key_added, {})
    if "energy" in info:
        report["energy"] = {k: _plain(v) for k, v in info["energy"].items()}
    steps_key = f"{key_added}_step_labels"
    if steps_key in adata.obsm and model_classes is not None:
        dec_key = f"{key_added}_decision_step"
        report["latency"] = latency_report(
            truth[mask].astype(str),
            np.asarray(adata.obsm[steps_key])[mask],
            model_classes,
            decision_steps=adata.obs[dec_key].to_numpy()[mask] if dec_key in adata.obs else None,
        )
    cal = _calibration_of(adata, key_added, truth[mask].astype(str).to_numpy(), mask,
                          model_classes)
    if cal is not None:
        report["calibration"] = cal
    report["n_cells_skipped"] = int((~mask).sum())
    if key_added in adata.uns:
        report["model"] = str(adata.uns[key_added].get("model", ""))
    adata.uns[f"{key_added}_evaluation"] = _uns_safe(report)
    if out is not None:
        write_report(report, out)
    return report


def calibration_report(
    confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """Expected calibration error and the data of a reliability diagram.

    ``confidence`` is the probability a cell's top class was given, ``correct`` whether that
    class is the cell's true label. Cells fall in ``n_bins`` equal-width bins ``(lo, hi]`` of
    confidence (a confidence of 0 joins the first bin); the ECE is the cell-weighted mean gap
    ``|mean confidence - accuracy|`` over the bins, the figure that
    :func:`scsnn.training.expected_calibration_error` gives at training time.

    Returns
    -------
    ``{"ece", "n_bins", "n_cells", "bins"}``; ``bins`` holds the lists ``lower``, ``upper``,
    ``count``, ``mean_confidence`` and ``accuracy`` (``None`` for an empty bin).
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != hit.shape:
        raise ValueError("confidence and correct differ in length")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds (edges[i], edges[i + 1]]; 0 joins bin 0, anything above 1 the last bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = conf.size
    counts, means, accs = [], [], []
    ece = 0.0
    for i in range(n_bins):
        inside = idx == i
        k = int(inside.sum())
        counts.append(k)
        if k:
            mc, ac = float(conf[inside].mean()), float(hit[inside].mean())
            ece += k / n * abs(mc - ac)
            means.append(mc)
            accs.append(ac)
        else:
            means.append(None)
            accs.append(None)
    return {
        "ece": float(ece) if n else None,
        "n_bins": int(n_bins),
        "n_cells": int(n),
        "bins": {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": counts,
                 "mean_confidence": means, "accuracy": accs},
    }


def _calibration_of(adata: ad.AnnData, key_added: str, truth: np.ndarray, mask: np.ndarray,
                    model_classes: list[str] | None) -> dict[str, Any] | None:
    """Calibration of ``obs[KEY_confidence]`` against the truth of the evaluated cells.

    A cell counts as right when its top class is its true label: the top class of
    ``obsm[KEY_probabilities]`` where present (so cells that ``min_confidence`` left
    "Unassigned" are judged by the class their confidence belongs to), else the predicted
    label ("Unassigned" counted as wrong). ``None`` without a confidence column.
    """
    conf_key = f"{key_added}_confidence"
    if conf_key not in adata.obs.columns:
        return None
    conf = adata.obs[conf_key].to_numpy(dtype=np.float64)[mask]
    prob_key = f"{key_added}_probabilities"
    top = None
    if prob_key in adata.obsm and model_classes is not None:
        proba = np.asarray(adata.obsm[prob_key])
        if proba.ndim == 2 and proba.shape[1] == len(model_classes):
            top = np.asarray(model_classes, dtype=object)[proba[mask].argmax(1)].astype(str)
    source = "probabilities"
    if top is None:
        top = adata.obs[key_added].astype(str).to_numpy()[mask]
        source = "labels"
    ok = np.isfinite(conf)
    if not ok.any():
        return None
    cal = calibration_report(conf[ok], top[ok] == truth[ok])
    cal["source"] = source
    return cal


def _plain(v: Any) -> Any:
    """numpy values from .h5ad as plain JSON-able Python values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _uns_safe(report: dict[str, Any]) -> dict[str, Any]:
    """The report in a form that AnnData writes to .h5ad (no None, no list of dicts)."""
    pc = pd.DataFrame(report["per_class"]).drop(columns=["in_model"])
    safe = {k: v for k, v in report.items()
            if k not in ("per_class", "confusion", "energy", "latency", "calibration")
            and v is not None}
    for k in ("energy", "latency", "assigned"):
        if k in report:
            safe[k] = {kk: vv for kk, vv in report[k].items() if vv is not None}
    if "calibration" in report:
        cal = report["calibration"]
        safe["calibration"] = {k: v for k, v in cal.items() if k != "bins" and v is not None}
        safe["calibration"]["bins"] = {
            k: np.asarray([np.nan if x is None else x for x in v],
                          dtype=np.int64 if k == "count" else np.float64)
            for k, v in cal["bins"].items()}
    safe["rare_classes"] = np.asarray(report["rare_classes"], dtype=object)
    safe["per_class"] = {c: pc[c].to_numpy() for c in pc.columns}
    safe["confusion_labels"] = np.asarray(report["confusion"]["labels"], dtype=object)
    safe["confusion"] = np.asarray(report["confusion"]["matrix"], dtype=np.int64)
    return safe


def per_class_table(report: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(report["per_class"])
    return df[["label", "support", "fraction", "precision", "recall", "f1", "rare"]]


def write_report(report: dict[str, Any], out: str | os.PathLike) -> Path:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.json").write_text(json.dumps(report, indent=1))
    per_class_table(report).to_csv(d / "per_class.csv", index=False)
    labels = report["confusion"]["labels"]
    pd.DataFrame(report["confusion"]["matrix"], index=labels, columns=labels).rename_axis(
        "true \\ predicted"
    ).to_csv(d / "confusion.csv")
    return d


def format_table(report: dict[str, Any]) -> str:
    """A plain-text per-class table with the summary lines, for terminals and logs."""
    df = per_class_table(report)
    w = max(12, *(len(s) for s in df["label"]))
    lines = [f"{'cell type':<{w}}  {'support':>7}  {'precision':>9}  {'recall':>6}  {'f1':>5}  rare"]
    for r in df.itertuples():
        lines.append(
            f"{r.label:<{w}}  {r.support:>7d}  {r.precision:>9.3f}  {r.recall:>6.3f}  "
            f"{r.f1:>5.3f}  {'yes' if r.rare else ''}"
        )
    lines.append(
        f"accuracy {report['accuracy']:.3f}   macro-F1 {report['macro_f1']:.3f}   "
        f"balanced accuracy {report['balanced_accuracy']:.3f}   cells {report['n_cells']}"
    )
    if report["rare_classes"]:
        lines.append(
            f"rare classes (< {report['rare_threshold']:.0%} of cells): "
            + ", ".join(report["rare_classes"])
            + f"; mean recall {report['rare_mean_recall']:.3f}"
        )
    if "n_unassigned" in report:
        lines.append(_unassigned_line(report))
    cal = report.get("calibration")
    if cal and cal.get("ece") is not None:
        lines.append(f"expected calibration error {cal['ece']:.3f} "
                     f"({cal['n_bins']} confidence bins, {cal['n_cells']} cells)")
    return "\n".join(lines)


def _unassigned_line(report: dict[str, Any]) -> str:
    """``Unassigned: 12 of 700 cells (1.7%); over the 688 assigned cells: accuracy ...``"""
    label = report.get("unassigned_label", UNASSIGNED)
    n_un, n = int(report["n_unassigned"]), int(report["n_cells"])
    line = f"{label}: {n_un} of {n} cells ({report['fraction_unassigned']:.1%})"
    a = report["assigned"]
    if n_un == 0:
        return line + " (the figures above are over all cells, every one assigned)"
    if a["accuracy"] is None:
        return line + "; no cell is assigned (lower --min-confidence)"
    return (line + f" counted as errors above; over the {a['n_cells']} assigned cells: "
            f"accuracy {a['accuracy']:.3f}   macro-F1 {a['macro_f1']:.3f}   "
            f"balanced accuracy {a['balanced_accuracy']:.3f}")


# -- energy and latency ------------------------------------------------------------------------

#: Energy per operation in 45 nm CMOS (pJ): a multiply-accumulate and an accumulate.
E_MAC_PJ = 4.6
E_AC_PJ = 0.9


def energy_estimate(
    layer_sizes: Sequence[int],
    *,
    timesteps: int,
    analog_input: bool,
    spiking: bool,
    n_cells: int,
    input_events: float = 0.0,
    layer_spikes: Sequence[float] = (),
    skip: bool = False,
) -> dict[str, Any]:
    """Energy per cell of the network and of its ANN twin, from counted spikes.

    ``layer_sizes`` = [genes, hidden..., classes]. The ANN does one MAC per synapse. The SNN
    does, per cell: the first layer's MACs once when its input is analog and constant over the
    steps (direct encoding), else one AC per input spike and fan-out; then one AC per hidden
    spike and fan-out (the next layer's width). Batch norm is folded into the linear layers
    and neuron updates are not counted, as in the convention of the HIFI paper. ``skip``:
    input-to-readout synapses too (genes x classes), in both networks: MACs for the ANN and
    analog input, else one AC per input spike and class.
    """
    sizes = [int(s) for s in layer_sizes]
    ann_macs = float(sum(a * b for a, b in zip(sizes[:-1], sizes[1:])))
    if skip:
        ann_macs += float(sizes[0] * sizes[-1])
    ann_pj = E_MAC_PJ * ann_macs
    if not spiking:
        return {"ratio_ann_over_snn": 1.0, "snn_pj_per_cell": ann_pj, "ann_pj_per_cell": ann_pj,
                "spike_rate_per_layer": [], "macs_per_cell": ann_macs, "sops_per_cell": 0.0}
    n = max(int(n_cells), 1)
    fan_in = sizes[1] + (sizes[-1] if skip else 0)  # synapses an input reaches
    macs = float(sizes[0] * fan_in) if analog_input else 0.0
    sops = 0.0 if analog_input else input_events / n * fan_in
    rates = []
    for i, spikes in enumerate(layer_spikes):
        per_cell = spikes / n
        sops += per_cell * sizes[i + 2]
        rates.append(per_cell / (sizes[i + 1] * timesteps))
    snn_pj = E_MAC_PJ * macs + E_AC_PJ * sops
    return {
        "ratio_ann_over_snn": ann_pj / snn_pj if snn_pj > 0 else float("inf"),
        "snn_pj_per_cell": snn_pj,
        "ann_pj_per_cell": ann_pj,
        "spike_rate_per_layer": rates,
        "macs_per_cell": macs,
        "sops_per_cell": sops,
        "input_spike_rate": (input_events / n / (sizes[0] * timesteps)) if not analog_input
        else None,
    }


def latency_report(
    truth: ArrayLike,
    step_labels: np.ndarray,
    classes: Sequence[str],
    *,
    decision_steps: np.ndarray | None = None,
    fraction: float = 0.99,
) -> dict[str, Any]:
    """Macro-F1 and accuracy when deciding after step t = 1..T, and the fewest steps that
    reach ``fraction`` of the final macro-F1; the mean steps per cell under early exit."""
    from sklearn.metrics import precision_recall_fscore_support

    t = np.asarray(pd.Series(truth).astype(str))
    names = np.asarray(classes, dtype=object)
    labels = sorted(np.unique(t).tolist())
    steps = np.asarray(step_labels)
    # label names (what annotate writes), or class indices into ``classes`` (older files)
    as_index = steps.dtype.kind in "iu"
    f1_by_step, acc_by_step = [], []
    for k in range(steps.shape[1]):
        p = (names[steps[:, k]] if as_index else steps[:, k]).astype(str)
        _, _, f1, _ = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
        f1_by_step.append(float(np.mean(f1)))
        acc_by_step.append(float(np.mean(p == t)))
    final = f1_by_step[-1]
    reach = [k + 1 for k, f in enumerate(f1_by_step) if f >= fraction * final - 1e-12]
    return {
        "macro_f1_by_step": f1_by_step,
        "accuracy_by_step": acc_by_step,
        "steps_to_99pct": reach[0] if reach else len(f1_by_step),
        "mean_steps_early_exit": None if decision_steps is None
        else float(np.mean(decision_steps)),
    }


class _CallableModule(types.ModuleType):
    """``scsnn.evaluate`` is this module, and calling it runs :func:`evaluate`: the package
    face offers ``scsnn.evaluate(adata, truth_key)`` while ``from scsnn.evaluate import ...``
    keeps working (importing a submodule rebinds the package attribute to the module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
