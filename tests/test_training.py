"""scsnn.training: stratified split, Laplacian smoothness, bi-level training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scsnn.io import get_expression
from scsnn.models import NetworkConfig, build_network
from scsnn.pp import fit_gene_space
from scsnn.training import BiLevelTrainer, TrainConfig, laplacian_smoothness, stratified_split


# -- stratified_split ---------------------------------------------------------------------
def test_stratified_split_every_class_validated():
    sizes = {0: 1, 1: 2, 2: 3, 3: 10, 4: 57}
    codes = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    np.random.default_rng(0).shuffle(codes)
    sp_ = stratified_split(codes, 0.15, seed=0)
    tr, va = sp_.train, sp_.val
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(codes.size))
    assert set(codes[va]) == {2, 3, 4}  # every class with >= 3 cells
    assert set(codes[tr]) == {0, 1, 2, 3, 4}
    assert sorted(sp_.unsplit_classes) == [0, 1]
    for c, n in sizes.items():
        n_tr = int((codes[tr] == c).sum())
        if n < 3:
            assert n_tr == n
        else:
            assert n_tr >= 2  # at least two cells stay in training
    assert (codes[va] == 4).sum() == round(0.15 * 57)
    again = stratified_split(codes, 0.15, seed=0)
    assert np.array_equal(again.val, va)
    assert not np.array_equal(stratified_split(codes, 0.15, seed=1).val, va)


def test_stratified_split_no_validation():
    codes = np.repeat([0, 1], 10)
    sp_ = stratified_split(codes, 0.0)
    assert sp_.val.size == 0 and sp_.train.size == 20
    assert sorted(sp_.unsplit_classes) == [0, 1]


# -- laplacian_smoothness -----------------------------------------------------------------
def _net(hidden=(32, 16), seed=0):
    return build_network(NetworkConfig(n_genes=40, n_classes=3, hidden=hidden), seed=seed)


def _set_identical_alpha(net):
    with torch.no_grad():
        for layer in net.hifi_layers():
            layer.a_k.fill_(0.2)
            layer.a_theta.fill_(0.5)
            layer.a_c.fill_(-0.1)
            layer.a_gamma.fill_(-2.0)


def test_laplacian_nonnegative_and_differentiable():
    for seed in range(3):
        net = _net(seed=seed)
        val = laplacian_smoothness(net)
        assert val.ndim == 0 and float(val.detach()) >= 0
    net = _net()
    val = laplacian_smoothness(net)
    assert float(val.detach()) > 0
    val.backward()
    for p in net.neuron_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert net.fcs[1].weight.grad is None  # the synapses only define the graph


def test_laplacian_zero_for_identical_alpha_on_regular_graph():
    net = _net(hidden=(16, 16))
    _set_identical_alpha(net)
    with torch.no_grad():
        net.fcs[1].weight.fill_(0.3)  # every neuron has the same degree
    assert abs(float(laplacian_smoothness(net).detach())) < 1e-6
    with torch.no_grad():  # make one neuron different: the term becomes positive
        net.hifi_layers()[0].a_theta[0] = 3.0
    assert float(laplacian_smoothness(net).detach()) > 1e-4


def test_laplacian_matches_dense_definition():
    """trace(A^T L A) / n^2 with L the symmetric normalised Laplacian of the two layers'
    neurons, |W| as edges and self-loops added (the model guide, section 2)."""
    net = _net(hidden=(12, 7))
    l1, l2 = net.hifi_layers()
    W = net.fcs[1].weight.detach().abs()  # (7, 12)
    n1, n2 = W.shape[1], W.shape[0]
    adj = torch.zeros(n1 + n2, n1 + n2)
    adj[n1:, :n1] = W
    adj[:n1, n1:] = W.T
    adj += torch.eye(n1 + n2)
    d = adj.sum(1).rsqrt()
    lap = torch.eye(n1 + n2) - d[:, None] * adj * d[None, :]
    a = torch.cat([l1.alpha_matrix(), l2.alpha_matrix()]).detach()
    expected = torch.trace(a.T @ lap @ a) / (n1 + n2) ** 2
    got = laplacian_smoothness(net).detach()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_laplacian_no_hifi_layers():
    net = build_network(NetworkConfig(n_genes=10, n_classes=2, hidden=(8, 4), neuron="lif"))
    assert float(laplacian_smoothness(net).detach()) == 0.0
    one = build_network(NetworkConfig(n_genes=10, n_classes=2, hidden=(8,)))
    assert float(laplacian_smoothness(one).detach()) == 0.0  # a single HIFI layer has no pair


# -- the trainer ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared():
    import scsnn

    a = scsnn.datasets.synthetic(n_cells=300, n_genes=200, n_types=4, rare_fraction=0.03,
                                 n_markers=10, seed=3)
    labs = a.obs["cell_type"].astype(str).to_numpy()
    classes = sorted(set(labs))
    codes = np.array([classes.index(x) for x in labs], dtype=np.int64)
    gs, X = fit_gene_space(get_expression(a), codes, classes, n_hvg=60, n_markers=5)
    return X, codes, gs, classes


def _fit(prepared, *, neuron="hifi", **tkw):
    X, codes, gs, classes = prepared
    cfg = NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes), hidden=(32, 16),
                        neuron=neuron)
    net = build_network(cfg, seed=0)
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tcfg = TrainConfig(**{"epochs": 3, "seed": 0, "progress": False, **tkw})
    net, metrics = BiLevelTrainer(tcfg, torch.device("cpu")).fit(net, X, codes, gs,
                                                                 len(classes))
    return net, init, metrics


def _alpha_names(net):
    ids = {id(p) for p in net.neuron_parameters()}
    return [n for n, p in net.named_parameters() if id(p) in ids]


def test_bilevel_neuron_params_change_only_in_alpha_steps(prepared, monkeypatch):
    snaps = []
    orig = BiLevelTrainer._alpha_step

    def spy(self, network, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in network.state_dict().items()}
        out = orig(self, network, *args, **kwargs)
        after = {k: v.detach().clone() for k, v in network.state_dict().items()}
        snaps.append((before, after))
        return out

    monkeypatch.setattr(BiLevelTrainer, "_alpha_step", spy)
    net, init, metrics = _fit(prepared, epochs=4, alpha_interval=2, patience=100)
    assert metrics["bilevel"] is True
    assert len(snaps) == 2  # epochs 2 and 4
    alpha = _alpha_names(net)
    assert len(alpha) == 8
    others = [k for k in init if k not in alpha]
    prev = init
    for before, after in snaps:
        # between alpha steps (synapse epochs) the neuron parameters do not move
        assert all(torch.equal(prev[k], before[k]) for k in alpha)
        # an alpha step moves them, and leaves every other tensor (weights, BN stats) alone
        assert any(not torch.equal(before[k], after[k]) for k in alpha)
        assert all(torch.equal(before[k], after[k]) for k in others)
        prev = after
    # the synapses did learn
    assert not torch.equal(init["fcs.0.weight"], snaps[0][0]["fcs.0.weight"])
    assert all(np.isfinite(h["alpha_loss"]) == (h["epoch"] % 2 == 0) for h in metrics["history"])


def test_bilevel_without_alpha_step_keeps_neuron_params(prepared):
    net, init, metrics = _fit(prepared, epochs=2, alpha_interval=5)
    state = net.state_dict()
    for k in _alpha_names(net):
        assert torch.equal(state[k], init[k])
    assert not torch.equal(state["fcs.0.weight"], init["fcs.0.weight"])


def test_bilevel_and_joint_training_change_neuron_params(prepared):
    for kw in ({"alpha_interval": 1}, {"bilevel": False}):
        net, init, metrics = _fit(prepared, epochs=2, **kw)
        assert metrics["bilevel"] is kw.get("bilevel", True)
        state = net.state_dict()
        assert any(not torch.equal(state[k], init[k]) for k in _alpha_names(net))


def test_early_stopping_records_history(prepared):
    net, init, m = _fit(prepared, epochs=40, patience=2, min_epochs=3, lr=0.0, alpha_lr=0.0)
    hist = m["history"]
    assert m["epochs_run"] == len(hist) < 40  # nothing learns: stops early
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
    assert len(hist) >= 3  # min_epochs
    for h in hist:
        assert {"epoch", "train_loss", "alpha_loss", "val_macro_f1"} <= set(h)
        assert 0.0 <= h["val_macro_f1"] <= 1.0 and h["train_loss"] > 0
    assert m["val_macro_f1"] == pytest.approx(max(h["val_macro_f1"] for h in hist))
    assert 1 <= m["best_epoch"] <= len(hist)
    assert len(hist) - m["best_epoch"] == 2  # stopped after `patience` epochs without gain
    assert m["n_train"] + m["n_val"] == 300 and m["n_val"] > 0
    assert not net.training


def test_training_learns_and_is_deterministic(prepared):
    X, codes, gs, classes = prepared
    net1, _, m1 = _fit(prepared, epochs=6)
    net2, _, m2 = _fit(prepared, epochs=6)
    s1, s2 = net1.state_dict(), net2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [h["train_loss"] for h in m1["history"]] == [h["train_loss"] for h in m2["history"]]
    assert m1["val_macro_f1"] > 0.5  # four well-separated synthetic types


@pytest.mark.parametrize("neuron", ["lif", "ann"])
def test_training_without_hifi(prepared, neuron):
    net, init, m = _fit(prepared, neuron=neuron, epochs=2)
    assert m["bilevel"] is False  # nothing to train at the upper level
    assert len(m["history"]) == 2
