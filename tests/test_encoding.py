"""scsnn.encoding: direct, rate, latency and rank-order input encoders."""

from __future__ import annotations

import pytest
import torch

from scsnn.encoding import ENCODERS, make_encoder

G = 12


def _reference(n=400, g=G, seed=0):
    """Standardised-looking reference cells: zero expression at the floor, the rest above."""
    gen = torch.Generator().manual_seed(seed)
    floor = -torch.rand(g, generator=gen) - 0.2
    detected = torch.rand(n, g, generator=gen) < 0.6
    values = floor + 0.05 + torch.rand(n, g, generator=gen) * 4.0
    return torch.where(detected, values, floor.expand(n, g)), floor


def _fitted(name, T, **kw):
    z, floor = _reference()
    return make_encoder(name, T, G, **kw).fit(z, floor), z, floor


@pytest.mark.parametrize("name", ENCODERS)
def test_shapes_binary_and_silent_when_undetected(name):
    enc, z, floor = _fitted(name, 6)
    out = enc(z[:5], torch.Generator().manual_seed(1))
    assert out.shape == (6, 5, G) and out.dtype == z.dtype
    if name == "direct":
        assert enc.analog and enc.constant
        return
    assert not enc.analog and not enc.constant
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    undetected = z[:5] <= floor
    assert undetected.any()
    assert out[:, undetected].sum() == 0  # a gene with zero expression never fires


def test_direct_repeats_input():
    enc, z, _ = _fitted("direct", 4)
    out = enc(z)
    for t in range(4):
        assert torch.equal(out[t], z)


def test_levels_are_equal_frequency_bins_of_detected_values():
    T = 4
    enc, z, floor = _fitted("latency", T)
    lev = enc.levels(z)
    assert torch.equal(lev == 0, z <= floor)
    for g in range(G):
        counts = torch.bincount(lev[:, g], minlength=T + 1)[1:].float()
        # each level holds about a quarter of the cells in which the gene is detected
        assert counts.min() >= 0.7 * counts.mean()
    assert enc.thresholds.shape == (T - 1, G)
    assert torch.all(enc.thresholds[1:] >= enc.thresholds[:-1])


def test_latency_fires_once_strongest_first_and_uses_every_step():
    T = 4
    enc, z, floor = _fitted("latency", T)
    s = enc(z)
    per_gene = s.sum(0)
    assert torch.equal(per_gene, (z > floor).to(s.dtype))  # once if detected, else never
    # every step carries input (the old code left steps 2 and 3 empty at T = 4)
    assert torch.all(s.sum((1, 2)) > 0)
    t_fire = s.argmax(0)
    lev = enc.levels(z)
    hit = lev > 0
    assert torch.equal(t_fire[hit], (T - lev[hit]))
    # a higher value never fires later
    g = 0
    zz = z[:, g][hit[:, g]]
    tt = t_fire[:, g][hit[:, g]]
    order = torch.argsort(zz)
    assert torch.all(tt[order][1:] <= tt[order][:-1])


def test_rate_probability_follows_level():
    T = 4
    enc, z, floor = _fitted("rate", T)
    x = z[:8].repeat(500, 1)  # the same eight cells, 500 times: 2,000 draws per gene
    rate = enc(x, torch.Generator().manual_seed(0)).mean(0).view(500, 8, G).mean(0)
    lev = enc.levels(z[:8]).float()
    assert torch.allclose(rate, lev / T, atol=0.05)
    assert torch.all(rate[z[:8] <= floor] == 0)


def test_rate_reproducible_with_seeded_generator():
    enc, z, _ = _fitted("rate", 8)
    a = enc(z, torch.Generator().manual_seed(42))
    b = enc(z, torch.Generator().manual_seed(42))
    c = enc(z, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rank_fires_top_n_in_order():
    T, n = 4, 5
    enc, z, floor = _fitted("rank", T, rank_n=n)
    s = enc(z)
    per_cell = s.sum((0, 2))
    detected = (z > floor).sum(1)
    assert torch.equal(per_cell, torch.minimum(detected, torch.tensor(n)).to(s.dtype))
    assert torch.all(s.sum(0) <= 1)
    for i in range(10):
        fired = torch.nonzero(s[:, i].sum(0)).flatten()
        silent = torch.nonzero((s[:, i].sum(0) == 0) & (z[i] > floor)).flatten()
        if silent.numel():  # every gene that fired stands out more than any silent one
            assert z[i, fired].min() >= z[i, silent].max()
        t = s[:, i, fired].argmax(0)
        order = torch.argsort(-z[i, fired])
        assert torch.all(t[order][1:] >= t[order][:-1])  # stronger genes fire no later


def test_rank_code_depends_only_on_each_cells_order():
    enc, z, floor = _fitted("rank", 4, rank_n=6)
    # replace every cell's detected values by new ones in the same order within the cell
    det = z > floor
    order = torch.argsort(torch.where(det, z, torch.full_like(z, -1e9)), dim=1, descending=True)
    pos = torch.argsort(order, dim=1).float()  # position of each gene in its cell's order
    other = torch.where(det, 8.0 - 0.3 * pos, z)
    assert not torch.allclose(other, z)
    assert torch.equal(enc(z), enc(other))


def test_fitted_levels_travel_in_the_state_dict():
    enc, z, _ = _fitted("latency", 4)
    fresh = make_encoder("latency", 4, G)
    assert not torch.equal(fresh(z), enc(z))
    fresh.load_state_dict(enc.state_dict())
    assert torch.equal(fresh(z), enc(z))
    assert set(enc.state_dict()) == {"floor", "thresholds"}
    assert make_encoder("direct", 4, G).state_dict() == {}


def test_unknown_encoder_and_bad_settings():
    with pytest.raises(ValueError, match="unknown encoder 'poisson'"):
        make_encoder("poisson", 4, G)
    with pytest.raises(ValueError, match="timesteps"):
        make_encoder("rate", 0, G)
    with pytest.raises(ValueError, match="rank_n"):
        make_encoder("rank", 4, G, rank_n=0)
