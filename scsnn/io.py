"""Reading and validating inputs, gene matching and atomic writes.

Nothing here knows about torch: this module only deals with AnnData and matrices.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._files import file_mode
from .errors import InputError

logger = logging.getLogger("scsnn")

#: Values a "counts" matrix may hold: non-negative, integer to within this tolerance.
_INTEGER_TOL = 1e-3


def read_h5ad(path: str | os.PathLike, *, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, turning every failure into a one-line :class:`InputError`."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    if p.is_dir():
        raise InputError(f"expected an .h5ad file, got a directory: {p}")
    try:
        adata = ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{p} holds no data ({adata.n_obs} cells x {adata.n_vars} genes)")
    return adata


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` through a temporary file in the same folder and a rename.

    A crash or an error midway leaves the previous file untouched.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp.h5ad", dir=p.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.chmod(tmp, file_mode(p))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Expression:
    """An expression matrix taken out of an AnnData, with what it is and where it came from."""

    X: sp.csr_matrix  # cells x genes, float32, CSR
    genes: np.ndarray  # gene identifiers matching the columns of X
    kind: str  # "counts" or "lognorm"
    source: str  # "X", "layers['name']" or "raw"


def _as_csr32(X) -> sp.csr_matrix:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X.sum_duplicates()
    return X


def detect_kind(X: sp.csr_matrix, *, max_values: int = 200_000, seed: int = 0) -> str:
    """Tell raw counts ("counts") from log-normalised data ("lognorm").

    Refuses NaN, infinite and negative values: those are not expression levels that
    scsnn can normalise (scaled data must be given unscaled, as counts or log1p values).
    """
    data = X.data
    if data.size > max_values:
        rng = np.random.default_rng(seed)
        sample = data[rng.choice(data.size, size=max_values, replace=False)]
    else:
        sample = data
    if not np.all(np.isfinite(data)):
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"expression matrix has {n_bad} NaN or infinite values")
    if data.size and data.min() < 0:
        raise InputError(
            "expression matrix has negative values (is it scaled?); give raw counts or "
            "log-normalised values, e.g. with --layer or --use-raw"
        )
    if sample.size == 0:
        raise InputError("expression matrix holds only zeros")
    frac = np.abs(sample - np.round(sample))
    if np.all(frac < _INTEGER_TOL) and sample.max() > 1.0:
        return "counts"
    return "lognorm"


def get_expression(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
) -> Expression:
    """Take the expression matrix from ``X``, ``layers[layer]`` or ``raw``, as CSR float32.

    ``gene_symbols`` names a ``var`` column whose values identify genes instead of ``var_names``.
    """
    if layer is not None and use_raw:
        raise InputError("give either a layer or use_raw, not both")
    if use_raw:
        if adata.raw is None:
            raise InputError("use_raw was asked for, but the data have no .raw")
        X, var = adata.raw.X, adata.raw.var
        source = "raw"
    elif layer is not None:
        if layer not in adata.layers:
            have = ", ".join(adata.layers.keys()) or "none"
            raise InputError(f"layer '{layer}' not found (layers: {have})")
        X, var = adata.layers[layer], adata.var
        source = f"layers['{layer}']"
    else:
        X, var = adata.X, adata.var
        source = "X"
    if X is None:
        raise InputError(f"no expression matrix in {source}")
    if hasattr(X, "to_memory"):  # backed sparse dataset
        X = X.to_memory()
    X = _as_csr32(X)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"expression matrix in {source} is empty ({X.shape[0]} x {X.shape[1]})")
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            raise InputError(f"var column '{gene_symbols}' not found (for gene symbols)")
        genes = var[gene_symbols].astype(str).to_numpy()
    else:
        genes = np.asarray(var.index.astype(str))
    kind = detect_kind(X)
    return Expression(X=X, genes=genes, kind=kind, source=source)


def get_labels(adata: ad.AnnData, label_key: str) -> pd.Series:
    """The labels in ``obs[label_key]`` as strings; missing labels are refused."""
    if label_key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns[:20])) or "none"
        raise InputError(f"label key '{label_key}' not in obs (columns: {cols})")
    labels = adata.obs[label_key]
    missing = labels.isna()
    if missing.all():
        raise InputError(f"obs['{label_key}'] holds no labels")
    return labels.astype(object).where(~missing, None)


def match_genes(query_genes: np.ndarray, model_genes: list[str]) -> np.ndarray:
    """For each model gene, the column of the query that holds it, or -1.

    Duplicated query genes: the first column is used.
    """
    index = pd.Index(query_genes)
    if not index.is_unique:
        first = ~index.duplicated(keep="first")
        index = pd.Index(np.asarray(query_genes)[first])
        cols = np.flatnonzero(first)
        pos = index.get_indexer(model_genes)
        return np.where(pos >= 0, cols[np.clip(pos, 0, None)], -1)
    return index.get_indexer(model_genes)
