"""The HIFI claims, measured: ``scsnn.benchmark`` on every real pairing in ../shared/data.

    python benchmarks/hifi_claims.py --out docs/benchmark_results            # all tasks
    python benchmarks/hifi_claims.py --tasks pbmc68k,pancreas --encoder latency

For each task it runs HIFI, LIF, PLIF, the ANN twin, logistic regression and CellTypist (where
it can run) on the same genes and splits, and writes ``<task>.md`` / ``<task>.json`` plus
``summary.md`` (all tables, in order). Labels: ``obs["cell_type"]`` unless the task says
otherwise (``cell_type_common`` for cross-study PBMC pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import anndata as ad

from scsnn import benchmark as bm

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _read(d: Path, name: str) -> ad.AnnData:
    return ad.read_h5ad(d / f"{name}.h5ad")


def _by_obs(a: ad.AnnData, key: str, ref: set[str], query: set[str]) -> tuple[ad.AnnData, ...]:
    v = a.obs[key].astype(str)
    return a[v.isin(ref).to_numpy()].copy(), a[v.isin(query).to_numpy()].copy()


def _shared_labels(ref: ad.AnnData, query: ad.AnnData, label: str) -> tuple[ad.AnnData, ...]:
    both = set(ref.obs[label].astype(str)) & set(query.obs[label].astype(str))
    keep = lambda a: a[a.obs[label].astype(str).isin(both).to_numpy()].copy()  # noqa: E731
    return keep(ref), keep(query)


def _pair(ref: ad.AnnData, query: ad.AnnData, label: str, shared: bool = True) -> list[bm.Split]:
    if shared:
        ref, query = _shared_labels(ref, query, label)
    return [bm.pair_split(ref, query, label)]


def tasks(d: Path, folds: int, seed: int) -> dict[str, tuple[str, str, Callable[[], Iterator]]]:
    """name -> (description, label key, splits)."""
    cv = lambda name, label="cell_type": lambda: bm.cv_splits(  # noqa: E731
        _read(d, name), label, folds, seed)
    return {
        "pbmc68k": ("pbmc68k_reduced, 5-fold CV", "cell_type", cv("pbmc68k_reduced")),
        "pbmc3k": ("pbmc3k, 5-fold CV", "cell_type", cv("pbmc3k")),
        "pbmc_3batch": ("pbmc_3batch 3'v1+3'v2 -> 5' (cross-chemistry)", "cell_type",
                        lambda: _pair(*_by_obs(_read(d, "pbmc_3batch"), "donor",
                                               {"3pv1", "3pv2"}, {"5p"}), "cell_type")),
        "pbmc_kang": ("pbmc_kang control -> IFN-beta stimulated", "cell_type",
                      lambda: _pair(*_by_obs(_read(d, "pbmc_kang"), "condition",
                                             {"ctrl"}, {"stim"}), "cell_type")),
        "pbmc3k_facs": ("pbmc3k -> pbmc_facs800 (FACS-sorted), common labels",
                        "cell_type_common",
                        lambda: _pair(_read(d, "pbmc3k"), _read(d, "pbmc_facs800"),
                                      "cell_type_common")),
        "lymphnode_pbmc3k": ("immune_lymphnode_ref -> pbmc3k (cross-study), common labels",
                             "cell_type_common",
                             lambda: _pair(_read(d, "immune_lymphnode_ref"), _read(d, "pbmc3k"),
                                           "cell_type_common")),
        "pancreas": ("pancreas Wang -> Xin, shared labels", "cell_type",
                     lambda: _pair(_read(d, "pancreas_wang"), _read(d, "pancreas_xin"),
                                   "cell_type")),
        "pancreas_baron": ("pancreas Baron human -> mouse", "cell_type",
                           lambda: _pair(*_by_obs(_read(d, "pancreas_baron_hs_mm"), "species",
                                                  {"human"}, {"mouse"}), "cell_type")),
        "celllines": ("cell lines CEL-seq2 -> Drop-seq (cross-platform)", "cell_type",
                      lambda: _pair(_read(d, "celllines3_celseq2"),
                                    _read(d, "celllines3_dropseq"), "cell_type")),
        "tumour": ("HNSCC (Puram) -> melanoma (Tirosh); query labels are CHETAH calls",
                   "cell_type",
                   lambda: _pair(_read(d, "hnscc_puram_ref"), _read(d, "melanoma_tirosh_query"),
                                 "cell_type")),
        "brain_cerebellum": ("mouse cerebellum (Saunders), 5-fold CV", "cell_type",
                             cv("brain_cerebellum_saunders")),
        "brain_hippocampus": ("mouse hippocampus (Saunders), 5-fold CV", "cell_type",
                              cv("brain_hippocampus_saunders")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=None, help="comma-separated (default: all)")
    ap.add_argument("--methods", default=",".join(bm.DEFAULT_METHODS))
    ap.add_argument("--encoder", default="direct")
    ap.add_argument("--timesteps", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmark_results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)

    available = tasks(args.data_dir, args.folds, args.seed)
    names = args.tasks.split(",") if args.tasks else list(available)
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from {list(available)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kw = {"encoder": args.encoder, "timesteps": args.timesteps, "epochs": args.epochs,
          "device": "cpu"}
    args.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for name in names:
        desc, label, make = available[name]
        t0 = time.perf_counter()
        res = bm.run(list(make()), label, methods=methods, seed=args.seed, train_kwargs=kw)
        res.update(task=name, what=desc, settings=kw | {"seed": args.seed, "folds": args.folds})
        res["wall_seconds"] = time.perf_counter() - t0
        table = bm.markdown(res, f"{name}: {desc} (encoder {args.encoder}, T={args.timesteps})")
        (args.out / f"{name}.md").write_text(table + "\n")
        (args.out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
        tables.append(table)
        print(table, f"\n({res['wall_seconds']:.0f} s)\n", flush=True)
    (args.out / "summary.md").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
