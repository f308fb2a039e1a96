"""Does the form of the input change the annotation? A k-fold cross-validation of pbmc3k with
its raw counts and with TPM-like and CPM-like matrices made from them.

    python benchmarks/input_forms.py [--data ../shared/data/pbmc3k.h5ad] [--folds 5]
        [--epochs 40] [--seed 0] [--threads 1]

Forms (built from the counts, cell by cell):

- ``counts``: as shipped (integers).
- ``tpm``: TPM-like, ``counts / gene length`` scaled to 1e6 per cell, with gene lengths
  drawn once from a log-normal around 2 kb (as Smart-seq2 pipelines report them).
- ``cpm``: ``counts / total * 1e6``.

Every form is split into the same folds (stratified on the labels) and trained with the
same seed and settings; scsnn detects each form (counts; scaled values with constant row
sums) and brings it to log1p of 10,000 per cell. Prints per fold and form the macro-F1 on
the held-out cells, the mean over folds, and its difference to the counts one. A last row
annotates the TPM-like held-out cells with the counts models (a query in another form than
its reference).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "pbmc3k.h5ad"


def gene_lengths(n_genes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(2000.0), 0.6, n_genes)


def make_form(counts: sp.csr_matrix, form: str, lengths: np.ndarray) -> sp.csr_matrix:
    X = sp.csr_matrix(counts, dtype=np.float64)
    if form == "counts":
        return sp.csr_matrix(X, dtype=np.float32)
    if form == "tpm":
        X = X @ sp.diags(1.0 / lengths)
    elif form != "cpm":
        raise ValueError(form)
    s = np.asarray(X.sum(1)).ravel()
    s[s == 0] = 1.0
    return sp.csr_matrix(sp.diags(1e6 / s) @ X, dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="default: the library's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch
    from sklearn.metrics import f1_score

    import scsnn
    from scsnn.benchmark import cv_splits

    torch.set_num_threads(a.threads)
    logging.getLogger("scsnn").setLevel(logging.WARNING)
    adata = scsnn.read_h5ad(a.data)
    adata = adata[adata.obs[a.label_key].notna().to_numpy()].copy()
    adata.obs["_row"] = np.arange(adata.n_obs)
    lengths = gene_lengths(adata.n_vars)
    forms = {f: make_form(adata.X, f, lengths) for f in ("counts", "tpm", "cpm")}
    settings = {} if a.epochs is None else {"epochs": a.epochs}
    kinds = {f: scsnn.io.get_expression(_with_x(adata, X)).kind for f, X in forms.items()}
    print(f"{Path(a.data).name}: {adata.n_obs} cells, {adata.n_vars} genes, "
          f"{adata.obs[a.label_key].nunique()} classes; {a.folds}-fold cross-validation, "
          f"seed {a.seed}, settings {settings or 'library defaults'}")
    print("detected kinds: " + ", ".join(f"{f} -> {k}" for f, k in kinds.items()))
    splits = list(cv_splits(adata, a.label_key, a.folds, a.seed))
    scores: dict[str, list[float]] = {f: [] for f in (*forms, "counts model -> tpm query")}
    t0 = time.perf_counter()
    for i, split in enumerate(splits):
        tr = split.reference.obs["_row"].to_numpy()
        te = split.query.obs["_row"].to_numpy()
        truth = adata.obs[a.label_key].astype(str).to_numpy()[te]
        models = {}
        for form, X in forms.items():
            ref, query = _with_x(adata[tr], X[tr]), _with_x(adata[te], X[te])
            model = scsnn.tl.train(ref, a.label_key, seed=a.seed, device="cpu", progress=False,
                                   **scsnn.tl.configs(**settings))
            models[form] = model
            q = scsnn.tl.annotate(query, model, copy=True, device="cpu")
            f1 = f1_score(truth, q.obs["scsnn"].astype(str), average="macro")
            scores[form].append(float(f1))
            print(f"fold {i + 1} {form:7s} macro-F1 {f1:.4f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        q = scsnn.tl.annotate(_with_x(adata[te], forms["tpm"][te]), models["counts"],
                              copy=True, device="cpu")
        f1 = f1_score(truth, q.obs["scsnn"].astype(str), average="macro")
        scores["counts model -> tpm query"].append(float(f1))
    print()
    print("| form | macro-F1 per fold | mean | mean - counts |")
    print("|---|---|---|---|")
    base = float(np.mean(scores["counts"]))
    for form, s in scores.items():
        m = float(np.mean(s))
        print(f"| {form} | {' '.join(f'{x:.4f}' for x in s)} | {m:.4f} | {m - base:+.4f} |")
    worst = max(abs(np.mean(scores[f]) - base) for f in ("tpm", "cpm"))
    print(f"\nlargest |mean macro-F1 - counts| over tpm, cpm: {worst:.4f} "
          f"({'within' if worst <= 0.01 else 'NOT within'} 0.01); "
          f"{time.perf_counter() - t0:.0f} s")
    sys.stdout.flush()


def _with_x(adata, X):
    import anndata as ad

    return ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32), obs=adata.obs.copy(),
                      var=adata.var.copy())


if __name__ == "__main__":
    main()
