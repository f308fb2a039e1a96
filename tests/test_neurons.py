"""scsnn.neurons: the HIFI neuron and the LIF/PLIF factories."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from spikingjelly.activation_based import neuron as sj_neuron

from scsnn.neurons import HIFI_PARAMS, HIFINode, make_neuron


def _node(n=16, seed=0, **kw) -> HIFINode:
    return HIFINode(n, generator=torch.Generator().manual_seed(seed), **kw)


def _drive(T=8, N=4, F_=16, seed=1, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, N, F_, generator=g) * scale


def test_per_neuron_parameter_vectors():
    node = _node(16)
    for name in HIFI_PARAMS:
        p = getattr(node, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == (16,)
    # heterogeneous from the start: a small random spread
    assert node.a_k.std() > 0 and node.a_theta.std() > 0
    assert len(node.neuron_parameters()) == 4
    assert node.alpha_matrix().shape == (16, 4)
    hr = _node(8, hard_reset=True)
    assert hr.u.shape == (8,) and len(hr.neuron_parameters()) == 5
    na = _node(8, autapse=False)
    assert na.a_gamma is None and len(na.neuron_parameters()) == 3
    assert torch.all(na.gamma == 0)


def test_parameters_in_range_at_init():
    node = _node(256, init_spread=1.0)  # wide spread: the maps keep every value in range
    assert torch.all((node.k > 0) & (node.k < 1))
    assert torch.all(node.theta > 0)
    assert torch.all((node.c > 0) & (node.c < 2))
    assert torch.all(node.gamma > 0)
    n0 = _node(64, init_spread=0.0, init_k=0.3, init_theta=0.8, init_c=1.2, init_gamma=0.05)
    assert torch.allclose(n0.k, torch.full((64,), 0.3), atol=1e-6)
    assert torch.allclose(n0.theta, torch.full((64,), 0.8), atol=1e-6)
    assert torch.allclose(n0.c, torch.full((64,), 1.2), atol=1e-6)
    assert torch.allclose(n0.gamma, torch.full((64,), 0.05), atol=1e-6)


def test_gamma_receives_gradient_at_init():
    node = _node(16)
    out = node(_drive())
    assert out.sum() > 0  # the neurons fire, so the autapse matters from step 2 on
    out.sum().backward()
    assert node.a_gamma.grad is not None
    assert node.a_gamma.grad.abs().sum() > 0
    for name in ("a_k", "a_theta", "a_c"):
        assert getattr(node, name).grad.abs().sum() > 0


def test_multistep_output_binary_shape():
    node = _node(16)
    s = node(_drive(T=5, N=3))
    assert s.shape == (5, 3, 16)
    assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    assert 0 < s.mean() < 1


def test_single_and_multi_step_agree():
    x = _drive(T=6)
    m = _node(16)
    s_multi = m(x)
    s_ = _node(16, step_mode="s")
    s_single = torch.stack([s_(x[t]) for t in range(6)])
    assert torch.equal(s_multi, s_single)
    assert torch.allclose(m.v, s_.v)


def test_autapse_reduces_firing_under_constant_drive():
    x = torch.full((20, 4, 32), 0.9)
    with_aut = _node(32, init_gamma=1.0, autapse=True)
    without = _node(32, init_gamma=1.0, autapse=False)
    # same generator: the first three parameter vectors are identical
    assert torch.equal(with_aut.a_k, without.a_k) and torch.equal(with_aut.a_c, without.a_c)
    n_with, n_without = with_aut(x).sum(), without(x).sum()
    assert n_without > 0
    assert n_with < n_without


def test_reset_net_resets_state():
    node = _node(16)
    x = _drive()
    first = node(x)
    assert isinstance(node.v, torch.Tensor) and node.v.abs().sum() > 0
    second = node(x)  # continues from the stored state
    assert not torch.equal(first, second)
    functional.reset_net(node)
    assert node.v == 0.0 and node.s == 0.0
    assert torch.equal(node(x), first)


def test_online_mode_detaches_state_between_steps():
    x = _drive(T=6, N=2).requires_grad_(True)
    online = _node(16, online=True)
    online(x)[-1].sum().backward()
    g = x.grad
    assert torch.all(g[:-1] == 0)  # earlier inputs: no gradient through the state
    assert g[-1].abs().sum() > 0  # within the step: gradient flows

    x2 = x.detach().clone().requires_grad_(True)
    bptt = _node(16, online=False)
    bptt(x2)[-1].sum().backward()
    assert x2.grad[0].abs().sum() > 0  # full BPTT reaches the first step


def test_hand_computed_steps_match_docstring_formula():
    node = _node(3, init_spread=0.0, step_mode="s")
    with torch.no_grad():
        node.a_k.copy_(torch.tensor([0.0, 1.0, -1.0]))
        node.a_theta.copy_(torch.tensor([0.0, 0.5, -0.5]))
        node.a_c.copy_(torch.tensor([0.0, 0.3, -0.2]))
        node.a_gamma.copy_(torch.tensor([0.0, -1.0, 1.0]))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    sp_ = lambda z: math.log1p(math.exp(z))  # noqa: E731
    xs = [[1.2, -0.4, 2.0], [0.9, 1.5, 0.1], [0.7, 0.2, 1.0]]
    v, s = [0.0] * 3, [0.0] * 3
    all_spikes, inhibited = [], 0
    for x in xs:
        out = node(torch.tensor([x]))
        for i in range(3):
            k = sig(node.a_k[i].item())
            theta = sp_(node.a_theta[i].item()) + 0.05
            c = 2 * sig(node.a_c[i].item())
            gamma = sp_(node.a_gamma[i].item())
            inhibited += s[i] > 0
            current = c * (x[i] - gamma * s[i])
            h = (1 - k) * v[i] + current
            h = h if h >= 0 else 0.1 * h
            s[i] = 1.0 if h - theta >= 0 else 0.0
            v[i] = h - theta * s[i]
        assert out[0].tolist() == s
        assert torch.allclose(node.v[0], torch.tensor(v), atol=1e-5)
        all_spikes += s
    # both branches (spike, silence) and the autapse term were exercised
    assert 0.0 in all_spikes and 1.0 in all_spikes
    assert inhibited > 0


def test_hard_reset_goes_to_u():
    node = _node(4, init_spread=0.0, hard_reset=True, step_mode="s")
    with torch.no_grad():
        node.u.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.tensor([[5.0, 5.0, 5.0, 0.0]])
    s = node(x)
    assert s.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    h_last = F.leaky_relu(node.c[3].detach() * 0.0, 0.1)
    assert torch.allclose(node.v[0], torch.tensor([0.1, -0.2, 0.3, float(h_last)]))


@pytest.mark.parametrize("kind", ["lif", "plif", "hifi", "sj-lif", "sj-plif"])
def test_factory(kind):
    layer = make_neuron(kind, 16)
    assert layer.step_mode == "m"
    s = layer(_drive(T=5, N=3, scale=3.0))
    assert s.shape == (5, 3, 16)
    assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    assert s.sum() > 0
    expected = {"lif": HIFINode, "plif": HIFINode, "hifi": HIFINode,
                "sj-lif": sj_neuron.LIFNode, "sj-plif": sj_neuron.ParametricLIFNode}[kind]
    assert isinstance(layer, expected)


def test_fair_baselines_are_the_hifi_layer_with_frozen_shared_parameters():
    lif, plif, hifi = make_neuron("lif", 16), make_neuron("plif", 16), make_neuron("hifi", 16)
    for node in (lif, plif):  # same soft reset, gain 1, leak 0.5, threshold 1, no autapse
        assert not node.hard_reset and not node.autapse and not node.heterogeneous
        q = node.quantities()
        assert torch.allclose(q["k"], torch.full((16,), 0.5))
        assert torch.allclose(q["theta"], torch.full((16,), 1.0))
        assert torch.allclose(q["c"], torch.full((16,), 1.0))
        assert torch.all(q["gamma"] == 0)
    assert lif.neuron_parameters() == []  # nothing neuron-level is learned
    (leak,) = plif.neuron_parameters()  # one learnable leak per layer
    assert leak is plif.a_k and leak.shape == (1,)
    assert len(hifi.neuron_parameters()) == 4
    assert all(p.shape == (16,) for p in hifi.neuron_parameters())
    # with HIFI's parameters set to LIF's values, the two layers compute the same spikes
    x = _drive(T=6, N=3, scale=2.5)
    twin = make_neuron("hifi", 16, autapse=False)
    with torch.no_grad():
        twin.a_k.zero_()
        twin.a_theta.fill_(math.log(math.expm1(1.0 - 0.05)))
        twin.a_c.zero_()
    assert torch.equal(twin(x), lif(x))


def test_homogeneous_hifi_has_one_value_per_layer():
    node = make_neuron("hifi", 12, heterogeneous=False)
    assert all(p.shape == (1,) for p in node.neuron_parameters())
    assert len(node.neuron_parameters()) == 4
    assert node.alpha_matrix().shape == (12, 4)
    assert torch.all(node.alpha_matrix() == node.alpha_matrix()[0])
    out = node(_drive(T=4, N=2, F_=12))
    out.sum().backward()
    assert all(p.grad is not None for p in node.neuron_parameters())


def test_frozen_parameters_are_buffers():
    node = HIFINode(8, learn=("theta",))
    assert [p is node.a_theta for p in node.neuron_parameters()] == [True]
    assert "a_k" in dict(node.named_buffers()) and "a_theta" in dict(node.named_parameters())
    assert set(node.state_dict()) >= {"a_k", "a_theta", "a_c", "a_gamma"}
    with pytest.raises(ValueError, match="unknown neuron parameter"):
        HIFINode(8, learn=("tau",))


def test_neuron_summary_reports_spread():
    from scsnn.neurons import neuron_summary

    het, hom = _node(64, init_spread=0.5), make_neuron("lif", 64)
    s_het, s_hom = neuron_summary([het])[0], neuron_summary([hom])[0]
    assert set(s_het) == {"k", "theta", "c", "gamma"}
    assert s_het["theta"]["sd"] > 0.05 and s_hom["theta"]["sd"] == 0.0
    assert s_hom["k"]["mean"] == pytest.approx(0.5)


def test_one_recurrence_for_loop_and_reference():
    """HIFINode's plain loop and kernels.hifi_reference run the same step function."""
    from scsnn.kernels import hifi_reference

    node = _node(16, init_spread=0.5, kernel="torch")
    x = _drive(T=7)
    s = node(x)
    v0 = torch.zeros_like(x[0])
    ref, v, _ = hifi_reference(x, v0, v0, node.k, node.theta, node.c, node.gamma, None,
                               autapse=True, hard_reset=False, online=False)
    assert torch.equal(s, ref) and torch.equal(node.v, v)


def test_factory_options_and_unknown():
    h = make_neuron("hifi", 8, online=True, autapse=False)
    assert h.online and not h.autapse
    with pytest.raises(ValueError, match="unknown neuron 'izhikevich'"):
        make_neuron("izhikevich", 8)
