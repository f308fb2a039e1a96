"""The hard case, measured: a query from another batch, with rare subtypes.

    python benchmarks/shift.py --shifts 0,0.5,1,1.5 --seeds 0,1,2 --out docs/benchmark_results/shift
    python benchmarks/shift.py --out docs/benchmark_results/shift --report

Generates :func:`scsnn.datasets.synthetic_shift` (default: 30,000 reference cells, 10,000
query cells, 2,000 genes; five lineages, fifteen subtypes, five of them rare at 0.2-1 %) at
each shift strength (0: the query is the reference's batch; 1: the default shift), written
block by block under ``OUT/data`` and reused, and runs scsnn (default settings), logistic
regression (plain and class-balanced) and CellTypist on the same cells. ``--variant
NAME:key=value,...`` adds scsnn runs with other settings (flat names of
:func:`scsnn.tl.configs`), e.g. ``--variant hifi-aug:augment_depth=0.3``. Jobs (shift,
method, seed) run in parallel processes with one thread each, and finished jobs are kept in
``OUT/rows.jsonl`` (a rerun resumes). A variant's ``adapt_batchnorm=1`` annotates the query
with test-time adaptation of batch norm; ``adapt_batchnorm=both`` scores the same networks
without and with it (rows ``NAME`` and ``NAME+adabn``), ``all`` also with the re-weighted
adaptation (``NAME+adabn-rw``). The report (``shift.md``, ``shift.json``): macro-F1 and
the mean recall of the rare subtypes, mean ± sd over training seeds, per method and shift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hifi_claims import parse_variant  # noqa: E402

BASELINES = ("logreg", "logreg-balanced", "celltypist")


def _init_worker() -> None:
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[v] = "1"
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)


def _data(out: Path, shift: float, args: argparse.Namespace) -> Path:
    import scsnn

    d = out / "data" / f"shift_{shift:g}_n{args.n_cells}_q{args.n_query}_g{args.n_genes}"
    if not (d / "query.h5ad").is_file():
        scsnn.datasets.synthetic_shift(n_cells=args.n_cells, n_query=args.n_query,
                                       n_genes=args.n_genes, shift=shift, seed=args.data_seed,
                                       out=d)
    return d


def run_job(data: str, shift: float, name: str, method: str, settings: dict[str, Any],
            seed: int, timesteps: int, epochs: int) -> list[dict[str, Any]]:
    import anndata as ad

    from scsnn import benchmark as bm

    t0 = time.perf_counter()
    ref = ad.read_h5ad(Path(data) / "reference.h5ad")
    query = ad.read_h5ad(Path(data) / "query.h5ad")
    rare = list(ref.uns["synthetic"]["rare_types"])
    kw = {"timesteps": timesteps, "epochs": epochs, **settings}
    res = bm.run([bm.pair_split(ref, query, "cell_type")], "cell_type", methods=[method],
                 seeds=[seed], train_kwargs=kw)
    rows = res["rows"]
    for r in rows:
        r["method"] = name + r["method"][len(method):]  # keeps "+adabn", "+adabn-rw"
        if "truth" in r:
            import numpy as np

            t, p = np.asarray(r["truth"]), np.asarray(r["pred"])
            rec = {c: float((p[t == c] == c).mean()) for c in rare if (t == c).any()}
            r["rare_subtype_recall"] = rec
            r["rare_subtype_mean_recall"] = float(np.mean(list(rec.values()))) if rec else None
            del r["truth"], r["pred"]  # 10,000 cells per row: keep the file small
    wall = time.perf_counter() - t0
    # with adapt_batchnorm=both: a second record, NAME+adabn, from the same trained networks
    return [{"key": f"{shift:g}|{n}|{seed}", "shift": shift, "method": n, "seed": seed,
             "settings": settings, "rows": [r for r in rows if r["method"] == n],
             "versions": res.get("versions"), "wall_seconds": wall}
            for n in dict.fromkeys(r["method"] for r in rows)]


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(vals, float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def report(out: Path) -> str:
    recs = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines() if x]
    shifts = sorted({r["shift"] for r in recs})
    methods: list[str] = []
    for r in recs:
        if r["method"] not in methods:
            methods.append(r["method"])
    methods.sort(key=lambda m: (m in BASELINES, m))
    summ: dict[str, dict[str, Any]] = {}
    for s in shifts:
        for m in methods:
            rows = [row for r in recs if r["shift"] == s and r["method"] == m
                    for row in r["rows"] if row.get("macro_f1") is not None]
            if not rows:
                continue
            f1 = _mean_sd([row["macro_f1"] for row in rows])
            rr = [row["rare_subtype_mean_recall"] for row in rows
                  if row.get("rare_subtype_mean_recall") is not None]
            per = {}
            for row in rows:
                for c, v in (row.get("rare_subtype_recall") or {}).items():
                    per.setdefault(c, []).append(v)
            summ.setdefault(f"{s:g}", {})[m] = {
                "macro_f1": f1[0], "macro_f1_sd": f1[1], "seeds": len(rows),
                "rare_mean_recall": _mean_sd(rr)[0] if rr else None,
                "rare_mean_recall_sd": _mean_sd(rr)[1] if rr else None,
                "rare_recall": {c: float(sum(v) / len(v)) for c, v in per.items()},
                "train_seconds": float(sum(row.get("train_seconds", 0) for row in rows)
                                       / len(rows)),
            }

    def cell(d: dict[str, Any] | None, k: str) -> str:
        if not d or d.get(k) is None:
            return "–"
        sd = d.get(f"{k}_sd") or 0.0
        return f"{d[k]:.3f}" + (f" ± {sd:.3f}" if sd else "")

    lines = ["| shift | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for s in summ:
        lines.append(f"| {s} macro-F1 | " + " | ".join(cell(summ[s].get(m), "macro_f1")
                                                      for m in methods) + " |")
        lines.append(f"| {s} rare-subtype recall | " + " | ".join(
            cell(summ[s].get(m), "rare_mean_recall") for m in methods) + " |")
    lines += ["", "| shift | method | seeds | train s | recall of each rare subtype |",
              "|---|---|---|---|---|"]
    for s in summ:
        for m, d in summ[s].items():
            rec = ", ".join(f"{c} {v:.2f}" for c, v in sorted(d["rare_recall"].items()))
            lines.append(f"| {s} | {m} | {d['seeds']} | {d['train_seconds']:.0f} | {rec} |")
    text = "\n".join(lines) + "\n"
    (out / "shift.md").write_text(text)
    (out / "shift.json").write_text(json.dumps(summ, indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shifts", default="1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="hifi,logreg,logreg-balanced,celltypist")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,... an scsnn run with other settings (repeatable)")
    ap.add_argument("--n-cells", type=int, default=30_000)
    ap.add_argument("--n-query", type=int, default=10_000)
    ap.add_argument("--n-genes", type=int, default=2000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only write the report")
    ap.add_argument("--out", type=Path, default=Path("shift"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        _init_worker()
        variants: list[tuple[str, str, dict[str, Any]]] = []
        for m in args.methods.split(","):
            variants.append((m, m, {}))
        for v in args.variant:  # the same NAME:key=value,... syntax and checks
            name, settings = parse_variant(v)
            variants.append((name, "hifi", settings))
        rows_file = args.out / "rows.jsonl"
        done = ({json.loads(x)["key"] for x in rows_file.read_text().splitlines() if x}
                if rows_file.is_file() else set())
        jobs = []
        for s in (float(x) for x in args.shifts.split(",")):
            d = _data(args.out, s, args)
            for name, method, settings in variants:
                for seed in (int(x) for x in args.seeds.split(",")):
                    if method in BASELINES and method != "celltypist" and seed != 0:
                        continue  # deterministic: one run
                    keys = [f"{s:g}|{name}|{seed}"]
                    extra = {"both": ["+adabn"], "all": ["+adabn", "+adabn-rw"]}.get(
                        settings.get("adapt_batchnorm"), [])
                    keys += [f"{s:g}|{name}{x}|{seed}" for x in extra]
                    if not all(k in done for k in keys):
                        jobs.append((str(d), s, name, method, settings, seed))
        print(f"{len(jobs)} jobs to run", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker) as pool:
            futs = [pool.submit(run_job, *j, args.timesteps, args.epochs) for j in jobs]
            for fut in as_completed(futs):
                for rec in fut.result():
                    if rec["key"] in done:  # a stored row that this job measured again
                        continue
                    done.add(rec["key"])
                    with rows_file.open("a") as f:
                        f.write(json.dumps(rec, default=str) + "\n")
                    r = rec["rows"][0]
                    rare = r.get("rare_subtype_mean_recall")
                    print(f"{rec['key']}: macro-F1 {r.get('macro_f1', float('nan')):.3f}, rare "
                          f"{float('nan') if rare is None else rare:.3f} "
                          f"({rec['wall_seconds']:.0f} s)", flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
