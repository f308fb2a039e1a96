"""Sparse, event-driven input: the first layer works on stored entries only, with the
results of the dense path (up to float rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from spikingjelly.activation_based import functional

from scsnn.bundle import predict, reads_sparse, sparse_batch
from scsnn.models import (
    NetworkConfig,
    SparseCells,
    build_network,
    event_linear,
    predict_batches,
    stable_order,
)
from scsnn.pp import GeneSpace, ScaledCells

G, N = 40, 30


def _gene_space(seed=0) -> GeneSpace:
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.1, 1.5, G).astype(np.float32)
    std = rng.uniform(0.2, 1.0, G).astype(np.float32)
    std[0] = 0.01  # zero expression of gene 0 standardises below the clip
    return GeneSpace(genes=[f"g{i}" for i in range(G)], mean=mean, std=std, clip=10.0)


def _counts(n=N, density=0.25, seed=1) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n, G, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.log1p(X.data * 20).astype(np.float32)
    X.data[:3] = 40.0  # far above the mean: clipped
    return X


def _network(encoder, gs, X, **kw):
    cfg = NetworkConfig(n_genes=G, n_classes=4, hidden=(16, 8), timesteps=4, encoder=encoder,
                        **kw)
    net = build_network(cfg, seed=0)
    if hasattr(net.encoder, "thresholds"):
        z = torch.from_numpy(gs.scale(X))
        net.encoder.fit(z, torch.from_numpy(gs.floor()))
    return net


@pytest.mark.parametrize("absent", ["mean", "zero"])
def test_scale_sparse_stands_for_scale(absent):
    gs, X = _gene_space(), _counts()
    present = np.ones(G, bool)
    present[[3, 7]] = False
    X = X.tolil()
    X[0, 3] = 2.0  # an entry of an absent gene takes the base value
    X = X.tocsr()
    for p in (None, present):
        dense = gs.scale(X, p, absent=absent)
        sparse = SparseCells.from_numpy(*gs.scale_sparse(X, p, absent=absent))
        np.testing.assert_array_equal(sparse.to_dense().numpy(), dense)
    assert gs.scale_sparse(X)[3][0] == -10.0  # gene 0's floor is clipped


def test_event_linear_forward_and_gradient_match_a_dense_product():
    rng = np.random.default_rng(0)
    n_bags, H, nnz = 12, 5, 60
    bags = torch.from_numpy(np.sort(rng.integers(0, n_bags, nnz)))
    genes = torch.from_numpy(rng.integers(0, G, nnz))
    w = torch.rand(nnz, dtype=torch.float64)
    W = torch.randn(H, G, dtype=torch.float64, requires_grad=True)
    S = torch.zeros(n_bags, G, dtype=torch.float64).index_put_((bags, genes), w, accumulate=True)
    g = torch.randn(n_bags, H, dtype=torch.float64)
    (event_linear(genes, bags, n_bags, W, w) * g).sum().backward()
    grad = W.grad.clone()
    W.grad = None
    (S @ W.t() * g).sum().backward()
    torch.testing.assert_close(event_linear(genes, bags, n_bags, W, w), S @ W.t())
    torch.testing.assert_close(grad, W.grad)


def test_stable_order_sorts_and_keeps_ties_in_order():
    keys = torch.tensor([3, 1, 3, 0, 1, 1])
    assert stable_order(keys, 4).tolist() == [3, 1, 4, 5, 0, 2]
    big = torch.tensor([70000, 5, 70000, 2])
    assert stable_order(big, 70001).tolist() == [3, 1, 0, 2]


@pytest.mark.parametrize("encoder", ["latency", "direct"])
def test_sparse_input_gives_the_dense_results(encoder):
    gs, X = _gene_space(), _counts()
    net = _network(encoder, gs, X).eval()
    absent = "mean" if encoder == "direct" else "zero"
    present = np.ones(G, bool)
    present[5] = False
    assert net.reads_sparse(False)
    for p in (None, present):
        dense = torch.from_numpy(gs.scale(X, p, absent=absent))
        sparse = sparse_batch(gs, X, p, absent=absent)
        functional.reset_net(net)
        a = net.forward_steps(dense)
        functional.reset_net(net)
        b = net.forward_steps(sparse)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_step_on_sparse_input_matches_the_dense_one():
    """The same dropout draw, spikes, loss and gradients, sparse or dense (latency)."""
    gs, X = _gene_space(), _counts()
    grads = []
    for sparse in (True, False):
        net = _network("latency", gs, X).train()
        xb = sparse_batch(gs, X, absent="zero") if sparse else torch.from_numpy(gs.scale(X))
        torch.manual_seed(5)
        functional.reset_net(net)
        loss = net(xb).logsumexp(1).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_spike_count_is_the_same_on_sparse_input():
    from scsnn.models import SpikeCounter

    gs, X = _gene_space(), _counts()
    net = _network("latency", gs, X).eval()
    counts = []
    for xb in (torch.from_numpy(gs.scale(X)), sparse_batch(gs, X, absent="zero")):
        net.counter = SpikeCounter()
        functional.reset_net(net)
        net(xb)
        counts.append((net.counter.input_events, net.counter.layer_spikes))
    net.counter = None
    assert counts[0][0] == counts[1][0] > 0
    assert counts[0][1] == pytest.approx(counts[1][1], rel=1e-3)


def test_encoders_without_an_event_path_read_sparse_input_densified():
    gs, X = _gene_space(), _counts()
    for encoder in ("rate", "rank"):
        net = _network(encoder, gs, X).eval()
        assert not net.reads_sparse(False) and not reads_sparse(net)
        gen = torch.Generator()
        functional.reset_net(net)
        a = net.forward_steps(torch.from_numpy(gs.scale(X, absent="zero")),
                              gen.manual_seed(1))
        functional.reset_net(net)
        b = net.forward_steps(sparse_batch(gs, X, absent="zero"), gen.manual_seed(1))
        torch.testing.assert_close(a, b)
    # direct input is densified in training, where input dropout reaches the zero entries
    net = _network("direct", gs, X)
    assert net.reads_sparse(False) and not net.reads_sparse(True)


def test_predict_sparse_equals_predict_dense_and_chunks():
    gs, X = _gene_space(), _counts(n=200)
    net = _network("latency", gs, X)
    assert reads_sparse(net)
    sparse = predict(net, X, gs, batch_size=64)
    dense = predict_batches(net, (gs.scale(X[s : s + 64], absent="zero")
                                  for s in range(0, 200, 64)))
    assert (sparse.logits.argmax(1) == dense.logits.argmax(1)).mean() > 0.99
    np.testing.assert_allclose(sparse.logits, dense.logits, atol=1e-3)
    parts = [predict(net, X[s : s + 64], gs, batch_size=64, first_batch=s // 64)
             for s in range(0, 200, 64)]
    np.testing.assert_array_equal(np.concatenate([p.logits for p in parts]), sparse.logits)


def test_scaled_cells_sparse_rows_draw_the_same_augmentation():
    gs, X = _gene_space(), _counts()
    cells = ScaledCells(X, gs, gene_noise=0.3)
    idx = np.array([4, 2, 2, 9])
    dense = cells.rows(idx, np.random.default_rng(3))
    sparse = SparseCells.from_numpy(*cells.sparse_rows(idx, np.random.default_rng(3)))
    np.testing.assert_array_equal(sparse.to_dense().numpy(), dense)
