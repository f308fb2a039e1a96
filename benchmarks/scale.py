"""How training and annotation cost grow with the number of cells, scsnn beside CellTypist.

    python benchmarks/scale.py --sizes 10000,100000 --out docs/benchmark_results/scale
    python benchmarks/scale.py --sizes 1000000 --max-train-cells 100000 --out ...
    python benchmarks/scale.py --sizes 100000 --timesteps 2,4,8 --skip-celltypist --out ...
    python benchmarks/scale.py --step scsnn-train --ref R --model M --settings '{"skip": true}'

For every N: a synthetic reference of N cells and a query of N cells (3,000 genes, 20 types,
the rarest at 0.2 %; `scsnn dataset synthetic`, written block by block) at each --sparsity
(`realistic`: about 19 % non-zero and 1,500 counts per cell, as 10x data over highly variable
genes; `dense`: the earlier setting, about 44 % non-zero and 5,000 counts per cell; the
density measured in the query file is reported), then, each in its
own process so that peak resident memory belongs to one step (times exclude Python start-up
and imports, for both tools; reading the input file is included):

- scsnn train (`scsnn.tl.train` on the file read into memory; with --max-train-cells a
  class-balanced sample of at most that many cells is read from the file instead; with
  --stream-train 1 every mini-batch is read from the file, `scsnn train --stream`), then save,
- scsnn annotate (`scsnn.tl.annotate_file`, what `scsnn annotate` runs: the query is read in
  blocks of 65,536 cells and the predictions written into a copy of the file),
- CellTypist train (SGD mini-batch: `celltypist.train(..., use_SGD=True, mini_batch=True)`)
  and annotate, on log1p(CP10k) data as CellTypist requires (normalisation counted in its
  time), run with --celltypist-python (CellTypist 1.7 needs scikit-learn < 1.7).

Every number is measured in this run: wall seconds, cells per second, peak RSS (MB), rare-type
recall and macro-F1 on the query. Writes scale.json and scale.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# -- steps, each run in a child process ---------------------------------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _truth_scores(query: str, pred_key: str | None, pred=None) -> dict:
    import h5py
    import numpy as np
    from anndata.io import read_elem

    from scsnn.evaluate import classification_report

    with h5py.File(query, "r") as f:
        obs = read_elem(f["obs"])
        rare = read_elem(f["uns/synthetic/rare_type"]) if "uns/synthetic/rare_type" in f \
            else None  # e.g. synthetic_shift's data: several rare types, not one
    truth = obs["cell_type"].astype(str).to_numpy()
    pred = obs[pred_key].astype(str).to_numpy() if pred is None else np.asarray(pred, dtype=str)
    rep = classification_report(truth, pred)
    out = {"macro_f1": rep["macro_f1"], "accuracy": rep["accuracy"]}
    if rare is not None:
        rec = next(r["recall"] for r in rep["per_class"] if r["label"] == str(rare))
        out.update({"rare_type": str(rare), "rare_recall": rec,
                    "rare_cells": int((truth == str(rare)).sum())})
    return out


def step_scsnn_train(a: argparse.Namespace) -> dict:
    import torch

    import scsnn
    import scsnn.tl  # imports outside the timed part, as for CellTypist
    from scsnn.io import read_h5ad_sample

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    if a.stream_train:
        ref = read_h5ad_sample(a.ref, "cell_type", a.max_train_cells or 50_000, seed=0)
    elif a.max_train_cells:
        ref = read_h5ad_sample(a.ref, "cell_type", a.max_train_cells, seed=0)
    else:
        ref = scsnn.read_h5ad(a.ref)
    model = scsnn.tl.train(ref, "cell_type", seed=a.seed, device="cpu", progress=False,
                           stream_from=a.ref if a.stream_train else None,
                           **scsnn.tl.configs(timesteps=a.t, **json.loads(a.settings or "{}")))
    model.save(a.model)
    wall = time.perf_counter() - t
    return {"seconds": wall, "peak_rss_mb": _peak_mb(), "cells": int(ref.n_obs),
            "epochs": model.metrics.get("epochs_run"), "best_epoch": model.metrics.get("best_epoch"),
            "network_seconds": model.metrics.get("train_seconds")}


def step_scsnn_annotate(a: argparse.Namespace) -> dict:
    import torch

    import scsnn
    import scsnn.tl  # imports outside the timed part, as for CellTypist

    torch.set_num_threads(a.threads)
    out = str(Path(a.work) / f"annotated_T{a.t}.h5ad")
    t = time.perf_counter()
    scsnn.tl.annotate_file(a.query, a.model, output=out, device="cpu")
    wall = time.perf_counter() - t
    res = {"seconds": wall, "peak_rss_mb": _peak_mb(), **_truth_scores(out, "scsnn")}
    os.unlink(out)
    return res


def _celltypist_input(path: str):
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def step_celltypist_train(a: argparse.Namespace) -> dict:
    import celltypist

    t = time.perf_counter()
    adata = _celltypist_input(a.ref)
    model = celltypist.train(adata, "cell_type", use_SGD=True, mini_batch=True,
                             feature_selection=False, n_jobs=a.threads, check_expression=False)
    wall = time.perf_counter() - t
    model.write(a.model)
    return {"seconds": wall, "peak_rss_mb": _peak_mb()}


def step_celltypist_annotate(a: argparse.Namespace) -> dict:
    import celltypist

    t = time.perf_counter()
    adata = _celltypist_input(a.query)
    pred = celltypist.annotate(adata, model=a.model, majority_voting=False)
    labels = pred.predicted_labels["predicted_labels"].to_numpy()
    wall = time.perf_counter() - t
    return {"seconds": wall, "peak_rss_mb": _peak_mb(), **_truth_scores(a.query, None, labels)}


STEPS = {"scsnn-train": step_scsnn_train, "scsnn-annotate": step_scsnn_annotate,
         "celltypist-train": step_celltypist_train,
         "celltypist-annotate": step_celltypist_annotate}


def run_step(python: str, step: str, **kw) -> dict:
    """Run one step in a child process; its JSON result, or the reason it failed."""
    args = [python, str(HERE), "--step", step]
    for k, v in kw.items():
        if v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS=str(kw.get("threads", 2)), PYTHONPATH=path)
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        return {"error": tail[:300], "seconds_until_failure": time.perf_counter() - t}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _density(path: Path) -> dict:
    """Non-zero fraction and median counts per cell of an h5ad file's X (CSR on disk)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        indptr = f["X/indptr"][:]
        n_obs, n_vars = (int(v) for v in f["X"].attrs["shape"])
        head = int(indptr[min(len(indptr) - 1, 20_000)])
        data = f["X/data"][:head]
    per_cell = np.add.reduceat(data.astype(np.float64), indptr[:min(n_obs, 20_000)])
    return {"nonzero": float(indptr[-1]) / (n_obs * n_vars),
            "median_counts": float(np.median(per_cell))}


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| data | N cells | T | method | train s | epochs (best) | train peak MB | "
             "annotate cells/s | annotate peak MB | macro-F1 | rare recall |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dens = r.get("density") or {}
        data = (f"{r.get('sparsity', 'dense')}, {dens['nonzero']:.0%} non-zero, "
                f"{dens['median_counts']:,.0f} counts/cell" if dens else
                r.get("sparsity", "dense"))
        for m in ("scsnn", "celltypist"):
            tr, an = r.get(f"{m}_train", {}), r.get(f"{m}_annotate", {})
            if not tr and not an:
                continue
            name = m
            if m == "scsnn" and r.get("stream_train"):
                name = "scsnn (--stream)"
            elif m == "scsnn" and r.get("max_train_cells"):
                name = f"scsnn (--max-cells {r['max_train_cells']})"
            if "error" in tr or "error" in an:
                why = tr.get("error") or an.get("error")
                lines.append(f"| {data} | {r['n']} | {r['t'] if m == 'scsnn' else ''} | "
                             f"{name} | not run: {why} | | | | | | |")
                continue
            cps = r["n_query"] / an["seconds"] if an else None
            lines.append(
                f"| {data} | {r['n']} | {r['t'] if m == 'scsnn' else ''} | {name} | "
                f"{_fmt(tr.get('seconds'))} | "
                + (f"{tr['epochs']} ({tr.get('best_epoch')})" if tr.get("epochs") else "")
                + f" | {_fmt(tr.get('peak_rss_mb'), '.0f')} | {_fmt(cps, '.0f')} | "
                f"{_fmt(an.get('peak_rss_mb'), '.0f')} | {_fmt(an.get('macro_f1'), '.3f')} | "
                f"{_fmt(an.get('rare_recall'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", choices=list(STEPS))
    ap.add_argument("--ref")
    ap.add_argument("--query")
    ap.add_argument("--model")
    ap.add_argument("--work")
    ap.add_argument("--t", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of a scsnn-train step")
    ap.add_argument("--settings", default=None, help="scsnn-train step: other training "
                    "settings, a JSON object of flat names of scsnn.tl.configs, e.g. "
                    "'{\"skip\": true, \"hidden\": [256, 64]}'")
    ap.add_argument("--max-train-cells", type=int, default=None)
    ap.add_argument("--stream-train", type=int, default=0,
                    help="1: draw the training mini-batches from the file on disk "
                    "(`scsnn train --stream`; gene space fitted on --max-train-cells, "
                    "default 50,000)")
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--sparsity", default="realistic",
                    help="comma-separated: realistic, dense (data under DATA_DIR/<sparsity>)")
    ap.add_argument("--query-cells", type=int, default=None,
                    help="query size (default: N, the reference size)")
    ap.add_argument("--timesteps", default="4", help="comma-separated T values for scsnn")
    ap.add_argument("--data-dir", default="/tmp/scsnn-scale", help="where the data are written")
    ap.add_argument("--celltypist-python", default=sys.executable)
    ap.add_argument("--skip-celltypist", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    if a.step:
        print(json.dumps(STEPS[a.step](a)))
        return

    rows = []
    for sparsity, n in ((sp_, int(x)) for sp_ in a.sparsity.split(",")
                        for x in a.sizes.split(",")):
        nq = a.query_cells or n
        d = Path(a.data_dir) / sparsity / f"n{n}_q{nq}"
        ref, query = d / "reference.h5ad", d / "query.h5ad"
        if not (ref.is_file() and query.is_file()):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "scsnn", "dataset", "synthetic", "--out",
                            str(d), "--n-cells", str(n), "--n-query", str(nq), "--n-genes",
                            "3000", "--n-types", "20", "--rare-fraction", "0.002",
                            "--sparsity", sparsity], check=True, stdout=subprocess.DEVNULL)
            print(f"[N={n}] data written in {time.perf_counter() - t:.0f} s", flush=True)
        density = _density(query)
        ct = None
        if not a.skip_celltypist:
            ct_model = str(d / "celltypist.pkl")
            ct = {"celltypist_train": run_step(a.celltypist_python, "celltypist-train",
                                               ref=ref, model=ct_model, threads=a.threads)}
            ct["celltypist_annotate"] = (
                run_step(a.celltypist_python, "celltypist-annotate", query=query,
                         model=ct_model, threads=a.threads)
                if "error" not in ct["celltypist_train"] else {})
            print(f"[N={n}] celltypist {json.dumps(ct)}", flush=True)
        for t_steps in (int(x) for x in a.timesteps.split(",")):
            model = str(d / f"scsnn_T{t_steps}")
            row = {"n": n, "n_query": nq, "t": t_steps, "threads": a.threads,
                   "max_train_cells": a.max_train_cells, "sparsity": sparsity,
                   "density": density}
            row["scsnn_train"] = run_step(sys.executable, "scsnn-train", ref=ref, model=model,
                                          t=t_steps, threads=a.threads,
                                          max_train_cells=a.max_train_cells,
                                          stream_train=a.stream_train or None)
            row["stream_train"] = bool(a.stream_train)
            row["scsnn_annotate"] = (
                run_step(sys.executable, "scsnn-annotate", query=query, model=model, work=d,
                         t=t_steps, threads=a.threads)
                if "error" not in row["scsnn_train"] else {})
            if ct is not None and t_steps == int(a.timesteps.split(",")[0]):
                row.update(ct)
            print(f"[N={n} T={t_steps}] {json.dumps(row)}", flush=True)
            rows.append(row)
    md = markdown(rows)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(rows, indent=1))
        (out / "scale.md").write_text(md)


if __name__ == "__main__":
    main()
