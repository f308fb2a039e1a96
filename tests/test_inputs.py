"""Every input a lab sends gets a right answer or a clear refusal.

``CASES`` is the table of inputs tried through the command line: what the input is, the
exit code, and the words its message (the error line, or the line that says what was found
and done) must hold. ``docs/inputs.md`` shows the same table with the messages of a real
run; ``test_docs_table_matches_the_cases`` keeps the two in step. Regenerate the docs table
with ``python tests/test_inputs.py`` (it runs every case and prints the rows).

The forms of expression matrix (counts, integer-valued floats, CP10k, CPM, TPM, FPKM, log1p
of those, z-scores) are built from the real pbmc3k and pbmc68k_reduced counts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import DATA_DIR, assert_one_line, shared_file
from typer.testing import CliRunner

import scsnn
from scsnn import io
from scsnn.cli import app
from scsnn.errors import InputError
from scsnn.pp import log_normalize

DOCS = Path(__file__).resolve().parents[1] / "docs" / "inputs.md"
runner = CliRunner()
#: the inputs hold duplicated names on purpose: anndata warns about them
pytestmark = pytest.mark.filterwarnings("ignore:.*names are not unique:UserWarning")


# -- the forms of a count matrix -------------------------------------------------------------


def gene_lengths(n_genes: int, seed: int = 0) -> np.ndarray:
    """Gene lengths in bases for TPM/FPKM-like matrices (log-normal, about 2 kb)."""
    return np.random.default_rng(seed).lognormal(np.log(2000.0), 0.6, n_genes)


def subset_genes(n_genes: int) -> np.ndarray:
    """The genes of the ``tpm_subset`` form: two thirds, drawn at random."""
    return np.sort(np.random.default_rng(1).choice(n_genes, n_genes * 2 // 3, replace=False))


def forms(counts: sp.csr_matrix) -> dict[str, sp.csr_matrix]:
    """The forms people hand over, from one count matrix (cells x genes)."""
    X = sp.csr_matrix(counts, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    total[total == 0] = 1.0
    length = gene_lengths(X.shape[1])

    def per_cell(M, target):
        s = np.asarray(M.sum(1)).ravel()
        s[s == 0] = 1.0
        return sp.csr_matrix(sp.diags(target / s) @ M)

    def log(M, f=np.log1p):
        M = M.copy()
        M.data = f(M.data)
        return M

    cp10k = per_cell(X, 1e4)
    cpm = per_cell(X, 1e6)
    tpm = per_cell(X @ sp.diags(1.0 / length), 1e6)  # reads per base, scaled to 1e6
    fpkm = sp.csr_matrix(sp.diags(1e9 / total) @ X @ sp.diags(1.0 / length))
    keep = subset_genes(X.shape[1])
    return {
        "counts": X,
        "cp10k": cp10k,
        "cpm": cpm,
        "tpm": tpm,
        "tpm_subset": sp.csr_matrix(tpm[:, keep]),  # row sums no longer constant
        "fpkm": fpkm,
        "log1p_cp10k": log(cp10k),
        "log1p_tpm": log(tpm),
        "log2_tpm": log(tpm, lambda v: np.log2(v + 1)),
    }


EXPECTED_KIND = {"counts": "counts", "cp10k": "scaled", "cpm": "scaled", "tpm": "scaled",
                 "tpm_subset": "scaled", "fpkm": "scaled", "log1p_cp10k": "lognorm",
                 "log1p_tpm": "lognorm", "log2_tpm": "lognorm"}


@pytest.fixture(scope="module")
def pbmc3k_forms():
    a = scsnn.read_h5ad(shared_file("pbmc3k.h5ad"))
    return a, forms(a.X)


@pytest.mark.parametrize("form", list(EXPECTED_KIND))
def test_each_form_of_pbmc3k_is_detected(pbmc3k_forms, form):
    a, fs = pbmc3k_forms
    var = a.var.iloc[subset_genes(a.n_vars)] if form == "tpm_subset" else a.var
    b = ad.AnnData(X=sp.csr_matrix(fs[form], dtype=np.float32), var=var)
    ex = io.get_expression(b)
    assert ex.kind == EXPECTED_KIND[form], (form, ex.found)
    assert ex.describe()
    Y = log_normalize(ex)
    assert np.all(np.isfinite(Y.data)) and Y.data.min() >= 0
    assert Y.data.max() < 20  # on the model's log scale


def test_scaled_forms_become_log1p_cp10k(pbmc3k_forms):
    """CP10k and CPM become exactly what counts become; TPM becomes log1p(TPM / 100)."""
    _, fs = pbmc3k_forms
    rows = slice(0, 400)

    def lognorm(form):
        X = sp.csr_matrix(fs[form][rows], dtype=np.float32)
        return log_normalize(io.get_expression(ad.AnnData(X=X)))

    ref = lognorm("counts")
    for form in ("cp10k", "cpm"):
        assert abs(lognorm(form) - ref).max() < 2e-4, form
    tpm = fs["tpm"][rows].astype(np.float64)
    want = tpm.copy()
    want.data = np.log1p(want.data / 100)
    assert abs(lognorm("tpm") - want).max() < 1e-4


def test_dtypes_of_counts(pbmc3k_forms):
    _, fs = pbmc3k_forms
    dense = fs["counts"][:300].toarray()
    for dtype in (np.int16, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64):
        ex = io.get_expression(ad.AnnData(X=dense.astype(dtype)))
        assert ex.kind == "counts" and ex.X.dtype == np.float32, dtype
        np.testing.assert_array_equal(ex.X.toarray(), dense.astype(np.float32))


def test_every_shared_file_keeps_its_kind(data_dir):
    """Counts files stay counts, log-normalised ones lognorm (hnscc/melanoma included)."""
    for p in sorted(data_dir.glob("*.h5ad")):
        a = scsnn.read_h5ad(p)
        want = "counts" if str(a.uns["X_type"]).startswith("raw_counts") else "lognorm"
        assert io.get_expression(a).kind == want, p.name
        with io.H5adRows(p) as rows:
            assert rows.detect_kind() == want, p.name


def test_scaled_and_lognorm_rules_at_the_edges():
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(50, 40)).astype(np.float64)
    X[X.sum(1) == 0, 0] = 1
    cp = X / X.sum(1, keepdims=True) * 1e4
    assert io.inspect_values(sp.csr_matrix(cp)).kind == "scaled"  # constant sums
    sub = cp[:, :20]
    assert sub.max() > io.LOG_MAX and io.inspect_values(sp.csr_matrix(sub)).kind == "scaled"
    small = np.log1p(cp)
    det = io.inspect_values(sp.csr_matrix(small))
    assert det.kind == "lognorm" and "summing to 10,000" in det.found
    one = sp.csr_matrix(small[:1])  # a single cell: no row-sum rule, the values decide
    assert io.inspect_values(one).kind == "lognorm"
    assert io.inspect_values(sp.csr_matrix(cp[:1])).kind == "scaled"
    with pytest.raises(InputError, match=r"negative values \(down to -1\.5\).*--layer") as ei:
        io.inspect_values(sp.csr_matrix(np.array([[1.0, -1.5]])))
    assert_one_line(str(ei.value))


# -- gene names --------------------------------------------------------------------------------


def test_duplicated_genes_are_summed_with_a_warning(caplog):
    X = np.array([[1, 2, 3, 4], [0, 5, 0, 6]], dtype=np.float32)
    a = ad.AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=["A", "B", "A", "C"]))
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        ex = io.get_expression(a)
    assert list(ex.genes) == ["A", "B", "C"]
    np.testing.assert_array_equal(ex.X.toarray(), [[4, 2, 4], [0, 5, 6]])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "1 gene names occur more than once in X (2 columns), e.g. 'A' (2)" in msg
    assert "summed" in msg and "\n" not in msg
    # log-scale values are summed on the linear scale
    L = np.log1p(X * 1.5)
    ex = io.get_expression(ad.AnnData(X=sp.csr_matrix(L), var=a.var))
    assert ex.kind == "lognorm"
    np.testing.assert_allclose(ex.X.toarray()[:, 0], np.log1p(np.expm1(L[:, 0]) +
                                                              np.expm1(L[:, 2])), rtol=1e-6)


def test_unnamed_genes_are_left_out(caplog):
    X = sp.csr_matrix(np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32))
    var = pd.DataFrame({"symbol": ["A", None, ""]}, index=["e1", "e2", "e3"])
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        ex = io.get_expression(ad.AnnData(X=X, var=var), gene_symbols="symbol")
    assert list(ex.genes) == ["A"] and ex.X.shape == (2, 1)
    assert "2 of 3 columns of X have no gene name" in caplog.text


def test_h5ad_rows_sum_duplicated_genes_like_in_memory(tmp_path, caplog):
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(30, 6)).astype(np.float32)
    names = ["A", "B", "A", "C", "B", "A"]
    a = ad.AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=names))
    p = tmp_path / "d.h5ad"
    a.write_h5ad(p)
    mem = io.get_expression(a)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scsnn"), io.H5adRows(p) as rows:
        kind = rows.detect_kind()
        e1 = rows.expression(0, 30, kind)
        e2 = rows.expression_rows(np.arange(5, 12), kind)
    assert list(e1.genes) == list(mem.genes) == ["A", "B", "C"]
    np.testing.assert_array_equal(e1.X.toarray(), mem.X.toarray())
    np.testing.assert_array_equal(e2.X.toarray(), mem.X[5:12].toarray())
    assert caplog.text.count("occur more than once") == 1  # warned once per file


@pytest.mark.parametrize("case,fragment", [
    ("version", "version suffixes"),
    ("case", "letter case"),
    ("column", "use --gene-symbols symbol"),
    ("ensembl", "Ensembl IDs"),
    ("back", "leave out --gene-symbols"),
])
def test_gene_match_hints(case, fragment):
    model = [f"ENSG{i:011d}" for i in range(200)]
    symbols = [f"GENE{i}" for i in range(200)]
    if case == "version":
        q, var, col = [g + ".15" for g in model], None, None
    elif case == "case":
        q, var, col, model = [s.capitalize() for s in symbols], None, None, symbols
    elif case == "column":
        q, col = model, None
        var, model = pd.DataFrame({"symbol": symbols, "n": range(200)}, index=q), symbols
    elif case == "ensembl":
        q, var, col = model, None, None
        model = symbols
    else:  # --gene-symbols given, but var_names are what the model uses
        var = pd.DataFrame({"symbol": symbols}, index=model)
        q, col = symbols, "symbol"
    hint = io.gene_match_hint(np.asarray(q), model, var, col)
    assert fragment in hint, hint
    assert "\n" not in hint
    assert io.gene_match_hint(np.asarray(model), model) == ""  # nothing to explain


# -- the command line: the table of inputs ----------------------------------------------------


@dataclass
class Ctx:
    """What a case builds on: a folder, the counts query (pbmc68k_reduced, 240 cells), the
    model trained on its counts (conftest's pbmc_model_dir), a small reference."""

    tmp: Path
    base: ad.AnnData
    model: Path
    ref: ad.AnnData

    def write(self, name: str, adata: ad.AnnData) -> Path:
        p = self.tmp / name
        adata.write_h5ad(p)
        return p

    def query(self, name: str, fn: Callable[[ad.AnnData], ad.AnnData | None]) -> Path:
        a = self.base.copy()
        return self.write(name, fn(a) or a)

    def with_x(self, name: str, X) -> Path:
        def put(a):
            a.X = X
        return self.query(name, put)


@dataclass
class Case:
    id: str
    what: str  # the input, in words (the docs table's first column)
    build: Callable[[Ctx], list[str]]  # the command line
    code: int  # the exit code
    fragments: tuple[str, ...]  # words the message must hold
    env: Callable[[Ctx], dict[str, str]] | None = None  # environment of the run
    same_labels_as_counts: bool = False  # the predictions equal those of the counts query


def _annotate(q: Path, ctx: Ctx, *extra: str, model: Path | None = None,
              out: Path | None = None) -> list[str]:
    out = out if out is not None else ctx.tmp / f"{q.stem}.out.h5ad"
    return ["annotate", str(q), "-m", str(model or ctx.model), "-o", str(out), "--device",
            "cpu", *extra]


def _form(name: str):
    def build(ctx: Ctx) -> list[str]:
        X = sp.csr_matrix(forms(ctx.base.X)[name], dtype=np.float32)
        if name == "tpm_subset":
            def put(a):
                b = a[:, subset_genes(a.n_vars)].copy()
                b.X = X
                return b
            return _annotate(ctx.query(f"{name}.h5ad", put), ctx)
        return _annotate(ctx.with_x(f"{name}.h5ad", X), ctx)
    return build


def _set_value(value: float):
    def fn(a):
        X = a.X.toarray()
        X[3, 5] = value
        a.X = sp.csr_matrix(X)
    return fn


def _zscored(a):
    a.layers["counts"] = a.X.copy()
    X = np.log1p(a.X.toarray())
    a.X = sp.csr_matrix((X - X.mean(0)) / (X.std(0) + 1e-6))


def _dup_genes(a):
    names = list(a.var_names)
    names[1], names[3], names[5] = names[0], names[2], names[2]
    a.var_names = names


def _unnamed(a):
    a.var["symbol"] = ["" if i % 10 == 0 else g for i, g in enumerate(a.var_names)]
    a.var_names = [f"id{i}" for i in range(a.n_vars)]


def _empty_cells_genes(a):
    X = a.X.toarray()
    X[:5] = 0  # cells without any count
    X[:, :7] = 0  # genes measured nowhere
    a.X = sp.csr_matrix(X)


def _unicode_names(a):
    X = sp.hstack([a.X, sp.csr_matrix(np.ones((a.n_obs, 3), dtype=np.float32))]).tocsr()
    genes = [*a.var_names, "gène/1", "基因", "g\u00a0x"]
    obs = pd.DataFrame({"Zelltyp α": "x/y",
                        "cell_type": a.obs["cell_type"].astype(str).to_numpy()},
                       index=[f"zelle/{i}·ü" for i in range(a.n_obs)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))


def _ensembl(a):
    a.var["symbol"] = list(a.var_names)
    a.var_names = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    del a.var["gene_symbol_original"]


def _versions(a):
    a.var_names = [f"{g}.{i % 9 + 1}" for i, g in enumerate(a.var_names)]
    del a.var["gene_symbol_original"]


def _lower(a):
    a.var_names = [g.capitalize() for g in a.var_names]
    del a.var["gene_symbol_original"]


def _model_variant(ctx: Ctx, name: str, edit) -> Path:
    d = ctx.tmp / name
    shutil.copytree(ctx.model, d)
    edit(d)
    return d


def _edit_json(d: Path, fn) -> None:
    meta = json.loads((d / "model.json").read_text())
    fn(meta)
    (d / "model.json").write_text(json.dumps(meta))


def _flip_weights(d: Path) -> None:
    w = bytearray((d / "weights.safetensors").read_bytes())
    w[-1] ^= 0x55
    (d / "weights.safetensors").write_bytes(bytes(w))


def _q(ctx: Ctx) -> Path:
    p = ctx.tmp / "query.h5ad"
    if not p.exists():
        ctx.write("query.h5ad", ctx.base)
    return p


def _train(ctx: Ctx, ref: Path, *extra: str, label: str = "cell_type",
           out: Path | None = None) -> list[str]:
    out = out if out is not None else ctx.tmp / f"{ref.stem}.model"
    return ["train", str(ref), "-l", label, "-o", str(out), "--epochs", "1", "--hidden", "16",
            "--n-hvg", "100", "--device", "cpu", *extra]


def _ref(ctx: Ctx, name: str, fn) -> Path:
    a = ctx.ref.copy()
    return ctx.write(name, fn(a) or a)


def _tpm_ref(a):
    a.X = sp.csr_matrix(forms(a.X)["tpm"], dtype=np.float32)


def _odd_labels(a):
    labels = a.obs["cell_type"].astype(str)
    a.obs["label"] = labels.map(lambda s: s.replace("+", "⁺/") + " – naïve")


def _one_class(a):
    a.obs["one"] = "T cell"


CASES = [
    # -- accepted: brought into the model's space, with a line that says so (exit 0)
    Case("counts", "raw counts (integers)", _form("counts"), 0,
         ("X holds raw counts (integers up to", "normalised to 10,000 per cell"),
         same_labels_as_counts=True),
    Case("counts-int64-dense", "counts as a dense int64 matrix",
         lambda c: _annotate(c.with_x("int64.h5ad", c.base.X.toarray().astype(np.int64)), c),
         0, ("raw counts",), same_labels_as_counts=True),
    Case("counts-float16", "counts as float16",
         lambda c: _annotate(c.with_x("f16.h5ad", c.base.X.toarray().astype(np.float16)), c),
         0, ("raw counts",), same_labels_as_counts=True),
    Case("cp10k", "normalised, not logged (CP10k)", _form("cp10k"), 0,
         ("scaled values, not logged", "every cell sums to 10,000",
          "the model's reference held raw counts"), same_labels_as_counts=True),
    Case("cpm", "CPM-like", _form("cpm"), 0,
         ("scaled values, not logged", "every cell sums to 1e+06"),
         same_labels_as_counts=True),
    Case("tpm", "TPM-like (counts / gene length, 1e6 per cell)", _form("tpm"), 0,
         ("scaled values, not logged", "every cell sums to 1e+06",
          "normalised to 10,000 per cell and log1p-transformed")),
    Case("tpm-subset", "TPM-like on a gene subset (row sums vary, values up to 1e5)",
         _form("tpm_subset"), 0, ("far above a log scale", "log1p-transformed")),
    Case("fpkm", "FPKM-like", _form("fpkm"), 0, ("far above a log scale",)),
    Case("log1p-cp10k", "log1p(CP10k), scanpy/Seurat log-normalised",
         lambda c: _annotate(c.with_x("lc.h5ad", sp.csr_matrix(
             forms(c.base.X)["log1p_cp10k"], dtype=np.float32)), c), 0,
         ("log-scale values", "log1p of values summing to 10,000 per cell", "used as given",
          "the query holds log-normalised values"), same_labels_as_counts=True),
    Case("log1p-tpm", "log1p(TPM) (log-scale, not CP10k)", _form("log1p_tpm"), 0,
         ("log-scale values", "used as given", "the predictions hold only if")),
    Case("zscored-with-layer", "z-scored X, counts in a layer, --layer counts",
         lambda c: _annotate(c.query("zl.h5ad", _zscored), c, "--layer", "counts"), 0,
         ("layers['counts'] holds raw counts",), same_labels_as_counts=True),
    Case("duplicated-genes", "duplicated gene names",
         lambda c: _annotate(c.query("dup.h5ad", _dup_genes), c), 0,
         ("2 gene names occur more than once in X of dup.h5ad (5 columns)", "summed")),
    Case("unnamed-genes", "genes without a name in the --gene-symbols column",
         lambda c: _annotate(c.query("unnamed.h5ad", _unnamed), c, "--gene-symbols", "symbol"),
         0, ("columns of X of unnamed.h5ad have no gene name and are left out",)),
    Case("empty-cells-genes", "cells without counts, genes measured nowhere",
         lambda c: _annotate(c.query("empty.h5ad", _empty_cells_genes), c), 0,
         ("raw counts",)),
    Case("unicode-names", "unicode and '/' in cell, column and gene names",
         lambda c: _annotate(c.query("uni.h5ad", _unicode_names), c), 0, ("annotated 240",)),
    Case("train-tpm", "a TPM-like reference (failed in scanpy before)",
         lambda c: _train(c, _ref(c, "tpmref.h5ad", _tpm_ref)), 0,
         ("reference: 240 cells", "scaled values, not logged", "saved to")),
    Case("train-odd-labels", "labels with unicode, '/' and '+'",
         lambda c: _train(c, _ref(c, "oddref.h5ad", _odd_labels), label="label"), 0,
         ("saved to",)),
    # -- refused with one line (exit 1)
    Case("missing-file", "a file that does not exist",
         lambda c: _annotate(c.tmp / "nope.h5ad", c), 1, ("file not found",)),
    Case("directory", "a directory instead of a file",
         lambda c: _annotate(c.tmp, c), 1, ("expected an .h5ad file, got a directory",)),
    Case("empty-file", "an empty file", lambda c: _annotate(_raw(c, "e.h5ad", b""), c), 1,
         ("cannot read", "as .h5ad")),
    Case("garbage", "a text file named .h5ad",
         lambda c: _annotate(_raw(c, "g.h5ad", b"hello\n" * 100), c), 1, ("cannot read",)),
    Case("truncated", "a truncated .h5ad",
         lambda c: _annotate(_raw(c, "t.h5ad", _q(c).read_bytes()[:20000]), c), 1,
         ("cannot read",)),
    Case("no-cells", "no cells (0 x genes)",
         lambda c: _annotate(c.write("z.h5ad", c.base[:0].copy()), c), 1, ("holds no data",)),
    Case("nan", "NaN in X", lambda c: _annotate(c.query("nan.h5ad", _set_value(np.nan)), c), 1,
         ("has 1 NaN or infinite values",)),
    Case("inf", "infinity in X",
         lambda c: _annotate(c.query("inf.h5ad", _set_value(np.inf)), c), 1,
         ("NaN or infinite",)),
    Case("zscored", "z-scored (negative) X",
         lambda c: _annotate(c.query("z.h5ad", _zscored), c), 1,
         ("negative values", "scaled or centred (z-scores)", "--layer NAME (layers here: counts)")),
    Case("negative-no-alternative", "negative values, nothing else in the file",
         lambda c: _annotate(c.query("neg.h5ad", _set_value(-1.0)), c), 1,
         ("negative values", "this file has no other layer and no .raw")),
    Case("all-zero", "only zeros",
         lambda c: _annotate(c.with_x("zero.h5ad", sp.csr_matrix(c.base.shape,
                                                                 dtype=np.float32)), c), 1,
         ("holds only zeros",)),
    Case("missing-layer", "--layer that does not exist",
         lambda c: _annotate(_q(c), c, "--layer", "spliced"), 1,
         ("layer 'spliced' not found",)),
    Case("no-raw", "--use-raw without .raw",
         lambda c: _annotate(_q(c), c, "--use-raw"), 1, ("no .raw",)),
    Case("layer-and-raw", "--layer and --use-raw together",
         lambda c: _annotate(_q(c), c, "--layer", "x", "--use-raw"), 1, ("not both",)),
    Case("missing-symbol-column", "--gene-symbols column that does not exist",
         lambda c: _annotate(_q(c), c, "--gene-symbols", "symbol"), 1,
         ("var column 'symbol' not found", "text columns: gene_symbol_original")),
    Case("ensembl-ids", "Ensembl IDs in var_names, symbols in a var column",
         lambda c: _annotate(c.query("ens.h5ad", _ensembl), c), 1,
         ("holds 0 of the model's", "use --gene-symbols symbol")),
    Case("version-suffixes", "gene IDs with version suffixes",
         lambda c: _annotate(c.query("ver.h5ad", _versions), c), 1,
         ("version suffixes", "strip them")),
    Case("letter-case", "gene names in another letter case (mouse-style)",
         lambda c: _annotate(c.query("case.h5ad", _lower), c), 1, ("differ in letter case",)),
    Case("damaged-model", "model.json that is not JSON",
         lambda c: _annotate(_q(c), c, model=_model_variant(
             c, "m_json", lambda d: (d / "model.json").write_text("{ not json"))), 1,
         ("damaged model", "not valid JSON")),
    Case("checksum", "weights that do not match their checksum",
         lambda c: _annotate(_q(c), c, model=_model_variant(c, "m_w", _flip_weights)), 1,
         ("does not match its checksum",)),
    Case("foreign-model", "a model.json of another tool",
         lambda c: _annotate(_q(c), c, model=_model_variant(
             c, "m_f", lambda d: (d / "model.json").write_text('{"name": "other"}'))), 1,
         ("not an scsnn model",)),
    Case("newer-model", "a model of a newer schema",
         lambda c: _annotate(_q(c), c, model=_model_variant(
             c, "m_n", lambda d: _edit_json(d, lambda m: m.update(schema_version=99)))), 1,
         ("newer than this scsnn",)),
    Case("no-model", "a model folder that does not exist",
         lambda c: _annotate(_q(c), c, model=c.tmp / "nomodel"), 1,
         ("model directory not found",)),
    Case("output-is-dir", "--output that is a directory",
         lambda c: _annotate(_q(c), c, out=c.tmp), 1, ("it is a directory",)),
    Case("output-unwritable", "--output in a folder that cannot be made (under a file)",
         lambda c: _annotate(_q(c), c, out=_raw(c, "afile", b"x") / "o.h5ad"), 1,
         ("cannot write", "is not a directory")),
    Case("key-with-slash", "--key-added with a '/'",
         lambda c: _annotate(_q(c), c, "--key-added", "a/b"), 1, ("hold no '/'",)),
    Case("annotate-memory", "a query too large for the memory (pbmc3k, SCSNN_MEMORY_LIMIT)",
         lambda c: _annotate(shared_file("pbmc3k.h5ad"), c), 1,
         ("annotating 2,638 cells of pbmc3k.h5ad", "needs about", "--chunk-size 1024"),
         env=lambda c: {io.MEMORY_ENV: str(_annotate_limit(c))}),
    Case("train-memory", "a reference too large for the memory (pbmc3k, SCSNN_MEMORY_LIMIT)",
         lambda c: _train(c, shared_file("pbmc3k.h5ad")), 1,
         ("training on 2,638 cells x 13,714 genes", "needs about", "--max-cells", "--stream"),
         env=lambda c: {io.MEMORY_ENV: "480M"}),
    Case("train-missing-label", "--label-key not in obs",
         lambda c: _train(c, _q(c), label="celltype"), 1, ("label key 'celltype' not in obs",)),
    Case("train-one-class", "a reference with one class",
         lambda c: _train(c, _ref(c, "one.h5ad", _one_class), label="one"), 1,
         ("needs at least 2 classes",)),
    Case("train-nan", "NaN in the reference",
         lambda c: _train(c, _ref(c, "nanref.h5ad", _set_value(np.nan))), 1,
         ("NaN or infinite",)),
    Case("train-out-is-file", "--out that is a file",
         lambda c: _train(c, _q(c), out=_raw(c, "f", b"x")), 1,
         ("exists and is not a directory",)),
    # -- usage errors (exit 2)
    Case("bad-chunk", "--chunk that is not I/N",
         lambda c: _annotate(_q(c), c, "--chunk", "x/2"), 2, ("expected I/N",)),
    Case("bad-confidence", "--min-confidence above 1",
         lambda c: _annotate(_q(c), c, "--min-confidence", "2"), 2, ("--min-confidence",)),
]


def _annotate_limit(c: Ctx) -> int:
    """A memory limit under which pbmc3k fits in blocks of 1,024 cells, not whole."""
    info = io.matrix_info(shared_file("pbmc3k.h5ad"))
    m = scsnn.load_model(c.model)
    args = (len(m.genes), len(m.classes), m.config.timesteps, 1024)
    small, whole = (io.annotate_bytes(info, info.n_obs, b, *args) for b in (1024, 65536))
    assert small / 0.9 < whole
    return int(small / 0.9) + 1


def _raw(ctx: Ctx, name: str, content: bytes) -> Path:
    p = ctx.tmp / name
    p.write_bytes(content)
    return p


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, _pbmc_session, pbmc_model_dir) -> Ctx:
    if not (DATA_DIR / "pbmc68k_reduced.h5ad").is_file():
        pytest.skip("needs the shared pbmc68k_reduced counts")
    rows = np.random.default_rng(0).choice(_pbmc_session.n_obs, 240, replace=False)
    base = _pbmc_session[np.sort(rows)].copy()
    base.layers = {}
    return Ctx(tmp_path_factory.mktemp("inputs"), base, pbmc_model_dir, base)


@pytest.fixture(scope="module")
def counts_labels(ctx) -> np.ndarray:
    out = ctx.tmp / "counts_labels.h5ad"
    r = runner.invoke(app, ["annotate", str(_q(ctx)), "-m", str(ctx.model), "-o", str(out),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return ad.read_h5ad(out).obs["scsnn"].astype(str).to_numpy()


def run_case(case: Case, c: Ctx):
    """Invoke the CLI for a case: (result, the message line, the input files' bytes before)."""
    args = case.build(c)
    inputs = [Path(a) for a in args[1:2] if Path(a).is_file()]
    before = {p: p.read_bytes() for p in inputs}
    env = case.env(c) if case.env is not None else {}
    env_saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = runner.invoke(app, args)
    finally:
        for k, v in env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return args, r, before


def message_of(case: Case, r) -> str:
    """The line a case documents: the error, or the log lines that say what was found."""
    if case.code == 2:  # click's usage error (plain, or in rich's box)
        boxed = [line.strip(" │╭╮╰╯─") for line in r.output.splitlines() if "│" in line]
        text = boxed or [line for line in r.output.splitlines() if line.startswith("Error")]
        return " ".join(" ".join(text).split())
    if case.code == 1:
        return r.stderr.strip()
    lines = [line for line in r.stderr.strip().splitlines() if line]
    return " | ".join(lines + r.stdout.strip().splitlines()[:1])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_input(case, ctx, counts_labels):
    args, r, before = run_case(case, ctx)
    assert r.exit_code == case.code, r.output
    assert "Traceback" not in r.output
    msg = message_of(case, r)
    for f in case.fragments:
        assert f in msg, (f, msg)
    if case.code == 1:
        assert msg.startswith("error: ")
        assert_one_line(msg)
        assert r.stdout == ""
    for p, data in before.items():  # refused or not, the input is left as it was
        assert p.read_bytes() == data
    if case.code == 0 and args[0] == "annotate":
        out = Path(args[args.index("-o") + 1])
        a = ad.read_h5ad(out)
        assert "scsnn" in a.obs and a.n_obs == 240
        labels = a.obs["scsnn"].astype(str).to_numpy()
        if case.same_labels_as_counts:  # the same cells, the same answer
            assert (labels == counts_labels).mean() >= 0.99, case.id
    if case.code == 0 and args[0] == "train":
        m = scsnn.load_model(Path(args[args.index("-o") + 1]))
        assert m.classes and m.compute_id() == m.model_id


# -- the docs table ----------------------------------------------------------------------------


def test_docs_table_matches_the_cases():
    text = DOCS.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 4 and cells[-1].startswith("`test_inputs.py::test_input["):
            rows[cells[-1][len("`test_inputs.py::test_input["):-2]] = cells
    assert set(rows) == {c.id for c in CASES}, set(rows) ^ {c.id for c in CASES}
    for c in CASES:
        cells = rows[c.id]
        assert cells[-2] == str(c.code), c.id
        for f in c.fragments:
            assert f.replace("|", "\\|") in cells[1], (c.id, f)


def _docs_table(c: Ctx) -> str:
    """The table of docs/inputs.md, from a real run of every case."""
    lines = ["| input | message | exit code | test |", "|---|---|---|---|"]
    for case in CASES:
        _, r, _ = run_case(case, c)
        msg = message_of(case, r).replace(str(c.tmp) + "/", "").replace(str(c.model), "MODEL")
        msg = msg.replace(str(c.tmp), ".").replace("|", "\\|")
        lines.append(f"| {case.what} | {msg} | {r.exit_code} | "
                     f"`test_inputs.py::test_input[{case.id}]` |")
    return "\n".join(lines)


if __name__ == "__main__":  # print the docs table
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import _load_pbmc, small

    logging.getLogger("scsnn").setLevel(logging.INFO)
    pb = _load_pbmc()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        scsnn.tl.train(pb, "cell_type", **small(seed=0)).save(model)
        rows = np.random.default_rng(0).choice(pb.n_obs, 240, replace=False)
        base = pb[np.sort(rows)].copy()
        base.layers = {}
        work = Path(tmp) / "work"
        work.mkdir()
        print(_docs_table(Ctx(work, base, model, base)))
