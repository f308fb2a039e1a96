"""Logistic regression on the input codes that scsnn's first layer and its input-to-readout
synapses see, on the first split of every task of ``hifi_claims.py``.

Features, all on scsnn's gene space of the task (fitted with the default settings, seed 0):

* ``z``: the standardised values (the ``logreg`` baseline of ``hifi_claims.py``);
* ``levels``: the latency code's level of every gene, 0 (not detected) .. T, i.e. the spike
  counts that reach the readout through ``--skip`` synapses;
* ``detected``: 1 where a gene is detected, else 0;
* ``steps`` (with ``--more``): the spike trains themselves, one feature per gene and step
  (a readout synapse of its own for each step, i.e. any function of a gene's level);
* ``levels-T8``, ``levels-T16`` (with ``--more``): the latency levels of an encoder of 8 or
  16 steps fitted on the same cells (finer equal-frequency bins), scaled to 0 .. 4;
* ``z+levels`` (with ``--more``): both side by side (a read of the analog input and of the
  spike code at once);
* ``rank-bal``, ``levels+rank-bal`` (with ``--more``): the spike counts that the rank code
  (N-of-M, N = 128, T steps) sends through the skip synapses (``T - step`` of each of a cell's
  N most outstanding detected genes), alone and beside the latency levels, class-balanced.

scikit-learn ``LogisticRegression(C=1, max_iter=1000)`` fitted on all reference cells of the
split (``-bal`` columns: ``class_weight="balanced"``), macro-F1 on its query cells.
``--c-grid`` prints instead, for the levels, the query macro-F1 at C = 0.1, 0.3, 1, 3, 10 and
the C that a 3-fold cross-validation on the reference picks (macro-F1), unweighted and
balanced. ``--convergence`` prints, for the class-balanced fit of the levels (what ``--skip``
fits), the query macro-F1 at scikit-learn's default tolerance (``tol=1e-4``, where L-BFGS
stops after a few dozen iterations, as in scsnn's skip fit) and fitted to convergence
(``tol=1e-8``) at C = 1, 0.3, 0.1, 0.03, 0.01, with the iterations each took at C = 1.

    python benchmarks/linear_codes.py [--tasks a,b] [--more | --c-grid | --convergence] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)


def _logreg(C: float, balanced: bool, tol: float = 1e-4, max_iter: int = 1000):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, tol=tol,
                              class_weight="balanced" if balanced else None)


CONVERGENCE_FITS = [("tol 1e-4, C 1", 1.0, 1e-4)] + [
    (f"converged, C {c:g}", c, 1e-8) for c in (1.0, 0.3, 0.1, 0.03, 0.01)]


def _convergence(X, y, Xq, yq) -> tuple[list[float], list[int]]:
    from scsnn.evaluate import classification_report

    f1s, iters = [], []
    for _, C, tol in CONVERGENCE_FITS:
        clf = _logreg(C, True, tol=tol, max_iter=5000).fit(X, y)
        f1s.append(classification_report(yq, clf.predict(Xq))["macro_f1"])
        iters.append(int(np.max(clf.n_iter_)))
    return f1s, iters


def _fit_score(X, y, Xq, yq, *, C=1.0, balanced=False) -> float:
    from scsnn.evaluate import classification_report

    return classification_report(yq, _logreg(C, balanced).fit(X, y).predict(Xq))["macro_f1"]


def _c_grid(X, y, Xq, yq, balanced: bool) -> dict:
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    query, cv = {}, {}
    folds = list(StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    for C in C_GRID:
        query[C] = _fit_score(X, y, Xq, yq, C=C, balanced=balanced)
        cv[C] = float(np.mean([
            f1_score(y[te], _logreg(C, balanced).fit(X[tr], y[tr]).predict(X[te]),
                     average="macro") for tr, te in folds]))
    pick = max(C_GRID, key=lambda c: cv[c])
    return {"query": query, "cv": cv, "pick": pick}


def main() -> None:
    import torch
    from scipy import sparse
    from sklearn.exceptions import ConvergenceWarning

    import hifi_claims as hc
    from scsnn import benchmark as bm
    from scsnn.encoding import LatencyEncoder, RankEncoder
    from scsnn.io import get_expression

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=hc.DEFAULT_DATA)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--more", action="store_true", help="also class-balanced fits, the "
                    "per-step spike trains and finer latency codes")
    ap.add_argument("--c-grid", action="store_true", help="the levels' fit at five C values "
                    "and the C a 3-fold CV on the reference picks")
    ap.add_argument("--convergence", action="store_true", help="the balanced levels' fit at "
                    "the default tolerance and converged, at five C values")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ConvergenceWarning)
    table = hc.tasks(args.data_dir, 5, 0)
    names = args.tasks.split(",") if args.tasks else list(table)
    if args.convergence:
        print("| task | " + " | ".join(f[0] for f in CONVERGENCE_FITS)
              + " | iterations at C 1: tol 1e-4 / converged |")
        print("|---|" + "---|" * (len(CONVERGENCE_FITS) + 1))
    elif args.c_grid:
        head = ["C " + f"{c:g}" for c in C_GRID]
        print("| task | weights | " + " | ".join(head) + " | CV picks | query at the pick |")
        print("|---|---|" + "---|" * (len(head) + 2))
    elif args.more:
        cols = ["z", "z-bal", "levels", "levels-bal", "detected", "steps", "steps-bal",
                "levels-T8", "levels-T16", "z+levels", "rank-bal", "levels+rank-bal"]
        print("| task | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    else:
        print("| task | z | levels | detected |\n|---|---|---|---|")
    for name in names:
        desc, label, make = table[name]
        split = next(iter(make()))
        model = bm.train_method(split, label, 0, {"epochs": 1, "device": "cpu",
                                                  "progress": False})
        enc = model.network.encoder
        T = enc.timesteps
        parts = (("ref", split.reference), ("query", split.query))
        zs = {p: torch.as_tensor(model.gene_space.features(get_expression(a))) for p, a in parts}
        yr = split.reference.obs[label].astype(str).to_numpy()
        yq = split.query.obs[label].astype(str).to_numpy()
        lev = {p: enc.levels(z).numpy().astype(np.float32) for p, z in zs.items()}
        levels = {p: sparse.csr_matrix(v) for p, v in lev.items()}
        if args.convergence:
            f1s, iters = _convergence(levels["ref"], yr, levels["query"], yq)
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in f1s)
                  + f" | {iters[0]} / {iters[1]} |", flush=True)
            print(json.dumps({"task": name, "macro_f1": f1s, "iterations": iters}),
                  file=sys.stderr)
            continue
        if args.c_grid:
            for balanced in (False, True):
                g = _c_grid(levels["ref"], yr, levels["query"], yq, balanced)
                print(f"| {name} | {'balanced' if balanced else 'none'} | "
                      + " | ".join(f"{g['query'][c]:.3f}" for c in C_GRID)
                      + f" | {g['pick']:g} | {g['query'][g['pick']]:.3f} |", flush=True)
                print(json.dumps({"task": name, "balanced": balanced, **g}), file=sys.stderr)
            continue
        feats = {"z": {p: z.numpy() for p, z in zs.items()}, "levels": levels,
                 "detected": {p: sparse.csr_matrix((v > 0).astype(np.float32))
                              for p, v in lev.items()}}
        fits = [("z", "z", False), ("levels", "levels", False), ("detected", "detected", False)]
        if args.more:
            feats["steps"] = {p: sparse.hstack([sparse.csr_matrix((v == k).astype(np.float32))
                                                for k in range(1, T + 1)]).tocsr()
                              for p, v in lev.items()}
            for Tf in (8, 16):
                e = LatencyEncoder(Tf, enc.n_genes, enc.clip).fit(zs["ref"], enc.floor)
                feats[f"levels-T{Tf}"] = {
                    p: sparse.csr_matrix(e.levels(z).numpy().astype(np.float32) * (T / Tf))
                    for p, z in zs.items()}
            feats["z+levels"] = {p: np.hstack([zs[p].numpy(), lev[p]]) for p in zs}
            rank = RankEncoder(T, enc.n_genes, enc.clip).fit(zs["ref"], enc.floor)
            feats["rank"] = {p: sparse.vstack([  # blocks: the code is T x cells x genes
                sparse.csr_matrix((rank(z[i : i + 4096]).cumsum(0).mean(0) * T).numpy())
                for i in range(0, len(z), 4096)]).tocsr() for p, z in zs.items()}
            feats["levels+rank"] = {p: sparse.hstack([levels[p], feats["rank"][p]]).tocsr()
                                    for p in zs}
            fits = [("z", "z", False), ("z-bal", "z", True), ("levels", "levels", False),
                    ("levels-bal", "levels", True), ("detected", "detected", False),
                    ("steps", "steps", False), ("steps-bal", "steps", True),
                    ("levels-T8", "levels-T8", False), ("levels-T16", "levels-T16", False),
                    ("z+levels", "z+levels", False), ("rank-bal", "rank", True),
                    ("levels+rank-bal", "levels+rank", True)]
        res = {col: _fit_score(feats[f]["ref"], yr, feats[f]["query"], yq, balanced=b)
               for col, f, b in fits}
        print(f"| {name} | " + " | ".join(f"{res[c]:.3f}" for c in res) + " |", flush=True)
        print(json.dumps({"task": name, "split": split.name, **res}), file=sys.stderr)


if __name__ == "__main__":
    main()
