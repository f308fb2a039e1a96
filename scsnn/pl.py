"""Plots of predictions and evaluations, drawn with matplotlib's object API (no pyplot state,
no display needed), each returned as a :class:`~matplotlib.figure.Figure`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from numpy.typing import ArrayLike

_RARE = "#d62728"
_COMMON = "#1f77b4"
_GREY = "#b0b0b0"
_UNASSIGNED = "Unassigned"


def _height(n: int) -> float:
    return max(2.5, 0.28 * n + 1.2)


def _label_font(n: int) -> float:
    """Tick-label size for ``n`` categories: 8 pt for a few, down to 6 pt for 40 and more."""
    return 8.0 if n <= 15 else 7.0 if n <= 30 else 6.0


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label (tab20, then tab20b and tab20c; "Unassigned" grey)."""
    from matplotlib import colormaps

    named = [lab for lab in labels if lab != _UNASSIGNED]
    # tab10 for up to 10 labels; then tab20's dark shades before its light ones, so that
    # neighbours in the legend do not share a hue, then tab20b and tab20c
    colours = ([colormaps["tab10"](i) for i in range(10)] if len(named) <= 10 else
               [colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
               + [colormaps["tab20b"](i) for i in range(20)]
               + [colormaps["tab20c"](i) for i in range(20)])
    if len(named) > len(colours):
        hsv = colormaps["hsv"]
        colours = [hsv(i / len(named)) for i in range(len(named))]
    out: dict[str, Any] = {lab: colours[i] for i, lab in enumerate(named)}
    out[_UNASSIGNED] = _GREY
    return out


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def composition(counts: pd.Series, *, title: str = "Predicted cell types") -> Figure:
    """Horizontal bars: cells per predicted label."""
    counts = counts.sort_values()
    fig = Figure(figsize=(6.5, _height(len(counts))), layout="constrained")
    ax = fig.add_subplot()
    if counts.empty:
        _empty(ax, "no cells")
        ax.set_title(title)
        return fig
    y = np.arange(len(counts))
    vals = counts.to_numpy(dtype=float)
    ax.barh(y, vals, color=[_GREY if str(i) == _UNASSIGNED else _COMMON for i in counts.index])
    ax.set_yticks(y, [str(i) for i in counts.index], fontsize=_label_font(len(counts)))
    top = max(vals.max(), 1.0)
    for yi, v in zip(y, vals):
        ax.text(v + top * 0.01, yi, f"{int(v)}", va="center", fontsize=6.5)
    ax.set_xlim(0, top * 1.12)
    ax.set_ylim(-0.6, len(counts) - 0.4)
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


def _per_class_bars(per_class: Sequence[dict[str, Any]], metric: str, *, title: str,
                    xlabel: str, rare_threshold: float | None) -> Figure:
    """Horizontal bars of one per-class metric, worst at the bottom; rare types in red (bar
    and name), the support beside every bar."""
    df = pd.DataFrame(list(per_class))
    fig = Figure(figsize=(7.0, _height(len(df))), layout="constrained")
    ax = fig.add_subplot()
    if df.empty:
        _empty(ax, "no cell types")
        ax.set_title(title)
        return fig
    if "rare" not in df:
        df["rare"] = False
    df = df.sort_values([metric, "label"], ascending=[True, False], kind="stable")
    rare = df["rare"].astype(bool).to_numpy()
    y = np.arange(len(df))
    ax.barh(y, df[metric].to_numpy(dtype=float), color=[_RARE if r else _COMMON for r in rare])
    ax.set_yticks(y, [str(v) for v in df["label"]], fontsize=_label_font(len(df)))
    for tick, r in zip(ax.get_yticklabels(), rare):
        if r:
            tick.set_color(_RARE)
    sizes = df["support"] if "support" in df else [None] * len(df)
    for yi, (v, n) in enumerate(zip(df[metric].to_numpy(dtype=float), sizes)):
        if n is not None:
            ax.text(v + 0.01, yi, f"{v:.2f}  n={int(n)}", va="center", fontsize=6.5)
    ax.set_xlim(0, 1.22)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_ylim(-0.6, len(df) - 0.4)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    if rare.any():
        what = "rare" if rare_threshold is None else f"rare (< {rare_threshold:.0%} of cells)"
        # below the axes: inside, it would cover the bars or their numbers
        fig.legend(handles=[Patch(color=_RARE, label=what), Patch(color=_COMMON, label="other")],
                   loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    ax.set_title(title)
    return fig


def f1_per_class(per_class: Sequence[dict[str, Any]], *, title: str = "F1 per cell type",
                 rare_threshold: float | None = None) -> Figure:
    """F1 of every true cell type; rare types in red, their support beside the bar."""
    return _per_class_bars(per_class, "f1", title=title, xlabel="F1",
                           rare_threshold=rare_threshold)


def recall_per_class(per_class: Sequence[dict[str, Any]], *,
                     title: str = "Recall per cell type",
                     rare_threshold: float | None = None) -> Figure:
    """Recall (the fraction of a type's cells called right) of every true cell type, from the
    ``per_class`` table of :func:`scsnn.evaluate.evaluate`; rare types (its ``rare`` flag:
    under ``rare_threshold`` of the evaluated cells) in red, the support beside each bar."""
    return _per_class_bars(per_class, "recall", title=title, xlabel="recall",
                           rare_threshold=rare_threshold)


def confusion(labels: Sequence[str], matrix: np.ndarray, *, true_labels: Sequence[str],
              title: str = "Confusion (row-normalised)", counts: bool = True) -> Figure:
    """Row-normalised confusion matrix: true types (rows) against predicted labels (columns,
    "Unassigned" among them), shaded by the fraction of the true type, with the cell counts
    written in the non-empty cells (``counts``)."""
    labels = [str(c) for c in labels]
    m = np.asarray(matrix, dtype=float).reshape(len(labels), len(labels))
    rows = [labels.index(str(t)) for t in true_labels]
    m = m[rows] if rows else np.zeros((0, len(labels)))
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(m / m.sum(1, keepdims=True))
    n_r, n_c = norm.shape
    cell = 0.32 if max(n_r, n_c) > 25 else 0.4
    longest = max([len(str(c)) for c in labels] + [1])
    margin = min(0.055 * longest + 0.6, 3.2)  # room for the rotated and the row names
    fig = Figure(figsize=(max(4.5, cell * n_c + margin + 2.2),
                          max(3.5, cell * n_r + margin + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    if n_r == 0 or n_c == 0:
        _empty(ax, "no cells")
        ax.set_title(title)
        return fig
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fs = _label_font(max(n_r, n_c))
    ax.set_xticks(range(n_c), labels, rotation=90,
                  fontsize=fs)
    ax.set_yticks(range(n_r), [str(t) for t in true_labels], fontsize=fs)
    if counts:
        cfs = 6.5 if max(n_r, n_c) <= 20 else 5.0
        for i in range(n_r):
            for j in range(n_c):
                if m[i, j] > 0:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=cfs,
                            color="white" if norm[i, j] > 0.55 else "black")
    # the diagonal (true type = predicted label) outlined
    for i, t in enumerate(true_labels):
        if str(t) in labels:
            j = labels.index(str(t))
            ax.add_patch(Rectangle(
                (j - 0.5, i - 0.5), 1, 1, fill=False, ec="0.35", lw=0.5))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title + (" — numbers: cells" if counts else ""), fontsize=10)
    fig.colorbar(im, ax=ax, shrink=min(0.8, 6 / max(n_r, 1) + 0.3), label="fraction of the true type")
    return fig


def dotplot(truth: ArrayLike, pred: ArrayLike, *,
            title: str = "Predicted labels per reference label") -> Figure:
    """A scanpy-style dot plot of reference labels (rows) against predicted labels (columns):
    the dot's size and colour are the fraction of the reference label's cells given that
    predicted label (each row sums to 1). Predicted labels are ordered as the reference
    labels, then those that are no reference label (such as "Unassigned"). Categories of a
    categorical ``truth`` / ``pred`` that no cell carries are kept (empty row or column)."""
    t = pd.Series(truth).reset_index(drop=True)
    p = pd.Series(pred).reset_index(drop=True)
    t_labels = ([str(c) for c in t.cat.categories] if isinstance(t.dtype, pd.CategoricalDtype)
                else sorted(t.dropna().astype(str).unique().tolist()))
    p_seen = ([str(c) for c in p.cat.categories] if isinstance(p.dtype, pd.CategoricalDtype)
              else sorted(p.dropna().astype(str).unique().tolist()))
    cols = [c for c in t_labels if c in p_seen] + [c for c in p_seen if c not in t_labels]
    ok = t.notna().to_numpy() & p.notna().to_numpy()
    tab = pd.crosstab(pd.Categorical(t[ok].astype(str), categories=t_labels),
                      pd.Categorical(p[ok].astype(str), categories=cols), dropna=False)
    tab = tab.reindex(index=t_labels, columns=cols, fill_value=0)
    frac = tab.to_numpy(dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.nan_to_num(frac / frac.sum(1, keepdims=True))
    n_r, n_c = frac.shape
    longest = max([len(c) for c in cols + t_labels] + [1])
    margin = min(0.055 * longest + 0.6, 3.2)
    main_w = max(3.0, 0.3 * n_c + margin)
    fig = Figure(figsize=(main_w + 1.5, max(3.5, 0.3 * n_r + margin + 0.8)),
                 layout="constrained")
    ax, side = fig.subplots(1, 2, width_ratios=[main_w, 1.3])
    side.axis("off")
    if n_r == 0 or n_c == 0:
        _empty(ax, "no cells")
        ax.set_title(title)
        return fig
    yy, xx = np.nonzero(frac > 0)
    vals = frac[yy, xx]
    smax = 150.0 if max(n_r, n_c) <= 25 else 90.0
    sc = ax.scatter(xx, yy, s=vals * smax + 3, c=vals, cmap="Reds", vmin=0, vmax=1,
                    edgecolors="0.3", linewidths=0.3)
    fs = _label_font(max(n_r, n_c))
    ax.set_xticks(range(n_c), cols, rotation=90, fontsize=fs)
    ax.set_yticks(range(n_r), t_labels, fontsize=fs)
    ax.set_xlim(-0.6, n_c - 0.4)
    ax.set_ylim(n_r - 0.4, -0.6)
    ax.set_xticks(np.arange(n_c + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_r + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.92", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_axisbelow(True)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("reference label")
    handles = [Line2D([], [], ls="", marker="o", markersize=np.sqrt(f * smax + 3),
                      markerfacecolor="0.6", markeredgecolor="0.3", label=f"{f:.0%}")
               for f in (0.1, 0.25, 0.5, 1.0)]
    side.legend(handles=handles, title="fraction of\nreference cells", loc="upper left",
                fontsize=7, title_fontsize=7, frameon=False, labelspacing=1.2,
                borderaxespad=0.0)
    # the colour bar below the size legend, a fixed height whatever the rows
    h = min(0.4, 1.6 / fig.get_figheight())
    cax = side.inset_axes((0.05, 0.02, 0.12, h))
    fig.colorbar(sc, cax=cax, label="fraction")
    cax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def reliability(calibration: dict[str, Any], *,
                title: str = "Reliability of the confidence") -> Figure:
    """Reliability diagram: per confidence bin, the accuracy of its cells (bars) against their
    mean confidence (dots), the diagonal of perfect calibration, and below, the cells per bin
    (each count written). ``calibration`` is :func:`scsnn.evaluate.calibration_report`'s
    dict (or an evaluation holding one under ``"calibration"``)."""
    cal = calibration.get("calibration", calibration)
    bins = cal.get("bins", {})
    lower = np.asarray(bins.get("lower", []), dtype=float)
    upper = np.asarray(bins.get("upper", []), dtype=float)
    count = np.asarray(bins.get("count", []), dtype=float)
    acc = np.asarray([np.nan if v is None else v for v in bins.get("accuracy", [])], dtype=float)
    mc = np.asarray([np.nan if v is None else v for v in bins.get("mean_confidence", [])],
                    dtype=float)
    fig = Figure(figsize=(5.5, 5.6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    top.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    if count.sum() > 0:
        width = upper - lower
        centre = (lower + upper) / 2
        full = count > 0
        top.bar(centre[full], acc[full], width=width[full] * 0.95, color=_COMMON, alpha=0.8,
                label="accuracy of the bin")
        top.scatter(mc[full], acc[full], color="k", s=12, zorder=3,
                    label="mean confidence of the bin")
        for c, a, m_ in zip(centre[full], acc[full], mc[full]):
            top.plot([m_, m_], [m_, a], color=_RARE, lw=1, alpha=0.7)
        bottom.bar(centre, count, width=width * 0.95, color="0.55")
        fs = 6.5 if len(count) <= 15 else 5.0
        for c, n in zip(centre, count):
            if n > 0:
                bottom.text(c, n, f"{int(n)}", ha="center", va="bottom", fontsize=fs,
                            rotation=90 if len(count) > 15 else 0)
        bottom.set_ylim(0, count.max() * 1.35)
    else:
        _empty(top, "no cells")
    ece = cal.get("ece")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=7, frameon=False)
    top.set_title(title + (f" (ECE {ece:.3f})" if ece is not None else ""), fontsize=10)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("cells")
    bottom.set_xlim(0, 1)
    return fig


def spike_rates(energy: dict[str, Any] | Sequence[float], *,
                title: str = "Spike rate per layer") -> Figure:
    """Bars: the mean spike rate (spikes per neuron and time step) of every hidden layer, from
    ``uns[KEY]["energy"]["spike_rate_per_layer"]`` (and the input layer's, with spiking
    input encodings). An ANN or non-spiking model has none: the figure says so."""
    if isinstance(energy, dict):
        rates = list(np.asarray(energy.get("spike_rate_per_layer", []), dtype=float).ravel())
        inp = energy.get("input_spike_rate")
    else:
        rates, inp = list(np.asarray(energy, dtype=float).ravel()), None
    names = [f"hidden {i + 1}" for i in range(len(rates))]
    colours = [_COMMON] * len(rates)
    if inp is not None and np.isfinite(float(np.asarray(inp))):
        names, rates, colours = ["input", *names], [float(np.asarray(inp)), *rates], \
            ["0.55", *colours]
    fig = Figure(figsize=(max(4.0, 1.0 * len(rates) + 2.0), 3.4), layout="constrained")
    ax = fig.add_subplot()
    if not rates:
        _empty(ax, "no spiking layers (ANN or non-spiking model)")
        ax.set_title(title)
        return fig
    x = np.arange(len(rates))
    ax.bar(x, rates, color=colours, width=0.6)
    top = max(max(rates), 1e-6)
    for xi, r in zip(x, rates):
        ax.text(xi, r + top * 0.02, f"{r:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("spikes per neuron per step")
    ax.set_title(title)
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
            ax.hist(b, bins=bins, color="0.6", alpha=0.7)
            ax.hist(a, bins=bins, color=_COMMON, alpha=0.7)
            # the spread in the panel's title: a legend in every panel hides bars
            ax.set_title(f"sd {b.std():.3f} → {a.std():.3f}", fontsize=7.5, loc="right")
            ax.tick_params(labelsize=7)
            if i == len(trained) - 1:
                ax.set_xlabel(labels[q])
            if j == 0:
                ax.set_ylabel(f"layer {i + 1}: neurons", fontsize=8)
    fig.legend(handles=[Patch(color="0.6", alpha=0.7, label="at initialisation"),
                        Patch(color=_COMMON, alpha=0.7, label="trained")],
               loc="outside upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def latency_curve(curves: dict[str, Sequence[float]], *,
                  title: str = "Macro-F1 by decision step", ylabel: str = "macro-F1") -> Figure:
    """Macro-F1 when the class is read after step t = 1..T, one line per method (or per
    measure: any curves over the steps, named by ``ylabel``)."""
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    longest = 1
    for name, ys in curves.items():
        ys = list(ys)
        longest = max(longest, len(ys))
        ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3.5, label=name)
    if longest <= 20:
        ax.set_xticks(range(1, longest + 1))
    ax.set_ylim(0, 1.02)
    ax.grid(color="0.92", lw=0.6)
    ax.set_xlabel("decision step t")
    ax.set_ylabel(ylabel)
    if curves:
        ax.legend(frameon=False, loc="lower right")
    ax.set_title(title)
    return fig


# -- UMAP panels -----------------------------------------------------------------------------

def embedding(adata: Any, *, basis: str = "X_umap", max_cells: int = 20_000,
              random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates to draw cells on: ``(cells, coords)``, positions into ``adata`` and
    their coordinates. ``obsm[basis]`` when present (every cell); else a UMAP computed with
    scanpy on a copy of at most ``max_cells`` randomly drawn cells (``adata`` is left as it
    is): counts are log-normalised first, then PCA (or ``obsm["X_pca"]``), 15 neighbours,
    UMAP. Needs the expression matrix when there is no ``obsm[basis]``."""
    if basis in adata.obsm:
        xy = np.asarray(adata.obsm[basis])[:, :2].astype(float)
        return np.arange(adata.n_obs), xy
    if adata.n_vars == 0:
        raise ValueError(f"no obsm['{basis}'] and no expression to compute a UMAP from")
    import scanpy as sc

    rng = np.random.default_rng(random_state)
    cells = np.arange(adata.n_obs)
    if adata.n_obs > max_cells:
        cells = np.sort(rng.choice(adata.n_obs, size=max_cells, replace=False))
    sub = adata[cells].copy()
    sub.obs = sub.obs.iloc[:, :0]  # only the matrix (and X_pca) are needed
    if "X_pca" not in sub.obsm:
        x = sub.X
        vals = x.data if hasattr(x, "data") and not isinstance(x, np.ndarray) else np.asarray(x)
        vals = np.asarray(vals[:10_000], dtype=float)
        if vals.size and vals.max() > 30 and np.allclose(vals, np.round(vals)):
            sc.pp.normalize_total(sub, target_sum=1e4)
            sc.pp.log1p(sub)
        n_comps = int(min(50, sub.n_obs - 1, sub.n_vars - 1))
        sc.pp.pca(sub, n_comps=max(n_comps, 2), random_state=random_state)
    sc.pp.neighbors(sub, n_neighbors=min(15, max(sub.n_obs - 1, 2)), use_rep="X_pca",
                    random_state=random_state)
    sc.tl.umap(sub, random_state=random_state)
    return cells, np.asarray(sub.obsm["X_umap"], dtype=float)


def umap(adata: Any, *, truth_key: str | None = None, key_added: str = "scsnn",
         basis: str = "X_umap", max_cells: int = 20_000, random_state: int = 0,
         title: str | None = None) -> Figure:
    """Cells on a UMAP, in panels: the reference label (with ``truth_key``), the predicted
    label ``obs[key_added]`` and its confidence. The two label panels share colours and one
    legend below. Uses ``obsm[basis]`` when present, else computes a UMAP on a subsample of
    at most ``max_cells`` cells (see :func:`embedding`)."""
    cells, xy = embedding(adata, basis=basis, max_cells=max_cells, random_state=random_state)
    obs = adata.obs.iloc[cells]
    panels: list[tuple[str, str]] = []
    if truth_key is not None and truth_key in obs:
        panels.append(("reference: " + truth_key, truth_key))
    if key_added in obs:
        panels.append(("predicted: " + key_added, key_added))
    conf_key = f"{key_added}_confidence"
    if conf_key in obs:
        panels.append(("confidence", conf_key))
    if not panels:
        raise ValueError(f"nothing to colour by: no obs['{key_added}']")
    order = []
    classes = adata.uns.get(key_added, {}).get("classes") if hasattr(adata, "uns") else None
    if classes is not None:
        order = [str(c) for c in classes]
    seen: list[str] = []
    for _, col in panels:
        if col != conf_key:
            seen += [str(v) for v in pd.Series(obs[col]).dropna().astype(str).unique()]
    labels = [c for c in order if c in seen] + sorted(set(seen) - set(order))
    colours = _palette(labels)
    n = len(cells)
    size = float(np.clip(20000 / max(n, 1), 0.3, 12))
    draw = np.random.default_rng(random_state).permutation(n)  # no type drawn over the rest
    n_leg = len(labels)
    longest = max([len(c) for c in labels] + [1])
    ncol = max(1, min(n_leg, int(13 // max(1.0, 0.075 * longest + 0.5))))
    leg_rows = int(np.ceil(n_leg / ncol)) if n_leg else 0
    fig = Figure(figsize=(4.3 * len(panels) + 0.6, 4.6 + 0.17 * leg_rows), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, col) in zip(axes, panels):
        if col == conf_key:
            v = obs[col].to_numpy(dtype=float)
            im = ax.scatter(xy[draw, 0], xy[draw, 1], c=v[draw], s=size, cmap="viridis",
                            vmin=0, vmax=1, linewidths=0, rasterized=True)
            fig.colorbar(im, ax=ax, shrink=0.7, label="confidence")
        else:
            v = pd.Series(obs[col]).astype(str).to_numpy()
            v = np.where(pd.Series(obs[col]).isna().to_numpy(), "", v)
            c = [colours.get(x, (0.9, 0.9, 0.9, 1.0)) for x in v[draw]]
            ax.scatter(xy[draw, 0], xy[draw, 1], c=c, s=size, linewidths=0, rasterized=True)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1", fontsize=8)
        ax.set_ylabel("UMAP 2", fontsize=8)
        ax.set_aspect("equal", adjustable="datalim")
    if labels:
        handles = [Line2D([], [], ls="", marker="o", markersize=6, markerfacecolor=colours[lab],
                          markeredgewidth=0, label=lab) for lab in labels]
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=7,
                   frameon=False, columnspacing=1.2, handletextpad=0.3)
    note = f"{n} of {adata.n_obs} cells" if n < adata.n_obs else f"{n} cells"
    fig.suptitle((title or "UMAP") + f" ({note})", fontsize=11)
    return fig
