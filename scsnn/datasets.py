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
                      mean_library, seed, profile_seed, gene_sigma=1.5):
    if n_types < 2:
        raise ValueError("n_types must be at least 2")
    if n_markers * n_types > n_genes:
        raise ValueError("n_markers * n_types must not exceed n_genes")
    prng = np.random.default_rng(seed if profile_seed is None else profile_seed)
    base = prng.lognormal(mean=-1.0, sigma=gene_sigma, size=n_genes)
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


#: :func:`synthetic` settings whose counts are as sparse as 10x data over the highly variable
#: genes: about 19 % non-zero and 1,500 counts per cell over 3,000 genes (pbmc3k over a
#: model's 2,064 genes: 11 % non-zero, 940 counts per cell).
REALISTIC = {"mean_library": 1500.0, "gene_sigma": 2.0}


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
    gene_sigma: float = 1.5,
    chunk: int = 20_000,
    seed: int = 0,
    profile_seed: int | None = None,
    path: str | os.PathLike | None = None,
) -> ad.AnnData | None:
    """Negative-binomial counts for ``n_types`` cell types, one of them rare.

    Each type up-regulates its own ``n_markers`` genes by ``marker_fold`` and shifts every gene
    slightly; the last type (``type_{n_types-1}``) makes up ``rare_fraction`` of the cells and
    the rest share the remaining cells evenly. Library sizes are log-normal around
    ``mean_library``; gene means are log-normal with log-sd ``gene_sigma`` (larger: more
    genes rarely detected, a sparser matrix). The defaults give a dense matrix (about 44 %
    non-zero over 3,000 genes); ``mean_library=1500, gene_sigma=2.0`` gives one as sparse as
    10x data over highly variable genes (about 19 % non-zero, 1,500 counts per cell; see
    :data:`REALISTIC`). Counts are built ``chunk`` cells at a time and stored as CSR float32.
    Labels are in ``obs["cell_type"]``. ``profile_seed`` (default: ``seed``) fixes the cell-type
    profiles apart from the cells, so that a reference and a query can share their types.

    With ``path`` the cells are written to that ``.h5ad`` file block by block (memory bounded
    by ``chunk`` cells, for atlas-sized test data) and ``None`` is returned.
    """
    profiles, labels, lib, rng, obs, var, uns = _synthetic_design(
        n_cells, n_genes, n_types, rare_fraction, n_markers, marker_fold, mean_library, seed,
        profile_seed, gene_sigma)
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
    mean_library: float = 5000.0,
    gene_sigma: float = 1.5,
) -> list[Path]:
    """``out/reference.h5ad`` (and ``out/query.h5ad`` with ``n_query`` cells of the same
    cell types), written block by block; ``mean_library`` and ``gene_sigma`` as in
    :func:`synthetic` (``**REALISTIC`` for counts as sparse as real data)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    kw = {"n_genes": n_genes, "n_types": n_types, "rare_fraction": rare_fraction,
          "mean_library": mean_library, "gene_sigma": gene_sigma}
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


#: The cell-type tree of :func:`synthetic_shift`: lineage -> subtypes; subtypes given as
#: (name, fraction of all cells) are rare (0.2-1 %), next to common siblings of the lineage.
SHIFT_LINEAGES: dict[str, list[str | tuple[str, float]]] = {
    "T": ["T_naive", "T_memory", "T_effector", ("T_gd", 0.004)],
    "B": ["B_naive", "B_memory", ("B_plasma", 0.006)],
    "Myeloid": ["Mono_classical", "Mono_nonclassical", ("DC_plasmacytoid", 0.002)],
    "NK": ["NK_bright", "NK_dim"],
    "Progenitor": ["HSC", ("MEP", 0.003), ("GMP", 0.01)],
}


def _shift_design(n_genes: int, seed: int, *, lineage_markers: int, lineage_fold: float,
                  subtype_markers: int, subtype_fold: float):
    """Cell-type profiles: a strong program per lineage, a weak one (about ten genes at a
    modest fold change) per subtype, a little noise on every gene."""
    rng = np.random.default_rng([seed, 7])
    names, lineage_of, rare = [], [], {}
    for lin, subs in SHIFT_LINEAGES.items():
        for s in subs:
            name, frac = (s, None) if isinstance(s, str) else s
            names.append(name)
            lineage_of.append(lin)
            if frac is not None:
                rare[name] = float(frac)
    n_types = len(names)
    lineages = list(SHIFT_LINEAGES)
    need = len(lineages) * lineage_markers + n_types * subtype_markers
    if need > n_genes:
        raise ValueError(f"n_genes must be at least {need} for this design")
    base = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    base /= base.sum()
    perm = rng.permutation(n_genes)
    logfc = rng.normal(0.0, 0.15, size=(n_types, n_genes))
    pos = 0
    lin_genes = {}
    for lin in lineages:
        lin_genes[lin] = perm[pos : pos + lineage_markers]
        pos += lineage_markers
    for t, (name, lin) in enumerate(zip(names, lineage_of)):
        logfc[t, lin_genes[lin]] += np.log(lineage_fold)
        genes = perm[pos : pos + subtype_markers]
        pos += subtype_markers
        logfc[t, genes] += np.log(subtype_fold) * rng.uniform(0.8, 1.2, size=genes.size)
    profiles = base * np.exp(logfc)
    profiles /= profiles.sum(1, keepdims=True)
    return names, lineage_of, rare, profiles


def _shift_composition(names, lineage_of, rare, rng, jitter: float) -> np.ndarray:
    """Cell-type proportions: rare types at their fractions, the rest shared by the common
    types (lineage shares perturbed by ``jitter``: the composition shift of a query)."""
    common = [i for i, n in enumerate(names) if n not in rare]
    w = np.exp(rng.normal(0.0, jitter, size=len(common))) if jitter > 0 else np.ones(len(common))
    p = np.zeros(len(names))
    p[common] = w / w.sum() * (1.0 - sum(rare.values()))
    for i, n in enumerate(names):
        if n in rare:
            p[i] = rare[n]
    return p / p.sum()


def synthetic_shift(
    n_cells: int = 30_000,
    n_query: int = 10_000,
    n_genes: int = 2000,
    *,
    shift: float = 1.0,
    gene_bias: float = 0.5,
    depth_ratio: float = 0.5,
    composition: float = 0.5,
    ambient: float = 0.1,
    mean_library: float = 1500.0,
    dispersion: float = 0.3,
    lineage_markers: int = 30,
    lineage_fold: float = 6.0,
    subtype_markers: int = 10,
    subtype_fold: float = 2.0,
    chunk: int = 20_000,
    seed: int = 0,
    out: str | os.PathLike | None = None,
) -> tuple[ad.AnnData, ad.AnnData] | list[Path]:
    """The hard case: a reference and a query from another batch, with rare subtypes.

    Five lineages with strong markers hold 15 subtypes that differ from their siblings by
    ``subtype_markers`` genes at a ``subtype_fold`` change; five of them are rare (0.2-1 % of
    the cells, see :data:`SHIFT_LINEAGES`). Counts are negative binomial around log-normal
    library sizes. The query comes from another "batch", with knobs that ``shift`` scales
    together (0: the same batch as the reference):

    * ``gene_bias``: sd of a per-gene log-normal multiplicative bias;
    * ``depth_ratio``: the query's library sizes are ``1 - depth_ratio * shift`` of the
      reference's (at least 0.1);
    * ``composition``: sd of the log-normal perturbation of the common types' proportions;
    * ``ambient``: fraction of every query cell's counts drawn from the pooled profile (ambient
      RNA).

    Labels: ``obs["cell_type"]`` (subtype) and ``obs["lineage"]``; ``uns["synthetic"]`` holds
    the design (rare types and their fractions, the shift settings). With ``out``, the two
    files ``out/reference.h5ad`` and ``out/query.h5ad`` are written block by block (memory
    bounded by ``chunk`` cells) and their paths returned; else the two AnnData objects.
    """
    names, lineage_of, rare, profiles = _shift_design(
        n_genes, seed, lineage_markers=lineage_markers, lineage_fold=lineage_fold,
        subtype_markers=subtype_markers, subtype_fold=subtype_fold)
    rng_ref = np.random.default_rng([seed, 11])
    rng_q = np.random.default_rng([seed, 13])
    s = max(float(shift), 0.0)
    p_ref = _shift_composition(names, lineage_of, rare, rng_ref, 0.0)
    p_q = _shift_composition(names, lineage_of, rare, rng_q, composition * s)
    bias = np.exp(rng_q.normal(0.0, gene_bias * s, size=n_genes)) if s > 0 else np.ones(n_genes)
    q_profiles = profiles * bias
    q_profiles /= q_profiles.sum(1, keepdims=True)
    soup = (p_q[:, None] * q_profiles).sum(0)
    amb = min(max(ambient * s, 0.0), 0.9)
    q_profiles = (1.0 - amb) * q_profiles + amb * soup
    depth = max(1.0 - depth_ratio * s, 0.1)

    cats = pd.CategoricalDtype(names)
    lin_cats = pd.CategoricalDtype(list(SHIFT_LINEAGES))
    design = {"seed": int(seed), "rare_types": list(rare), "rare_fractions": rare,
              "shift": s, "gene_bias_sd": gene_bias * s, "depth_ratio": depth,
              "composition_sd": composition * s, "ambient_fraction": amb}

    def make(n, p, prof, rng, lib_mean, prefix):
        labels = rng.choice(len(names), size=n, p=p)
        for i, name in enumerate(names):  # every rare type present, even in small samples
            if name in rare and not (labels == i).any():
                labels[rng.integers(n)] = i
        lib = rng.lognormal(np.log(lib_mean), 0.35, size=n)
        obs = pd.DataFrame({
            "cell_type": pd.Categorical(np.asarray(names)[labels], dtype=cats),
            "lineage": pd.Categorical(np.asarray(lineage_of)[labels], dtype=lin_cats),
        }, index=[f"{prefix}_{i}" for i in range(n)])
        return labels, lib, obs

    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    parts = []
    for n, p, prof, rng, lib_mean, prefix, role in (
            (n_cells, p_ref, profiles, rng_ref, mean_library, "ref", "reference"),
            (n_query, p_q, q_profiles, rng_q, mean_library * depth, "query", "query")):
        labels, lib, obs = make(n, p, prof, rng, lib_mean, prefix)
        uns = {"X_type": "counts", "synthetic": dict(design, role=role)}
        blocks = _synthetic_blocks(prof, labels, lib, rng, dispersion, chunk)
        parts.append((blocks, obs, uns))
    if out is not None:
        from .io import write_h5ad_blocks

        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        paths = [d / "reference.h5ad", d / "query.h5ad"]
        for path, (blocks, obs, uns) in zip(paths, parts):
            write_h5ad_blocks(path, blocks, obs=obs, var=var, uns=uns)
        return paths
    result = []
    for blocks, obs, uns in parts:
        a = ad.AnnData(X=sp.vstack(list(blocks), format="csr"), obs=obs, var=var.copy())
        a.uns.update(uns)
        result.append(a)
    return result[0], result[1]
