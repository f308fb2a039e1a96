"""scsnn.io: reading, validating, gene matching and atomic writes."""

from __future__ import annotations

import os
import stat

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import assert_one_line, shared_file

from scsnn import io
from scsnn.errors import InputError, ScsnnError


def _adata(X, genes=None, **kw) -> ad.AnnData:
    X = np.asarray(X, dtype=np.float32)
    genes = genes or [f"g{j}" for j in range(X.shape[1])]
    return ad.AnnData(
        X=sp.csr_matrix(X),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=genes),
        **kw,
    )


COUNTS = np.array([[0, 3, 1, 0], [5, 0, 0, 2], [1, 1, 7, 0]], dtype=np.float32)


# -- read_h5ad --------------------------------------------------------------------------
def test_read_h5ad_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found") as ei:
        io.read_h5ad(tmp_path / "nope.h5ad")
    assert_one_line(str(ei.value))


def test_read_h5ad_directory(tmp_path):
    with pytest.raises(InputError, match="directory") as ei:
        io.read_h5ad(tmp_path)
    assert_one_line(str(ei.value))


@pytest.mark.parametrize("content", [b"", b"this is not an HDF5 file\n" * 50])
def test_read_h5ad_garbage_file(tmp_path, content):
    p = tmp_path / "garbage.h5ad"
    p.write_bytes(content)
    with pytest.raises(InputError, match="cannot read") as ei:
        io.read_h5ad(p)
    assert_one_line(str(ei.value))
    assert isinstance(ei.value, ScsnnError) and isinstance(ei.value, ValueError)


def test_read_h5ad_truncated_file(tmp_path):
    src = shared_file("pbmc68k_reduced.h5ad").read_bytes()
    p = tmp_path / "trunc.h5ad"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(InputError) as ei:
        io.read_h5ad(p)
    assert_one_line(str(ei.value))


def test_read_h5ad_roundtrip_and_empty(tmp_path):
    a = _adata(COUNTS)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = io.read_h5ad(tmp_path / "a.h5ad")
    assert b.shape == (3, 4)
    np.testing.assert_array_equal(b.X.toarray(), COUNTS)
    empty = ad.AnnData(X=np.zeros((0, 4), dtype=np.float32))
    empty.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match="no data"):
        io.read_h5ad(tmp_path / "empty.h5ad")


def test_read_shared_file(data_dir):
    a = io.read_h5ad(data_dir / "pancreas_wang.h5ad")
    assert a.n_obs == 501 and a.n_vars == 219
    assert "cell_type" in a.obs


# -- get_expression -----------------------------------------------------------------------
def test_get_expression_from_x_layer_raw():
    a = _adata(COUNTS)
    a.layers["lognorm"] = sp.csr_matrix(np.log1p(COUNTS))
    a.raw = _adata(COUNTS * 2, genes=["r0", "r1", "r2", "r3"])
    ex = io.get_expression(a)
    assert ex.source == "X" and ex.kind == "counts"
    assert sp.isspmatrix_csr(ex.X) and ex.X.dtype == np.float32
    np.testing.assert_array_equal(ex.X.toarray(), COUNTS)
    assert list(ex.genes) == ["g0", "g1", "g2", "g3"]

    ex = io.get_expression(a, layer="lognorm")
    assert ex.source == "layers['lognorm']" and ex.kind == "lognorm"
    np.testing.assert_allclose(ex.X.toarray(), np.log1p(COUNTS), rtol=1e-6)

    ex = io.get_expression(a, use_raw=True)
    assert ex.source == "raw" and ex.kind == "counts"
    np.testing.assert_array_equal(ex.X.toarray(), COUNTS * 2)
    assert list(ex.genes) == ["r0", "r1", "r2", "r3"]


def test_get_expression_dense_input_becomes_csr():
    a = ad.AnnData(X=COUNTS.astype(np.float64))
    ex = io.get_expression(a)
    assert sp.isspmatrix_csr(ex.X) and ex.X.dtype == np.float32
    assert ex.X.nnz == int((COUNTS != 0).sum())


def test_get_expression_missing_layer_and_raw():
    a = _adata(COUNTS)
    a.layers["counts"] = a.X.copy()
    with pytest.raises(InputError, match=r"layer 'nope' not found \(layers: counts\)") as ei:
        io.get_expression(a, layer="nope")
    assert_one_line(str(ei.value))
    with pytest.raises(InputError, match="no .raw"):
        io.get_expression(a, use_raw=True)
    with pytest.raises(InputError, match="not both"):
        io.get_expression(a, layer="counts", use_raw=True)


def test_get_expression_gene_symbols():
    a = _adata(COUNTS, genes=["ENSG1", "ENSG2", "ENSG3", "ENSG4"])
    a.var["symbol"] = ["CD3E", "MS4A1", "LYZ", "NKG7"]
    ex = io.get_expression(a, gene_symbols="symbol")
    assert list(ex.genes) == ["CD3E", "MS4A1", "LYZ", "NKG7"]
    with pytest.raises(InputError, match="var column 'sym' not found"):
        io.get_expression(a, gene_symbols="sym")


def test_counts_vs_lognorm_detection():
    assert io.detect_kind(sp.csr_matrix(COUNTS)) == "counts"
    assert io.detect_kind(sp.csr_matrix(np.log1p(COUNTS))) == "lognorm"
    # all ones (binary) is not counts: max must exceed 1
    assert io.detect_kind(sp.csr_matrix((COUNTS > 0).astype(np.float32))) == "lognorm"
    # nearly integer values within the tolerance are counts
    assert io.detect_kind(sp.csr_matrix(COUNTS + (COUNTS > 0) * 1e-4)) == "counts"


def test_shared_file_kinds(data_dir):
    pb = io.read_h5ad(data_dir / "pbmc68k_reduced.h5ad")
    assert io.get_expression(pb).kind == "counts"
    assert io.get_expression(pb, layer="log_normalized").kind == "lognorm"
    wang = io.read_h5ad(data_dir / "pancreas_wang.h5ad")
    assert io.get_expression(wang).kind == "lognorm"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_refused(bad):
    X = COUNTS.copy()
    X[1, 2] = bad
    with pytest.raises(InputError, match="1 NaN or infinite") as ei:
        io.get_expression(_adata(X))
    assert_one_line(str(ei.value))


def test_negative_values_refused():
    X = np.log1p(COUNTS)
    X[0, 0] = -0.5
    with pytest.raises(InputError, match="negative values") as ei:
        io.get_expression(_adata(X))
    assert_one_line(str(ei.value))


def test_all_zero_matrix_refused():
    with pytest.raises(InputError, match="only zeros"):
        io.get_expression(_adata(np.zeros((3, 4))))


# -- labels -------------------------------------------------------------------------------
def test_get_labels():
    a = _adata(COUNTS)
    a.obs["ct"] = pd.Categorical(["A", None, "B"])
    lab = io.get_labels(a, "ct")
    assert list(lab) == ["A", None, "B"]
    with pytest.raises(InputError, match="label key 'nope' not in obs"):
        io.get_labels(a, "nope")
    a.obs["empty"] = pd.Categorical([None, None, None], categories=["A"])
    with pytest.raises(InputError, match="holds no labels"):
        io.get_labels(a, "empty")


# -- write_h5ad_atomic --------------------------------------------------------------------
def test_write_h5ad_atomic_writes_and_replaces(tmp_path):
    p = tmp_path / "sub" / "out.h5ad"
    io.write_h5ad_atomic(_adata(COUNTS), p)
    assert io.read_h5ad(p).shape == (3, 4)
    io.write_h5ad_atomic(_adata(COUNTS[:2]), p)
    assert io.read_h5ad(p).shape == (2, 4)
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.h5ad"]


def test_write_h5ad_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "out.h5ad"
    io.write_h5ad_atomic(_adata(COUNTS), p)
    before = p.read_bytes()

    def boom(self, filename, *args, **kwargs):
        with open(filename, "wb") as fh:  # a partial write, then a failure
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_h5ad_atomic(_adata(COUNTS[:1]), p)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5ad"]  # no temp file left


def test_write_h5ad_atomic_keeps_file_mode(tmp_path):
    p = tmp_path / "out.h5ad"
    io.write_h5ad_atomic(_adata(COUNTS), p)
    os.chmod(p, 0o640)
    io.write_h5ad_atomic(_adata(COUNTS), p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640


# -- match_genes ----------------------------------------------------------------------------
def test_match_genes_missing():
    cols = io.match_genes(np.array(["a", "b", "c"]), ["c", "x", "a"])
    np.testing.assert_array_equal(cols, [2, -1, 0])


def test_match_genes_duplicated_query_uses_first():
    q = np.array(["a", "b", "a", "c", "b"])
    cols = io.match_genes(q, ["b", "a", "c", "z"])
    np.testing.assert_array_equal(cols, [1, 0, 3, -1])
    cols = io.match_genes(np.array(["z", "z"]), ["a", "z"])
    np.testing.assert_array_equal(cols, [-1, 0])


def test_write_h5ad_atomic_to_directory_fails_cleanly(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        io.write_h5ad_atomic(_adata(COUNTS), d)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dir"]  # temp file removed
    assert list(d.iterdir()) == []


def test_backed_read_gives_same_expression(tmp_path):
    a = _adata(COUNTS)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = io.read_h5ad(tmp_path / "a.h5ad", backed=True)
    try:
        ex = io.get_expression(b)
        assert ex.kind == "counts"
        np.testing.assert_array_equal(ex.X.toarray(), COUNTS)
    finally:
        b.file.close()


# -- writing: refused before any work, full disks, slot names ----------------------------------
def test_check_writable(tmp_path):
    io.check_writable(tmp_path / "new" / "deeper" / "out.h5ad")  # made later: fine
    assert not (tmp_path / "new").exists()  # the check creates nothing
    io.check_writable(tmp_path / "model", folder=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is not a directory") as ei:
        io.check_writable(f / "out.h5ad")
    assert_one_line(str(ei.value))
    with pytest.raises(InputError, match="exists and is not a directory"):
        io.check_writable(f, folder=True)
    with pytest.raises(InputError, match="it is a directory"):
        io.check_writable(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("err", [OSError(28, "No space left on device"),
                                 OSError(27, "File too large"),
                                 RuntimeError("Can't write data (file write failed: errno = 28, "
                                              "error message = 'No space left on device')")])
def test_full_disk_is_one_line_and_leaves_the_file(tmp_path, monkeypatch, err):
    p = tmp_path / "out.h5ad"
    io.write_h5ad_atomic(_adata(COUNTS), p)
    before = p.read_bytes()

    def full(self, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise err

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    with pytest.raises(InputError, match="is full.*out.h5ad is unchanged") as ei:
        io.write_h5ad_atomic(_adata(COUNTS[:1]), p)
    assert_one_line(str(ei.value))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5ad"]
    with pytest.raises(InputError, match="new.h5ad was not written"):
        io.write_h5ad_atomic(_adata(COUNTS[:1]), tmp_path / "new.h5ad")


def test_slot_names_that_would_not_read_back_are_refused(tmp_path):
    a = _adata(COUNTS)
    a.obs["a/b"] = 1
    with pytest.raises(InputError, match="obs entry 'a/b'"):
        io.write_h5ad_atomic(a, tmp_path / "o.h5ad")
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="uns entry ''"):
        io.check_keys(uns=[""])
    io.check_keys(obs=["scsnn", "ü x", "a.b"])


def test_explicit_zeros_and_duplicates_do_not_change_the_input():
    X = sp.csr_matrix((np.array([1.0, 0.0, 2.0], dtype=np.float32), np.array([0, 1, 1]),
                       np.array([0, 2, 3])), shape=(2, 2))
    data = X.data.copy()
    a = ad.AnnData(X=X)
    ex = io.get_expression(a)
    assert ex.X.nnz == 2 and 0 not in ex.X.data
    np.testing.assert_array_equal(a.X.data, data)  # the AnnData keeps its stored zero
