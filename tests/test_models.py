"""scsnn.models: the spiking classifier, its ANN twin, batched prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional

from scsnn.errors import InputError
from scsnn.models import (
    NETWORKS,
    ANNClassifier,
    Dropout,
    NetworkConfig,
    SpikeCounter,
    SpikingClassifier,
    build_network,
    predict_batches,
    resolve_device,
    softmax,
)


def _cfg(**kw) -> NetworkConfig:
    base = dict(n_genes=20, n_classes=3, hidden=(8, 6), timesteps=3)
    base.update(kw)
    return NetworkConfig(**base)


def _x(n=5, g=20, seed=0):
    return torch.randn(n, g, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("neuron", NETWORKS)
@pytest.mark.parametrize("encoder", ["direct", "rate", "latency", "rank"])
def test_forward_shapes(neuron, encoder):
    net = build_network(_cfg(neuron=neuron, encoder=encoder), seed=0).eval()
    assert isinstance(net, ANNClassifier if neuron == "ann" else SpikingClassifier)
    x = _x()
    functional.reset_net(net)
    out = net(x, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    functional.reset_net(net)
    steps = net.forward_steps(x, torch.Generator().manual_seed(0))
    assert steps.shape == ((1, 5, 3) if neuron == "ann" else (3, 5, 3))
    assert torch.allclose(steps[-1], out, atol=1e-6)


def test_spike_counter_counts_every_spike():
    """The counter's totals equal the spikes the layers actually emitted."""
    net = build_network(_cfg(neuron="hifi", encoder="rate"), seed=0).eval()
    with torch.no_grad():  # low thresholds, so that every layer fires
        for layer in net.hifi_layers():
            layer.a_theta.fill_(-4.0)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(float(o.sum())))
             for m in net.spiking]
    inputs = []
    h_in = net.fcs[0].register_forward_hook(lambda mod, i, o: inputs.append(float(i[0].sum())))
    net.counter = SpikeCounter()
    functional.reset_net(net)
    x = _x()
    with torch.no_grad():
        net(x, torch.Generator().manual_seed(0))
    for h in [*hooks, h_in]:
        h.remove()
    assert net.counter.n_cells == x.shape[0]
    assert net.counter.layer_spikes == pytest.approx(seen)
    assert net.counter.input_events == pytest.approx(inputs[0]) and inputs[0] > 0
    assert all(v > 0 for v in seen)


def test_neuron_parameters():
    net = build_network(_cfg(neuron="hifi"), seed=0).eval()
    assert len(net.hifi_layers()) == 2
    assert len(net.neuron_parameters()) == 8  # 4 alpha vectors per HIFI layer
    lif = build_network(_cfg(neuron="lif"), seed=0)
    assert lif.neuron_parameters() == [] and len(lif.hifi_layers()) == 2
    plif = build_network(_cfg(neuron="plif"), seed=0)
    assert [p.shape for p in plif.neuron_parameters()] == [(1,), (1,)]
    sj = build_network(_cfg(neuron="sj-plif"), seed=0)
    assert len(sj.neuron_parameters()) == 2 and sj.hifi_layers() == []
    assert build_network(_cfg(neuron="ann")).neuron_parameters() == []
    with pytest.raises(ValueError, match="unknown neuron"):
        build_network(_cfg(neuron="izhikevich"))


def test_baselines_differ_from_hifi_only_in_the_neurons():
    """Same widths, batch norm, dropout and readout: the state dicts differ only in the
    neuron parameters, and LIF's are fixed buffers."""
    hifi = build_network(_cfg(neuron="hifi"), seed=0)
    lif = build_network(_cfg(neuron="lif"), seed=0)
    neuron_keys = {k for k in hifi.state_dict() if k.startswith("spiking.")}
    assert {k for k in lif.state_dict() if not k.startswith("spiking.")} == \
        set(hifi.state_dict()) - neuron_keys
    for k in set(hifi.state_dict()) - neuron_keys:
        assert torch.equal(hifi.state_dict()[k], lif.state_dict()[k])
    assert not any(n.startswith("spiking.") for n, _ in lif.named_parameters())


def test_batch_norm_affine_switch():
    on = build_network(_cfg(norm_affine=True))
    off = build_network(_cfg(norm_affine=False))
    assert on.norms[0].weight is not None and off.norms[0].weight is None
    assert off.norms[0].running_mean.shape == (8,)


def test_spike_input_dropout_silences_whole_genes():
    net = build_network(_cfg(encoder="latency", timesteps=4, input_dropout=0.5), seed=0)
    net.train()
    x = torch.rand(200, 20) + 1.0  # every gene detected (the default floor is -clip)
    torch.manual_seed(0)
    spikes = net.encode(x)
    per_gene = spikes.sum(0)
    dropped = per_gene == 0
    assert 0.3 < dropped.float().mean() < 0.7  # about half the genes of every cell
    full = net.encoder(x)
    kept = ~dropped
    # a kept gene keeps all its spikes (scaled by 1/keep), a dropped one loses every spike
    assert torch.allclose(spikes[:, kept] / 2.0, full[:, kept])
    net.eval()
    assert torch.equal(net.encode(x), full)


def test_dropout_mask_keeps_expected_value():
    d = Dropout(0.25)
    m = d.mask((400, 300), torch.device("cpu"), torch.float32)
    assert torch.allclose(torch.unique(m), torch.tensor([0.0, 256 / 192]))
    assert abs(float(m.mean()) - 1.0) < 0.02


def test_build_network_seeded():
    a, b = build_network(_cfg(), seed=5), build_network(_cfg(), seed=5)
    c = build_network(_cfg(), seed=6)
    sa, sb, sc_ = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc_[k]) for k in sa)


def test_network_config_round_trip():
    cfg = _cfg(encoder="rank", rank_n=7, neuron="plif", online=True, heterogeneous=False,
               norm_affine=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["hidden"] == [8, 6]
    back = NetworkConfig.from_dict({**d, "unknown_future_key": 1})
    assert back == cfg


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0, -5.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[1], 1 / 3)


def test_predict_batches_reproducible_and_chunkable():
    net = build_network(_cfg(encoder="rate"), seed=3).eval()
    with torch.no_grad():  # low thresholds, so that the spikes drawn matter
        for layer in net.hifi_layers():
            layer.a_theta.fill_(-4.0)
    x = [_x(7, seed=s).numpy() for s in range(4)]
    a = predict_batches(net, x, seed=5)
    b = predict_batches(net, x[2:], seed=5, first_batch=2)
    np.testing.assert_array_equal(a.logits[14:], b.logits)
    assert not np.array_equal(predict_batches(net, x, seed=6).logits, a.logits)
    empty = predict_batches(net, [], seed=5)
    assert empty.logits.shape == (0, 3) and empty.step_labels.shape == (0, 3)


def test_step_batch_norm_is_batch_norm_per_time_step():
    from scsnn.models import StepBatchNorm

    x = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(0)) * 2 + 1
    bntt = StepBatchNorm(3, 6)
    y = bntt(x)
    for t in range(3):
        ref = torch.nn.BatchNorm1d(6)
        np.testing.assert_allclose(ref(x[t]).detach(), y[t].detach(), atol=1e-5)
        np.testing.assert_allclose(ref.running_mean, bntt.running_mean[t], atol=1e-6)
        np.testing.assert_allclose(ref.running_var, bntt.running_var[t], atol=1e-5)
    net = build_network(_cfg(norm_per_step=True, encoder="latency"), seed=0)
    assert isinstance(net.norms[0], StepBatchNorm) and net.norms[0].weight.shape == (3, 8)
    functional.reset_net(net)
    assert net(_x()).shape == (5, 3)
