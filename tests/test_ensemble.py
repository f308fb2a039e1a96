"""Ensembles (train --ensemble K): K networks from different seeds, probabilities averaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small
from typer.testing import CliRunner

import scsnn
from scsnn.cli import app
from scsnn.errors import InputError
from scsnn.models import EnsembleClassifier, member_seed, softmax

runner = CliRunner()


@pytest.fixture(scope="module")
def ensemble(_pbmc_session):
    return scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, ensemble=2))


def test_member_seeds_are_distinct_and_member_zero_is_the_seed():
    assert member_seed(5, 0) == 5
    seeds = {member_seed(s, k) for s in range(4) for k in range(1, 4)}
    assert len(seeds) == 12 and not seeds & set(range(4))


def test_member_zero_is_the_single_network_of_the_same_seed(ensemble, pbmc_model):
    """Member 0 trains with the ensemble's seed on the same split: the single model."""
    assert isinstance(ensemble.network, EnsembleClassifier)
    single = pbmc_model.network.state_dict()
    member = ensemble.network.members[0].state_dict()
    assert single.keys() == member.keys()
    assert all(torch.equal(single[k], member[k]) for k in single)
    other = ensemble.network.members[1].state_dict()
    assert not torch.equal(member["fcs.0.weight"], other["fcs.0.weight"])
    ens = ensemble.metrics["ensemble"]
    assert ens["members"] == 2 and ens["seeds"] == [0, member_seed(0, 1)]
    assert ens["split_seed"] == 0
    assert ensemble.metrics["n_select"] == pbmc_model.metrics["n_select"]
    assert 0.0 <= ensemble.metrics["select_macro_f1"] <= 1.0
    assert ensemble.metrics["train_seconds"] >= ens["member_metrics"][0]["train_seconds"]


def test_probabilities_are_the_members_mean(ensemble, pbmc):
    """The ensemble's probabilities, at temperature 1, are the mean of the members' own
    tempered probabilities (members run alone with the same inference seed)."""
    net = ensemble.network
    gs = ensemble.gene_space
    X, present = gs.project(scsnn.io.get_expression(pbmc))
    out = scsnn.bundle.predict(net, X, gs, present)
    temps = net.member_temperature.tolist()
    assert all(t > 0 for t in temps) and temps != [1.0, 1.0]
    mean = np.mean([softmax(scsnn.bundle.predict(m, X, gs, present).logits / t)
                    for m, t in zip(net.members, temps)], axis=0)
    np.testing.assert_allclose(softmax(out.logits), mean, rtol=1e-4, atol=1e-6)


def test_save_load_annotate_and_energy(ensemble, pbmc, tmp_path):
    ensemble.save(tmp_path / "m")
    loaded = scsnn.load_model(tmp_path / "m")
    assert isinstance(loaded.network, EnsembleClassifier) and loaded.config.ensemble == 2
    a = scsnn.tl.annotate(pbmc, ensemble, device="cpu", copy=True)
    b = scsnn.tl.annotate(pbmc, loaded, device="cpu", copy=True)
    assert (a.obs["scsnn"] == b.obs["scsnn"]).all()
    np.testing.assert_array_equal(a.obsm["scsnn_probabilities"], b.obsm["scsnn_probabilities"])
    # energy: both members' spikes, per cell; rates are the members' mean
    e = a.uns["scsnn"]["energy"]
    assert e["ensemble"] == 2 and e["n_cells"] == pbmc.n_obs
    singles = []
    for member in loaded.network.members:
        one = scsnn.ScsnnModel(loaded.gene_space, loaded.classes, member,
                               scsnn.models.NetworkConfig.from_dict(
                                   {**loaded.config.to_dict(), "ensemble": 1}))
        singles.append(scsnn.tl.annotate(pbmc, one, device="cpu", copy=True).uns["scsnn"]["energy"])
    assert e["snn_pj_per_cell"] == pytest.approx(sum(s["snn_pj_per_cell"] for s in singles))
    assert e["ann_pj_per_cell"] == pytest.approx(singles[0]["ann_pj_per_cell"])
    for i, rate in enumerate(e["spike_rate_per_layer"]):
        assert rate == pytest.approx(np.mean([s["spike_rate_per_layer"][i] for s in singles]))


def test_batchnorm_adaptation_adapts_every_member(ensemble, pbmc):
    adapted = scsnn.tl.annotate(pbmc, ensemble, device="cpu", copy=True, adapt_batchnorm=True)
    plain = scsnn.tl.annotate(pbmc, ensemble, device="cpu", copy=True)
    assert adapted.uns["scsnn"]["params"]["adapt_batchnorm"] is True
    assert plain.obsm["scsnn_probabilities"].shape == adapted.obsm["scsnn_probabilities"].shape
    assert not np.allclose(plain.obsm["scsnn_probabilities"],
                           adapted.obsm["scsnn_probabilities"])


def test_bad_ensemble_size_is_refused(pbmc):
    with pytest.raises(InputError, match="ensemble"):
        scsnn.tl.train(pbmc, "cell_type", **small(seed=0, ensemble=0, epochs=1))


def test_cli_trains_an_ensemble_and_info_shows_it(pbmc, tmp_path):
    ref = tmp_path / "ref.h5ad"
    pbmc.write_h5ad(ref)
    out = tmp_path / "model"
    res = runner.invoke(app, ["train", str(ref), "--label-key", "cell_type", "--out", str(out),
                              "--epochs", "1", "--hidden", "16,8", "--n-hvg", "100",
                              "--ensemble", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "model.json").read_text())["network"]["ensemble"] == 2
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code == 0 and "ensemble of 2" in res.output
    res = runner.invoke(app, ["train", str(ref), "--label-key", "cell_type", "--out",
                              str(tmp_path / "bad"), "--ensemble", "0"])
    assert res.exit_code != 0
