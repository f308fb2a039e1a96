"""Test-time adaptation of batch norm at annotation (annotate --adapt-batchnorm, scsnn adapt)
and the training options for robustness to technical variation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import small
from typer.testing import CliRunner

import scsnn
from scsnn.cli import app
from scsnn.errors import InputError

runner = CliRunner()
TRAIN_SMALL = ["--epochs", "2", "--hidden", "32,16", "--n-hvg", "200", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _state(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def shifted(pbmc):
    """The PBMC cells with a batch effect: every gene scaled by its own factor, and a
    shallower sequencing depth."""
    rng = np.random.default_rng(7)
    X = sp.csr_matrix(pbmc.X, dtype=np.float32, copy=True)
    factor = np.exp(rng.normal(0.0, 0.6, size=X.shape[1])).astype(np.float32)
    X = sp.csr_matrix(X.multiply(factor[None, :]) * 0.5)
    X.data = np.rint(X.data)
    X.eliminate_zeros()
    pbmc.X = X.astype(np.float32)
    return pbmc


def test_annotate_adapts_a_copy_and_records_it(pbmc_model, shifted):
    before = _state(pbmc_model)
    plain = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True)
    adapted = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True,
                                adapt_batchnorm=True)
    assert _same_state(before, _state(pbmc_model)), "the loaded model was changed"
    assert not pbmc_model.network.training
    assert adapted.uns["scsnn"]["params"]["adapt_batchnorm"] is True
    assert plain.uns["scsnn"]["params"]["adapt_batchnorm"] is False
    p0 = adapted.obsm["scsnn_probabilities"]
    p1 = plain.obsm["scsnn_probabilities"]
    assert np.abs(p0 - p1).max() > 1e-3  # the statistics changed the predictions
    # the same query again: the same result (nothing carried over from the first run)
    again = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True,
                              adapt_batchnorm=True)
    np.testing.assert_array_equal(again.obsm["scsnn_probabilities"], p0)


def test_adapt_replaces_the_statistics_with_the_querys(pbmc_model, shifted):
    m2 = scsnn.tl.adapt(shifted, pbmc_model, device="cpu")
    norms0 = [m for m in pbmc_model.network.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    norms1 = [m for m in m2.network.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms0) == len(norms1) >= 1
    for a, b in zip(norms0, norms1):
        assert not torch.allclose(a.running_mean, b.running_mean, atol=1e-3)
        assert not torch.allclose(a.running_var, b.running_var, rtol=1e-2)
        torch.testing.assert_close(a.weight, b.weight)  # learned scale and shift kept
        torch.testing.assert_close(a.bias, b.bias)
    # the first batch norm now normalises the query's first-layer output to mean 0
    net = m2.network
    Xq, present = m2.gene_space.project(scsnn.io.get_expression(shifted))
    absent = "mean" if scsnn.models.is_analog(net) else "zero"
    x = torch.from_numpy(m2.gene_space.scale(Xq, present, absent=absent))
    seen = []
    hook = norms1[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            gen = torch.Generator()
            gen.manual_seed(scsnn.models.batch_seed(int(m2.settings["seed"]), 0))
            net.eval()
            net.forward_steps(x, gen)
    finally:
        hook.remove()
    y = seen[0].double()
    y = y.reshape(-1, y.shape[-1])
    torch.testing.assert_close(norms1[0].running_mean.double(), y.mean(0), rtol=1e-3,
                               atol=1e-3)
    assert m2.model_id != pbmc_model.model_id
    assert m2.settings["adapted_batchnorm"]["from_model"] == pbmc_model.model_id
    assert m2.settings["adapted_batchnorm"]["n_cells"] == shifted.n_obs


def test_chunked_equals_whole_with_adaptation(pbmc_model, shifted, tmp_path):
    q = tmp_path / "q.h5ad"
    shifted.write_h5ad(q)
    whole = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True, batch_size=64,
                              adapt_batchnorm=True)
    ref = whole.obsm["scsnn_probabilities"]
    # streamed: statistics from blocks of 128 cells, predictions block by block
    scsnn.tl.annotate_file(q, pbmc_model, output=tmp_path / "s.h5ad", batch_size=64,
                           chunk_size=128, device="cpu", adapt_batchnorm=True)
    s = scsnn.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_allclose(s.obsm["scsnn_probabilities"], ref, atol=1e-5)
    assert s.uns["scsnn"]["params"]["adapt_batchnorm"]
    assert (s.obs["scsnn"].astype(str) == whole.obs["scsnn"].astype(str)).all()
    # scattered: adapt once on the whole file, annotate 3 chunks, gather
    m2 = scsnn.tl.adapt(q, pbmc_model, batch_size=64, chunk_size=128, device="cpu")
    m2.save(tmp_path / "adapted")
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}.h5ad")
        scsnn.tl.annotate_file(q, tmp_path / "adapted", output=parts[-1], batch_size=64,
                               chunk=(i, 3), device="cpu")
    scsnn.tl.gather(q, parts[::-1], tmp_path / "g.h5ad")
    g = scsnn.read_h5ad(tmp_path / "g.h5ad")
    np.testing.assert_allclose(g.obsm["scsnn_probabilities"], ref, atol=1e-5)
    # and the adapted model on the whole query, in memory
    direct = scsnn.tl.annotate(shifted, m2, device="cpu", copy=True, batch_size=64)
    np.testing.assert_allclose(direct.obsm["scsnn_probabilities"], ref, atol=1e-5)


def test_adaptation_is_refused_for_a_chunk(pbmc_model_dir, pbmc, tmp_path):
    q = tmp_path / "q.h5ad"
    pbmc.write_h5ad(q)
    with pytest.raises(InputError, match="scsnn adapt"):
        scsnn.tl.annotate_file(q, pbmc_model_dir, output=tmp_path / "c.h5ad", chunk=(0, 2),
                               adapt_batchnorm=True, device="cpu")
    r = invoke("annotate", q, "--model", pbmc_model_dir, "--chunk", "1/2", "--output",
               tmp_path / "c.h5ad", "--adapt-batchnorm")
    assert r.exit_code == 2, r.output
    assert "scsnn adapt" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.h5ad").exists()


def test_cli_adapt_then_annotate(pbmc_model_dir, shifted, tmp_path):
    q = tmp_path / "q.h5ad"
    shifted.write_h5ad(q)
    meta = (pbmc_model_dir / "model.json").read_bytes()
    weights = (pbmc_model_dir / "weights.safetensors").read_bytes()
    r = invoke("annotate", q, "--model", pbmc_model_dir, "--output", tmp_path / "a.h5ad",
               "--adapt-batchnorm", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = invoke("adapt", q, "--model", pbmc_model_dir, "--out", tmp_path / "m2", "--device",
               "cpu")
    assert r.exit_code == 0, r.output
    assert "adapted to" in r.output
    assert (pbmc_model_dir / "model.json").read_bytes() == meta
    assert (pbmc_model_dir / "weights.safetensors").read_bytes() == weights
    r = invoke("annotate", q, "--model", tmp_path / "m2", "--output", tmp_path / "b.h5ad",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    a, b = scsnn.read_h5ad(tmp_path / "a.h5ad"), scsnn.read_h5ad(tmp_path / "b.h5ad")
    np.testing.assert_allclose(a.obsm["scsnn_probabilities"], b.obsm["scsnn_probabilities"],
                               atol=1e-5)
    assert a.uns["scsnn"]["params"]["adapt_batchnorm"]
    assert not b.uns["scsnn"]["params"]["adapt_batchnorm"]
    r = invoke("info", tmp_path / "m2")
    assert r.exit_code == 0 and "batch norm     adapted to" in r.output, r.output
    info = json.loads(invoke("info", tmp_path / "m2", "--json").output)
    assert info["adapted_batchnorm"]["n_cells"] == shifted.n_obs
    # never over the model it comes from
    r = invoke("adapt", q, "--model", pbmc_model_dir, "--out", pbmc_model_dir)
    assert r.exit_code == 2 and "--out" in r.output, r.output
    assert (pbmc_model_dir / "model.json").read_bytes() == meta


def test_train_options_reach_the_model(tmp_path, pbmc):
    ref = tmp_path / "ref.h5ad"
    pbmc.write_h5ad(ref)
    r = invoke("train", ref, "-l", "cell_type", "-o", tmp_path / "m", *TRAIN_SMALL,
               "--augment-depth", "0.4", "--augment-gene-noise", "0.2", "--logit-adjust", "1",
               "--pair-markers", "3")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    tr, pre = meta["settings"]["train"], meta["settings"]["preprocess"]
    assert tr["augment_depth"] == 0.4 and tr["augment_gene_noise"] == 0.2
    assert tr["logit_adjust"] == 1.0 and pre["n_pair_markers"] == 3


@pytest.mark.parametrize("args, hint", [
    (["--augment-depth", "0"], "--augment-depth"),
    (["--augment-depth", "1.5"], "--augment-depth"),
    (["--augment-gene-noise", "-0.1"], "--augment-gene-noise"),
    (["--logit-adjust", "-1"], "--logit-adjust"),
    (["--pair-markers", "-2"], "--pair-markers"),
])
def test_train_option_usage_errors(tmp_path, args, hint):
    r = invoke("train", tmp_path / "missing.h5ad", "-l", "x", "-o", tmp_path / "m", *args)
    assert r.exit_code == 2, r.output
    assert hint in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("bad", [dict(augment_depth=0.0), dict(augment_depth=2.0),
                                 dict(augment_gene_noise=-1.0), dict(logit_adjust=-0.5),
                                 dict(n_pair_markers=-1)])
def test_train_refuses_out_of_range_settings(synth, bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        scsnn.tl.train(synth, "cell_type", **small(**bad))


def test_depth_augmentation_without_counts_is_said(synth, caplog):
    lognorm = synth.copy()
    lognorm.X = scsnn.pp.log_normalize(scsnn.io.get_expression(synth))
    with caplog.at_level("WARNING", logger="scsnn"):
        scsnn.tl.train(lognorm, "cell_type", **small(epochs=1, augment_depth=0.5))
    assert "augment_depth needs the reference's raw counts" in caplog.text


def test_adapt_help_loads_no_torch():
    code = ("import sys\nfrom scsnn.cli import app\n"
            "for cmd in (['adapt', '--help'], ['annotate', '--help'], ['train', '--help']):\n"
            "    try:\n        app(cmd, prog_name='scsnn')\n"
            "    except SystemExit as e:\n        assert not e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    assert "--adapt-batchnorm" in r.stdout and "--augment-depth" in r.stdout
    assert "--pair-markers" in r.stdout and "--logit-adjust" in r.stdout


def test_benchmark_scores_both_from_one_training(synth):
    from scsnn import benchmark as bm

    ref, query = synth[:200].copy(), synth[200:].copy()
    split = bm.pair_split(ref, query, "cell_type")
    kw = dict(epochs=2, hidden=(16, 8), n_hvg=100, device="cpu")
    both = bm.run([split], "cell_type", methods=["hifi"], train_kwargs={
        **kw, "adapt_batchnorm": "both"})
    plain = bm.run([split], "cell_type", methods=["hifi"], train_kwargs=kw)
    adapted = bm.run([split], "cell_type", methods=["hifi"], train_kwargs={
        **kw, "adapt_batchnorm": True})
    by = {r["method"]: r for r in both["rows"]}
    assert set(by) == {"hifi", "hifi+adabn"}
    assert by["hifi"]["pred"] == plain["rows"][0]["pred"]
    assert by["hifi+adabn"]["pred"] == adapted["rows"][0]["pred"]
    assert [s["method"] for s in both["summary"]] == ["hifi", "hifi+adabn"]


def test_weighted_adaptation_with_equal_weights_is_plain_adaptation(pbmc_model, shifted):
    Xq, present = pbmc_model.gene_space.project(scsnn.io.get_expression(shifted))
    absent = "mean" if scsnn.models.is_analog(pbmc_model.network) else "zero"

    def batches():
        return (pbmc_model.gene_space.scale(Xq[s : s + 100], present, absent=absent)
                for s in range(0, Xq.shape[0], 100))

    import copy

    a, b = copy.deepcopy(pbmc_model.network), copy.deepcopy(pbmc_model.network)
    scsnn.models.adapt_batchnorm(a, batches, seed=0)
    scsnn.models.adapt_batchnorm(b, batches, seed=0, weights=np.ones(Xq.shape[0]))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_cell_weights_give_the_training_mix():
    from scsnn import tl

    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    mix = np.array([0.2, 0.3, 0.5])
    w = tl._cell_weights(labels, mix)
    assert w.mean() == pytest.approx(1.0)
    got = np.bincount(labels, weights=w) / w.sum()
    # class 2 would need a factor of 10 exactly, class 0 of 0.25: within the clip
    np.testing.assert_allclose(got, mix, atol=1e-9)
    # a class the query lacks: the mix over the predicted classes; factors clipped
    w = tl._cell_weights(np.array([0] * 99 + [1]), mix)
    # over classes 0 and 1 the mix is 0.4 / 0.6: class 0 gets 0.4 / 0.99, class 1 (0.6 / 0.01)
    # is clipped at REWEIGHT_CLIP
    assert w[-1] / w[0] == pytest.approx(tl.REWEIGHT_CLIP / (0.4 / 0.99))


def test_reweighted_adaptation_chunked_equals_whole(pbmc_model, shifted, tmp_path):
    q = tmp_path / "q.h5ad"
    shifted.write_h5ad(q)
    plain = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True, batch_size=64,
                              adapt_batchnorm=True)
    whole = scsnn.tl.annotate(shifted, pbmc_model, device="cpu", copy=True, batch_size=64,
                              adapt_batchnorm="reweighted")
    ref = whole.obsm["scsnn_probabilities"]
    assert whole.uns["scsnn"]["params"]["adapt_batchnorm"] == "reweighted"
    assert np.abs(ref - plain.obsm["scsnn_probabilities"]).max() > 1e-4
    scsnn.tl.annotate_file(q, pbmc_model, output=tmp_path / "s.h5ad", batch_size=64,
                           chunk_size=128, device="cpu", adapt_batchnorm="reweighted")
    s = scsnn.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_allclose(s.obsm["scsnn_probabilities"], ref, atol=1e-5)
    m2 = scsnn.tl.adapt(q, pbmc_model, batch_size=64, chunk_size=128, device="cpu",
                        reweighted=True)
    direct = scsnn.tl.annotate(shifted, m2, device="cpu", copy=True, batch_size=64)
    np.testing.assert_allclose(direct.obsm["scsnn_probabilities"], ref, atol=1e-5)
    with pytest.raises(InputError, match="adapt_batchnorm"):
        scsnn.tl.annotate(shifted, pbmc_model, device="cpu", adapt_batchnorm="sometimes")
