"""Training time and annotation throughput on synthetic counts, with rare-type recall.

    python benchmarks/speed.py                       # 100,000 x 3,000 train, 200,000 query
    python benchmarks/speed.py --train-cells 20000 --query-cells 50000   # quicker

Synthetic data: negative-binomial counts, ``--types`` cell types, the last one at
``--rare-fraction`` of the cells (scsnn.datasets.synthetic). Reference and query are drawn
from the same profiles with different seeds. Prints measured wall times, peak resident memory
and the recall of the rare type; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings

import numpy as np
import torch

import scsnn
from scsnn.evaluate import classification_report


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train-cells", type=int, default=100_000)
    ap.add_argument("--query-cells", type=int, default=200_000)
    ap.add_argument("--genes", type=int, default=3000)
    ap.add_argument("--types", type=int, default=20)
    ap.add_argument("--rare-fraction", type=float, default=0.002)
    ap.add_argument("--epochs", type=int, default=None, help="default: scsnn's own")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--neuron", default="hifi")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    common = dict(n_genes=args.genes, n_types=args.types, rare_fraction=args.rare_fraction)
    ref = scsnn.datasets.synthetic(args.train_cells, seed=args.seed, **common)
    query = scsnn.datasets.synthetic(args.query_cells, seed=args.seed + 1, profile_seed=args.seed,
                                     **common)
    t_gen = time.perf_counter() - t
    rare = ref.uns["synthetic"]["rare_type"]
    print(f"data: reference {ref.n_obs} x {ref.n_vars}, query {query.n_obs} cells, "
          f"{args.types} types, rare type {rare} at {args.rare_fraction:.2%} "
          f"(generated in {t_gen:.1f} s); torch threads {torch.get_num_threads()}")

    kw = {"timesteps": args.timesteps, "neuron": args.neuron, "seed": args.seed,
          "progress": False, "device": "cpu"}
    if args.epochs:
        kw["epochs"] = args.epochs
    t = time.perf_counter()
    model = scsnn.tl.train(ref, "cell_type", **kw)
    t_train = time.perf_counter() - t
    print(f"train: {t_train:.1f} s wall ({model.metrics['epochs_run']} epochs, "
          f"best {model.metrics['best_epoch']}), peak RSS {peak_rss_mb():.0f} MB")

    truth = query.obs["cell_type"].astype(str).to_numpy()
    del ref
    t = time.perf_counter()
    scsnn.tl.annotate(query, model, device="cpu")
    t_ann = time.perf_counter() - t
    rep = classification_report(truth, query.obs["scsnn"].astype(str))
    rare_rec = next(r["recall"] for r in rep["per_class"] if r["label"] == rare)
    res = {
        "train_cells": args.train_cells, "query_cells": args.query_cells, "genes": args.genes,
        "types": args.types, "rare_fraction": args.rare_fraction, "timesteps": args.timesteps,
        "neuron": args.neuron, "torch_threads": torch.get_num_threads(),
        "train_seconds": round(t_train, 2), "epochs_run": model.metrics["epochs_run"],
        "annotate_seconds": round(t_ann, 2),
        "annotate_cells_per_second": round(args.query_cells / t_ann, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "accuracy": round(rep["accuracy"], 4), "macro_f1": round(rep["macro_f1"], 4),
        "rare_type": rare, "rare_recall": round(rare_rec, 4),
    }
    print(f"annotate: {t_ann:.1f} s for {args.query_cells} cells = "
          f"{res['annotate_cells_per_second']:.0f} cells/s; peak RSS {res['peak_rss_mb']:.0f} MB")
    print(f"query accuracy {rep['accuracy']:.4f}, macro-F1 {rep['macro_f1']:.4f}, "
          f"rare type recall {rare_rec:.3f} ({np.sum(truth == rare)} cells)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
