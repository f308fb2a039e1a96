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
from .errors import InputError
from .evaluate import RARE_THRESHOLD, classification_report, latency_report
from .io import get_expression
from .pp import log_normalize

logger = logging.getLogger("scsnn")

#: scsnn variants: name -> keyword arguments of :func:`scsnn.tl.train`
SCSNN_METHODS: dict[str, dict[str, Any]] = {
    "hifi": {},
    "lif": {"neuron": "lif"},
    "plif": {"neuron": "plif"},
    "ann": {"neuron": "ann"},
    "hifi-no-autapse": {"autapse": False},
    "hifi-joint": {"bilevel": False},
    "hifi-no-smoothness": {"smoothness": 0.0},
    "hifi-online": {"online": True},
}
OTHER_METHODS = ("logreg", "celltypist")
DEFAULT_METHODS = ("hifi", "lif", "plif", "ann", "logreg", "celltypist")
ALL_METHODS = tuple(SCSNN_METHODS) + OTHER_METHODS


@dataclass
class Split:
    name: str
    reference: ad.AnnData
    query: ad.AnnData
    genes: list[str] | None  # candidate genes (shared by reference and query), or None


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
            seed: int) -> tuple[np.ndarray, float, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def features(a: ad.AnnData) -> np.ndarray:
        return model.gene_space.features(get_expression(a))

    Zr = features(ref)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit(Zr, ref.obs[label_key].astype(str).to_numpy())
    t1 = time.perf_counter()
    pred = clf.predict(features(query))
    return pred, t1 - t0, time.perf_counter() - t1


def run(
    splits: Sequence[Split] | Iterator[Split],
    label_key: str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    seed: int = 0,
    rare_threshold: float = RARE_THRESHOLD,
    train_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method on every split; return per-split rows and per-method summaries."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)} (choose from "
                         f"{', '.join(ALL_METHODS)})")
    kw = dict(train_kwargs or {})
    kw.setdefault("progress", False)
    ct_problem = celltypist_status() if "celltypist" in methods else None
    rows: list[dict[str, Any]] = []
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {m: ([], []) for m in methods}
    for split in splits:
        truth = split.query.obs[label_key].astype(str).to_numpy()
        logger.info("benchmark split %s: %d reference, %d query cells", split.name,
                    split.reference.n_obs, split.query.n_obs)
        anchor = None  # the hifi model (or the first scsnn model) lends its gene space
        for method in [m for m in methods if m in SCSNN_METHODS] + \
                      [m for m in methods if m in OTHER_METHODS]:
            row: dict[str, Any] = {"split": split.name, "method": method, "n_query": len(truth)}
            if method in SCSNN_METHODS:
                t0 = time.perf_counter()
                model = tl.train(split.reference, label_key, genes=split.genes, seed=seed,
                                 **(kw | SCSNN_METHODS[method]))
                t1 = time.perf_counter()
                q = tl.annotate(split.query, model, copy=True, min_gene_overlap=0.0)
                t2 = time.perf_counter()
                pred = q.obs["scsnn"].astype(str).to_numpy()
                anchor = anchor or model
                info = q.uns["scsnn"]
                lat = latency_report(truth, np.asarray(q.obsm["scsnn_step_labels"]),
                                     model.classes)
                row.update(
                    train_seconds=t1 - t0, annotate_cells_per_s=len(truth) / (t2 - t1),
                    energy_ratio=float(info["energy"]["ratio_ann_over_snn"]),
                    snn_pj_per_cell=float(info["energy"]["snn_pj_per_cell"]),
                    steps_to_99pct=lat["steps_to_99pct"] if method != "ann" else None,
                    macro_f1_by_step=lat["macro_f1_by_step"],
                )
            elif method == "logreg":
                if anchor is None:
                    anchor = tl.train(split.reference, label_key, genes=split.genes, seed=seed,
                                      **(kw | {"epochs": 1}))
                pred, ttrain, tann = _logreg(anchor, split.reference, split.query, label_key,
                                             seed)
                row.update(train_seconds=ttrain, annotate_cells_per_s=len(truth) / tann)
            else:  # celltypist
                if ct_problem:
                    row["unavailable"] = ct_problem
                    rows.append(row)
                    continue
                genes = anchor.gene_space.genes if anchor is not None else split.genes
                try:
                    pred, ttrain, tann = _celltypist(split.reference, split.query, label_key,
                                                     list(genes or split.reference.var_names))
                except Exception as exc:
                    row["unavailable"] = f"failed: {type(exc).__name__}: {exc}"
                    rows.append(row)
                    continue
                row.update(train_seconds=ttrain, annotate_cells_per_s=len(truth) / tann)
            rep = classification_report(truth, pred, rare_threshold=rare_threshold)
            row.update(accuracy=rep["accuracy"], macro_f1=rep["macro_f1"],
                       balanced_accuracy=rep["balanced_accuracy"])
            pooled[method][0].append(truth)
            pooled[method][1].append(pred)
            rows.append(row)
    return {"rows": rows, "summary": summarise(rows, pooled, methods, rare_threshold),
            "celltypist": ct_problem or "ran"}


def summarise(rows: list[dict[str, Any]], pooled: dict[str, Any], methods: Sequence[str],
              rare_threshold: float) -> list[dict[str, Any]]:
    """Mean and standard deviation over splits; rare-class recall from pooled predictions."""
    df = pd.DataFrame(rows)
    out = []
    for m in methods:
        sub = df[df["method"] == m]
        rec: dict[str, Any] = {"method": m, "splits": int(len(sub))}
        if "unavailable" in sub.columns and sub["unavailable"].notna().any():
            rec["unavailable"] = str(sub["unavailable"].dropna().iloc[0])
            out.append(rec)
            continue
        for col in ("accuracy", "macro_f1", "balanced_accuracy", "energy_ratio",
                    "steps_to_99pct", "train_seconds", "annotate_cells_per_s"):
            if col in sub.columns and sub[col].notna().any():
                vals = sub[col].dropna().astype(float)
                rec[col] = float(vals.mean())
                rec[f"{col}_sd"] = float(vals.std(ddof=0))
        truth, pred = pooled[m]
        if truth:
            rep = classification_report(np.concatenate(truth), np.concatenate(pred),
                                        rare_threshold=rare_threshold)
            rec["rare_recall"] = {r["label"]: r["recall"] for r in rep["per_class"] if r["rare"]}
            rec["rare_mean_recall"] = rep["rare_mean_recall"]
            rec["pooled_macro_f1"] = rep["macro_f1"]
        out.append(rec)
    return out


def markdown(result: dict[str, Any], title: str = "") -> str:
    """The summary as a Markdown table (mean ± sd over splits)."""

    def pm(r: dict[str, Any], key: str, fmt: str = "{:.3f}") -> str:
        if key not in r:
            return "–"
        s = fmt.format(r[key])
        sd = r.get(f"{key}_sd")
        return s if not sd else f"{s} ± {fmt.format(sd)}"

    head = ["method", "macro-F1", "accuracy", "balanced acc", "rare mean recall",
            "rare classes (recall)", "E_ANN/E_SNN", "steps to 99%", "train s", "cells/s"]
    lines = ([f"### {title}", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["summary"]:
        if "unavailable" in r:
            lines.append(f"| {r['method']} | not run: {r['unavailable']} |" + " |" * 8)
            continue
        rare = ", ".join(f"{k} ({v:.2f})" for k, v in r.get("rare_recall", {}).items()) or "none"
        rmr = r.get("rare_mean_recall")
        lines.append("| " + " | ".join([
            r["method"], pm(r, "macro_f1"), pm(r, "accuracy"), pm(r, "balanced_accuracy"),
            "–" if rmr is None else f"{rmr:.3f}", rare, pm(r, "energy_ratio", "{:.2f}"),
            pm(r, "steps_to_99pct", "{:.1f}"), pm(r, "train_seconds", "{:.1f}"),
            pm(r, "annotate_cells_per_s", "{:,.0f}"),
        ]) + " |")
    return "\n".join(lines)
