"""Accuracy of scsnn side by side with logistic regression on the same genes and splits.

Both methods see the same reference cells, the same genes and the same preprocessing: the
logistic regression is fitted on the standardised matrix that the trained scsnn model's gene
space produces (``model.gene_space``), so only the classifier differs.

Usage::

    python benchmarks/accuracy.py [--tasks pbmc68k,pbmc3k] [--seed 0] [--data-dir DIR]
                                  [--out results.json] [--quick] [--set epochs=30 ...]

Tasks (labels in ``obs["cell_type"]``; data described in ``shared/data/README.md``):
``pbmc68k`` and ``pbmc3k`` (5-fold stratified cross-validation, predictions pooled over
folds), ``pbmc_3batch`` (3'v1 + 3'v2 -> 5'), ``pancreas`` (Wang -> Xin, shared labels only),
``celllines`` (CEL-seq2 -> Drop-seq). Rare classes are those under 3% of the evaluated cells.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message=".*[Tt]riton.*")
warnings.filterwarnings("ignore", category=FutureWarning)

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

import scsnn  # noqa: E402
from scsnn.evaluate import classification_report  # noqa: E402
from scsnn.io import get_expression  # noqa: E402

LABEL = "cell_type"
METHODS = ("scsnn-hifi", "logreg", "logreg-balanced")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A split: (reference, query, candidate genes or None).
Split = tuple[ad.AnnData, ad.AnnData, list[str] | None]


def read(data_dir: Path, name: str) -> ad.AnnData:
    return ad.read_h5ad(data_dir / f"{name}.h5ad")


def shared_genes(ref: ad.AnnData, query: ad.AnnData) -> list[str]:
    return ref.var_names.intersection(query.var_names).tolist()


def cv_splits(adata: ad.AnnData, n_folds: int) -> Iterator[Split]:
    skf = StratifiedKFold(5, shuffle=True, random_state=0)
    for i, (tr, te) in enumerate(skf.split(np.zeros(adata.n_obs), adata.obs[LABEL])):
        if i < n_folds:
            yield adata[tr].copy(), adata[te].copy(), None


def cross_split(ref: ad.AnnData, query: ad.AnnData) -> Iterator[Split]:
    yield ref, query, shared_genes(ref, query)


def pbmc_3batch(data_dir: Path) -> Iterator[Split]:
    a = read(data_dir, "pbmc_3batch")
    donor = a.obs["donor"].astype(str)
    yield from cross_split(a[donor.isin(["3pv1", "3pv2"]).to_numpy()].copy(),
                           a[(donor == "5p").to_numpy()].copy())


def pancreas(data_dir: Path) -> Iterator[Split]:
    ref, query = read(data_dir, "pancreas_wang"), read(data_dir, "pancreas_xin")
    labels = set(ref.obs[LABEL].astype(str)) & set(query.obs[LABEL].astype(str))
    keep = lambda a: a[a.obs[LABEL].astype(str).isin(labels).to_numpy()].copy()  # noqa: E731
    yield from cross_split(keep(ref), keep(query))


def tasks(data_dir: Path, n_folds: int) -> dict[str, Callable[[], Iterator[Split]]]:
    return {
        "pbmc68k": lambda: cv_splits(read(data_dir, "pbmc68k_reduced"), n_folds),
        "pbmc3k": lambda: cv_splits(read(data_dir, "pbmc3k"), n_folds),
        "pbmc_3batch": lambda: pbmc_3batch(data_dir),
        "pancreas": lambda: pancreas(data_dir),
        "celllines": lambda: cross_split(read(data_dir, "celllines3_celseq2"),
                                         read(data_dir, "celllines3_dropseq")),
    }


def standardised(model: scsnn.ScsnnModel, adata: ad.AnnData) -> np.ndarray:
    """The dense standardised matrix the network sees, in the model's gene space."""
    return model.gene_space.features(get_expression(adata))


def run_split(ref: ad.AnnData, query: ad.AnnData, genes: list[str] | None, seed: int,
              train_kwargs: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Predictions of every method on the query, and scsnn's timings."""
    t0 = time.perf_counter()
    model = scsnn.tl.train(ref, LABEL, genes=genes, seed=seed, progress=False, **train_kwargs)
    t1 = time.perf_counter()
    scsnn.tl.annotate(query, model)
    t2 = time.perf_counter()
    preds = {"scsnn-hifi": query.obs["scsnn"].astype(str).to_numpy()}
    Zr, Zq, y = standardised(model, ref), standardised(model, query), ref.obs[LABEL].astype(str)
    for name, cw in (("logreg", None), ("logreg-balanced", "balanced")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=1000, class_weight=cw).fit(Zr, y)
        preds[name] = clf.predict(Zq)
    timing = {"train_s": t1 - t0, "annotate_s": t2 - t1, "n_query": query.n_obs,
              "n_genes": model.gene_space.n_genes, "epochs_run": model.metrics["epochs_run"],
              "best_epoch": model.metrics["best_epoch"]}
    return preds, timing


def summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("n_cells", "accuracy", "macro_f1", "balanced_accuracy", "rare_classes",
            "rare_mean_recall")
    out = {k: report[k] for k in keys}
    out["rare_recall"] = {r["label"]: r["recall"] for r in report["per_class"] if r["rare"]}
    out["per_class"] = report["per_class"]
    return out


def run_task(splits: Iterator[Split], seed: int, train_kwargs: dict[str, Any]) -> dict[str, Any]:
    truth: list[np.ndarray] = []
    preds: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    fold_f1: dict[str, list[float]] = {m: [] for m in METHODS}
    timings = []
    for ref, query, genes in splits:
        p, t = run_split(ref, query, genes, seed, train_kwargs)
        y = query.obs[LABEL].astype(str).to_numpy()
        truth.append(y)
        timings.append(t)
        for m in METHODS:
            preds[m].append(p[m])
            fold_f1[m].append(classification_report(y, p[m])["macro_f1"])
    y_all = np.concatenate(truth)
    res: dict[str, Any] = {"methods": {}, "timing": timings}
    for m in METHODS:
        res["methods"][m] = summary(classification_report(y_all, np.concatenate(preds[m])))
        if len(fold_f1[m]) > 1:
            res["methods"][m]["fold_macro_f1"] = fold_f1[m]
            res["methods"][m]["fold_mean_macro_f1"] = float(np.mean(fold_f1[m]))
    res["scsnn_train_s"] = float(sum(t["train_s"] for t in timings))
    res["scsnn_cells_per_s"] = float(sum(t["n_query"] for t in timings)
                                     / sum(t["annotate_s"] for t in timings))
    return res


def markdown(name: str, res: dict[str, Any]) -> str:
    cv = "fold_mean_macro_f1" in res["methods"][METHODS[0]]
    head = ["method", "macro-F1"] + (["fold-mean macro-F1"] if cv else []) + [
        "accuracy", "balanced acc", "rare mean recall", "rare classes (recall)"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in res["methods"].items():
        rare = ", ".join(f"{k} ({v:.2f})" for k, v in r["rare_recall"].items()) or "none"
        rmr = "n/a" if r["rare_mean_recall"] is None else f"{r['rare_mean_recall']:.3f}"
        row = [m, f"{r['macro_f1']:.3f}"] + ([f"{r['fold_mean_macro_f1']:.3f}"] if cv else []) + [
            f"{r['accuracy']:.3f}", f"{r['balanced_accuracy']:.3f}", rmr, rare]
        lines.append("| " + " | ".join(row) + " |")
    t = res["timing"]
    lines += ["", f"{res['methods'][METHODS[0]]['n_cells']} evaluated cells, {len(t)} split(s); "
              f"scsnn: {t[0]['n_genes']} genes, training {res['scsnn_train_s']:.1f} s in all, "
              f"epochs run/best {[(x['epochs_run'], x['best_epoch']) for x in t]}, "
              f"annotation {res['scsnn_cells_per_s']:,.0f} cells/s", ""]
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="pbmc68k,pbmc3k,pbmc_3batch,pancreas,celllines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 epochs and only the first CV fold")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="scsnn.tl.train keyword, e.g. --set epochs=30 --set class_balance=0.7")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    train_kwargs = ({"epochs": 3} if args.quick else {}) | parse_set(args.set)
    available = tasks(args.data_dir, 1 if args.quick else 5)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {list(available)}")

    results: dict[str, Any] = {"seed": args.seed, "train_kwargs": train_kwargs,
                               "scsnn_version": scsnn.__version__, "tasks": {}}
    t0 = time.perf_counter()
    for name in names:
        results["tasks"][name] = res = run_task(available[name](), args.seed, train_kwargs)
        print(markdown(name, res), flush=True)
    results["wall_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"total {results['wall_s']:.0f} s; results written to {args.out}")


if __name__ == "__main__":
    main()
