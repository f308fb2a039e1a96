"""How much of a reference the clip of standardised values touches (the event-driven first
layer applies it exactly; this measures how often it matters).

    python benchmarks/clip_share.py [--data-dir ../shared/data] [FILE:LABEL ...]

For each labelled file: the gene space scsnn fits (default settings), then over all cells the
share of stored (non-zero) entries whose standardised value is clipped at +clip, and the
number of genes whose zero level is below -clip (their zero entries are clipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT = ["pbmc3k.h5ad:cell_type", "pbmc68k_reduced.h5ad:cell_type",
           "pancreas_baron_hs_mm.h5ad:cell_type", "brain_hippocampus_saunders.h5ad:cell_type"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", default=DEFAULT)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args()
    import numpy as np

    from scsnn.io import get_expression, get_labels, read_h5ad
    from scsnn.pp import fit_gene_space

    print("| file | cells | genes | non-zero | entries clipped at +clip | genes with zero "
          "level clipped |\n|---|---:|---:|---:|---:|---:|")
    for spec in a.files:
        name, label = spec.rsplit(":", 1)
        adata = read_h5ad(a.data_dir / name)
        labels = get_labels(adata, label)
        keep = labels.notna().to_numpy()
        adata = adata[keep].copy()
        cat = labels[keep].astype("category")
        codes, classes = cat.cat.codes.to_numpy(), [str(c) for c in cat.cat.categories]
        gs, X = fit_gene_space(get_expression(adata), codes, classes)
        _, _, v, base = gs.scale_sparse(X)
        n_hi = int((v >= gs.clip).sum())
        n_lo = int((base <= -gs.clip).sum())
        print(f"| {name} | {X.shape[0]:,} | {X.shape[1]:,} | "
              f"{X.nnz / (X.shape[0] * X.shape[1]):.1%} | {n_hi:,} ({n_hi / max(X.nnz, 1):.3%}) "
              f"| {n_lo} |", flush=True)


if __name__ == "__main__":
    main()
