"""Preprocessing recorded as a reusable *gene space*.

On the reference, :func:`fit_gene_space` normalises (library size + log1p, when given counts
or scaled values such as CPM/TPM),
selects genes (highly variable genes plus the top marker genes of every class, so that a
class of ten cells keeps its markers), and records standardisation statistics. The resulting
:class:`GeneSpace` is stored in the model and re-applied, unchanged, to every query.

Nothing here knows about torch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .io import Expression, H5adRows, kind_action, kind_words, match_genes

logger = logging.getLogger("scsnn")

TARGET_SUM = 1e4


def log_normalize(expr: Expression, *, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Bring an expression matrix to log1p of values normalised to ``target_sum`` per cell.

    Raw counts and scaled values (CP10k, CPM, TPM, FPKM: ``kind="scaled"``) are normalised
    per cell (scanpy's ``normalize_total``: ``x / rowsum * target_sum``) and
    log1p-transformed, so that TPM-like input becomes ``log1p(TPM / 100)``; log-normalised
    data (``kind="lognorm"``) pass as they are. Cells without any expression stay zero.

    Works on all genes of the matrix, so that library sizes are those of the whole profile.
    Returns a new CSR float32 matrix; the input is not modified.
    """
    if expr.kind == "lognorm":
        return expr.X
    X = _csr(expr.X)
    return _normalised(X, X.copy(), expr.kind, target_sum)


def _csr(X: Any) -> sp.csr_matrix:
    return X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)


def _normalised(X: sp.csr_matrix, sub: sp.csr_matrix, kind: str,
                target_sum: float) -> sp.csr_matrix:
    """scanpy's ``normalize_total`` then ``log1p`` (the same arithmetic, bit for bit) on the
    entries of ``sub``, some columns of ``X`` with its rows, with library sizes from all of
    ``X``; CSR float32."""
    if kind not in ("counts", "scaled"):
        raise InputError(f"unknown kind of expression values '{kind}' "
                         "(counts, scaled or lognorm)")
    scale = library_sizes(X) / target_sum
    scale = scale + (scale == 0)
    data = sub.data / np.repeat(scale, np.diff(sub.indptr))
    np.log1p(data, out=data)
    return sp.csr_matrix((data.astype(np.float32, copy=False), sub.indices, sub.indptr),
                         shape=sub.shape)


def library_sizes(X: sp.csr_matrix) -> np.ndarray:
    """Every row's total, summed in float64 and returned in ``X``'s dtype, as scanpy's
    ``normalize_total`` computes it."""
    X = sp.csr_matrix(X)
    out = np.zeros(X.shape[0], dtype=np.float64)
    nonempty = np.diff(X.indptr) > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(X.data.astype(np.float64), X.indptr[:-1][nonempty])
    return out.astype(X.dtype if X.dtype.kind == "f" else np.float32)


def _column_mean_var(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel()
    return mean, np.maximum(sq - mean**2, 0.0)


def _class_sums(X: sp.csr_matrix, codes: np.ndarray, n_classes: int):
    """Per class: cell counts, and sums and sums of squares of every gene (two sparse
    products)."""
    n = X.shape[0]
    ind = sp.csr_matrix(
        (np.ones(n, dtype=np.float64), (codes, np.arange(n))), shape=(n_classes, n)
    )
    counts = np.asarray(ind.sum(axis=1)).ravel()
    sums = np.asarray((ind @ X).todense())
    sqs = np.asarray((ind @ X.multiply(X)).todense())
    return counts, sums, sqs


def _class_moments(X: sp.csr_matrix, codes: np.ndarray, n_classes: int):
    """Per class: cell counts, means and variances of every gene."""
    counts, sums, sqs = _class_sums(X, codes, n_classes)
    mean = sums / np.maximum(counts, 1)[:, None]
    var = np.maximum(sqs / np.maximum(counts, 1)[:, None] - mean**2, 0.0)
    return counts, mean, var


def nearest_classes(X: sp.csr_matrix, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """For every class, the most similar other class: the highest Pearson correlation of
    the classes' mean (log-normalised) profiles."""
    _, mean, _ = _class_moments(X, codes, n_classes)
    c = np.corrcoef(mean) if n_classes > 1 else np.ones((1, 1))
    c = np.nan_to_num(c, nan=-1.0)
    np.fill_diagonal(c, -np.inf)
    return c.argmax(1)


def pair_scores(X: sp.csr_matrix, codes: np.ndarray, n_classes: int,
                pairs: list[tuple[int, int]]) -> np.ndarray:
    """Welch t statistic of every gene between the two classes of each pair,
    ``(len(pairs), n_genes)`` (positive: higher in the first class)."""
    counts, mean, var = _class_moments(X, codes, n_classes)
    out = np.zeros((len(pairs), X.shape[1]))
    for k, (a, b) in enumerate(pairs):
        se = np.sqrt(var[a] / max(counts[a], 1) + var[b] / max(counts[b], 1) + 1e-4)
        out[k] = (mean[a] - mean[b]) / se
    return out


def marker_scores(X: sp.csr_matrix, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Welch t statistic of each gene for each class against the rest, ``(n_classes, n_genes)``.

    Computed with two sparse products, so it scales to large references. Genes lower in the
    class than in the rest get negative scores.
    """
    n = X.shape[0]
    counts, sums, sqs = _class_sums(X, codes, n_classes)
    tot_sum, tot_sq = sums.sum(0), sqs.sum(0)
    n_in = counts[:, None]
    n_out = np.maximum(n - n_in, 1)
    mean_in = sums / n_in
    mean_out = (tot_sum - sums) / n_out
    var_in = np.maximum(sqs / n_in - mean_in**2, 0.0)
    var_out = np.maximum((tot_sq - sqs) / n_out - mean_out**2, 0.0)
    se = np.sqrt(var_in / n_in + var_out / n_out + 1e-4)
    return (mean_in - mean_out) / se


@dataclass
class PreprocessConfig:
    """How the gene space is fitted on a reference.

    Parameters
    ----------
    n_hvg
        Highly variable genes kept.
    n_markers
        Top marker genes kept per class (on top of the HVGs), so a small class keeps its
        markers.
    n_pair_markers
        Genes kept per class that best separate it from its nearest class (one-vs-nearest,
        up in either), on top of the one-vs-rest markers (0: none).
    min_cells_per_class
        Classes with fewer labelled cells are dropped, with a message naming them.
    clip
        Standardised values are clipped to ``[-clip, clip]``.
    """

    n_hvg: int = 2000
    n_markers: int = 25
    n_pair_markers: int = 0
    min_cells_per_class: int = 1
    clip: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GeneSpace:
    """The model's genes and how to bring any expression profile into them."""

    genes: list[str]
    mean: np.ndarray
    std: np.ndarray
    clip: float = 10.0
    target_sum: float = TARGET_SUM
    reference_kind: str = "counts"
    n_hvg: int = 0
    markers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    # -- applying it ---------------------------------------------------------------------
    def project(self, expr: Expression) -> tuple[sp.csr_matrix, np.ndarray]:
        """Log-normalise ``expr`` and reorder its columns to the model genes.

        Returns the CSR matrix (cells x model genes; absent genes are empty columns) and a
        boolean mask of the model genes that the query holds. Equal to
        :func:`log_normalize` followed by the column selection, but only the model genes'
        entries are normalised and log-transformed (library sizes are still those of the
        whole profile).
        """
        cols = match_genes(expr.genes, self.genes)
        present = cols >= 0
        X = _csr(expr.X)
        sub = sp.csr_matrix(X[:, cols[present]])
        if expr.kind != "lognorm":  # the selected entries alone are normalised
            sub = _normalised(X, sub, expr.kind, self.target_sum)
        sub = sp.csr_matrix(sub, dtype=np.float32)
        if present.all():
            return sub, present
        remap = np.flatnonzero(present)  # increasing: rows keep their column order
        out = sp.csr_matrix((sub.data, remap[sub.indices], sub.indptr),
                            shape=(sub.shape[0], self.n_genes))
        return out, present

    def scale(self, X: sp.spmatrix | np.ndarray, present: np.ndarray | None = None, *,
              absent: str = "mean") -> np.ndarray:
        """Standardise rows of a projected matrix with the reference statistics, then clip.

        Dense float32 output: call it on a mini-batch. Genes the query lacks are set to the
        reference mean (``absent="mean"``, standardised 0: no signal either way, for analog
        input) or to zero expression (``absent="zero"``: silent for spike encoders).
        """
        if absent not in ("mean", "zero"):
            raise ValueError(f"absent must be 'mean' or 'zero', got {absent!r}")
        dense = X.toarray() if sp.issparse(X) else np.asarray(X)
        Z = (dense.astype(np.float32, copy=False) - self.mean) / self.std
        np.clip(Z, -self.clip, self.clip, out=Z)
        if present is not None and not present.all():
            Z[:, ~present] = 0.0 if absent == "mean" else self.floor()[~present]
        return Z

    def scale_sparse(self, X: sp.spmatrix, present: np.ndarray | None = None, *,
                     absent: str = "mean"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`scale` without densifying: ``(indptr, indices, values, base)``, the
        standardised, clipped value of every stored entry of the CSR rows and, for each gene,
        the value of its unstored entries (the floor; 0 or the floor for genes the query
        lacks, as ``absent`` says). The same arithmetic as :meth:`scale`, so the dense matrix
        these stand for is equal to ``scale(X, present, absent=absent)``.
        """
        if absent not in ("mean", "zero"):
            raise ValueError(f"absent must be 'mean' or 'zero', got {absent!r}")
        X = sp.csr_matrix(X)
        base = self.floor()
        idx = X.indices.astype(np.int64, copy=False)
        v = (X.data.astype(np.float32, copy=False) - self.mean[idx]) / self.std[idx]
        np.clip(v, -self.clip, self.clip, out=v)
        indptr = X.indptr.astype(np.int64, copy=False)
        if present is not None and not present.all():
            if absent == "mean":
                base[~present] = 0.0
            keep = present[idx]
            if not keep.all():  # entries of genes the query lacks take the base value
                row = np.repeat(np.arange(X.shape[0]), np.diff(indptr))
                idx, v = idx[keep], v[keep]
                indptr = np.concatenate([[0], np.cumsum(np.bincount(row[keep],
                                                                    minlength=X.shape[0]))])
        return indptr, idx, v.astype(np.float32, copy=False), base

    def floor(self) -> np.ndarray:
        """``[genes]``: the standardised value of zero expression of every gene (what
        :meth:`scale` gives an undetected gene)."""
        return self.scale(np.zeros((1, self.n_genes), dtype=np.float32))[0]

    def features(self, expr: Expression) -> np.ndarray:
        """``project`` then ``scale``: the dense standardised matrix a model sees.

        Dense over all cells: for baselines on small data; the model itself scales per batch.
        """
        X, present = self.project(expr)
        return self.scale(X, present)

    # -- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "genes": list(self.genes),
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "clip": float(self.clip),
            "target_sum": float(self.target_sum),
            "reference_kind": self.reference_kind,
            "n_hvg": int(self.n_hvg),
            "markers": {k: list(v) for k, v in self.markers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneSpace:
        genes = [str(g) for g in d["genes"]]
        mean = np.asarray(d["mean"], dtype=np.float32)
        std = np.asarray(d["std"], dtype=np.float32)
        if not (len(genes) == mean.size == std.size) or len(genes) == 0:
            raise ValueError("gene space: genes, mean and std differ in length")
        if not np.all(std > 0):
            raise ValueError("gene space: non-positive standard deviations")
        return cls(
            genes=genes,
            mean=mean,
            std=std,
            clip=float(d.get("clip", 10.0)),
            target_sum=float(d.get("target_sum", TARGET_SUM)),
            reference_kind=str(d.get("reference_kind", "counts")),
            n_hvg=int(d.get("n_hvg", 0)),
            markers={str(k): [str(g) for g in v] for k, v in d.get("markers", {}).items()},
        )


def select_genes(
    Xlog: sp.csr_matrix,
    genes: np.ndarray,
    codes: np.ndarray,
    classes: list[str],
    *,
    n_hvg: int = 2000,
    n_markers: int = 25,
    n_pair_markers: int = 0,
    min_cells: int = 3,
) -> tuple[np.ndarray, int, dict[str, list[str]]]:
    """Indices of the kept genes: highly variable genes, then each class's top markers
    (one class against all others), then, with ``n_pair_markers``, the genes that best tell
    every class from its nearest class (up in either of the two), so that a rare subtype's
    few distinguishing genes are kept even when they do not stand out against all cells.

    Returns ``(indices, number of HVGs, {class: marker genes})``; pair markers are listed
    under ``"<class> vs <nearest class>"``.
    """
    n_cells_expr = np.diff(Xlog.tocsc().indptr)
    unique = ~pd.Index(genes).duplicated(keep="first")
    candidates = np.flatnonzero((n_cells_expr >= min(min_cells, Xlog.shape[0])) & unique)
    if candidates.size == 0:
        raise InputError("no gene is expressed in enough reference cells")
    Xc = Xlog[:, candidates]

    if candidates.size <= n_hvg:
        hvg = np.arange(candidates.size)
    else:
        import scanpy as sc  # only where genes are chosen (training), not to annotate

        tmp = ad.AnnData(X=Xc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(tmp, n_top_genes=n_hvg, flavor="seurat")
        disp = tmp.var["dispersions_norm"].to_numpy()
        hv = tmp.var["highly_variable"].to_numpy()
        hvg = np.flatnonzero(hv)
        hvg = hvg[np.argsort(-np.nan_to_num(disp[hvg], nan=-np.inf), kind="stable")]

    scores = marker_scores(Xc, codes, len(classes))
    markers: dict[str, list[str]] = {}
    chosen = list(hvg)
    seen = set(chosen)
    for ci, name in enumerate(classes):
        order = np.argsort(-scores[ci], kind="stable")[:n_markers]
        order = order[scores[ci, order] > 0]
        markers[name] = [str(genes[candidates[j]]) for j in order]
        for j in order:
            if j not in seen:
                seen.add(j)
                chosen.append(j)
    if n_pair_markers > 0 and len(classes) > 1:
        nearest = nearest_classes(Xc, codes, len(classes))
        pairs = [(ci, int(nearest[ci])) for ci in range(len(classes))]
        ps = pair_scores(Xc, codes, len(classes), pairs)
        for k, (a, b) in enumerate(pairs):
            order = np.argsort(-np.abs(ps[k]), kind="stable")[:n_pair_markers]
            order = order[np.abs(ps[k, order]) > 0]
            markers[f"{classes[a]} vs {classes[b]}"] = [str(genes[candidates[j]])
                                                        for j in order]
            for j in order:
                if j not in seen:
                    seen.add(j)
                    chosen.append(j)
    return candidates[np.asarray(chosen, dtype=np.int64)], int(len(hvg)), markers


def fit_gene_space(
    expr: Expression,
    codes: np.ndarray,
    classes: list[str],
    *,
    n_hvg: int = 2000,
    n_markers: int = 25,
    n_pair_markers: int = 0,
    clip: float = 10.0,
    restrict_genes: list[str] | None = None,
) -> tuple[GeneSpace, sp.csr_matrix]:
    """Fit the gene space on a labelled reference.

    Returns the gene space and the reference projected into it (log-normalised CSR, not yet
    standardised), ready for mini-batching.
    """
    Xlog = log_normalize(expr)
    genes = np.asarray(expr.genes)
    if restrict_genes is not None:
        keep = np.flatnonzero(pd.Index(genes).isin(pd.Index(restrict_genes)))
        if keep.size == 0:
            raise InputError("none of the requested genes is in the reference")
        Xlog, genes = Xlog[:, keep], genes[keep]
    idx, n_sel_hvg, markers = select_genes(
        Xlog, genes, codes, classes, n_hvg=n_hvg, n_markers=n_markers,
        n_pair_markers=n_pair_markers,
    )
    Xsel = sp.csr_matrix(Xlog[:, idx], dtype=np.float32)
    mean, var = _column_mean_var(Xsel)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0
    gs = GeneSpace(
        genes=[str(g) for g in genes[idx]],
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        clip=clip,
        reference_kind=expr.kind,
        n_hvg=n_sel_hvg,
        markers=markers,
    )
    logger.info(
        "gene space: %d genes (%d highly variable + %d class markers) from %s (%s, %s)",
        gs.n_genes,
        n_sel_hvg,
        gs.n_genes - n_sel_hvg,
        expr.source,
        kind_words(expr.kind),
        kind_action(expr.kind, gs.target_sum),
    )
    return gs, Xsel


class ProjectedRows:
    """Cells of an ``.h5ad`` file on disk, read on demand and projected into a gene space.

    Stands in for the in-memory reference matrix during training: ``rows[idx]`` is a lazy
    view of a subset, and :meth:`take_rows` reads the given cells (any order, repeats
    allowed) from the file, log-normalises them and keeps the model's genes. Memory holds
    one mini-batch, never the reference.
    """

    def __init__(self, source: H5adRows, gene_space: GeneSpace, kind: str,
                 rows: np.ndarray | None = None) -> None:
        self._src = source
        self._gs = gene_space
        self._kind = kind
        self._rows = (np.arange(source.n_obs) if rows is None
                      else np.asarray(rows, dtype=np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self._rows), self._gs.n_genes)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: slice | np.ndarray) -> ProjectedRows:
        return ProjectedRows(self._src, self._gs, self._kind, self._rows[key])

    def take_rows(self, idx: np.ndarray) -> sp.csr_matrix:
        """The projected cells ``idx`` (positions in this view), in that order."""
        file_rows = self._rows[np.asarray(idx, dtype=np.int64)]
        uniq, inverse = np.unique(file_rows, return_inverse=True)
        expr = self._src.expression_rows(uniq, self._kind)
        proj, _ = self._gs.project(expr)
        return proj[inverse]

    def digest(self) -> str:
        """Identifies the cells (file, layout and rows) for checks across processes."""
        import hashlib

        h = hashlib.sha256(str(self._src.path.resolve()).encode())
        h.update(repr((self._src.n_obs, self._src.n_vars, self._kind)).encode())
        h.update(self._rows.tobytes())
        return h.hexdigest()


class ScaledCells:
    """Standardised cells for the trainer: ``rows(idx)`` is the dense ``[len(idx), genes]``
    float32 block of those cells (any order, repeats allowed), read from a projected CSR
    matrix or from :class:`ProjectedRows` on disk, one mini-batch at a time.

    With ``rng`` (training batches), ``rows`` can imitate technical variation before the
    standardisation: ``depth`` = the smallest fraction of a cell's counts kept by binomial
    thinning (each cell draws its fraction uniformly from [depth, 1]; needs the reference's
    raw counts, i.e. ``library`` = every cell's total count over all its genes), and
    ``gene_noise`` = the sd of a per-gene log-normal factor drawn for each batch (a batch
    effect on single genes).
    """

    def __init__(self, X: sp.csr_matrix | ProjectedRows, gene_space: GeneSpace, *,
                 library: np.ndarray | None = None, depth: float = 1.0,
                 gene_noise: float = 0.0) -> None:
        self.X = X
        self.gene_space = gene_space
        self.library = None if library is None else np.asarray(library, dtype=np.float64)
        self.depth = float(depth)
        self.gene_noise = float(gene_noise)

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented at all."""
        return (self.depth < 1.0 and self.library is not None) or self.gene_noise > 0

    def _augment(self, block: sp.csr_matrix, idx: np.ndarray,
                 rng: np.random.Generator) -> sp.csr_matrix:
        x = sp.csr_matrix(block, dtype=np.float64, copy=True)
        ts = self.gene_space.target_sum
        if self.depth < 1.0 and self.library is not None:
            lib = self.library[idx]
            keep = rng.uniform(self.depth, 1.0, size=len(idx))
            row = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
            counts = np.rint(np.expm1(x.data) * lib[row] / ts)  # the cell's raw counts
            thinned = rng.binomial(counts.astype(np.int64), keep[row]).astype(np.float64)
            x.data = np.log1p(thinned / (lib[row] * keep[row]) * ts)
        if self.gene_noise > 0:
            factor = np.exp(rng.normal(0.0, self.gene_noise, size=x.shape[1]))
            x.data = np.log1p(np.expm1(x.data) * factor[x.indices])
        x.eliminate_zeros()
        return x

    def _block(self, idx: np.ndarray, rng: np.random.Generator | None) -> sp.csr_matrix:
        """The projected rows ``idx``, augmented for a training batch (``rng``)."""
        idx = np.asarray(idx, dtype=np.int64)
        block = self.X.take_rows(idx) if hasattr(self.X, "take_rows") else self.X[idx]
        if rng is not None and self.augments:
            block = self._augment(block, idx, rng)
        return block

    def rows(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.gene_space.scale(self._block(idx, rng))

    def sparse_rows(self, idx: np.ndarray, rng: np.random.Generator | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The same cells as :meth:`rows` (the same augmentation draws), not densified: the
        arrays of :meth:`GeneSpace.scale_sparse`."""
        return self.gene_space.scale_sparse(self._block(idx, rng))

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_genes(self) -> int:
        return self.gene_space.n_genes

    def digest(self) -> str:
        """Identifies the cells and genes, for checks across training processes."""
        import hashlib

        h = hashlib.sha256()
        if hasattr(self.X, "digest"):
            h.update(self.X.digest().encode())
        else:
            X = self.X
            h.update(repr((X.shape, X.nnz, float(np.asarray(X.data, dtype=np.float64).sum())))
                     .encode())
        h.update("\0".join(self.gene_space.genes).encode())
        return h.hexdigest()
