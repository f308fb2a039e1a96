"""Input-to-readout synapses (train --skip): every input spike also drives the readout
through a current-based synapse that does not decay over the T steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small
from spikingjelly.activation_based import functional
from test_sparse import G, _counts, _gene_space, _network
from typer.testing import CliRunner

import scsnn
from scsnn.bundle import sparse_batch
from scsnn.cli import app
from scsnn.errors import InputError
from scsnn.evaluate import energy_estimate
from scsnn.models import NetworkConfig, build_network

runner = CliRunner()


def _with_skip_weights(net, seed=3):
    with torch.no_grad():
        net.skip.weight.copy_(torch.randn(net.skip.weight.shape,
                                          generator=torch.Generator().manual_seed(seed)))
    return net


def test_skip_starts_at_zero_and_leaves_the_network_unchanged():
    """Zero skip synapses: the same readout as the network without them."""
    gs, X = _gene_space(), _counts()
    plain = _network("latency", gs, X).eval()
    skip = _network("latency", gs, X, skip=True).eval()
    assert torch.count_nonzero(skip.skip.weight) == 0
    z = torch.from_numpy(gs.scale(X))
    for net in (plain, skip):
        functional.reset_net(net)
    torch.testing.assert_close(plain.forward_steps(z), skip.forward_steps(z))


def test_latency_skip_adds_each_detected_gene_level_times():
    """With the latency code the final readout gains W @ level / T, and the readout after
    step t only the genes that fired by then."""
    gs, X = _gene_space(), _counts()
    net = _with_skip_weights(_network("latency", gs, X, skip=True)).eval()
    z = torch.from_numpy(gs.scale(X))
    functional.reset_net(net)
    with_skip = net.forward_steps(z)
    w = net.skip.weight.detach().clone()
    with torch.no_grad():
        net.skip.weight.zero_()
    functional.reset_net(net)
    without = net.forward_steps(z)
    T = net.cfg.timesteps
    levels = net.encoder.levels(z).to(z.dtype)
    torch.testing.assert_close(with_skip[-1] - without[-1], levels @ w.t() / T,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.input_trace(z), levels / T)
    # after the first step only the strongest genes (level T) have fired
    first = (levels == T).to(z.dtype) @ w.t()
    torch.testing.assert_close(with_skip[0] - without[0], first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder", ["latency", "direct"])
def test_skip_on_sparse_input_gives_the_dense_results(encoder):
    gs, X = _gene_space(), _counts()
    net = _with_skip_weights(_network(encoder, gs, X, skip=True)).eval()
    absent = "mean" if encoder == "direct" else "zero"
    dense = torch.from_numpy(gs.scale(X, absent=absent))
    sparse = sparse_batch(gs, X, absent=absent)
    functional.reset_net(net)
    a = net.forward_steps(dense)
    functional.reset_net(net)
    b = net.forward_steps(sparse)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_skip_gradients_match_on_sparse_and_dense_input():
    gs, X = _gene_space(), _counts()
    grads = []
    for sparse in (True, False):
        net = _with_skip_weights(_network("latency", gs, X, skip=True)).train()
        xb = sparse_batch(gs, X, absent="zero") if sparse else torch.from_numpy(gs.scale(X))
        torch.manual_seed(5)
        functional.reset_net(net)
        net(xb).logsumexp(1).mean().backward()
        grads.append(net.skip.weight.grad.clone())
    assert torch.count_nonzero(grads[0]) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_ann_twin_with_skip_adds_a_linear_read():
    cfg = NetworkConfig(n_genes=G, n_classes=3, hidden=(8,), neuron="ann", skip=True)
    net = _with_skip_weights(build_network(cfg, seed=0)).eval()
    z = torch.randn(5, G)
    base = net.net(z)
    torch.testing.assert_close(net(z), base + z @ net.skip.weight.t())


def test_energy_counts_the_skip_synapses():
    sizes = [100, 20, 4]
    plain = energy_estimate(sizes, timesteps=4, analog_input=False, spiking=True, n_cells=2,
                            input_events=60.0, layer_spikes=[10.0])
    skip = energy_estimate(sizes, timesteps=4, analog_input=False, spiking=True, n_cells=2,
                           input_events=60.0, layer_spikes=[10.0], skip=True)
    assert skip["sops_per_cell"] == pytest.approx(plain["sops_per_cell"] + 30 * 4)
    assert skip["ann_pj_per_cell"] > plain["ann_pj_per_cell"]


@pytest.fixture(scope="module")
def skip_model(_pbmc_session):
    return scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, skip=True))


def test_logreg_fit_skip_synapses_are_fixed_and_reproducible(skip_model, _pbmc_session):
    """skip_fit='logreg': the synapses are the regression's (non-zero, not trained after),
    the same from the same seed, and the model saves and loads with them."""
    w = skip_model.network.skip.weight
    assert not w.requires_grad and torch.count_nonzero(w) > 0
    again = scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, skip=True))
    assert torch.equal(w, again.network.skip.weight)
    assert torch.equal(skip_model.network.fcs[0].weight, again.network.fcs[0].weight)


def test_skip_model_saves_loads_and_annotates(skip_model, pbmc, tmp_path):
    skip_model.save(tmp_path / "m")
    loaded = scsnn.bundle.load_model(tmp_path / "m")
    assert loaded.config.skip
    assert torch.equal(loaded.network.skip.weight, skip_model.network.skip.weight)
    a = scsnn.tl.annotate(pbmc, skip_model, copy=True)
    b = scsnn.tl.annotate(pbmc, loaded, copy=True)
    assert (a.obs["scsnn"] == b.obs["scsnn"]).all()
    np.testing.assert_allclose(a.obsm["scsnn_probabilities"], b.obsm["scsnn_probabilities"])
    energy = a.uns["scsnn"]["energy"]
    assert energy["ratio_ann_over_snn"] > 1
    res = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert res.exit_code == 0 and "input-to-readout synapses" in res.output


def test_joint_skip_trains_from_zero(_pbmc_session):
    m = scsnn.tl.train(_pbmc_session, "cell_type",
                       **small(seed=0, skip=True, skip_fit="joint", epochs=2))
    w = m.network.skip.weight
    assert w.requires_grad and torch.count_nonzero(w) > 0


def test_unknown_skip_fit_is_refused(_pbmc_session):
    with pytest.raises(InputError, match="skip_fit"):
        scsnn.tl.train(_pbmc_session, "cell_type", **small(skip=True, skip_fit="ridge"))


def test_hidden_gain_scales_only_the_hidden_share_of_the_readout(skip_model, _pbmc_session):
    """skip_hidden_gain g: the same training, then the readout is skip + g * hidden; at 0 it
    is the skip read alone."""
    from scsnn.io import get_expression

    half = skip_model  # the default gain, 0.5
    full = scsnn.tl.train(_pbmc_session, "cell_type",
                          **small(seed=0, skip=True, skip_hidden_gain=1.0))
    zero = scsnn.tl.train(_pbmc_session, "cell_type",
                          **small(seed=0, skip=True, skip_hidden_gain=0.0))
    assert half.metrics["skip_hidden_gain"] == 0.5
    z = torch.as_tensor(skip_model.gene_space.features(get_expression(_pbmc_session)),
                        dtype=torch.float32)
    out = {}
    for name, m in (("full", full), ("half", half), ("zero", zero)):
        net = m.network.eval()
        with torch.no_grad():
            functional.reset_net(net)
            out[name] = net(z)
            out[name + "_skip"] = net.input_trace(z) @ net.skip.weight.t()
    torch.testing.assert_close(out["full_skip"], out["half_skip"])
    torch.testing.assert_close(out["zero"], out["zero_skip"])
    hidden = out["full"] - out["full_skip"]
    assert hidden.abs().max() > 0.1
    torch.testing.assert_close(out["half"], out["full_skip"] + 0.5 * hidden,
                               rtol=1e-4, atol=1e-4)


def test_out_of_range_hidden_gain_is_refused(_pbmc_session):
    with pytest.raises(InputError, match="skip_hidden_gain"):
        scsnn.tl.train(_pbmc_session, "cell_type", **small(skip=True, skip_hidden_gain=1.5))


def test_balanced_skip_fit_reweights_the_classes(skip_model, _pbmc_session):
    """skip_class_weight: "balanced" (the default) and "none" fit the same cells with other
    weights (the classes of pbmc68k_reduced are far from equal in size), recorded in the
    metrics."""
    plain = scsnn.tl.train(_pbmc_session, "cell_type",
                           **small(seed=0, skip=True, skip_class_weight="none"))
    assert skip_model.metrics["skip_class_weight"] == "balanced"
    assert plain.metrics["skip_class_weight"] == "none"
    a, b = skip_model.network.skip.weight, plain.network.skip.weight
    assert not b.requires_grad
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(InputError, match="skip_class_weight"):
        scsnn.tl.train(_pbmc_session, "cell_type",
                       **small(skip=True, skip_class_weight="inverse"))


@pytest.mark.parametrize("T", [4, 6])
def test_skip_fit_reads_the_latency_levels_from_sparse_rows(T):
    """The skip fit's features (the spike counts T * input_trace) come from the stored
    entries without densifying the cells; they equal the dense computation."""
    from scsnn.pp import ScaledCells
    from scsnn.training import BiLevelTrainer as Trainer

    gs, X = _gene_space(), _counts()
    net = _network("latency", gs, X, skip=True)
    if T != 4:
        cfg = NetworkConfig(n_genes=G, n_classes=4, hidden=(16, 8), timesteps=T, skip=True)
        net = build_network(cfg, seed=0)
        net.encoder.fit(torch.from_numpy(gs.scale(X)), torch.from_numpy(gs.floor()))
    cells = ScaledCells(X, gs)
    rows = np.arange(0, X.shape[0], 2)
    levels = Trainer._skip_levels(net, cells, rows)
    with torch.no_grad():
        dense = (net.input_trace(torch.from_numpy(cells.rows(rows))) * T).numpy()
    np.testing.assert_allclose(levels.toarray(), dense, rtol=0, atol=1e-5)
    assert levels.nnz == np.count_nonzero(np.round(dense))
    # another encoder: not this path
    assert Trainer._skip_levels(_network("rank", gs, X, skip=True), cells, rows) is None
    # the ANN twin (no encoder: its skip synapses read z): not this path either
    cfg = NetworkConfig(n_genes=G, n_classes=4, hidden=(16, 8), neuron="ann", skip=True)
    assert Trainer._skip_levels(build_network(cfg, seed=0), cells, rows) is None


def test_lbfgs_logreg_converges_to_scikit_learns_optimum():
    """The fixed-step solver minimises scikit-learn's objective: run long, it reaches the
    converged scikit-learn fit (balanced weights, C = 1); its few-step fits are the same on
    every call."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression

    from scsnn.training import lbfgs_logreg

    rng = np.random.default_rng(0)
    y = rng.choice(3, size=300, p=[0.6, 0.3, 0.1])
    X = rng.poisson(1.0 + y[:, None] * (np.arange(12) % 3 == 0), size=(300, 12)).astype(float)
    X = sparse.csr_matrix(X)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000, class_weight="balanced")
    ref.fit(X, y)
    coef = lbfgs_logreg(X, y, 3, 300, balanced=True)
    np.testing.assert_allclose(coef, ref.coef_, atol=2e-3)
    few = lbfgs_logreg(X, y, 3, 5, balanced=True)
    assert np.abs(few - ref.coef_).max() > 1e-2  # five steps stop short of the optimum
    np.testing.assert_array_equal(few, lbfgs_logreg(X, y, 3, 5, balanced=True))
    # the sparse products cut into row blocks for several threads: the same sums, bit for bit
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(few, lbfgs_logreg(X, y, 3, 5, balanced=True,
                                                        threads=threads))


def test_fixed_step_skip_fit_is_the_default_and_reproducible(skip_model, _pbmc_session):
    """The default skip fit is 20 L-BFGS steps; skip_fit_steps=0 is scikit-learn's solver,
    other synapses; either is the same from the same seed."""
    m = skip_model
    again = scsnn.tl.train(_pbmc_session, "cell_type",
                           **small(seed=0, skip=True, skip_fit_steps=20))
    assert m.metrics["skip_fit_steps"] == 20
    w = m.network.skip.weight
    assert torch.count_nonzero(w) > 0 and torch.equal(w, again.network.skip.weight)
    sk = scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, skip=True, skip_fit_steps=0))
    assert sk.metrics["skip_fit_steps"] == 0
    assert torch.count_nonzero(sk.network.skip.weight) > 0
    assert not torch.equal(w, sk.network.skip.weight)  # scikit-learn's fit differs
    with pytest.raises(InputError, match="skip_fit_steps"):
        scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, skip_fit_steps=-1))
