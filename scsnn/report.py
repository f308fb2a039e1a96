"""Per-sample reports (tables, plots, a Markdown page) and a summary across samples.

Reports read only the annotations of an ``.h5ad`` file (``obs``, ``obsm``, ``uns``), never its
expression matrix, so they stay cheap for large queries.
"""

from __future__ import annotations

import base64
import html
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
        if k.startswith(key_added) or k == "X_umap":  # the UMAP panels draw on X_umap
            adata.obsm[k] = v
    return adata


class _Figures:
    """The report's plots: each saved as a PNG beside the report, its bytes kept for the
    HTML page, a failing plot logged and left out rather than failing the report."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.items: list[tuple[str, str, bytes]] = []  # file name, caption, PNG bytes
        self.skipped: list[str] = []

    def add(self, name: str, caption: str, draw: Any) -> None:
        try:
            fig = draw()
        except Exception as exc:  # noqa: BLE001 - a plot is worth a note, not a failed report
            logger.warning("report: %s left out (%s: %s)", name, type(exc).__name__, exc)
            self.skipped.append(f"{caption}: {exc}")
            return
        path = self.d / name
        fig.savefig(path, dpi=110)
        self.items.append((name, caption, path.read_bytes()))

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.items]


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
    umap: bool | None = None,
    umap_max_cells: int = 20_000,
    model: Any = None,
    html: bool = True,
) -> dict[str, Any]:
    """Tables, plots, ``report.md`` and a self-contained ``report.html`` for one annotated
    sample, written into ``out``.

    Always: ``labels.csv`` (cells and mean confidence per predicted label),
    ``composition.png``, ``confidence.png`` and ``report.json``; ``spike_rates.png`` when
    ``uns[key_added]`` holds the energy figures. With ``truth_key``: the evaluation of
    :func:`scsnn.evaluate.evaluate` (``per_class.csv``, ``confusion.csv``, ``recall.png``,
    ``f1.png``, ``confusion.png``, ``dotplot.png``, ``reliability.png``, ``latency.png``,
    rare cell types called out).

    Parameters
    ----------
    umap
        UMAP panels (``umap.png``: reference, prediction, confidence). ``None``: drawn when
        ``obsm["X_umap"]`` is there; ``True``: also computed (scanpy, on at most
        ``umap_max_cells`` cells) when it is not and ``adata`` holds its expression;
        ``False``: never.
    model
        The :class:`~scsnn.bundle.ScsnnModel` (or its folder) that annotated ``adata``: adds
        its learned neuron parameters per layer (``neurons.png``).
    html
        Write ``report.html``: the tables and every plot embedded (base64 PNG), one file that
        needs nothing else.

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
    energy = info.get("energy", {})
    summary: dict[str, Any] = {
        "sample": name,
        "n_cells": int(len(pred)),
        "mean_confidence": float(conf.mean()) if len(conf) else None,
        "fraction_unassigned": float((pred == "Unassigned").mean()) if len(pred) else 0.0,
        "labels": {str(k): int(v) for k, v in labels["cells"].items()},
        "model": str(info.get("model", "")),
        "energy_ratio_ann_over_snn": _num(energy.get("ratio_ann_over_snn")),
    }
    figures = _Figures(d)
    if plots:
        figures.add("composition.png", "Cells per predicted label",
                    lambda: pl.composition(labels["cells"],
                                           title=f"{name}: predicted cell types"))
        figures.add("confidence.png", "Confidence of the predictions",
                    lambda: pl.confidence(conf, min_confidence=float(
                        params.get("min_confidence", 0.0)), title=f"{name}: confidence"))
    evaluation = None
    if truth_key:
        evaluation = evaluate(adata, truth_key, key_added=key_added,
                              rare_threshold=rare_threshold,
                              restrict_to_model_classes=restrict_to_model_classes)
        write_report(evaluation, d)
        (d / "evaluation.json").write_text(json.dumps(evaluation, indent=1))
        cal = evaluation.get("calibration") or {}
        summary.update({
            "truth_key": truth_key,
            "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"],
            "balanced_accuracy": evaluation["balanced_accuracy"],
            "rare_classes": evaluation["rare_classes"],
            "rare_mean_recall": evaluation["rare_mean_recall"],
            "ece": cal.get("ece"),
        })
        if plots:
            _evaluation_plots(figures, evaluation, adata, truth_key, key_added, name,
                              restrict_to_model_classes)
    if plots and energy:
        figures.add("spike_rates.png", "Spike rate per layer",
                    lambda: pl.spike_rates(dict(energy), title=f"{name}: spike rate per layer"))
    if plots and model is not None:
        def _neurons() -> Any:
            from .bundle import load_model

            m = load_model(model) if isinstance(model, (str, os.PathLike)) else model
            return pl.neuron_parameters(m, title=f"{name}: neuron parameters per layer")

        figures.add("neurons.png", "Learned neuron parameters per layer", _neurons)
    if plots and umap is not False and ("X_umap" in adata.obsm or (umap and adata.n_vars > 0)):
        figures.add("umap.png", "UMAP: reference, prediction, confidence",
                    lambda: pl.umap(adata, truth_key=truth_key, key_added=key_added,
                                    max_cells=umap_max_cells, title=f"{name}: UMAP"))
    elif plots and umap:
        figures.skipped.append("UMAP: no obsm['X_umap'] and no expression to compute one "
                               "from (give the AnnData with its matrix)")
    (d / "report.json").write_text(json.dumps(summary, indent=1))
    _write_markdown(d / "report.md", summary, labels, evaluation, figures.names)
    if html:
        (d / "report.html").write_text(
            _sample_html(summary, labels, evaluation, figures, energy), encoding="utf-8")
    return summary


def _evaluation_plots(figures: _Figures, ev: dict[str, Any], adata: ad.AnnData,
                      truth_key: str, key_added: str, name: str, restrict: bool) -> None:
    from . import pl

    per_class, thr = ev["per_class"], ev["rare_threshold"]
    true_labels = [r["label"] for r in per_class]
    figures.add("recall.png", "Recall per cell type (rare types in red)",
                lambda: pl.recall_per_class(per_class, rare_threshold=thr,
                                            title=f"{name}: recall per cell type"))
    figures.add("f1.png", "F1 per cell type (rare types in red)",
                lambda: pl.f1_per_class(per_class, rare_threshold=thr,
                                        title=f"{name}: F1 per cell type"))
    figures.add("confusion.png", "Confusion matrix (shade: fraction of the true type; "
                "numbers: cells)",
                lambda: pl.confusion(ev["confusion"]["labels"],
                                     np.asarray(ev["confusion"]["matrix"]),
                                     true_labels=true_labels, title=f"{name}: confusion"))

    def _dots() -> Any:
        labs = ev["confusion"]["labels"]
        m = np.asarray(ev["confusion"]["matrix"], dtype=np.int64)
        rows = [labs.index(t) for t in true_labels]
        # rebuilt from the confusion matrix: exactly the evaluated cells
        t = np.repeat([labs[i] for i in rows for _ in labs],
                      m[rows].ravel()) if rows else np.array([], dtype=object)
        p = np.repeat([lab for _ in rows for lab in labs], m[rows].ravel()) if rows else t
        return pl.dotplot(pd.Categorical(t, categories=true_labels),
                          pd.Categorical(p, categories=labs),
                          title=f"{name}: predicted labels per reference label")

    figures.add("dotplot.png", "Predicted labels per reference label (dot: fraction of the "
                "reference label's cells)", _dots)
    if ev.get("calibration"):
        figures.add("reliability.png", "Reliability diagram of the confidence",
                    lambda: pl.reliability(ev["calibration"],
                                           title=f"{name}: reliability"))
    lat = ev.get("latency")
    if lat and lat.get("macro_f1_by_step"):
        figures.add("latency.png", "Macro-F1 and accuracy by decision step",
                    lambda: pl.latency_curve({"macro-F1": lat["macro_f1_by_step"],
                                              "accuracy": lat["accuracy_by_step"]},
                                             title=f"{name}: score by decision step",
                                             ylabel="score"))


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


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.rare td { background: #fdecea; } tr.rare td.label { color: #b71c1c; font-weight: 600; }
.note { color: #555; font-size: .9em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto;
         border: 1px solid #eee; } figcaption { color: #555; font-size: .9em; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _img(name: str, caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{_e(Path(name).stem)}"><img alt="{_e(caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)} '
            f'(<code>{_e(name)}</code>)</figcaption></figure>')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[bool],
           row_class: Sequence[str] | None = None, table_id: str = "") -> str:
    out = [f'<table id="{_e(table_id)}">' if table_id else "<table>", "<thead><tr>"]
    out += [f"<th>{_e(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        cls = row_class[i] if row_class else ""
        out.append(f'<tr class="{_e(cls)}">' if cls else "<tr>")
        for j, v in enumerate(r):
            kind = "num" if numeric[j] else ("label" if j == 0 else "")
            out.append(f'<td class="{kind}">{_e(v)}</td>' if kind else f"<td>{_e(v)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _page(title: str, body: list[str]) -> str:
    from ._version import __version__

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body)
            + f'<p class="note">Written by scsnn {_e(__version__)}.</p></body></html>\n')


def _pct(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{float(v):.1%}"


def _sample_html(summary: dict[str, Any], labels: pd.DataFrame,
                 evaluation: dict[str, Any] | None, figures: _Figures,
                 energy: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("sample", summary["sample"]), ("cells", summary["n_cells"]),
        ("model", summary["model"] or "n/a"),
        ("mean confidence", _fmt(summary["mean_confidence"])),
        ("unassigned", _pct(summary["fraction_unassigned"])),
        ("energy E_ANN / E_SNN", _fmt(summary["energy_ratio_ann_over_snn"])),
    ]
    if energy and energy.get("snn_pj_per_cell") is not None:
        rows.append(("SNN energy per cell (pJ)", f"{float(energy['snn_pj_per_cell']):.1f}"))
    body = [f"<h1>{_e(summary['sample'])}: scsnn annotation report</h1>"]
    if evaluation is not None:
        rows += [
            ("truth key", summary["truth_key"]),
            ("evaluated cells", evaluation["n_cells"]),
            ("accuracy", _fmt(evaluation["accuracy"])),
            ("macro-F1", _fmt(evaluation["macro_f1"])),
            ("balanced accuracy", _fmt(evaluation["balanced_accuracy"])),
            (f"rare types (< {evaluation['rare_threshold']:.0%} of cells)",
             ", ".join(evaluation["rare_classes"]) or "none"),
            ("mean recall of the rare types", _fmt(evaluation["rare_mean_recall"])),
        ]
        cal = evaluation.get("calibration")
        if cal:
            rows.append(("expected calibration error",
                         f"{_fmt(cal['ece'])} ({cal['n_bins']} bins)"))
        if "n_unassigned" in evaluation:
            rows.append((str(evaluation.get("unassigned_label", "Unassigned")),
                         f"{evaluation['n_unassigned']} of {evaluation['n_cells']} cells "
                         f"({evaluation['fraction_unassigned']:.1%})"))
            a = evaluation["assigned"]
            if evaluation["n_unassigned"] and a["accuracy"] is not None:
                rows.append((f"over the {a['n_cells']} assigned cells",
                             f"accuracy {a['accuracy']:.3f}, macro-F1 {a['macro_f1']:.3f}, "
                             f"balanced accuracy {a['balanced_accuracy']:.3f}"))
    body += ["<h2>Summary</h2>",
             _table(["", "value"], rows, numeric=[False, False], table_id="summary")]
    if evaluation is not None:
        pc = evaluation["per_class"]
        body += ["<h2>Per cell type</h2>",
                 f'<p class="note">Rare types (under {evaluation["rare_threshold"]:.0%} of the '
                 "evaluated cells) are marked.</p>",
                 _table(["cell type", "support", "fraction", "precision", "recall", "F1",
                         "rare"],
                        [(r["label"], r["support"], f"{r['fraction']:.3f}",
                          f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                          "rare" if r["rare"] else "") for r in pc],
                        numeric=[False, True, True, True, True, True, False],
                        row_class=["rare" if r["rare"] else "" for r in pc],
                        table_id="per-class")]
    body += ["<h2>Predicted labels</h2>",
             _table(["predicted label", "cells", "fraction", "mean confidence"],
                    [(lab, int(r["cells"]), f"{r['fraction']:.3f}",
                      f"{r['mean_confidence']:.3f}") for lab, r in labels.iterrows()],
                    numeric=[False, True, True, True], table_id="labels")]
    if figures.items or figures.skipped:
        body.append("<h2>Plots</h2>")
        body += [_img(n, c, png) for n, c, png in figures.items]
        body += [f'<p class="note">Left out: {_e(x)}</p>' for x in figures.skipped]
    return _page(f"{summary['sample']}: scsnn report", body)


def _summary_html(table: pd.DataFrame, composition: pd.DataFrame) -> str:
    cols = [("sample", False), ("n_cells", True), ("accuracy", True), ("macro_f1", True),
            ("balanced_accuracy", True), ("rare_mean_recall", True), ("ece", True),
            ("mean_confidence", True), ("fraction_unassigned", True),
            ("energy_ratio_ann_over_snn", True), ("model", False)]
    names = {"n_cells": "cells", "macro_f1": "macro-F1", "balanced_accuracy": "balanced acc.",
             "rare_mean_recall": "rare recall", "ece": "ECE",
             "mean_confidence": "mean confidence", "fraction_unassigned": "unassigned",
             "energy_ratio_ann_over_snn": "E_ANN/E_SNN"}

    def cell(c: str, v: Any) -> Any:
        if c in ("sample", "model"):
            return "" if v is None or (isinstance(v, float) and pd.isna(v)) else v
        if c == "n_cells":
            return int(v)
        if c == "fraction_unassigned":
            return _pct(v)
        return _fmt(None if v is None else float(v))

    rows = [[cell(c, r[c]) for c, _ in cols] for _, r in table.iterrows()]
    body = ["<h1>scsnn annotation summary</h1>", f"<p>{len(table)} samples.</p>",
            "<h2>Samples</h2>",
            _table([names.get(c, c) for c, _ in cols], rows, numeric=[n for _, n in cols],
                   table_id="summary"),
            "<h2>Cells per predicted label</h2>",
            _table(["predicted label", *[str(c) for c in composition.columns]],
                   [[lab, *(int(v) for v in r)] for lab, r in composition.iterrows()],
                   numeric=[False] + [True] * len(composition.columns),
                   table_id="composition")]
    return _page("scsnn annotation summary", body)


SUMMARY_COLUMNS = ("sample", "n_cells", "accuracy", "macro_f1", "balanced_accuracy",
                   "rare_mean_recall", "ece", "mean_confidence", "fraction_unassigned",
                   "energy_ratio_ann_over_snn", "model")


def summarize(reports: Sequence[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """One table across samples from their report folders (each with ``report.json``).

    Writes ``summary.tsv`` (one row per sample), ``composition.tsv`` (cells per predicted
    label and sample), ``summary.md`` and a self-contained ``summary.html`` into ``out``;
    returns the summary table.
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
    (d / "summary.html").write_text(_summary_html(table, composition), encoding="utf-8")
    return table
