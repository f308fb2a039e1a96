"""Side-by-side benchmark: HIFI against typical SNNs, the ANN twin, logistic regression and
CellTypist, on the same genes and the same splits.

Every method sees the reference cells of a split and is scored on its query cells. The
scsnn networks each fit their own gene space, which is the same for all of them (it depends
only on the reference and its labels); logistic regression is fitted on that gene space's
standardised matrix, CellTypist on the log-normalised expression of the same genes.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from . import tl
from ._version import library_versions
from .errors import InputError
from .evaluate import RARE_THRESHOLD, classification_report, latency_report
from .io import get_expression
from .pp import log_normalize

logger = logging.getLogger("scsnn")

#: scsnn variants: name -> keyword arguments of :func:`scsnn.tl.train`
SCSNN_METHODS: dict[str, dict[str, Any]] = {
    "hifi": {},
    # the HIFI layer with shared, fixed parameters; PLIF's one leak per layer is trained
    # with the weights, as a typical SNN is
    "lif": {"neuron": "lif"},
    "plif": {"neuron": "plif", "bilevel": False},
    "sj-lif": {"neuron": "sj-lif"},
    "sj-plif": {"neuron": "sj-plif", "bilevel": False},
    "ann": {"neuron": "ann"},
    "hifi-no-autapse": {"autapse": False},
    "hifi-homogeneous": {"heterogeneous": False},
    "hifi-joint": {"bilevel": False},
    "hifi-no-smoothness": {"smoothness": 0.0},
    "hifi-online": {"online": True},
}
OTHER_METHODS = ("logreg", "logreg-balanced", "celltypist")
DEFAULT_METHODS = ("hifi", "lif", "plif", "ann", "logreg", "celltypist")
ALL_METHODS = tuple(SCSNN_METHODS) + OTHER_METHODS


@dataclass
class Split:
    name: str
    reference: ad.AnnData
    query: ad.AnnData
    genes: list[str] | None  # candidate genes (shared by reference and query), or None


def train_method(split: Split, label_key: str, seed: int,
                 settings: dict[str, Any]) -> Any:
    """Train one scsnn network on a split's reference; ``settings`` are flat (see
    :func:`scsnn.tl.configs`), plus ``device`` and ``progress``."""
    flat = dict(settings)
    device = flat.pop("device", "auto")
    progress = flat.pop("progress", False)
    return tl.train(split.reference, label_key, genes=split.genes, seed=seed, device=device,
                    progress=progress, **tl.configs(**flat))


def cv_splits(adata: ad.AnnData, label_key: str, folds: int, seed: int) -> Iterator[Split]:
    """Stratified k-fold splits of one labelled AnnData."""
    y = adata.obs[label_key].astype(str).to_numpy()
    counts = pd.Series(y).value_counts()
    k = int(min(folds, counts.max()))
    if k < 2:
        raise InputError("cross-validation needs at least 2 folds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes smaller than k: sklearn warns
        skf = StratifiedKFold(k, shuffle=True, random_state=seed)
        for i, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
            yield Split(f"fold{i + 1}", adata[tr].copy(), adata[te].copy(), None)


def pair_split(ref: ad.AnnData, query: ad.AnnData, label_key: str) -> Split:
    """Reference -> query, on the genes both measure."""
    genes = ref.var_names.intersection(query.var_names).tolist()
    if not genes:
        raise InputError("reference and query share no gene names")
    return Split("query", ref, query, genes)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def celltypist_status() -> str | None:
    """None when CellTypist can be used here, else why not (one line)."""
    try:
        import celltypist  # noqa: F401
        import sklearn
    except Exception as exc:  # not installed, or broken install
        return f"not installed ({type(exc).__name__}: {exc})"
    ct_ver = getattr(celltypist, "__version__", "0")
    if _version(sklearn.__version__) >= (1, 7) and _version(ct_ver) <= (1, 7, 1):
        return (f"CellTypist {ct_ver} passes LogisticRegression(multi_class=...), which "
                f"scikit-learn {sklearn.__version__} removed; pip install 'scsnn[celltypist]' "
                "(scikit-learn<1.7) to run it")
    return None


def _celltypist(ref: ad.AnnData, query: ad.AnnData, label_key: str,
                genes: list[str]) -> tuple[np.ndarray, float, float]:
    import celltypist

    def lognorm(a: ad.AnnData) -> ad.AnnData:
        expr = get_expression(a)
        X = log_normalize(expr)
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=a.obs_names.astype(str)),
                         var=pd.DataFrame(index=pd.Index(expr.genes).astype(str)))
        out = out[:, ~out.var_names.duplicated()]
        return out[:, out.var_names.isin(genes)].copy()

    r, q = lognorm(ref), lognorm(query)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(r, labels=ref.obs[label_key].astype(str).to_numpy(),
                                 use_SGD=True, mini_batch=r.n_obs > 5000,
                                 feature_selection=False, n_jobs=1, check_expression=False)
        t1 = time.perf_counter()
        pred = celltypist.annotate(q, model=model, majority_voting=False)
    t2 = time.perf_counter()
    return pred.predicted_labels["predicted_labels"].astype(str).to_numpy(), t1 - t0, t2 - t1


def _logreg(model: Any, ref: ad.AnnData, query: ad.AnnData, label_key: str,
            seed: int, balanced: bool = False) -> tuple[np.ndarray, float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def features(a: ad.AnnData) -> np.ndarray:
        return model.gene_space.features(get_expression(a))

    Zr = features(ref)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=1000, random_state=seed,
                                 class_weight="balanced" if balanced else None)
        clf.fit(Zr, ref.obs[label_key].astype(str).to_numpy())
    t1 = time.perf_counter()
    pred = clf.predict(features(query))
    return pred, t1 - t0, time.perf_counter() - t1


#: the method-name suffix of rows scored with each extra adaptation mode (see :func:`run`)
ADAPT_SUFFIX = {True: "+adabn", "reweighted": "+adabn-rw"}


def _score_scsnn(model: Any, split: Split, label_key: str, truth: np.ndarray,
                 t_train: float, adapt_batchnorm: bool | str = False
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    t1 = time.perf_counter()
    q = tl.annotate(split.query, model, copy=True, min_gene_overlap=0.0,
                    adapt_batchnorm=adapt_batchnorm)
    t2 = time.perf_counter()
    pred = q.obs["scsnn"].astype(str).to_numpy()
    info = q.uns["scsnn"]
    lat = latency_report(truth, np.asarray(q.obsm["scsnn_step_labels"]), model.classes)
    spiking = model.config.neuron != "ann"
    extra = dict(
        train_seconds=t_train, annotate_cells_per_s=len(truth) / (t2 - t1),
        energy_ratio=float(info["energy"]["ratio_ann_over_snn"]),
        snn_pj_per_cell=float(info["energy"]["snn_pj_per_cell"]),
        spike_rate_per_layer=[float(r) for r in info["energy"].get("spike_rate_per_layer", [])],
        input_spike_rate=info["energy"].get("input_spike_rate"),
        steps_to_99pct=lat["steps_to_99pct"] if spiking else None,
        macro_f1_by_step=lat["macro_f1_by_step"],
        neurons=model.metrics.get("neurons"),
        select_macro_f1=model.metrics.get("select_macro_f1"),
        epochs_run=model.metrics.get("epochs_run"),
    )
    return pred, extra


def run(
    splits: Sequence[Split] | Iterator[Split],
    label_key: str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int | None = None,
    seeds: Sequence[int] = (0,),
    rare_threshold: float = RARE_THRESHOLD,
    train_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method with every training seed on every split.

    ``train_kwargs`` are flat training settings (:func:`scsnn.tl.configs`), plus ``device``,
    ``progress`` and ``adapt_batchnorm``: True (or ``"reweighted"``) annotates the scsnn
    networks' queries with test-time adaptation of batch norm (:func:`scsnn.tl.annotate`);
    ``"both"`` scores every scsnn network without and with it, ``"all"`` also with the
    re-weighted one (the adapted rows' methods are ``"<method>+adabn"`` and
    ``"<method>+adabn-rw"``; training is shared).

    Returns ``{"rows": [...], "summary": [...], "celltypist": ..., "versions": ...}``: one
    row per (split, method, seed), and per method the mean and standard deviation over
    seeds of each seed's result (macro-F1 etc. averaged over the splits, rare-class recall
    from the predictions pooled over the splits); ``versions``: the libraries that produced
    it (:func:`scsnn._version.library_versions`). ``seed`` (one seed) is a shorthand for ``seeds=[seed]``.
    """
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)} (choose from "
                         f"{', '.join(ALL_METHODS)})")
    seeds = [int(seed)] if seed is not None else [int(s) for s in seeds]
    kw = dict(train_kwargs or {})
    kw.setdefault("progress", False)
    adapt = kw.pop("adapt_batchnorm", False)
    extra_modes = {"both": [True], "all": [True, "reweighted"]}.get(adapt, [])
    adapt = False if extra_modes else ("reweighted" if adapt == "reweighted" else bool(adapt))
    ct_problem = celltypist_status() if "celltypist" in methods else None
    rows: list[dict[str, Any]] = []
    order = [m for m in methods if m in SCSNN_METHODS] + [m for m in methods if m in OTHER_METHODS]
    for split in splits:
        truth = split.query.obs[label_key].astype(str).to_numpy()
        logger.info("benchmark split %s: %d reference, %d query cells", split.name,
                    split.reference.n_obs, split.query.n_obs)
        for s in seeds:
            anchor = None  # the hifi model (or the first scsnn model) lends its gene space
            for method in order:
                row: dict[str, Any] = {"split": split.name, "method": method, "seed": s,
                                       "n_query": len(truth)}
                if method in SCSNN_METHODS:
                    t0 = time.perf_counter()
                    model = train_method(split, label_key, s, kw | SCSNN_METHODS[method])
                    t_train = time.perf_counter() - t0
                    pred, extra = _score_scsnn(model, split, label_key, truth, t_train,
                                               adapt)
                    anchor = anchor or model
                    row.update(extra)
                    for mode in extra_modes:
                        pa, ea = _score_scsnn(model, split, label_key, truth, t_train, mode)
                        rep = classification_report(truth, pa, rare_threshold=rare_threshold)
                        rows.append(dict(row, **ea, method=method + ADAPT_SUFFIX[mode],
                                         accuracy=rep["accuracy"], macro_f1=rep["macro_f1"],
                                         balanced_accuracy=rep["balanced_accuracy"],
                                         truth=truth.tolist(), pred=[str(x) for x in pa]))
                elif method == "logreg" or method == "logreg-balanced":
                    if anchor is None:
                        anchor = train_method(split, label_key, s, kw | {"epochs": 1})
                    pred, ttrain, tann = _logreg(anchor, split.reference, split.query,
                                                 label_key, s,
                                                 balanced=method == "logreg-balanced")
                    row.update(train_seconds=ttrain, annotate_cells_per_s=len(truth) / tann)
                else:  # celltypist
                    if ct_problem:
                        row["unavailable"] = ct_problem
                        rows.append(row)
                        continue
                    genes = anchor.gene_space.genes if anchor is not None else split.genes
                    try:
                        pred, ttrain, tann = _celltypist(split.reference, split.query,
                                                         label_key,
                                                         list(genes or split.reference.var_names))
                    except Exception as exc:
                        row["unavailable"] = f"failed: {type(exc).__name__}: {exc}"
                        rows.append(row)
                        continue
                    row.update(train_seconds=ttrain, annotate_cells_per_s=len(truth) / tann)
                rep = classification_report(truth, pred, rare_threshold=rare_threshold)
                row.update(accuracy=rep["accuracy"], macro_f1=rep["macro_f1"],
                           balanced_accuracy=rep["balanced_accuracy"],
                           truth=truth.tolist(), pred=[str(x) for x in pred])
                rows.append(row)
    named = list(methods) + [m + ADAPT_SUFFIX[mode] for mode in extra_modes
                             for m in methods if m in SCSNN_METHODS]
    return {"rows": rows, "summary": summarise(rows, named, rare_threshold),
            "celltypist": ct_problem or "ran", "seeds": seeds, "versions": library_versions()}


_MEAN_COLS = ("accuracy", "macro_f1", "balanced_accuracy", "energy_ratio", "steps_to_99pct",
              "train_seconds", "annotate_cells_per_s", "select_macro_f1")


def summarise(rows: list[dict[str, Any]], methods: Sequence[str],
              rare_threshold: float = RARE_THRESHOLD) -> list[dict[str, Any]]:
    """Per method: each seed's result (means over the splits; rare-class recall from the
    predictions pooled over the splits), then the mean and standard deviation over seeds."""
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        rec: dict[str, Any] = {"method": m, "splits": len({r["split"] for r in mine}),
                               "seeds": sorted({int(r.get("seed", 0)) for r in mine})}
        bad = [r["unavailable"] for r in mine if r.get("unavailable")]
        if bad or not mine:
            rec["unavailable"] = bad[0] if bad else "not run"
            out.append(rec)
            continue
        per_seed = []
        for s in rec["seeds"]:
            rs = [r for r in mine if int(r.get("seed", 0)) == s]
            one: dict[str, Any] = {}
            for col in _MEAN_COLS:
                vals = [float(r[col]) for r in rs if r.get(col) is not None]
                if vals:
                    one[col] = float(np.mean(vals))
            rates = [r["spike_rate_per_layer"] for r in rs if r.get("spike_rate_per_layer")]
            if rates:
                one["spike_rate_per_layer"] = np.mean(np.asarray(rates, float), 0).tolist()
            if rs and "truth" in rs[0]:
                rep = classification_report(np.concatenate([r["truth"] for r in rs]),
                                            np.concatenate([r["pred"] for r in rs]),
                                            rare_threshold=rare_threshold)
                one["rare_recall"] = {r["label"]: r["recall"] for r in rep["per_class"]
                                      if r["rare"]}
                one["rare_mean_recall"] = rep["rare_mean_recall"]
                one["pooled_macro_f1"] = rep["macro_f1"]
            per_seed.append(one)
        rec["per_seed"] = per_seed
        for col in (*_MEAN_COLS, "rare_mean_recall", "pooled_macro_f1"):
            vals = [p[col] for p in per_seed if p.get(col) is not None]
            if vals:
                rec[col] = float(np.mean(vals))
                rec[f"{col}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        rare = [p["rare_recall"] for p in per_seed if p.get("rare_recall")]
        if rare:
            rec["rare_recall"] = {k: float(np.mean([d[k] for d in rare])) for k in rare[0]}
        rates = [p["spike_rate_per_layer"] for p in per_seed if p.get("spike_rate_per_layer")]
        if rates:
            rec["spike_rate_per_layer"] = np.mean(np.asarray(rates, float), 0).tolist()
        out.append(rec)
    return out


def tie(a: dict[str, Any], b: dict[str, Any], key: str = "macro_f1") -> bool:
    """Whether two summaries differ by less than the larger of their seed-to-seed standard
    deviations (a tie), for ``key``; equal means (e.g. two deterministic methods with the
    same predictions, sd 0) are a tie too."""
    if key not in a or key not in b:
        return False
    spread = max(a.get(f"{key}_sd", 0.0), b.get(f"{key}_sd", 0.0))
    diff = abs(a[key] - b[key])
    return diff < spread or diff <= 1e-12


def markdown(result: dict[str, Any], title: str = "") -> str:
    """The summary as a Markdown table: mean ± sd over training seeds."""

    def pm(r: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
        if key not in r:
            return "–"
        s = fmt.format(r[key])
        sd = r.get(f"{key}_sd")
        return s if not sd else f"{s} ± {fmt.format(sd)}"

    head = ["method", "macro-F1", "accuracy", "balanced acc", "rare mean recall",
            "rare classes (recall)", "E_ANN/E_SNN", "steps to 99%", "spike rate per layer",
            "train s", "cells/s"]
    n_seeds = len(result.get("seeds", [0]))
    lines = ([f"### {title}", ""] if title else []) + [
        f"Mean ± sd over {n_seeds} training seed(s).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["summary"]:
        if "unavailable" in r:
            lines.append(f"| {r['method']} | not run: {r['unavailable']} |" + " |" * 9)
            continue
        rare = ", ".join(f"{k} ({v:.2f})" for k, v in r.get("rare_recall", {}).items()) or "none"
        rates = r.get("spike_rate_per_layer")
        lines.append("| " + " | ".join([
            r["method"], pm(r, "macro_f1"), pm(r, "accuracy"), pm(r, "balanced_accuracy"),
            pm(r, "rare_mean_recall"), rare, pm(r, "energy_ratio", "{:.1f}"),
            pm(r, "steps_to_99pct", "{:.1f}"),
            " / ".join(f"{x:.3f}" for x in rates) if rates else "–",
            pm(r, "train_seconds", "{:.1f}"), pm(r, "annotate_cells_per_s", "{:,.0f}"),
        ]) + " |")
    return "\n".join(lines)
