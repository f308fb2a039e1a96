"""scsnn.datasets: the scanpy PBMC copy and the synthetic generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scsnn
from scsnn.datasets import pbmc68k_reduced, synthetic


def test_synthetic_shapes_and_labels():
    a = synthetic(n_cells=500, n_genes=300, n_types=5, rare_fraction=0.02, n_markers=10, seed=1)
    assert a.shape == (500, 300)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    X = a.X.toarray()
    assert np.all(X >= 0) and np.all(X == np.round(X))
    assert scsnn.io.get_expression(a).kind == "counts"
    ct = a.obs["cell_type"]
    assert isinstance(ct.dtype, pd.CategoricalDtype)
    assert list(ct.cat.categories) == [f"type_{t}" for t in range(5)]
    counts = ct.value_counts()
    assert counts["type_4"] == 10  # rare: 2% of 500
    common = counts.drop("type_4")
    assert common.max() - common.min() <= 1  # the rest share the cells evenly
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert a.uns["synthetic"]["rare_type"] == "type_4"
    assert a.uns["X_type"] == "counts"


def test_synthetic_rare_fraction_edge_cases():
    assert (synthetic(200, 100, 3, rare_fraction=0.001, n_markers=5).obs["cell_type"]
            == "type_2").sum() == 1  # at least one rare cell
    none = synthetic(200, 100, 3, rare_fraction=0.0, n_markers=5)
    vc = none.obs["cell_type"].value_counts()
    assert vc.min() >= 66 and none.uns["synthetic"]["rare_type"] == ""


def test_synthetic_markers_are_up():
    a = synthetic(n_cells=600, n_genes=200, n_types=3, rare_fraction=0.1, n_markers=10,
                  marker_fold=8.0, seed=2)
    X = a.X.toarray()
    X = X / X.sum(1, keepdims=True)
    lab = a.obs["cell_type"].to_numpy()
    for t in ("type_0", "type_1", "type_2"):
        fc = np.log((X[lab == t].mean(0) + 1e-6) / (X[lab != t].mean(0) + 1e-6))
        assert (fc > np.log(3)).sum() >= 8  # its ~10 marker genes stand out


def test_synthetic_determinism_by_seed():
    a = synthetic(300, 100, 3, n_markers=5, seed=4)
    b = synthetic(300, 100, 3, n_markers=5, seed=4)
    c = synthetic(300, 100, 3, n_markers=5, seed=5)
    assert (a.X != b.X).nnz == 0
    assert list(a.obs["cell_type"]) == list(b.obs["cell_type"])
    assert (a.X != c.X).nnz > 0


def test_synthetic_chunking_same_shape():
    a = synthetic(250, 100, 3, n_markers=5, chunk=60, seed=0)
    assert a.shape == (250, 100) and a.X.nnz > 0


@pytest.mark.parametrize("kw,match", [({"n_types": 1}, "n_types"),
                                      ({"n_markers": 50, "n_genes": 100}, "n_markers")])
def test_synthetic_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        synthetic(**{"n_cells": 50, "n_genes": 100, "n_types": 3, **kw})


def test_pbmc68k_reduced():
    a = pbmc68k_reduced()
    assert a.shape == (700, 765)
    assert "cell_type" in a.obs
    assert a.obs["cell_type"].nunique() == 10
    assert list(a.obs["cell_type"].astype(str)) == list(a.obs["bulk_labels"].astype(str))
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    assert a.X.min() >= 0
    ex = scsnn.io.get_expression(a)
    assert ex.kind == "lognorm"
    assert a.uns["X_type"] == "log-normalised"


def test_pbmc68k_reduced_matches_shared_file(data_dir):
    shipped = pbmc68k_reduced()
    shared = scsnn.read_h5ad(data_dir / "pbmc68k_reduced.h5ad")
    assert set(shipped.var_names) == set(shared.var_names)
    assert (shipped.obs["cell_type"].astype(str).value_counts().sort_index()
            == shared.obs["cell_type"].astype(str).value_counts().sort_index()).all()


def test_synthetic_shift_design_and_knobs(tmp_path):
    ref, q = scsnn.datasets.synthetic_shift(n_cells=3000, n_query=1500, n_genes=600, seed=2)
    syn = ref.uns["synthetic"]
    rare = syn["rare_types"]
    assert len(rare) == 5 and set(rare) <= set(ref.obs["cell_type"].cat.categories)
    frac = ref.obs["cell_type"].value_counts(normalize=True)
    for r in rare:  # 0.2-1 % of the cells, present in reference and query
        assert 0.001 <= frac[r] <= 0.015 and (q.obs["cell_type"] == r).any()
    assert set(ref.obs["lineage"].cat.categories) == set(scsnn.datasets.SHIFT_LINEAGES)
    # the query batch: lower depth, another composition; no shift: the same batch
    def lib(a):
        return float(np.median(np.asarray(a.X.sum(1)).ravel()))

    lib_r, lib_q = lib(ref), lib(q)
    assert 0.35 < lib_q / lib_r < 0.65
    comp_q = q.obs["cell_type"].value_counts(normalize=True)
    assert np.abs(comp_q[frac.index] - frac).max() > 0.02
    r0, q0 = scsnn.datasets.synthetic_shift(n_cells=3000, n_query=3000, n_genes=600, seed=2,
                                            shift=0.0)
    assert q0.uns["synthetic"]["ambient_fraction"] == 0.0
    assert 0.9 < lib(q0) / lib(r0) < 1.1
    assert np.array_equal(r0.X.toarray(), ref.X.toarray())  # the reference does not depend on the shift
    # written block by block: the same cells as in memory (with the same block size)
    paths = scsnn.datasets.synthetic_shift(n_cells=3000, n_query=1500, n_genes=600, seed=2,
                                           chunk=700, out=tmp_path)
    _, q = scsnn.datasets.synthetic_shift(n_cells=3000, n_query=1500, n_genes=600, seed=2,
                                          chunk=700)
    back = scsnn.read_h5ad(paths[1])
    assert back.obs["cell_type"].tolist() == q.obs["cell_type"].tolist()
    assert (back.X != q.X).nnz == 0


def test_synthetic_realistic_counts_are_as_sparse_as_10x_data():
    from scsnn.datasets import REALISTIC

    a = synthetic(n_cells=1000, n_genes=3000, n_types=10, seed=0, **REALISTIC)
    density = a.X.nnz / (a.n_obs * a.n_vars)
    counts = np.median(np.asarray(a.X.sum(1)).ravel())
    assert 0.12 < density < 0.26  # 10x data over highly variable genes: 10-20 %
    assert 1100 < counts < 1900
    dense = synthetic(n_cells=1000, n_genes=3000, n_types=10, seed=0)
    assert dense.X.nnz / (dense.n_obs * dense.n_vars) > 0.35
