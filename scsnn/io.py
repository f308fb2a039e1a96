"""Reading and validating inputs, gene matching and atomic writes.

Nothing here knows about torch: this module only deals with AnnData and matrices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
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


def read_h5ad(path: str | os.PathLike, *, backed: bool = False,
              allow_empty: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file, turning every failure into a one-line :class:`InputError`.

    Files without cells or genes are refused unless ``allow_empty``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"file not found: {p}")
    if p.is_dir():
        raise InputError(f"expected an .h5ad file, got a directory: {p}")
    try:
        adata = ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
    if not allow_empty and (adata.n_obs == 0 or adata.n_vars == 0):
        raise InputError(f"{p} holds no data ({adata.n_obs} cells x {adata.n_vars} genes)")
    return adata


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, mode_from: Path | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed over ``path`` when the block ends
    without error, removed otherwise (the previous file stays untouched).

    The new file takes the mode of ``path`` if it exists, else of ``mode_from``, else the
    umask default.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a directory")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp.h5ad", dir=p.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = file_mode(p if p.exists() or mode_from is None else mode_from)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` through a temporary file in the same folder and a rename.

    A crash or an error midway leaves the previous file untouched.
    """
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


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


def check_values(X: sp.csr_matrix) -> None:
    """Refuse NaN, infinite and negative expression values with a one-line error."""
    data = X.data
    if not np.all(np.isfinite(data)):
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"expression matrix has {n_bad} NaN or infinite values")
    if data.size and data.min() < 0:
        raise InputError(
            "expression matrix has negative values (is it scaled?); give raw counts or "
            "log-normalised values, e.g. with --layer or --use-raw"
        )


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
    check_values(X)
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


# -- row blocks of files too large to load, and predictions written back without X ---------


class H5adRows:
    """Row blocks of one expression matrix of an ``.h5ad`` file, read without loading it.

    The matrix is ``X``, ``layers[layer]`` or ``raw/X``; CSR-stored matrices (the usual
    layout of single-cell data) and dense ones are read block by block. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layer: str | None = None,
        use_raw: bool = False,
        gene_symbols: str | None = None,
    ) -> None:
        import h5py
        from anndata.io import read_elem, sparse_dataset

        p = Path(path)
        if not p.exists():
            raise InputError(f"file not found: {p}")
        if p.is_dir():
            raise InputError(f"expected an .h5ad file, got a directory: {p}")
        if layer is not None and use_raw:
            raise InputError("give either a layer or use_raw, not both")
        try:
            self._file = h5py.File(p, "r")
        except Exception as exc:
            raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
        f = self._file
        try:
            if "obs" not in f or ("X" not in f and layer is None and not use_raw):
                raise InputError(f"cannot read {p} as .h5ad: no obs or X")
            if use_raw:
                if "raw" not in f:
                    raise InputError("use_raw was asked for, but the data have no .raw")
                loc, var_loc, self.source = "raw/X", "raw/var", "raw"
            elif layer is not None:
                if "layers" not in f or layer not in f["layers"]:
                    have = ", ".join(f["layers"].keys()) if "layers" in f else ""
                    raise InputError(f"layer '{layer}' not found (layers: {have or 'none'})")
                loc, var_loc, self.source = f"layers/{layer}", "var", f"layers['{layer}']"
            else:
                loc, var_loc, self.source = "X", "var", "X"
            elem = f[loc]
            if isinstance(elem, h5py.Group):
                self._mat = sparse_dataset(elem)
                if self._mat.format != "csr":
                    logger.warning("%s of %s is stored column by column (%s): reading blocks "
                                   "of cells reads it whole", self.source, p.name,
                                   self._mat.format)
            else:
                self._mat = elem
            self.n_obs, self.n_vars = (int(n) for n in self._mat.shape)
            self.obs = read_elem(f["obs"])
            var = read_elem(f[var_loc])
        except InputError:
            self._file.close()
            raise
        except Exception as exc:
            self._file.close()
            raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
        if self.n_obs == 0 or self.n_vars == 0:
            self._file.close()
            raise InputError(f"{p} holds no data ({self.n_obs} cells x {self.n_vars} genes)")
        if gene_symbols is not None:
            if gene_symbols not in var.columns:
                self._file.close()
                raise InputError(f"var column '{gene_symbols}' not found (for gene symbols)")
            self.genes = var[gene_symbols].astype(str).to_numpy()
        else:
            self.genes = np.asarray(var.index.astype(str))
        self.path = p

    def __enter__(self) -> H5adRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32, checked for NaN and negative values."""
        X = _as_csr32(self._mat[start:stop])
        check_values(X)
        return X

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The cells at the sorted, distinct positions ``rows``, as CSR float32 (checked)."""
        X = _as_csr32(self._mat[np.asarray(rows, dtype=np.int64)])
        check_values(X)
        return X

    def expression(self, start: int, stop: int, kind: str) -> Expression:
        """Rows ``start:stop`` as an :class:`Expression` of the given kind."""
        return Expression(X=self.block(start, stop), genes=self.genes, kind=kind,
                          source=self.source)

    def detect_kind(self, max_rows: int = 65_536) -> str:
        """Counts or log-normalised, judged on the first ``max_rows`` cells."""
        return detect_kind(self.block(0, min(self.n_obs, max_rows)))


def chunk_bounds(n_obs: int, n_chunks: int, index: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``index`` of ``n_chunks``, cut at multiples of
    ``align`` (the inference batch size, so that chunks see the same batches as a whole run).
    The last chunks may be empty when there are fewer blocks than chunks."""
    if n_chunks < 1 or not 0 <= index < n_chunks:
        raise InputError(f"chunk {index + 1}/{n_chunks} does not exist (chunks count from 1)")
    per = -(-n_obs // n_chunks)
    per = -(-per // align) * align
    start = min(n_obs, index * per)
    return start, min(n_obs, start + per)


def write_annotations(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    obs: dict[str, object],
    obsm: dict[str, object],
    uns: dict[str, object],
    drop_obs: tuple[str, ...] = (),
) -> None:
    """Write obs columns, obsm entries and uns entries into a copy of the ``.h5ad`` file
    ``src`` saved as ``dst`` (which may be ``src`` itself), without loading ``X``.

    The copy is made in ``dst``'s folder and renamed over ``dst`` when complete, so an error
    midway leaves both files as they were.
    """
    import shutil

    import h5py
    from anndata.io import read_elem, write_elem

    s = Path(src)
    with atomic_output(dst, mode_from=s) as tmp:
        shutil.copyfile(s, tmp)
        with h5py.File(tmp, "r+") as f:
            df = read_elem(f["obs"])
            for col in drop_obs:
                if col in df.columns:
                    del df[col]
            for col, values in obs.items():
                df[col] = values
            del f["obs"]
            write_elem(f, "obs", df)
            for group, entries in (("obsm", obsm), ("uns", uns)):
                if group in f:
                    g = f[group]
                else:
                    g = f.create_group(group)
                    g.attrs["encoding-type"] = "dict"
                    g.attrs["encoding-version"] = "0.1.0"
                for key, value in entries.items():
                    if key in g:
                        del g[key]
                    write_elem(g, key, value)


def write_h5ad_blocks(
    path: str | os.PathLike,
    blocks: Iterable[sp.csr_matrix],
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    uns: dict[str, object] | None = None,
) -> None:
    """Write an ``.h5ad`` file whose CSR ``X`` arrives in blocks of rows, holding one block
    in memory at a time; atomic like :func:`write_h5ad_atomic`."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        ds = None
        n = 0
        for block in blocks:
            block = sp.csr_matrix(block, dtype=np.float32)
            if ds is None:
                write_elem(f, "X", block)
                ds = sparse_dataset(f["X"])
            else:
                ds.append(block)
            n += block.shape[0]
        if ds is None or n != len(obs):
            raise ValueError(f"blocks hold {n} rows, obs {len(obs)}")
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", dict(uns or {}))
        for group in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, group, {})


def subset_h5ad(src: str | os.PathLike, dst: str | os.PathLike,
                conditions: dict[str, list[str]]) -> int:
    """Write the cells of ``src`` whose ``obs`` values match every condition to ``dst``.

    ``conditions`` maps obs columns to the accepted values (compared as strings). Only the
    selected cells are loaded. Returns the number of cells written.
    """
    adata = read_h5ad(src, backed=True)
    try:
        mask = np.ones(adata.n_obs, dtype=bool)
        for col, values in conditions.items():
            if col not in adata.obs.columns:
                cols = ", ".join(map(str, adata.obs.columns[:20])) or "none"
                raise InputError(f"obs column '{col}' not found (columns: {cols})")
            have = adata.obs[col].astype(str)
            unknown = sorted(set(values) - set(have.unique()))
            if unknown:
                raise InputError(f"obs['{col}'] has no value {', '.join(unknown)}")
            mask &= have.isin(values).to_numpy()
        if not mask.any():
            raise InputError("no cell matches the subset")
        sub = adata[np.flatnonzero(mask)].to_memory()
    finally:
        adata.file.close()
    write_h5ad_atomic(sub, dst)
    return int(sub.n_obs)


def balanced_quota(counts: np.ndarray, total: int) -> np.ndarray:
    """Cells to keep per class so that at most ``total`` are kept: classes below a common cap
    are kept whole, the larger ones cut to that cap (water filling)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() <= total:
        return counts.copy()
    lo, hi = 0, int(counts.max())
    while lo < hi:  # the largest cap whose kept total fits
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    return np.minimum(counts, lo)


def read_h5ad_sample(path: str | os.PathLike, label_key: str, max_cells: int, *,
                     seed: int = 0) -> ad.AnnData:
    """At most ``max_cells`` cells of an ``.h5ad`` file, class-balanced, read without loading
    the rest: every cell of the small classes, an equal random share of the large ones.
    Cells without a label are left out. The file order of the cells is kept."""
    adata = read_h5ad(path, backed=True)
    try:
        labels = get_labels(adata, label_key)
        known = labels.notna().to_numpy()
        codes, uniques = pd.factorize(labels[known])
        idx_known = np.flatnonzero(known)
        quota = balanced_quota(np.bincount(codes, minlength=len(uniques)), max_cells)
        rng = np.random.default_rng(seed)
        keep = []
        for c, q in enumerate(quota):
            members = idx_known[codes == c]
            keep.append(members if q >= len(members) else rng.choice(members, q, replace=False))
        rows = np.sort(np.concatenate(keep))
        logger.info("training on %d of %d cells (class-balanced sample; classes under %d cells "
                    "kept whole)", len(rows), adata.n_obs, int(quota.max()))
        sub = adata[rows].to_memory()
    finally:
        adata.file.close()
    return sub
