"""Offline datasets: the PBMC set that ships inside scanpy, and a synthetic count generator."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def pbmc68k_reduced() -> ad.AnnData:
    """700 PBMCs with 10 bulk-profile labels, from the copy that ships inside scanpy.

    Returns an AnnData whose ``X`` holds the log-normalised expression of 765 genes (the
    shipped ``.raw``; scanpy's own ``X`` is scaled and cannot be renormalised), with the
    labels in ``obs["cell_type"]`` (a copy of ``obs["bulk_labels"]``).
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(
        X=sp.csr_matrix(src.raw.X, dtype=np.float32),
        obs=src.obs.copy(),
        var=pd.DataFrame(index=src.raw.var_names.copy()),
    )
    adata.obs["cell_type"] = adata.obs["bulk_labels"].astype(str).astype("category")
    adata.uns["X_type"] = "log-normalised"
    return adata


def _synthetic_design(n_cells, n_genes, n_types, rare_fraction, n_markers, marker_fold,
                      mean_library, seed, profile_seed):
    if n_types < 2:
        raise ValueError("n_types must be at least 2")
    if n_markers * n_types > n_genes:
        raise ValueError("n_markers * n_types must not exceed n_genes")
    prng = np.random.default_rng(seed if profile_seed is None else profile_seed)
    base = prng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    base /= base.sum()
    logfc = prng.normal(0.0, 0.25, size=(n_types, n_genes))
    perm = prng.permutation(n_genes)
    for t in range(n_types):
        logfc[t, perm[t * n_markers : (t + 1) * n_markers]] += np.log(marker_fold)
    profiles = base * np.exp(logfc)
    profiles /= profiles.sum(axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1]) if profile_seed is not None else prng

    n_rare = max(int(round(rare_fraction * n_cells)), 1) if rare_fraction > 0 else 0
    n_common = n_cells - n_rare
    common_types = n_types - 1 if n_rare else n_types
    labels = np.concatenate(
        [np.arange(n_common) % common_types, np.full(n_rare, n_types - 1)]
    ).astype(np.int64)
    rng.shuffle(labels)
    lib = rng.lognormal(np.log(mean_library), 0.35, size=n_cells)
    names = np.array([f"type_{t}" for t in range(n_types)])
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(names[labels], categories=names)},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    uns = {"X_type": "counts",
           "synthetic": {"seed": seed, "rare_type": str(names[-1]) if n_rare else "",
                         "rare_fraction": float(rare_fraction)}}
    return profiles, labels, lib, rng, obs, var, uns


def _synthetic_blocks(profiles, labels, lib, rng, dispersion, chunk):
    shape = 1.0 / dispersion
    for s in range(0, len(labels), chunk):
        lab = labels[s : s + chunk]
        mu = profiles[lab] * lib[s : s + chunk, None]
        lam = rng.gamma(shape, mu / shape)
        yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def synthetic(
    n_cells: int = 2000,
    n_genes: int = 1000,
    n_types: int = 8,
    *,
    rare_fraction: float = 0.01,
    n_markers: int = 20,
    marker_fold: float = 4.0,
    dispersion: float = 0.3,
    mean_library: float = 5000.0,
    chunk: int = 20_000,
    seed: int = 0,
    profile_seed: int | None = None,
    path: str | os.PathLike | None = None,
) -> ad.AnnData | None:
    """Negative-binomial counts for ``n_types`` cell types, one of them rare.

    Each type up-regulates its own ``n_markers`` genes by ``marker_fold`` and shifts every gene
    slightly; the last type (``type_{n_types-1}``) makes up ``rare_fraction`` of the cells and
    the rest share the remaining cells evenly. Library sizes are log-normal around
    ``mean_library``. Counts are built ``chunk`` cells at a time and stored as CSR float32.
    Labels are in ``obs["cell_type"]``. ``profile_seed`` (default: ``seed``) fixes the cell-type
    profiles apart from the cells, so that a reference and a query can share their types.

    With ``path`` the cells are written to that ``.h5ad`` file block by block (memory bounded
    by ``chunk`` cells, for atlas-sized test data) and ``None`` is returned.
    """
    profiles, labels, lib, rng, obs, var, uns = _synthetic_design(
        n_cells, n_genes, n_types, rare_fraction, n_markers, marker_fold, mean_library, seed,
        profile_seed)
    blocks = _synthetic_blocks(profiles, labels, lib, rng, dispersion, chunk)
    if path is not None:
        from .io import write_h5ad_blocks

        write_h5ad_blocks(path, blocks, obs=obs, var=var, uns=uns)
        return None
    adata = ad.AnnData(X=sp.vstack(list(blocks), format="csr"), obs=obs, var=var)
    adata.uns.update(uns)
    return adata


def write_synthetic(
    out: str | os.PathLike,
    *,
    n_cells: int = 10_000,
    n_query: int = 0,
    n_genes: int = 3000,
    n_types: int = 20,
    rare_fraction: float = 0.002,
    seed: int = 0,
) -> list[Path]:
    """``out/reference.h5ad`` (and ``out/query.h5ad`` with ``n_query`` cells of the same
    cell types), written block by block."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    kw = {"n_genes": n_genes, "n_types": n_types, "rare_fraction": rare_fraction}
    paths = [d / "reference.h5ad"]
    synthetic(n_cells, **kw, seed=seed, profile_seed=seed, path=paths[0])
    if n_query:
        paths.append(d / "query.h5ad")
        synthetic(n_query, **kw, seed=seed + 1, profile_seed=seed, path=paths[1])
    return paths


def write_pbmc68k_split(out: str | os.PathLike, *, query_fraction: float = 0.25,
                        seed: int = 0) -> list[Path]:
    """:func:`pbmc68k_reduced` split (stratified by cell type) into ``out/reference.h5ad`` and
    ``out/query.h5ad``."""
    from sklearn.model_selection import train_test_split

    from .io import write_h5ad_atomic

    adata = pbmc68k_reduced()
    idx = np.arange(adata.n_obs)
    tr, te = train_test_split(idx, test_size=query_fraction, stratify=adata.obs["cell_type"],
                              random_state=seed)
    d = Path(out)
    paths = [d / "reference.h5ad", d / "query.h5ad"]
    write_h5ad_atomic(adata[np.sort(tr)].copy(), paths[0])
    write_h5ad_atomic(adata[np.sort(te)].copy(), paths[1])
    return paths
