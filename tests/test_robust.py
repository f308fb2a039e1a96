"""Shift robustness and rare classes: training-time augmentation, one-vs-nearest markers,
the logit-adjusted loss and test-time adaptation of batch norm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scsnn
from scsnn.io import get_expression
from scsnn.models import NetworkConfig, adapt_batchnorm, build_network
from scsnn.pp import ScaledCells, fit_gene_space, select_genes
from scsnn.training import BiLevelTrainer, TrainConfig


@pytest.fixture(scope="module")
def counts_ref():
    a = scsnn.datasets.synthetic(n_cells=300, n_genes=200, n_types=4, rare_fraction=0.03,
                                 n_markers=10, seed=3)
    labs = a.obs["cell_type"].astype(str).to_numpy()
    classes = sorted(set(labs))
    codes = np.array([classes.index(x) for x in labs], dtype=np.int64)
    expr = get_expression(a)
    gs, X = fit_gene_space(expr, codes, classes, n_hvg=60, n_markers=5)
    library = np.asarray(expr.X.sum(axis=1), dtype=np.float64).ravel()
    return X, codes, gs, classes, library


# -- augmentation ---------------------------------------------------------------------------
def test_thinning_lowers_depth_and_is_seeded(counts_ref):
    X, codes, gs, classes, library = counts_ref
    idx = np.arange(50)
    plain = ScaledCells(X, gs).rows(idx)
    aug = ScaledCells(X, gs, library=library, depth=0.2)
    assert aug.augments
    # without an rng (evaluation, prediction) nothing is augmented
    np.testing.assert_array_equal(aug.rows(idx), plain)
    a1 = aug.rows(idx, np.random.default_rng(0))
    a2 = aug.rows(idx, np.random.default_rng(0))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, plain)
    # thinning only removes counts: a gene undetected before stays undetected
    block = sp.csr_matrix(aug._augment(X[idx], idx, np.random.default_rng(1)))
    assert block.nnz <= X[idx].nnz
    assert set(zip(*block.nonzero())) <= set(zip(*X[idx].nonzero()))
    # at a fifth of the depth, many detected genes drop out, and the depth-normalised level
    # of what remains stays about the same (the thinned library is used for normalising)
    assert block.nnz < X[idx].nnz
    assert abs(np.expm1(block.data).mean() / np.expm1(X[idx].data).mean() - 1) < 1.0


def test_gene_noise_scales_whole_genes(counts_ref):
    X, codes, gs, classes, library = counts_ref
    idx = np.arange(40)
    cells = ScaledCells(X, gs, gene_noise=0.5)
    assert cells.augments and not ScaledCells(X, gs).augments
    block = cells._augment(X[idx], idx, np.random.default_rng(0))
    ratio = np.expm1(block.toarray()) / np.where(X[idx].toarray() > 0,
                                                 np.expm1(X[idx].toarray()), np.nan)
    # one factor per gene, shared by every cell of the batch
    for j in range(ratio.shape[1]):
        col = ratio[:, j][np.isfinite(ratio[:, j])]
        if col.size > 1:
            np.testing.assert_allclose(col, col[0], rtol=1e-6)
    # no library: depth thinning is off even when asked for
    assert not ScaledCells(X, gs, depth=0.5).augments


def test_trainer_with_augmentation_and_logit_adjustment(counts_ref):
    X, codes, gs, classes, library = counts_ref

    def fit(**tkw):
        net = build_network(NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes),
                                          hidden=(32, 16)), seed=0)
        cells = ScaledCells(X, gs, library=library, depth=tkw.pop("depth", 1.0),
                            gene_noise=tkw.pop("noise", 0.0))
        cfg = TrainConfig(**{"epochs": 3, "seed": 0, "progress": False, **tkw})
        return BiLevelTrainer(cfg, torch.device("cpu")).fit(net, cells, codes, len(classes))

    base, _ = fit()
    aug1, m1 = fit(depth=0.3, noise=0.2, logit_adjust=1.0)
    aug2, m2 = fit(depth=0.3, noise=0.2, logit_adjust=1.0)
    s0, s1, s2 = base.state_dict(), aug1.state_dict(), aug2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # seeded
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)  # and it does something
    assert m1["select_macro_f1"] > 0.5


def test_logit_adjustment_prior_is_the_training_draws(counts_ref):
    X, codes, gs, classes, library = counts_ref
    net = build_network(NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes),
                                      hidden=(16, 8), neuron="ann"), seed=0)
    tr = BiLevelTrainer(TrainConfig(epochs=1, seed=0, progress=False, logit_adjust=1.0,
                                    class_balance=1.0), torch.device("cpu"))
    tr.fit(net, ScaledCells(X, gs), codes, len(classes))
    prior = torch.exp(tr._log_prior)
    # fully balanced sampling: every class is drawn equally often
    np.testing.assert_allclose(prior.numpy(), 1 / len(classes), rtol=1e-5)


# -- one-vs-nearest markers -----------------------------------------------------------------
def test_pair_markers_keep_the_gene_that_tells_a_rare_subtype_from_its_sibling():
    rng = np.random.default_rng(0)
    n_genes = 80
    # lineage A (marker genes 0-4) with a common and a rare subtype that differ only in
    # gene 70; lineage B (genes 5-9)
    labels = np.array(["A1"] * 300 + ["A2"] * 6 + ["B"] * 300)
    X = rng.poisson(0.3, size=(len(labels), n_genes)).astype(np.float32)
    X[labels != "B", :5] += rng.poisson(8, size=((labels != "B").sum(), 5))
    X[labels == "B", 5:10] += rng.poisson(8, size=((labels == "B").sum(), 5))
    X[labels == "A2", 70] += 4
    Xlog = sp.csr_matrix(np.log1p(X))
    genes = np.array([f"g{i}" for i in range(n_genes)])
    classes = ["A1", "A2", "B"]
    codes = np.array([classes.index(x) for x in labels])
    _, _, markers0 = select_genes(Xlog, genes, codes, classes, n_hvg=5, n_markers=1)
    idx, _, markers = select_genes(Xlog, genes, codes, classes, n_hvg=5, n_markers=1,
                                   n_pair_markers=1)
    assert "A2 vs A1" in markers and markers["A2 vs A1"] == ["g70"]
    assert "g70" in set(genes[idx])
    assert not any(k.endswith(" vs A1") for k in markers0)


# -- test-time adaptation of batch norm -----------------------------------------------------
def _bn_net(encoder="direct"):
    torch.manual_seed(0)
    return build_network(NetworkConfig(n_genes=12, n_classes=3, hidden=(16, 8),
                                       encoder=encoder, timesteps=4), seed=0)


def test_adapt_batchnorm_uses_the_query_statistics_and_any_chunking():
    rng = np.random.default_rng(0)
    query = (rng.normal(size=(90, 12)) * 2 + 3).astype(np.float32)
    a, b = _bn_net(), _bn_net()
    n = adapt_batchnorm(a, lambda: [query], seed=0)
    adapt_batchnorm(b, lambda: [query[:25], query[25:60], query[60:]], seed=0)
    assert n >= 1
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if "running_" in k:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5)
    # the first batch norm sees the first layer's output: its statistics are the query's
    first = next(m for m in a.modules() if isinstance(m, torch.nn.BatchNorm1d))
    fc = a.fcs[0]
    with torch.no_grad():
        h = fc(torch.from_numpy(query))
    torch.testing.assert_close(first.running_mean, h.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first.running_var, h.var(0), rtol=1e-3, atol=1e-4)
    assert not a.training
