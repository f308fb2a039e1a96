"""Reading and validating inputs, gene matching and atomic writes.

Nothing here knows about torch: this module only deals with AnnData and matrices.

What an expression matrix holds is judged by :func:`inspect_values` (see
``docs/inputs.md``):

``counts``
    non-negative integers (integer-valued floats too): raw UMI or read counts.
``scaled``
    non-negative, non-integer values that are not on a log scale: counts scaled per cell
    (CP10k, CPM, TPM, FPKM; every cell summing to the same total, or values far above a log
    scale). Treated like counts: normalised to 10,000 per cell, then log1p.
``lognorm``
    non-integer values on a log scale (at most :data:`LOG_MAX`): log1p of any of those,
    used as given.

Negative values (z-scores, centred data), NaN and infinite values are refused with a
one-line message that names the other matrices of the file (``--layer``, ``--use-raw``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
#: No log-scale expression value reaches this (log1p of 1e13; log2 of 1e9): non-integer
#: data going higher are scaled values (TPM, FPKM, CPM...), not logged.
LOG_MAX = 30.0
#: Row sums this close to constant (coefficient of variation) mark counts scaled per cell
#: to a common total (CP10k, CPM, TPM of all genes).
CONSTANT_SUM_CV = 1e-3
#: The kinds of expression matrix scsnn takes (see the module docstring).
KINDS = ("counts", "scaled", "lognorm")
_KIND_WORDS = {"counts": "raw counts", "scaled": "scaled values (CPM/TPM-like, not logged)",
               "lognorm": "log-normalised values"}


def kind_words(kind: str) -> str:
    """A kind in words, for messages: ``"raw counts"``, ``"scaled values ..."``, ..."""
    return _KIND_WORDS.get(kind, kind)


def kind_action(kind: str, target_sum: float = 1e4) -> str:
    """What scsnn does with a matrix of this kind, in words."""
    if kind == "lognorm":
        return "used as given"
    return f"normalised to {target_sum:,.0f} per cell and log1p-transformed"


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


# -- writing: atomic, and refused before any work when it cannot succeed -------------------

#: errno values that mean "the disk (or the file size limit) is full"
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_WORDS = ("no space left", "file too large", "disk quota")


def _disk_full(exc: BaseException) -> str | None:
    """The reason, when ``exc`` says the disk or the file size limit is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc).lower()
    for words in _FULL_WORDS:
        if words in text:
            return words[0].upper() + words[1:]
    return None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, mode_from: Path | None = None,
                  tmp: Path | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed over ``path`` when the block ends
    without error, removed otherwise (the previous file stays untouched).

    The new file takes the mode of ``path`` if it exists, else of ``mode_from``, else the
    umask default. A full disk (or file size limit) is reported as a one-line
    :class:`InputError` that says nothing was changed.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"cannot write {p}: it is a directory")
    if tmp is None:
        tmp = temporary_beside(p)
    try:
        yield tmp
        mode = file_mode(p if p.exists() or mode_from is None else mode_from)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        reason = _disk_full(exc) if isinstance(exc, Exception) else None
        if reason is not None:
            kept = "is unchanged" if p.exists() else "was not written"
            raise InputError(f"cannot write {p}: {reason} (the disk or the file size limit "
                             f"is full); {p.name} {kept}") from None
        raise


def temporary_beside(path: Path) -> Path:
    """A new empty temporary file in ``path``'s folder (made if missing), for an atomic
    rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.h5ad", dir=path.parent)
    os.close(fd)
    return Path(name)


class BackgroundCopy:
    """A copy of the file ``src`` into a temporary file beside ``dst``, made in a background
    thread while other work goes on (the copy runs in the kernel and holds no lock), for
    :func:`write_annotations` to finish. Used as a context manager: the temporary file is
    removed at the end of the block unless it was renamed into place."""

    def __init__(self, src: str | os.PathLike, dst: str | os.PathLike) -> None:
        import shutil
        from concurrent.futures import ThreadPoolExecutor

        self.src, self.dst = Path(src), Path(dst)
        if self.dst.is_dir():
            raise InputError(f"cannot write {self.dst}: it is a directory")
        self.path = temporary_beside(self.dst)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scsnn-copy")
        self._done = self._pool.submit(shutil.copyfile, self.src, self.path)

    def wait(self) -> Path:
        """The temporary copy, once complete (an error of the copy is raised here)."""
        try:
            self._done.result()
        finally:
            self._pool.shutdown(wait=True)
        return self.path

    def __enter__(self) -> BackgroundCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the block's own error is the one to report
            pass
        self.path.unlink(missing_ok=True)  # a no-op once renamed over the destination


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse, before any work is done, a destination that cannot be written.

    ``path`` is a file to be written atomically (a temporary file is made beside it) or,
    with ``folder``, a directory to write into (a model). The nearest existing folder is
    tried with a real temporary file, so the answer holds for any user and file system.
    """
    p = Path(path)
    if folder:
        if p.exists() and not p.is_dir():
            raise InputError(f"cannot write to {p}: it exists and is not a directory")
        where = p
    else:
        if p.is_dir():
            raise InputError(f"cannot write {p}: it is a directory")
        where = p.parent
    anchor = where
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise InputError(f"cannot write {p}: {anchor} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".scsnn-write-check.", dir=anchor)
    except OSError as exc:
        raise InputError(f"cannot write {p}: the folder {anchor} is not writable "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def write_h5ad_atomic(adata: ad.AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` through a temporary file in the same folder and a rename.

    A crash or an error midway leaves the previous file untouched.
    """
    check_keys(obs=adata.obs.columns, obsm=adata.obsm.keys(), uns=adata.uns.keys(),
               layers=adata.layers.keys())
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


def check_keys(**groups: Iterable[object]) -> None:
    """Refuse slot names that HDF5 would read as paths (``/``) or that are empty: the file
    written would not read back."""
    for group, keys in groups.items():
        for key in keys:
            k = str(key)
            if not k or "/" in k:
                raise InputError(f"cannot write {group} entry {k!r}: names of {group} "
                                 "entries must be non-empty and hold no '/'")


# -- expression matrices ---------------------------------------------------------------------


@dataclass
class Expression:
    """An expression matrix taken out of an AnnData, with what it is and where it came from."""

    X: sp.csr_matrix  # cells x genes, float32, CSR
    genes: np.ndarray  # gene identifiers matching the columns of X (unique)
    kind: str  # "counts", "scaled" or "lognorm"
    source: str  # "X", "layers['name']" or "raw"
    found: str = ""  # what the values look like, in words (from inspect_values)
    #: the ``var`` table the gene names came from (for hints when few genes match)
    var: pd.DataFrame | None = field(default=None, repr=False)
    gene_column: str | None = None  # the var column used for gene names, if any

    def describe(self, target_sum: float = 1e4) -> str:
        """One line: what the matrix holds and what scsnn does with it."""
        found = self.found or kind_words(self.kind)
        return f"{self.source} holds {found}: {kind_action(self.kind, target_sum)}"


def _as_csr32(X) -> sp.csr_matrix:
    """CSR float32 in canonical form without stored zeros; the input is never modified."""
    if sp.issparse(X):
        Y = sp.csr_matrix(X, dtype=np.float32)
    else:
        Y = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    if not Y.has_canonical_format or (Y.data.size and not np.all(Y.data)):
        if sp.issparse(X) and (np.shares_memory(Y.data, X.data)
                               or np.shares_memory(Y.indices, X.indices)):
            Y = Y.copy()
        Y.sum_duplicates()
        Y.eliminate_zeros()
    return Y


def _alternatives(layers: Iterable[str], has_raw: bool, raw_genes: int | None,
                  source: str) -> str:
    """' with --layer NAME (layers: a, b) or --use-raw (...)': the other matrices to try."""
    others = [str(k) for k in layers if f"layers['{k}']" != source]
    parts = []
    if others:
        shown = ", ".join(others[:6]) + (", ..." if len(others) > 6 else "")
        parts.append(f"--layer NAME (layers here: {shown})")
    if has_raw and source != "raw":
        parts.append("--use-raw" + (f" (.raw holds {raw_genes} genes)" if raw_genes else ""))
    if not parts:
        return " with --layer or --use-raw (this file has no other layer and no .raw)"
    return " with " + " or ".join(parts)


def _adata_alternatives(adata: ad.AnnData, source: str) -> str:
    raw = adata.raw
    return _alternatives(adata.layers.keys(), raw is not None,
                         raw.n_vars if raw is not None else None, source)


def check_values(X: sp.csr_matrix, *, source: str = "X", alternatives: str = "") -> None:
    """Refuse NaN, infinite and negative expression values with a one-line error.

    ``alternatives`` ends the message: the other matrices of the file to give instead."""
    data = X.data
    if not np.all(np.isfinite(data)):
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"expression matrix in {source} has {n_bad} NaN or infinite values; "
                         f"give a matrix without them{alternatives or ' (--layer, --use-raw)'}")
    if data.size and data.min() < 0:
        raise InputError(
            f"expression matrix in {source} has negative values (down to {data.min():.3g}): it "
            "looks scaled or centred (z-scores), which cannot be turned back into expression "
            "levels; give raw counts or log-normalised values"
            f"{alternatives or ', e.g. with --layer or --use-raw'}"
        )


@dataclass(frozen=True)
class Detection:
    """What an expression matrix holds: one of :data:`KINDS`, and the evidence in words."""

    kind: str
    found: str


def _g(x: float) -> str:
    """A number for messages: 419, 7.47, 4.2e+05."""
    x = float(x)
    return f"{x:,.0f}" if 100 <= abs(x) < 1e5 else f"{x:.3g}"


def inspect_values(X: sp.csr_matrix, *, max_values: int = 200_000, max_rows: int = 2_000,
                   seed: int = 0, source: str = "X", alternatives: str = "") -> Detection:
    """Tell raw counts, scaled values (CPM/TPM-like) and log-scale values apart.

    ``counts``: every value an integer (to 1e-3) and some above 1. ``scaled``: non-integer
    values that are not on a log scale: every cell sums to the same total (CP10k, CPM, TPM),
    or values above :data:`LOG_MAX`. ``lognorm``: other non-integer values (and 0/1 data).
    Refuses NaN, infinite and negative values (scaled data must be given unscaled).
    Values are judged on a random sample of ``max_values`` values; row sums on every cell.
    """
    check_values(X, source=source, alternatives=alternatives)
    data = X.data
    if data.size == 0:
        raise InputError(f"expression matrix in {source} holds only zeros")
    if data.size > max_values:
        rng = np.random.default_rng(seed)
        sample = data[rng.choice(data.size, size=max_values, replace=False)]
    else:
        sample = data
    top = float(data.max())
    integer = bool(np.all(np.abs(sample - np.round(sample)) < _INTEGER_TOL))
    if integer and top > 1.0:
        return Detection("counts", f"raw counts (integers up to {_g(top)})")
    sums = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    sums = sums[sums > 0]
    constant = sums.size >= 2 and sums.std() <= CONSTANT_SUM_CV * sums.mean()
    if not integer and constant:
        return Detection("scaled", f"scaled values, not logged (non-integer, up to {_g(top)}; "
                                   f"every cell sums to {_g(np.median(sums))}: CP10k/CPM/"
                                   "TPM-like)")
    if not integer and top > LOG_MAX:
        return Detection("scaled", f"scaled values, not logged (non-integer, up to {_g(top)}, "
                                   f"far above a log scale: TPM/FPKM/CPM-like)")
    if integer:
        return Detection("lognorm", "0/1 values (binary)")
    # log-scale: say whether it is log1p of values with a common total (LogNormalize)
    rows = np.flatnonzero(np.diff(X.indptr))[:max_rows]
    lin = X[rows].astype(np.float64)
    lin.data = np.expm1(lin.data)
    lsums = np.asarray(lin.sum(axis=1)).ravel()
    how = ""
    if lsums.size >= 2 and lsums.std() <= 0.02 * lsums.mean():
        how = f"; log1p of values summing to {_g(np.median(lsums))} per cell"
    return Detection("lognorm", f"log-scale values (non-integer, up to {_g(top)}{how})")


def detect_kind(X: sp.csr_matrix, *, max_values: int = 200_000, seed: int = 0) -> str:
    """``"counts"``, ``"scaled"`` or ``"lognorm"`` (see :func:`inspect_values`).

    Refuses NaN, infinite and negative values: those are not expression levels that
    scsnn can normalise (scaled data must be given unscaled, as counts or log1p values).
    """
    return inspect_values(X, max_values=max_values, seed=seed).kind


# -- gene names: missing and duplicated names ------------------------------------------------


@dataclass(frozen=True)
class GenePlan:
    """How the columns of a matrix become genes with unique names: columns without a name
    are left out, columns that share a name are summed (see :func:`plan_genes`)."""

    keep: np.ndarray | None  # columns kept (those with a name), or None for all
    codes: np.ndarray | None  # for each kept column, its gene; None when names are unique
    genes: np.ndarray  # the unique gene names
    unnamed: str = ""  # what was left out, in words
    duplicated: str = ""  # which names occur more than once, in words

    def message(self, kind: str) -> str:
        """The warning to give for a matrix of this kind ('' when nothing is done)."""
        msgs = [self.unnamed] if self.unnamed else []
        if self.duplicated:
            how = (" on the linear scale (log1p of the summed expm1)" if kind == "lognorm"
                   else "")
            msgs.append(f"{self.duplicated}: {DUPLICATE_RULE}{how}")
        return "; ".join(msgs)

    def apply(self, X: sp.csr_matrix, kind: str) -> sp.csr_matrix:
        """The matrix with the plan's columns: duplicated names summed (log-scale values on
        the linear scale: ``log1p(sum(expm1(x)))``)."""
        if self.keep is not None:
            X = X[:, self.keep]
        if self.codes is None:
            return X
        n = X.shape[1]
        S = sp.csr_matrix((np.ones(n), (np.arange(n), self.codes)),
                          shape=(n, len(self.genes)))
        if kind != "lognorm":
            return sp.csr_matrix(X.astype(np.float64) @ S, dtype=np.float32)
        lin = X.astype(np.float64)
        lin.data = np.expm1(lin.data)
        out = sp.csr_matrix(lin @ S)
        out.data = np.log1p(out.data)
        return sp.csr_matrix(out, dtype=np.float32)


#: Rule for duplicated gene names (see docs/inputs.md): log-scale values are summed on the
#: linear scale, ``log1p(sum(expm1(x)))``.
DUPLICATE_RULE = "the columns of each name are summed into one gene"


def plan_genes(genes: np.ndarray, *, where: str = "X") -> GenePlan:
    """The gene names of a matrix made usable: unnamed columns (empty, NaN, 'nan') left out,
    columns that share a name summed into one gene, with a warning that says how many and
    shows a few."""
    names = pd.Index(np.asarray(genes, dtype=object))
    missing = names.isna() | np.isin(names.astype(str).str.strip(), ["", "nan", "NaN", "None"])
    keep, unnamed = None, ""
    if missing.any():
        keep = np.flatnonzero(~missing)
        unnamed = (f"{int(missing.sum())} of {len(names)} columns of {where} have no gene "
                   "name and are left out")
        names = names[keep]
    names = names.astype(str)
    codes, uniques = pd.factorize(names)
    if len(uniques) == len(names):
        return GenePlan(keep, None, np.asarray(names, dtype=object).astype(str), unnamed)
    counts = pd.Series(codes).value_counts()
    dup = counts[counts > 1]
    examples = ", ".join(f"{uniques[c]!r} ({n})" for c, n in dup.head(3).items())
    duplicated = (f"{len(dup)} gene names occur more than once in {where} ({int(dup.sum())} "
                  f"columns), e.g. {examples}")
    return GenePlan(keep, codes, np.asarray(uniques, dtype=object).astype(str), unnamed,
                    duplicated)


def _gene_names(var: pd.DataFrame, gene_symbols: str | None) -> np.ndarray:
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            cols = [c for c in var.columns if var[c].dtype == object or
                    isinstance(var[c].dtype, pd.CategoricalDtype)]
            have = ", ".join(map(str, cols[:8])) or "none"
            raise InputError(f"var column '{gene_symbols}' not found (for gene symbols; "
                             f"text columns: {have})")
        return var[gene_symbols].astype(object).to_numpy()
    return np.asarray(var.index.astype(str))


def get_expression(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_symbols: str | None = None,
) -> Expression:
    """Take the expression matrix from ``X``, ``layers[layer]`` or ``raw``, as CSR float32.

    ``gene_symbols`` names a ``var`` column whose values identify genes instead of ``var_names``.
    The kind of values is judged by :func:`inspect_values`; duplicated gene names are summed
    and unnamed columns left out, with a warning (:func:`plan_genes`).
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
    genes = _gene_names(var, gene_symbols)
    det = inspect_values(X, source=source, alternatives=_adata_alternatives(adata, source))
    plan = plan_genes(genes, where=source)
    if plan.message(det.kind):
        logger.warning("%s", plan.message(det.kind))
    X = plan.apply(X, det.kind)
    if X.shape[1] == 0:
        raise InputError(f"no column of {source} has a gene name")
    return Expression(X=X, genes=plan.genes, kind=det.kind, source=source, found=det.found,
                      var=var, gene_column=gene_symbols)


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

    Duplicated query genes: the first column is used (:func:`get_expression` has already
    summed them).
    """
    index = pd.Index(query_genes)
    if not index.is_unique:
        first = ~index.duplicated(keep="first")
        index = pd.Index(np.asarray(query_genes)[first])
        cols = np.flatnonzero(first)
        pos = index.get_indexer(model_genes)
        return np.where(pos >= 0, cols[np.clip(pos, 0, None)], -1)
    return index.get_indexer(model_genes)


_VERSION = re.compile(r"\.\d+$")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def _overlap(a: Iterable[str], b: set[str]) -> int:
    return len(set(a) & b)


def _example(names: Iterable[str], pattern=None) -> str:
    for n in names:
        if pattern is None or pattern.search(str(n)):
            return str(n)
    return ""


def gene_match_hint(query_genes: np.ndarray, model_genes: list[str],
                    var: pd.DataFrame | None = None, gene_column: str | None = None) -> str:
    """Why few of the model's genes are found in a query, and what would match better:
    version suffixes (``ENSG...15`` vs ``ENSG...``), letter case, Ensembl IDs against symbols,
    or a ``var`` column (``--gene-symbols COLUMN``). '' when nothing would."""
    q = [str(g) for g in query_genes]
    m = [str(g) for g in model_genes]
    ms = set(m)
    n0 = _overlap(q, ms)
    need = max(n0 + max(1, len(ms) // 10), int(n0 * 1.2))  # "much better"
    hints = []
    # a var column holding the model's names
    best, best_n = None, n0
    if var is not None:
        for col in var.columns:
            if col == gene_column:
                continue
            s = var[col]
            if not (s.dtype == object or isinstance(s.dtype, pd.CategoricalDtype)
                    or pd.api.types.is_string_dtype(s.dtype)):
                continue
            n = _overlap(s.dropna().astype(str), ms)
            if n > best_n:
                best, best_n = col, n
        if gene_column is not None:
            n = _overlap(var.index.astype(str), ms)
            if n >= need and n > best_n:
                hints.append(f"var_names match {n} of them: leave out --gene-symbols")
    if best is not None and best_n >= need:
        hints.append(f"var['{best}'] matches {best_n} of them: use --gene-symbols {best}")
    def strip(names: list[str]) -> set[str]:
        return {_VERSION.sub("", g) for g in names}

    n1 = len(strip(q) & strip(m))
    if n1 >= need:
        qf = np.mean([bool(_VERSION.search(g)) for g in q[:2000]]) if q else 0.0
        mf = np.mean([bool(_VERSION.search(g)) for g in m[:2000]]) if m else 0.0
        if qf > mf + 0.5:
            which = (f"the query's IDs carry version suffixes ({_example(q, _VERSION)}) and "
                     "the model's do not")
        elif mf > qf + 0.5:
            which = (f"the model's IDs carry version suffixes ({_example(m, _VERSION)}) and "
                     "the query's do not")
        else:
            which = "the version suffixes differ"
        hints.append(f"{which}: without the suffixes {n1} match (strip them, e.g. "
                     "var_names.str.replace(r'\\.\\d+$', '', regex=True))")
    upper_m = {g.upper(): g for g in m}
    pairs = [(g, upper_m[g.upper()]) for g in q if g.upper() in upper_m and g not in ms]
    n2 = len({g.upper() for g in q} & set(upper_m))
    if n2 >= need and pairs:
        hints.append(f"gene names differ in letter case ({pairs[0][0]} vs {pairs[0][1]}; "
                     f"{n2} match ignoring case): another species, or names to recase")
    q_ens = np.mean([bool(_ENSEMBL.match(g)) for g in q[:2000]]) if q else 0.0
    m_ens = np.mean([bool(_ENSEMBL.match(g)) for g in m[:2000]]) if m else 0.0
    if not hints and abs(q_ens - m_ens) > 0.5:
        qa, ma = ("Ensembl IDs", "symbols") if q_ens > m_ens else ("symbols", "Ensembl IDs")
        hints.append(f"the query names genes by {qa} ({_example(q)}), the model by {ma} "
                     f"({_example(m)}): give the var column of {ma} with --gene-symbols")
    return "; ".join(hints)


# -- row blocks of files too large to load, and predictions written back without X ---------


class H5adRows:
    """Row blocks of one expression matrix of an ``.h5ad`` file, read without loading it.

    The matrix is ``X``, ``layers[layer]`` or ``raw/X``; CSR-stored matrices (the usual
    layout of single-cell data) and dense ones are read block by block. Use it as a
    context manager, or call :meth:`close`.

    :meth:`block` and :meth:`read_rows` give the file's columns (``genes``, as stored);
    :meth:`expression` and :meth:`expression_rows` give genes with unique names, as
    :func:`get_expression` does (duplicated names summed, unnamed columns left out).
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
            layers = list(f["layers"].keys()) if "layers" in f else []
            raw_genes = None
            if "raw" in f and "var" in f["raw"]:
                with contextlib.suppress(Exception):
                    raw_genes = len(read_elem(f["raw/var"]))
            self._alternatives = _alternatives(layers, "raw" in f, raw_genes, self.source)
        except InputError:
            self._file.close()
            raise
        except Exception as exc:
            self._file.close()
            raise InputError(f"cannot read {p} as .h5ad: {type(exc).__name__}: {exc}") from None
        if self.n_obs == 0 or self.n_vars == 0:
            self._file.close()
            raise InputError(f"{p} holds no data ({self.n_obs} cells x {self.n_vars} genes)")
        try:
            names = _gene_names(var, gene_symbols)
        except InputError:
            self._file.close()
            raise
        self.genes = np.asarray(names, dtype=object).astype(str)
        self.var = var
        self.gene_column = gene_symbols
        self._plan = plan_genes(names, where=f"{self.source} of {p.name}")
        self._warned = False
        self.detection: Detection | None = None
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

    def _checked(self, X) -> sp.csr_matrix:
        X = _as_csr32(X)
        check_values(X, source=self.source, alternatives=self._alternatives)
        return X

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32, checked for NaN and negative values."""
        return self._checked(self._mat[start:stop])

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The cells at the sorted, distinct positions ``rows``, as CSR float32 (checked)."""
        return self._checked(self._mat[np.asarray(rows, dtype=np.int64)])

    def _expression(self, X: sp.csr_matrix, kind: str) -> Expression:
        if self._plan.message(kind) and not self._warned:
            logger.warning("%s", self._plan.message(kind))
            self._warned = True
        if len(self._plan.genes) == 0:
            raise InputError(f"no column of {self.source} has a gene name")
        det = self.detection
        return Expression(X=self._plan.apply(X, kind), genes=self._plan.genes, kind=kind,
                          source=self.source, found=det.found if det else "", var=self.var,
                          gene_column=self.gene_column)

    def expression(self, start: int, stop: int, kind: str) -> Expression:
        """Rows ``start:stop`` as an :class:`Expression` of the given kind."""
        return self._expression(self.block(start, stop), kind)

    def expression_rows(self, rows: np.ndarray, kind: str) -> Expression:
        """The cells at the sorted, distinct positions ``rows`` as an :class:`Expression`."""
        return self._expression(self.read_rows(rows), kind)

    def detect_kind(self, max_rows: int = 65_536) -> str:
        """Counts, scaled or log-normalised, judged on the first ``max_rows`` cells (the
        evidence is kept in :attr:`detection`)."""
        self.detection = inspect_values(self.block(0, min(self.n_obs, max_rows)),
                                        source=self.source, alternatives=self._alternatives)
        return self.detection.kind


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
    copy: BackgroundCopy | None = None,
) -> None:
    """Write obs columns, obsm entries and uns entries into a copy of the ``.h5ad`` file
    ``src`` saved as ``dst`` (which may be ``src`` itself), without loading ``X``.

    The copy is made in ``dst``'s folder and renamed over ``dst`` when complete, so an error
    midway leaves both files as they were. ``copy``: that copy, already started in the
    background (:class:`BackgroundCopy` of ``src`` to ``dst``).
    """
    import shutil

    import h5py
    from anndata.io import read_elem, write_elem

    s = Path(src)
    check_keys(obs=obs.keys(), obsm=obsm.keys(), uns=uns.keys())
    if copy is not None and (copy.src != s or copy.dst != Path(dst)):
        raise ValueError("the background copy is of another file or destination")
    with atomic_output(dst, mode_from=s, tmp=None if copy is None else copy.path) as tmp:
        if copy is None:
            shutil.copyfile(s, tmp)
        else:
            copy.wait()
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


def kind_mismatch(query_kind: str, reference_kind: str,
                  target_sum: float = 1e4) -> tuple[int, str] | None:
    """``(logging level, one line)`` when a query's kind differs from the reference's, else
    None. Counts and scaled values meet in the same space (log1p of ``target_sum`` per
    cell); log-normalised values used as given meet it only if they are that too."""
    if query_kind == reference_kind:
        return None
    space = f"log1p of values scaled to {target_sum:,.0f} per cell"
    q, r = kind_words(query_kind), kind_words(reference_kind)
    if query_kind != "lognorm" and reference_kind != "lognorm":
        return logging.INFO, (f"the query holds {q}, the model's reference held {r}: both are "
                              f"brought to {space} (CP10k/CPM then match counts exactly; "
                              "TPM/FPKM, divided by gene length, only approximately)")
    if query_kind == "lognorm":
        return logging.WARNING, (
            f"the query holds {q} (used as given) but the model's reference held {r} "
            f"(brought to {space}): the predictions hold only if the query is {space} too "
            "(scanpy normalize_total + log1p); else give its counts with --layer or --use-raw")
    return logging.WARNING, (
        f"the query holds {q} (brought to {space}) but the model's reference held {r} (used "
        f"as given): the predictions hold only if the reference was {space} too")


# -- resources known in advance ----------------------------------------------------------------

#: Environment variable that caps (or, with ``off``, disables) the memory check.
MEMORY_ENV = "SCSNN_MEMORY_LIMIT"


@dataclass(frozen=True)
class MatrixInfo:
    """The size of an ``.h5ad`` expression matrix, read from the file's metadata."""

    n_obs: int
    n_vars: int
    nnz: int  # stored values (cells x genes for a dense matrix)
    dense: bool
    itemsize: int


def matrix_info(path: str | os.PathLike, *, layer: str | None = None,
                use_raw: bool = False) -> MatrixInfo | None:
    """Cells, genes and stored values of ``X`` (or a layer, or ``raw/X``) without reading
    it; None when the file cannot tell (the reader then says why)."""
    import h5py

    loc = "raw/X" if use_raw else f"layers/{layer}" if layer is not None else "X"
    try:
        with h5py.File(path, "r") as f:
            elem = f[loc]
            if isinstance(elem, h5py.Group):
                n, g = (int(x) for x in elem.attrs["shape"])
                data = elem["data"]
                return MatrixInfo(n, g, int(data.shape[0]), False, int(data.dtype.itemsize))
            n, g = (int(x) for x in elem.shape)
            return MatrixInfo(n, g, n * g, True, int(elem.dtype.itemsize))
    except Exception:
        return None


def n_labels(path: str | os.PathLike, label_key: str) -> int | None:
    """Distinct values of ``obs[label_key]`` of an ``.h5ad`` file, read without the rest."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            col = f["obs"][label_key]
            if isinstance(col, h5py.Group) and "categories" in col:
                return int(col["categories"].shape[0])
            return int(pd.Series(read_elem(col)).nunique())
    except Exception:
        return None


def _parse_bytes(text: str) -> int | None:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def available_memory() -> int | None:
    """Bytes this process may still allocate: ``SCSNN_MEMORY_LIMIT`` when set (``off``:
    None, no check), else the memory available on the machine, capped by the cgroup limit.
    None when unknown."""
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        if env.lower() in ("off", "none", "0", "no"):
            return None
        value = _parse_bytes(env)
        if value is None:
            raise InputError(f"{MEMORY_ENV}={env!r}: give bytes, e.g. 8G or 512M, or off")
        return value
    avail = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    return avail


#: Memory of the libraries and a model, besides the data (measured: about 300-400 MB).
_BASE_BYTES = 400 << 20
#: Bytes per stored value of a CSR float32 matrix (value + column index).
_CSR_BYTES = 12


def train_bytes(info: MatrixInfo, n_cells: int, n_classes: int) -> int:
    """Peak memory of :func:`scsnn.tl.train` on ``n_cells`` cells of this matrix: the read
    matrix and its normalised copies (about 4.5 times the CSR size, measured on pbmc3k x 8),
    the per-class marker statistics, a dense file read whole."""
    frac = n_cells / max(info.n_obs, 1)
    csr = info.nnz * frac * _CSR_BYTES
    dense = n_cells * info.n_vars * info.itemsize * 2 if info.dense else 0
    return int(_BASE_BYTES + 4.5 * csr + dense + n_classes * info.n_vars * 8 * 6)


def annotate_bytes(info: MatrixInfo, n_cells: int, block_cells: int, n_model_genes: int,
                   n_classes: int, timesteps: int, batch_size: int) -> int:
    """Peak memory of :func:`scsnn.tl.annotate_file` on ``n_cells`` cells read
    ``block_cells`` at a time: a block and its projections, a dense mini-batch, and the
    predictions of every cell (probabilities, logits, the label and confidence per step)."""
    block = min(block_cells, n_cells)
    csr = info.nnz * block / max(info.n_obs, 1) * _CSR_BYTES
    dense = block * info.n_vars * info.itemsize * 2 if info.dense else 0
    per_cell = n_classes * 24 + timesteps * 12 + 64
    batch = min(batch_size, n_cells) * n_model_genes * 4 * 4
    return int(_BASE_BYTES // 2 + 2.5 * csr + dense + n_cells * per_cell + batch)


def train_advice(info: MatrixInfo, n_cells: int, n_classes: int, avail: int, *,
                 sampled: bool = False, stream: bool = False) -> str:
    """The option that makes a training job fit in ``avail`` bytes: a sample of as many
    cells as fit (``--max-cells``, with or without ``--stream``)."""
    fit = n_cells
    while fit > 2 and train_bytes(info, fit, n_classes) > 0.9 * avail:
        fit = int(fit * 0.8)
    if train_bytes(info, max(fit, 2), n_classes) > 0.9 * avail:
        return "even a small sample does not fit: free memory, or use a larger machine"
    if not sampled:
        return (f"train on a class-balanced sample with --max-cells {fit}, or read the "
                f"mini-batches from disk with --stream --max-cells {fit}")
    return f"lower --max-cells (e.g. --max-cells {fit}{' --stream' if stream else ''})"


def annotate_advice(info: MatrixInfo, n_cells: int, block: int, n_model_genes: int,
                    n_classes: int, timesteps: int, batch_size: int, avail: int) -> str:
    """The option that makes an annotation fit in ``avail`` bytes: smaller blocks
    (``--chunk-size``), or parts (``--chunk I/N``, gathered after) when the predictions of
    every cell alone are too much."""
    args = (n_model_genes, n_classes, timesteps, batch_size)
    fit = block
    while fit > batch_size and annotate_bytes(info, n_cells, fit, *args) > 0.9 * avail:
        fit = max(batch_size, fit // 2)
    if annotate_bytes(info, n_cells, fit, *args) <= 0.9 * avail:
        return f"read smaller blocks with --chunk-size {fit}"
    parts = 2
    while parts < 4096 and annotate_bytes(info, -(-n_cells // parts), batch_size,
                                          *args) > 0.9 * avail:
        parts *= 2
    if annotate_bytes(info, -(-n_cells // parts), batch_size, *args) > 0.9 * avail:
        return "even one small block does not fit: free memory, or use a larger machine"
    return (f"lower --chunk-size (e.g. {batch_size}) and annotate in {parts} parts with "
            f"--chunk I/{parts} --output PART, then scsnn gather")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(need: int, doing: str, advice) -> None:
    """Refuse a job whose estimated peak memory ``need`` exceeds what is available, with a
    message that names the job and the option that bounds it: ``advice``, a string or a
    function of the available bytes that returns one."""
    avail = available_memory()
    if avail is None or need <= avail:
        return
    text = advice(avail) if callable(advice) else advice
    raise InputError(f"{doing} needs about {_gib(need)} of memory, but about {_gib(avail)} is "
                     f"available: {text} (or set {MEMORY_ENV}=off to try anyway)")
