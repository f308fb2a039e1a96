"""Per-sample reports (tables, plots, a Markdown page) and a summary across samples.

Reports read only the annotations of an ``.h5ad`` file (``obs``, ``obsm``, ``uns``), never its
expression matrix, so they stay cheap for large queries.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .errors import InputError
from .evaluate import RARE_THRESHOLD, evaluate, format_table, write_report

logger = logging.getLogger("scsnn")


def read_annotations(path: str | os.PathLike, *, key_added: str = "scsnn") -> ad.AnnData:
    """An AnnData with the ``obs``, ``obsm`` and ``uns`` of an ``.h5ad`` file and no genes."""
    import h5py
    from anndata.io import read_elem

    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    try:
        with h5py.File(p, "r") as f:
            obs = read_elem(f["obs"])
            obsm = {k: read_elem(f["obsm"][k]) for k in f["obsm"]} if "obsm" in f else {}
            uns = {k: read_elem(f["uns"][k]) for k in f["uns"]} if "uns" in f else {}
    except Exception as exc:
        raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
    if key_added not in obs.columns:
        raise InputError(f"no predictions in obs['{key_added}'] of {p}: run scsnn annotate "
                         "first")
    adata = ad.AnnData(obs=obs, uns=uns)
    for k, v in obsm.items():
        if k.startswith(key_added):
            adata.obsm[k] = v
    return adata


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return path.name


def sample_report(
    adata: ad.AnnData,
    out: str | os.PathLike,
    *,
    sample: str | None = None,
    truth_key: str | None = None,
    key_added: str = "scsnn",
    rare_threshold: float = RARE_THRESHOLD,
    restrict_to_model_classes: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Tables, plots and ``report.md`` for one annotated sample, written into ``out``.

    Always: ``labels.csv`` (cells and mean confidence per predicted label),
    ``composition.png``, ``confidence.png`` and ``report.json``. With ``truth_key``: the
    evaluation of :func:`scsnn.evaluate.evaluate` (``per_class.csv``, ``confusion.csv``,
    ``f1.png``, ``confusion.png``, rare cell types called out).

    Returns
    -------
    The sample's summary (also in ``report.json``): cells, label counts, mean confidence,
    fraction unassigned, energy, and the evaluation figures when a truth key is given.
    """
    from . import pl

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    name = sample or d.name
    if key_added not in adata.obs.columns:
        raise InputError(f"no predictions in obs['{key_added}']: run scsnn annotate first")
    pred = adata.obs[key_added].astype(str)
    conf_key = f"{key_added}_confidence"
    conf = adata.obs[conf_key].to_numpy(dtype=float) if conf_key in adata.obs else np.ones(len(pred))
    labels = (pd.DataFrame({"label": pred.to_numpy(), "confidence": conf})
              .groupby("label")["confidence"].agg(["size", "mean"])
              .rename(columns={"size": "cells", "mean": "mean_confidence"})
              .sort_values("cells", ascending=False))
    labels["fraction"] = labels["cells"] / max(len(pred), 1)
    labels.to_csv(d / "labels.csv")
    info = adata.uns.get(key_added, {})
    params = info.get("params", {})
    summary: dict[str, Any] = {
        "sample": name,
        "n_cells": int(len(pred)),
        "mean_confidence": float(conf.mean()) if len(conf) else None,
        "fraction_unassigned": float((pred == "Unassigned").mean()) if len(pred) else 0.0,
        "labels": {str(k): int(v) for k, v in labels["cells"].items()},
        "model": str(info.get("model", "")),
        "energy_ratio_ann_over_snn": _num(info.get("energy", {}).get("ratio_ann_over_snn")),
    }
    figures = []
    if plots:
        figures.append(_save(pl.composition(labels["cells"], title=f"{name}: predicted cell "
                                                                    "types"),
                             d / "composition.png"))
        figures.append(_save(pl.confidence(conf, min_confidence=float(
            params.get("min_confidence", 0.0)), title=f"{name}: confidence"),
            d / "confidence.png"))
    evaluation = None
    if truth_key:
        evaluation = evaluate(adata, truth_key, key_added=key_added,
                              rare_threshold=rare_threshold,
                              restrict_to_model_classes=restrict_to_model_classes)
        write_report(evaluation, d)
        (d / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
        summary.update({
            "truth_key": truth_key,
            "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"],
            "balanced_accuracy": evaluation["balanced_accuracy"],
            "rare_classes": evaluation["rare_classes"],
            "rare_mean_recall": evaluation["rare_mean_recall"],
        })
        if plots:
            figures.append(_save(pl.f1_per_class(evaluation["per_class"],
                                                 title=f"{name}: F1 per cell type"),
                                 d / "f1.png"))
            true_labels = [r["label"] for r in evaluation["per_class"]]
            figures.append(_save(pl.confusion(evaluation["confusion"]["labels"],
                                              np.asarray(evaluation["confusion"]["matrix"]),
                                              true_labels=true_labels,
                                              title=f"{name}: confusion"),
                                 d / "confusion.png"))
    (d / "report.json").write_text(json.dumps(summary, indent=1))
    _write_markdown(d / "report.md", summary, labels, evaluation, figures)
    return summary


def _num(v: Any) -> float | None:
    return None if v is None else float(np.asarray(v).item())


def _write_markdown(path: Path, summary: dict[str, Any], labels: pd.DataFrame,
                    evaluation: dict[str, Any] | None, figures: list[str]) -> None:
    lines = [f"# {summary['sample']}", "",
             f"{summary['n_cells']} cells, model `{summary['model']}`, mean confidence "
             f"{_fmt(summary['mean_confidence'])}, unassigned "
             f"{summary['fraction_unassigned']:.1%}.", ""]
    if evaluation is not None:
        lines += [f"Against `obs['{summary['truth_key']}']`: accuracy "
                  f"{evaluation['accuracy']:.3f}, macro-F1 {evaluation['macro_f1']:.3f}, "
                  f"balanced accuracy {evaluation['balanced_accuracy']:.3f}.", ""]
        lines += ["```", format_table(evaluation), "```", ""]
    lines += ["| predicted label | cells | fraction | mean confidence |", "|---|---:|---:|---:|"]
    for lab, r in labels.iterrows():
        lines.append(f"| {lab} | {int(r['cells'])} | {r['fraction']:.3f} | "
                     f"{r['mean_confidence']:.3f} |")
    lines.append("")
    lines += [f"![{f}]({f})" for f in figures]
    path.write_text("\n".join(lines) + "\n")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{v:.3f}"


SUMMARY_COLUMNS = ("sample", "n_cells", "accuracy", "macro_f1", "balanced_accuracy",
                   "rare_mean_recall", "mean_confidence", "fraction_unassigned",
                   "energy_ratio_ann_over_snn", "model")


def summarize(reports: Sequence[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """One table across samples from their report folders (each with ``report.json``).

    Writes ``summary.tsv`` (one row per sample), ``composition.tsv`` (cells per predicted
    label and sample) and ``summary.md`` into ``out``; returns the summary table.
    """
    rows, comp = [], {}
    for r in reports:
        f = Path(r) / "report.json"
        if not f.is_file():
            raise InputError(f"no report.json in {r} (run scsnn report first)")
        s = json.loads(f.read_text())
        rows.append({c: s.get(c) for c in SUMMARY_COLUMNS})
        comp[s["sample"]] = s.get("labels", {})
    if not rows:
        raise InputError("no reports to summarise")
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    composition = pd.DataFrame(comp).fillna(0).astype(int).sort_index()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    table.to_csv(d / "summary.tsv", sep="\t", index=False)
    composition.rename_axis("predicted label").to_csv(d / "composition.tsv", sep="\t")
    lines = ["# Annotation summary", "",
             "| sample | cells | accuracy | macro-F1 | balanced acc. | rare recall | "
             "mean confidence | unassigned | E_ANN/E_SNN |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.sample} | {r.n_cells} | {_fmt(r.accuracy)} | {_fmt(r.macro_f1)} | "
            f"{_fmt(r.balanced_accuracy)} | {_fmt(r.rare_mean_recall)} | "
            f"{_fmt(r.mean_confidence)} | {r.fraction_unassigned:.1%} | "
            f"{_fmt(r.energy_ratio_ann_over_snn)} |"
        )
    lines += ["", "Cells per predicted label:", "",
              "| label | " + " | ".join(composition.columns) + " |",
              "|---|" + "---:|" * len(composition.columns)]
    for lab, r in composition.iterrows():
        lines.append(f"| {lab} | " + " | ".join(str(int(v)) for v in r) + " |")
    (d / "summary.md").write_text("\n".join(lines) + "\n")
    return table
