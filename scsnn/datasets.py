"""Offline datasets: the PBMC set that ships inside scanpy, and a synthetic count generator."""

from __future__ import annotations

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
) -> ad.AnnData:
    """Negative-binomial counts for ``n_types`` cell types, one of them rare.

    Each type up-regulates its own ``n_markers`` genes by ``marker_fold`` and shifts every gene
    slightly; the last type (``type_{n_types-1}``) makes up ``rare_fraction`` of the cells and
    the rest share the remaining cells evenly. Library sizes are log-normal around
    ``mean_library``. Counts are built ``chunk`` cells at a time and stored as CSR float32.
    Labels are in ``obs["cell_type"]``. ``profile_seed`` (default: ``seed``) fixes the cell-type
    profiles apart from the cells, so that a reference and a query can share their types.
    """
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

    blocks = []
    shape = 1.0 / dispersion
    for s in range(0, n_cells, chunk):
        lab = labels[s : s + chunk]
        mu = profiles[lab] * lib[s : s + chunk, None]
        lam = rng.gamma(shape, mu / shape)
        counts = rng.poisson(lam).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    X = sp.vstack(blocks, format="csr")
    names = np.array([f"type_{t}" for t in range(n_types)])
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(names[labels], categories=names)},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["X_type"] = "counts"
    adata.uns["synthetic"] = {"seed": seed, "rare_type": str(names[-1]) if n_rare else "",
                              "rare_fraction": float(rare_fraction)}
    return adata
