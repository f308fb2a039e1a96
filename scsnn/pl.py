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


def neuron_parameters(model: Any, *, title: str = "Neuron parameters per layer") -> Figure:
    """Histograms of every HIFI layer's leak k, threshold theta, gain c and autapse gamma over
    its neurons: at initialisation (grey; rebuilt from the model's seed) and after training
    (blue). A homogeneous layer shows one bar.

    Parameters
    ----------
    model
        A trained :class:`~scsnn.bundle.ScsnnModel`.
    """
    from .models import build_network

    trained = model.network.hifi_layers()
    if not trained:
        raise ValueError("the model has no HIFI-based layers (ANN or SpikingJelly nodes)")
    initial = build_network(model.config, int(model.settings.get("seed", 0))).hifi_layers()
    names = ("k", "theta", "c", "gamma")
    labels = {"k": "leak k", "theta": "threshold θ", "c": "input gain c", "gamma": "autapse γ"}
    fig = Figure(figsize=(11, 2.4 * len(trained) + 0.6), layout="constrained")
    axes = fig.subplots(len(trained), len(names), squeeze=False)
    for i, (before, after) in enumerate(zip(initial, trained)):
        qb, qa = before.quantities(), after.quantities()
        for j, q in enumerate(names):
            ax = axes[i, j]
            b = qb[q].detach().cpu().numpy()
            a = qa[q].detach().cpu().numpy()
            lo, hi = float(min(b.min(), a.min())), float(max(b.max(), a.max()))
            if hi - lo < 1e-6:
                lo, hi = lo - 0.05, hi + 0.05
            bins = np.linspace(lo, hi, 41)
            ax.hist(b, bins=bins, color="0.6", alpha=0.7, label=f"start (sd {b.std():.3f})")
            ax.hist(a, bins=bins, color=_COMMON, alpha=0.7, label=f"trained (sd {a.std():.3f})")
            ax.legend(frameon=False, fontsize=7)
            ax.tick_params(labelsize=7)
            if i == len(trained) - 1:
                ax.set_xlabel(labels[q])
            if j == 0:
                ax.set_ylabel(f"layer {i + 1}: neurons", fontsize=8)
    fig.suptitle(title)
    return fig


def latency_curve(curves: dict[str, Sequence[float]], *,
                  title: str = "Macro-F1 by decision step") -> Figure:
    """Macro-F1 when the class is read after step t = 1..T, one line per method."""
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ys = list(ys)
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("decision step t")
    ax.set_ylabel("macro-F1")
    ax.legend(frameon=False)
    ax.set_title(title)
    return fig
