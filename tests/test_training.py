"""scsnn.training: three-way split, Laplacian smoothness, bi-level training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scsnn.io import get_expression
from scsnn.models import Dropout, NetworkConfig, build_network
from scsnn.pp import ScaledCells, fit_gene_space
from scsnn.training import (
    BiLevelTrainer,
    TrainConfig,
    laplacian_smoothness,
    macro_f1,
    stratified_split,
)


# -- stratified_split ---------------------------------------------------------------------
def test_three_way_split_every_class_where_needed():
    sizes = {0: 1, 1: 2, 2: 3, 3: 4, 4: 10, 5: 57}
    codes = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    np.random.default_rng(0).shuffle(codes)
    sp_ = stratified_split(codes, 0.1, 0.1, seed=0)
    tr, al, se = sp_.train, sp_.alpha, sp_.select
    for a, b in ((tr, al), (tr, se), (al, se)):
        assert np.intersect1d(a, b).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, al, se])), np.arange(codes.size))
    assert set(codes[se]) == {2, 3, 4, 5}  # every class with >= 3 cells is scored
    assert set(codes[al]) == {3, 4, 5}  # every class with >= 4 cells fits alpha
    assert set(codes[tr]) == set(sizes)
    assert sorted(sp_.unsplit_classes) == [0, 1]
    for c, n in sizes.items():
        assert (codes[tr] == c).sum() >= min(n, 2)  # at least two cells stay in training
    assert (codes[se] == 5).sum() == round(0.1 * 57) == (codes[al] == 5).sum()
    again = stratified_split(codes, 0.1, 0.1, seed=0)
    assert np.array_equal(again.select, se) and np.array_equal(again.alpha, al)
    assert not np.array_equal(stratified_split(codes, 0.1, 0.1, seed=1).select, se)


def test_split_without_held_out_cells():
    codes = np.repeat([0, 1], 10)
    sp_ = stratified_split(codes, 0.0, 0.0)
    assert sp_.select.size == 0 and sp_.alpha.size == 0 and sp_.train.size == 20
    assert sorted(sp_.unsplit_classes) == [0, 1]


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 6, 300)
    assert macro_f1(y, p) == pytest.approx(
        f1_score(y, p, average="macro", labels=np.unique(y), zero_division=0))


# -- laplacian_smoothness -----------------------------------------------------------------
def _net(hidden=(32, 16), seed=0, **kw):
    return build_network(NetworkConfig(n_genes=40, n_classes=3, hidden=hidden, **kw), seed=seed)


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


def test_laplacian_null_space_is_identical_biophysics():
    """Zero exactly when connected neurons share their parameters, whatever the synapses
    (the normalised Laplacian would vanish for alpha proportional to sqrt(degree) instead)."""
    net = _net(hidden=(16, 12))
    _set_identical_alpha(net)
    assert abs(float(laplacian_smoothness(net).detach())) < 1e-6  # random, irregular |W|
    l1, l2 = net.hifi_layers()
    W = net.fcs[1].weight.detach().abs()
    d1, d2 = W.sum(0), W.sum(1)
    with torch.no_grad():  # theta proportional to sqrt(degree): not smooth, so penalised
        l1.a_theta.copy_(torch.log(torch.expm1(d1.sqrt() - 0.05)))
        l2.a_theta.copy_(torch.log(torch.expm1(d2.sqrt() - 0.05)))
    assert float(laplacian_smoothness(net).detach()) > 1e-3
    _set_identical_alpha(net)
    with torch.no_grad():  # make one neuron different: the term becomes positive
        l1.a_theta[0] = 3.0
    assert float(laplacian_smoothness(net).detach()) > 1e-4


def test_laplacian_matches_dense_definition():
    """trace(A^T L A) / sum|W| with L = D - |W| the combinatorial Laplacian of the bipartite
    graph of two consecutive layers' neurons (|W| as edge weights)."""
    net = _net(hidden=(12, 7))
    l1, l2 = net.hifi_layers()
    W = net.fcs[1].weight.detach().abs()  # (7, 12)
    n1, n2 = W.shape[1], W.shape[0]
    adj = torch.zeros(n1 + n2, n1 + n2)
    adj[n1:, :n1] = W
    adj[:n1, n1:] = W.T
    lap = torch.diag(adj.sum(1)) - adj
    a = torch.cat([l1.alpha_matrix(), l2.alpha_matrix()]).detach()
    expected = torch.trace(a.T @ lap @ a) / W.sum()
    # ... which is the |W|-weighted mean squared difference of connected neurons
    diff = ((l1.alpha_matrix()[None, :, :] - l2.alpha_matrix()[:, None, :]) ** 2).sum(-1)
    assert torch.allclose(expected, (W * diff.detach()).sum() / W.sum(), rtol=1e-5)
    got = laplacian_smoothness(net).detach()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_laplacian_no_hifi_pair():
    net = build_network(NetworkConfig(n_genes=10, n_classes=2, hidden=(8, 4), neuron="lif"))
    assert float(laplacian_smoothness(net).detach()) == 0.0  # constant parameters
    one = build_network(NetworkConfig(n_genes=10, n_classes=2, hidden=(8,)))
    assert float(laplacian_smoothness(one).detach()) == 0.0  # a single HIFI layer has no pair
    sj = build_network(NetworkConfig(n_genes=10, n_classes=2, hidden=(8, 4), neuron="sj-lif"))
    assert float(laplacian_smoothness(sj).detach()) == 0.0


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


def _fit(prepared, *, neuron="hifi", net_kw=None, **tkw):
    X, codes, gs, classes = prepared
    cfg = NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes), hidden=(32, 16),
                        neuron=neuron, **(net_kw or {}))
    net = build_network(cfg, seed=0)
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tcfg = TrainConfig(**{"epochs": 3, "seed": 0, "progress": False, **tkw})
    net, metrics = BiLevelTrainer(tcfg, torch.device("cpu")).fit(net, ScaledCells(X, gs), codes,
                                                                 len(classes))
    return net, init, metrics


def _alpha_names(net):
    ids = {id(p) for p in net.neuron_parameters()}
    return [n for n, p in net.named_parameters() if id(p) in ids]


def test_bilevel_neuron_params_change_only_in_alpha_steps(prepared, monkeypatch):
    snaps = []
    orig = BiLevelTrainer._alpha_round

    def spy(self, network, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in network.state_dict().items()}
        out = orig(self, network, *args, **kwargs)
        after = {k: v.detach().clone() for k, v in network.state_dict().items()}
        snaps.append((before, after))
        return out

    monkeypatch.setattr(BiLevelTrainer, "_alpha_round", spy)
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
    assert all((h["alpha_loss"] is not None) == (h["epoch"] % 2 == 0)
               for h in metrics["history"])
    assert metrics["alpha"]["rounds"] == 2 and metrics["alpha"]["steps"] == 2 * 32


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
        assert {"epoch", "train_loss", "alpha_loss", "select_macro_f1"} <= set(h)
        assert 0.0 <= h["select_macro_f1"] <= 1.0 and h["train_loss"] > 0
    best = max(h["select_macro_f1"] for h in hist)
    assert m["select_macro_f1_best_epoch"] == pytest.approx(best)
    assert 1 <= m["best_epoch"] <= len(hist)
    assert len(hist) - m["best_epoch"] == 2  # stopped after `patience` epochs without gain
    assert m["n_train"] + m["n_alpha"] + m["n_select"] == 300
    assert m["n_alpha"] > 0 and m["n_select"] > 0
    assert not net.training


def test_training_learns_and_is_deterministic(prepared):
    X, codes, gs, classes = prepared
    net1, _, m1 = _fit(prepared, epochs=6)
    net2, _, m2 = _fit(prepared, epochs=6)
    s1, s2 = net1.state_dict(), net2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [h["train_loss"] for h in m1["history"]] == [h["train_loss"] for h in m2["history"]]
    assert m1["select_macro_f1"] > 0.5  # four well-separated synthetic types


@pytest.mark.parametrize("neuron", ["lif", "ann", "sj-lif"])
def test_training_without_hifi(prepared, neuron):
    net, init, m = _fit(prepared, neuron=neuron, epochs=2)
    assert m["bilevel"] is False  # nothing to train at the upper level
    assert len(m["history"]) == 2
    # the alpha split is not wasted: it joins the training split
    assert m["n_alpha"] == 0 and m["n_train"] + m["n_select"] == 300


def test_alpha_round_runs_without_dropout_and_with_frozen_statistics(prepared):
    """The upper level sees the deterministic network: every dropout module (the network's
    own Dropout class, not torch's) and every batch norm in evaluation mode."""
    X, codes, gs, classes = prepared
    cfg = NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes), hidden=(32, 16))
    net = build_network(cfg, seed=0)
    calls = []  # (module in training mode?, synapses frozen?) at every dropout call

    def hook(mod, args):
        calls.append((mod.training, not net.fcs[0].weight.requires_grad))

    for m in net.modules():
        if isinstance(m, Dropout | torch.nn.BatchNorm1d):
            m.register_forward_pre_hook(hook)
    tcfg = TrainConfig(epochs=2, alpha_interval=1, seed=0, progress=False)
    BiLevelTrainer(tcfg, torch.device("cpu")).fit(net, ScaledCells(X, gs), codes, len(classes))
    upper = [training for training, frozen in calls if frozen]
    lower = [training for training, frozen in calls if not frozen]
    assert upper and lower
    assert not any(upper)  # the upper level: no dropout, batch-norm statistics fixed
    assert any(lower)  # the lower level trains with dropout


def test_upper_level_moves_the_neuron_parameters(prepared):
    # without the skip read: on these easy cells the skip read alone scores the selection
    # split perfectly at the first epoch, which is then kept, before any upper-level round
    net, init, m = _fit(prepared, epochs=6, alpha_interval=2, patience=100, refit_epochs=0,
                        net_kw={"skip": False})
    change = m["neurons"]["mean_abs_change"]
    assert len(change) == 2 and set(change[0]) == {"k", "theta", "c", "gamma"}
    assert m["alpha"]["steps"] == 3 * 32
    assert max(change[0].values()) > 0.05  # a real budget: the biophysics move
    start, end = m["neurons"]["start"][0], m["neurons"]["end"][0]
    assert end["theta"]["sd"] != start["theta"]["sd"]
    ratio = m["alpha"]["smoothness_grad_ratio"]
    assert ratio is not None and 0 < ratio < 100


def test_stored_metric_is_the_saved_model_on_the_selection_split(prepared):
    X, codes, gs, classes = prepared
    net, init, m = _fit(prepared, epochs=4)
    split = stratified_split(codes, 0.1, 0.1, seed=0)
    trainer = BiLevelTrainer(TrainConfig(seed=0), torch.device("cpu"))
    logits = trainer._predict(net, ScaledCells(X, gs), split.select)
    assert m["select_macro_f1"] == pytest.approx(macro_f1(codes[split.select],
                                                          logits.argmax(1)))
    assert m["refit"]["epochs"] == 2 and isinstance(m["refit"]["kept"], bool)
    assert set(m["splits"]) == {"train", "alpha", "select", "refit"}


def test_temperature_scaling_fits_and_never_hurts():
    from scsnn.training import calibrate, expected_calibration_error

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(0, 1, (2000, 4))
    logits[np.arange(2000), y] += 1.0
    over = calibrate(logits * 4.0, y)  # overconfident: softened (T > 1)
    assert over["temperature"] > 2.0 and over["ece_after"] < over["ece_before"]
    under = calibrate(logits * 0.25, y)  # underconfident (label smoothing): sharpened
    assert under["temperature"] < 0.5 and under["ece_after"] < under["ece_before"]
    assert under["nll_after"] <= under["nll_before"]
    p = np.full((3, 2), 0.5)
    assert expected_calibration_error(p, np.array([0, 1, 0])) == pytest.approx(0.5 - 1 / 3)


def test_trained_model_carries_its_calibration(prepared):
    net, init, m = _fit(prepared, epochs=3)
    cal = m["calibration"]
    assert cal["n_cells"] == m["n_select"] and cal["temperature"] > 0
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
