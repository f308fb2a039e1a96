"""Check that annotating a file block by block (what `scsnn annotate` does, memory bounded)
gives exactly the predictions of in-memory annotation (`scsnn.tl.annotate` on an AnnData).

    python benchmarks/stream_check.py QUERY.h5ad MODEL_DIR [--slice 102400]

The streamed run covers the whole file; the in-memory side loads the file in slices of
--slice cells (a multiple of the 1,024-cell batch, so that batches match) when the whole
query does not fit in memory. Prints the cells compared, label and probability mismatches and
the peak resident memory of each side (each side runs in its own child process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def streamed(query: str, model: str, out: str) -> dict:
    import scsnn

    t = time.perf_counter()
    scsnn.tl.annotate_file(query, model, output=out, device="cpu")
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_mb()}


def in_memory(query: str, model: str, out: str, slice_cells: int) -> dict:
    import anndata as ad

    import scsnn

    m = scsnn.load_model(model)
    backed = ad.read_h5ad(query, backed="r")
    n = backed.n_obs
    labels, proba = [], []
    t = time.perf_counter()
    for a in range(0, n, slice_cells):
        part = backed[a : a + slice_cells].to_memory()
        scsnn.tl.annotate(part, m, device="cpu")
        labels.append(part.obs["scsnn"].astype(str).to_numpy())
        proba.append(np.asarray(part.obsm["scsnn_probabilities"]))
    np.savez(out, labels=np.concatenate(labels), proba=np.concatenate(proba))
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_mb(),
            "slices": -(-n // slice_cells)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("query")
    ap.add_argument("model")
    ap.add_argument("--slice", type=int, default=102_400)
    ap.add_argument("--side", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side == "streamed":
        print(json.dumps(streamed(a.query, a.model, a.out)))
        return
    if a.side == "memory":
        print(json.dumps(in_memory(a.query, a.model, a.out, a.slice)))
        return

    with tempfile.TemporaryDirectory(dir=Path(a.query).parent) as tmp:
        res = {}
        for side, out in (("streamed", f"{tmp}/streamed.h5ad"), ("memory", f"{tmp}/mem.npz")):
            r = subprocess.run([sys.executable, __file__, a.query, a.model, "--slice",
                                str(a.slice), "--side", side, "--out", out], check=True,
                               capture_output=True, text=True, env=dict(os.environ))
            res[side] = json.loads(r.stdout.strip().splitlines()[-1])
        import h5py
        from anndata.io import read_elem

        with h5py.File(f"{tmp}/streamed.h5ad", "r") as f:
            s_labels = read_elem(f["obs"])["scsnn"].astype(str).to_numpy()
            s_proba = np.asarray(read_elem(f["obsm/scsnn_probabilities"]))
        mem = np.load(f"{tmp}/mem.npz", allow_pickle=True)
    res["cells"] = int(len(s_labels))
    res["label_mismatches"] = int((s_labels != mem["labels"]).sum())
    res["probability_max_abs_diff"] = float(np.abs(s_proba - mem["proba"]).max())
    res["identical"] = bool(res["label_mismatches"] == 0
                            and np.array_equal(s_proba, mem["proba"]))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
