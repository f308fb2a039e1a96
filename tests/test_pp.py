"""scsnn.pp: the gene space fitted on the reference and re-applied to queries."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scsnn
from scsnn.io import get_expression
from scsnn.pp import GeneSpace, fit_gene_space, log_normalize, marker_scores


def _codes(adata, key="cell_type"):
    labs = adata.obs[key].astype(str).to_numpy()
    classes = sorted(set(labs))
    return np.array([classes.index(x) for x in labs]), classes


def _lognorm(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return np.log1p(X / X.sum(1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def rare_data():
    # 1000 cells, 5 types; the last type has 10 cells
    a = scsnn.datasets.synthetic(
        n_cells=1000, n_genes=500, n_types=5, rare_fraction=0.01, n_markers=10, seed=7
    )
    codes, classes = _codes(a)
    return a, codes, classes


def _top_rare_genes(a, rare_label, n=5):
    L = _lognorm(a.X.toarray())
    r = (a.obs["cell_type"] == rare_label).to_numpy()
    diff = L[r].mean(0) - L[~r].mean(0)
    return [str(a.var_names[j]) for j in np.argsort(-diff)[:n]]


def test_fit_gene_space_keeps_markers_of_tiny_class(rare_data):
    a, codes, classes = rare_data
    assert (a.obs["cell_type"] == "type_4").sum() == 10
    expr = get_expression(a)
    top = _top_rare_genes(a, "type_4")

    gs, Xsel = fit_gene_space(expr, codes, classes, n_hvg=20, n_markers=10)
    assert gs.n_hvg == 20
    assert gs.n_genes > 20  # markers added to the 20 HVGs
    assert len(set(gs.genes)) == gs.n_genes
    assert sum(g in gs.genes for g in top) >= 4
    assert set(gs.markers) == set(classes)
    assert gs.markers["type_4"] and set(gs.markers["type_4"]) <= set(gs.genes)
    assert Xsel.shape == (a.n_obs, gs.n_genes)
    assert gs.reference_kind == "counts"

    # control: without markers, the HVGs alone miss the tiny class's genes
    gs0, _ = fit_gene_space(expr, codes, classes, n_hvg=20, n_markers=0)
    assert gs0.n_genes == 20
    assert sum(g in gs0.genes for g in top) <= 1


def test_marker_scores_sign():
    X = sp.csr_matrix(np.array([[5, 0], [6, 0], [0, 4], [0, 5]], dtype=np.float32))
    s = marker_scores(X, np.array([0, 0, 1, 1]), 2)
    assert s.shape == (2, 2)
    assert s[0, 0] > 0 and s[0, 1] < 0 and s[1, 1] > 0 and s[1, 0] < 0


def test_log_normalize_matches_scanpy_formula_and_passes_lognorm():
    X = np.array([[1, 3, 0, 6], [2, 0, 2, 0]], dtype=np.float32)
    ex = get_expression(ad.AnnData(X=sp.csr_matrix(X)))
    np.testing.assert_allclose(log_normalize(ex).toarray(), _lognorm(X), rtol=1e-5)
    np.testing.assert_array_equal(ex.X.toarray(), X)  # input not modified
    lx = get_expression(ad.AnnData(X=sp.csr_matrix(np.log1p(X))))
    assert lx.kind == "lognorm"
    np.testing.assert_array_equal(log_normalize(lx).toarray(), lx.X.toarray())


def test_statistics_reapplied_to_query(rare_data):
    a, codes, classes = rare_data
    gs, Xsel = fit_gene_space(get_expression(a), codes, classes, n_hvg=30, n_markers=5)
    # the recorded statistics are those of the projected reference
    ref = Xsel.toarray().astype(np.float64)
    np.testing.assert_allclose(gs.mean, ref.mean(0), rtol=1e-4, atol=1e-5)
    sd = ref.std(0)
    np.testing.assert_allclose(gs.std, np.where(sd < 1e-6, 1.0, sd), rtol=1e-3, atol=1e-5)

    # a query of 7 cells with its genes in another order, plus genes the model lacks
    rng = np.random.default_rng(0)
    qX = a.X[:7].toarray()
    order = rng.permutation(a.n_vars)
    extra = rng.poisson(3.0, size=(7, 3)).astype(np.float32)
    q = ad.AnnData(
        X=sp.csr_matrix(np.hstack([qX[:, order], extra])),
        var=pd.DataFrame(index=list(a.var_names[order]) + ["x1", "x2", "x3"]),
    )
    qexpr = get_expression(q)
    P, present = gs.project(qexpr)
    assert present.all() and P.shape == (7, gs.n_genes)
    # manual: normalise over ALL query genes, pick the model genes by name, standardise
    full = _lognorm(q.X.toarray())
    pos = {g: i for i, g in enumerate(q.var_names)}
    manual = full[:, [pos[g] for g in gs.genes]]
    np.testing.assert_allclose(P.toarray(), manual, rtol=1e-4, atol=1e-5)
    Z = gs.scale(P, present)
    np.testing.assert_allclose(
        Z, np.clip((manual - gs.mean) / gs.std, -gs.clip, gs.clip), rtol=1e-3, atol=1e-4
    )
    # the query's own statistics play no role: one cell scales the same alone or in a batch
    np.testing.assert_allclose(gs.scale(P[3:4], present), Z[3:4], rtol=1e-6)
    np.testing.assert_array_equal(gs.features(qexpr), Z)  # project + scale in one call


def test_absent_genes_get_zero(rare_data):
    a, codes, classes = rare_data
    gs, _ = fit_gene_space(get_expression(a), codes, classes, n_hvg=30, n_markers=5)
    drop = set(gs.genes[:5])
    keep = [i for i, g in enumerate(a.var_names) if g not in drop]
    q = a[:20, keep].copy()
    P, present = gs.project(get_expression(q))
    assert present.sum() == gs.n_genes - 5
    assert not present[:5].any() and present[5:].all()
    assert P.shape == (20, gs.n_genes)
    assert P[:, :5].nnz == 0
    Z = gs.scale(P, present)
    assert np.all(Z[:, :5] == 0.0)
    # present genes are not zeroed: without the mask an empty column scales to -mean/std
    assert np.any(Z[:, 5:] != 0.0)
    Zu = gs.scale(P)
    np.testing.assert_allclose(Zu[:, :5], np.broadcast_to(-gs.mean[:5] / gs.std[:5], (20, 5)),
                               rtol=1e-5)


def test_scale_clips():
    gs = GeneSpace(genes=["a", "b"], mean=np.array([1.0, 0.0], np.float32),
                   std=np.array([0.1, 1.0], np.float32), clip=3.0)
    Z = gs.scale(np.array([[100.0, -50.0], [1.05, 0.5]], dtype=np.float32))
    np.testing.assert_allclose(Z, [[3.0, -3.0], [0.5, 0.5]], rtol=1e-5)
    assert Z.dtype == np.float32


def test_to_dict_from_dict_round_trip(rare_data):
    a, codes, classes = rare_data
    gs, _ = fit_gene_space(get_expression(a), codes, classes, n_hvg=30, n_markers=5, clip=7.5)
    d = json.loads(json.dumps(gs.to_dict()))  # JSON-serialisable
    back = GeneSpace.from_dict(d)
    assert back.genes == gs.genes
    np.testing.assert_array_equal(back.mean, gs.mean)
    np.testing.assert_array_equal(back.std, gs.std)
    assert back.mean.dtype == np.float32
    assert back.clip == 7.5 and back.target_sum == gs.target_sum
    assert back.reference_kind == gs.reference_kind and back.n_hvg == gs.n_hvg
    assert back.markers == gs.markers
    P, present = gs.project(get_expression(a[:10]))
    np.testing.assert_array_equal(back.scale(P, present), gs.scale(P, present))


def test_from_dict_rejects_inconsistent():
    good = {"genes": ["a", "b"], "mean": [0.0, 1.0], "std": [1.0, 2.0]}
    assert GeneSpace.from_dict(good).n_genes == 2
    with pytest.raises(ValueError, match="differ in length"):
        GeneSpace.from_dict({**good, "mean": [0.0]})
    with pytest.raises(ValueError, match="non-positive"):
        GeneSpace.from_dict({**good, "std": [1.0, 0.0]})
    with pytest.raises(ValueError):
        GeneSpace.from_dict({"genes": [], "mean": [], "std": []})


def test_restrict_genes(rare_data):
    a, codes, classes = rare_data
    allowed = [f"gene_{j}" for j in range(0, 500, 2)]
    gs, _ = fit_gene_space(get_expression(a), codes, classes, n_hvg=30, n_markers=5,
                           restrict_genes=allowed)
    assert set(gs.genes) <= set(allowed)
    with pytest.raises(scsnn.InputError, match="none of the requested genes"):
        fit_gene_space(get_expression(a), codes, classes, restrict_genes=["nope"])


@pytest.mark.parametrize("kind", ["counts", "scaled", "lognorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_project_equals_log_normalize_then_select(kind, dtype):
    """log_normalize and project (which normalises only the model genes' entries) are
    bit-equal to scanpy's normalize_total + log1p."""
    from scsnn.io import Expression, match_genes
    from scsnn.pp import GeneSpace, log_normalize

    rng = np.random.default_rng(0)
    X = sp.random(300, 200, density=0.2, format="csr", random_state=0, dtype=np.float64)
    X.data = np.rint(X.data * 30) + 1 if kind == "counts" else X.data * 7.3
    X = sp.csr_matrix(X.astype(dtype))
    X.data[X.indptr[3] : X.indptr[4]] = 0  # a cell without expression
    X.eliminate_zeros()
    genes = np.array([f"g{i}" for i in range(200)])
    model = [f"g{i}" for i in rng.permutation(230)[:150]]  # some absent from the query
    gs = GeneSpace(genes=model, mean=np.zeros(150, np.float32), std=np.ones(150, np.float32))
    expr = Expression(X=X, genes=genes, kind=kind, source="test")
    got, present = gs.project(expr)
    # scanpy's own normalize_total + log1p over all genes, then the model's columns
    tmp = ad.AnnData(X=X.copy())
    if kind != "lognorm":
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
    full = sp.csr_matrix(tmp.X, dtype=np.float32).toarray()
    cols = match_genes(genes, model)
    want = np.zeros((300, 150), np.float32)
    want[:, present] = full[:, cols[present]]
    assert not present.all() and got.dtype == np.float32
    np.testing.assert_array_equal(got.toarray(), want)
    if kind != "lognorm":  # log-normalised input is passed on as it is
        np.testing.assert_array_equal(log_normalize(expr).toarray(), full)
