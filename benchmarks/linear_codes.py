"""Logistic regression on the input codes that scsnn's first layer and its input-to-readout
synapses see, on the first split of every task of ``hifi_claims.py``.

Features, all on scsnn's gene space of the task (fitted with the default settings, seed 0):

* ``z``: the standardised values (the ``logreg`` baseline of ``hifi_claims.py``);
* ``levels``: the latency code's level of every gene, 0 (not detected) .. T, i.e. the spike
  counts that reach the readout through ``--skip`` synapses;
* ``detected``: 1 where a gene is detected, else 0.

scikit-learn ``LogisticRegression(C=1, max_iter=1000)`` fitted on all reference cells of the
split, macro-F1 on its query cells.

    python benchmarks/linear_codes.py [--tasks a,b] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch

    import hifi_claims as hc
    from scsnn import benchmark as bm
    from scsnn.evaluate import classification_report
    from scsnn.io import get_expression
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=hc.DEFAULT_DATA)
    ap.add_argument("--tasks", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ConvergenceWarning)
    table = hc.tasks(args.data_dir, 5, 0)
    names = args.tasks.split(",") if args.tasks else list(table)
    print("| task | z | levels | detected |\n|---|---|---|---|")
    for name in names:
        desc, label, make = table[name]
        split = next(iter(make()))
        model = bm.train_method(split, label, 0, {"epochs": 1, "device": "cpu",
                                                  "progress": False})
        enc = model.network.encoder
        feats = {}
        for part, a in (("ref", split.reference), ("query", split.query)):
            z = model.gene_space.features(get_expression(a))
            lev = enc.levels(torch.as_tensor(z)).numpy().astype(np.float32)
            feats[part] = {"z": z, "levels": lev, "detected": (lev > 0).astype(np.float32)}
        yr = split.reference.obs[label].astype(str).to_numpy()
        yq = split.query.obs[label].astype(str).to_numpy()
        res = {}
        for code in ("z", "levels", "detected"):
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(feats["ref"][code], yr)
            res[code] = classification_report(yq, clf.predict(feats["query"][code]))["macro_f1"]
        print(f"| {name} | " + " | ".join(f"{res[c]:.3f}" for c in res) + " |", flush=True)
        print(json.dumps({"task": name, "split": split.name, **res}), file=sys.stderr)


if __name__ == "__main__":
    main()
