"""scsnn.encoding: direct, rate and latency input encoders."""

from __future__ import annotations

import pytest
import torch

from scsnn.encoding import ENCODERS, make_encoder


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 12, generator=g) * 2.0


@pytest.mark.parametrize("name", ENCODERS)
def test_shapes(name, x):
    enc = make_encoder(name, timesteps=6)
    out = enc(x, torch.Generator().manual_seed(1))
    assert out.shape == (6, 5, 12)
    assert out.dtype == x.dtype


def test_direct_repeats_input(x):
    enc = make_encoder("direct", 4)
    out = enc(x)
    for t in range(4):
        assert torch.equal(out[t], x)
    assert enc.analog and enc.constant


def test_rate_binary_and_close_to_sigmoid():
    T = 4000
    x = torch.linspace(-3, 3, 9).unsqueeze(0)  # one cell, 9 genes
    enc = make_encoder("rate", T)
    s = enc(x, torch.Generator().manual_seed(0))
    assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    rate = s.mean(0).squeeze(0)
    assert torch.allclose(rate, torch.sigmoid(x).squeeze(0), atol=0.03)
    assert not enc.analog and not enc.constant


def test_rate_reproducible_with_seeded_generator(x):
    enc = make_encoder("rate", 8)
    a = enc(x, torch.Generator().manual_seed(42))
    b = enc(x, torch.Generator().manual_seed(42))
    c = enc(x, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_latency_one_spike_at_most_earlier_for_higher():
    T = 10
    x = torch.tensor([[-1.0, 0.0, 0.2, 1.0, 3.0, 8.0]])
    s = make_encoder("latency", T)(x)
    assert set(torch.unique(s).tolist()) <= {0.0, 1.0}
    per_gene = s.sum(0).squeeze(0)
    assert torch.all(per_gene <= 1)
    # at or below the mean (x <= 0, intensity <= 0.5): silent
    assert per_gene[0] == 0 and per_gene[1] == 0
    assert torch.all(per_gene[2:] == 1)
    t_first = s.squeeze(1).argmax(0)[2:]
    assert torch.all(t_first[1:] <= t_first[:-1])  # higher value -> earlier (or same) step
    assert t_first[-1] < t_first[0]  # strictly earlier across the range
    expected = torch.round((1 - torch.sigmoid(x[0, 2:])) * (T - 1)).long()
    assert torch.equal(t_first, expected)


def test_latency_many_genes(x):
    s = make_encoder("latency", 7)(x)
    assert torch.all(s.sum(0) <= 1)
    assert torch.equal(s.sum(0) > 0, x > 0)


def test_unknown_encoder_and_bad_timesteps():
    with pytest.raises(ValueError, match="unknown encoder 'poisson'"):
        make_encoder("poisson", 4)
    with pytest.raises(ValueError, match="timesteps"):
        make_encoder("rate", 0)
