"""Plots of predictions and evaluations, drawn with matplotlib's object API (no pyplot state,
no display needed), each returned as a :class:`~matplotlib.figure.Figure`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_RARE = "#d62728"
_COMMON = "#1f77b4"


def _height(n: int) -> float:
    return max(2.5, 0.28 * n + 1.2)


def composition(counts: pd.Series, *, title: str = "Predicted cell types") -> Figure:
    """Horizontal bars: cells per predicted label."""
    counts = counts.sort_values()
    fig = Figure(figsize=(6.5, _height(len(counts))), layout="constrained")
    ax = fig.add_subplot()
    ax.barh([str(i) for i in counts.index], counts.to_numpy(), color=_COMMON)
    ax.set_xlabel("cells")
    ax.set_title(title)
    return fig


def confidence(conf: np.ndarray, *, min_confidence: float = 0.0,
               title: str = "Confidence of the predictions") -> Figure:
    """Histogram of the predicted class's probability; the ``min_confidence`` cut as a line."""
    fig = Figure(figsize=(6.0, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(np.asarray(conf, dtype=float), bins=np.linspace(0, 1, 41), color=_COMMON)
    if min_confidence > 0:
        ax.axvline(min_confidence, color="k", ls="--", lw=1, label="min confidence")
        ax.legend(frameon=False)
    ax.set_xlabel("confidence")
    ax.set_ylabel("cells")
    ax.set_title(title)
    return fig


def f1_per_class(per_class: Sequence[dict[str, Any]], *, title: str = "F1 per cell type") -> Figure:
    """F1 of every true cell type; rare types in red, their support beside the bar."""
    df = pd.DataFrame(per_class).sort_values("f1")
    fig = Figure(figsize=(6.5, _height(len(df))), layout="constrained")
    ax = fig.add_subplot()
    colors = [_RARE if r else _COMMON for r in df["rare"]]
    ax.barh(df["label"].astype(str), df["f1"], color=colors)
    for y, (f1, n) in enumerate(zip(df["f1"], df["support"])):
        ax.text(f1 + 0.01, y, f"n={n}", va="center", fontsize=7)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("F1")
    ax.set_title(title + (" (red: rare)" if df["rare"].any() else ""))
    return fig


def confusion(labels: Sequence[str], matrix: np.ndarray, *, true_labels: Sequence[str],
              title: str = "Confusion (row-normalised)") -> Figure:
    """Row-normalised confusion matrix: true types (rows) against predicted labels."""
    m = np.asarray(matrix, dtype=float)
    rows = [labels.index(t) for t in true_labels]
    m = m[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(m / m.sum(1, keepdims=True))
    n_r, n_c = norm.shape
    fig = Figure(figsize=(max(4.0, 0.4 * n_c + 3), max(3.5, 0.35 * n_r + 2.5)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_c), [str(c) for c in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(n_r), [str(t) for t in true_labels], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true type")
    return fig
