"""scsnn.tl: train on a labelled AnnData, annotate a query."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import assert_one_line, cuda_only, shared_file, small

import scsnn
from scsnn.errors import InputError
from scsnn.tl import UNASSIGNED, label_summary

KEY = "scsnn"


# -- what annotate writes -----------------------------------------------------------------
def test_annotate_writes_all_slots(pbmc_annotated, pbmc_model):
    a = pbmc_annotated
    classes = pbmc_model.classes
    assert classes == sorted(a.obs["cell_type"].astype(str).unique())
    pred = a.obs[KEY]
    assert isinstance(pred.dtype, pd.CategoricalDtype)
    # model order, only the labels some cell carries (no min_confidence: no Unassigned)
    assert list(pred.cat.categories) == [c for c in classes if (pred == c).any()]
    assert UNASSIGNED not in pred.cat.categories
    assert pred.notna().all()

    conf = a.obs[f"{KEY}_confidence"].to_numpy()
    assert conf.shape == (a.n_obs,)
    assert np.all((conf >= 1.0 / len(classes) - 1e-6) & (conf <= 1.0))

    P = a.obsm[f"{KEY}_probabilities"]
    assert isinstance(P, np.ndarray) and P.dtype == np.float32
    assert P.shape == (a.n_obs, len(classes))
    proba = scsnn.tl.probabilities(a)  # the same as a DataFrame named by class
    assert list(proba.columns) == classes and list(proba.index) == list(a.obs_names)
    np.testing.assert_array_equal(proba.to_numpy(), P)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    assert np.all(P >= 0)
    # the label is the most probable class, the confidence its probability
    assert list(pred.astype(str)) == [classes[i] for i in P.argmax(1)]
    np.testing.assert_allclose(conf, P.max(1), rtol=1e-6)

    uns = a.uns[KEY]
    assert set(uns) == {"params", "classes", "model", "gene_overlap", "version", "energy",
                        "latency"}
    T = pbmc_model.config.timesteps
    steps = a.obsm[f"{KEY}_step_labels"]
    assert steps.shape == (a.n_obs, T) and set(np.unique(steps)) <= set(classes)
    # class names; the last step is the decision
    np.testing.assert_array_equal(steps[:, -1], np.asarray(classes, dtype=object)[P.argmax(1)])
    assert f"{KEY}_decision_step" not in a.obs  # only with early exit
    assert uns["latency"]["timesteps"] == T and uns["latency"]["mean_steps"] == T
    # spike input (the latency encoder): every layer is event-driven, no analog MACs
    e = uns["energy"]
    assert e["macs_per_cell"] == 0 and e["sops_per_cell"] > 0 and 0 < e["input_spike_rate"] < 1
    assert e["ratio_ann_over_snn"] > 1
    assert len(uns["energy"]["spike_rate_per_layer"]) == len(pbmc_model.config.hidden)
    assert list(uns["classes"]) == classes
    assert uns["model"] == pbmc_model.model_id and len(uns["model"]) == 64
    assert uns["version"] == scsnn.__version__
    assert uns["gene_overlap"]["n_model_genes"] == pbmc_model.gene_space.n_genes
    assert uns["gene_overlap"]["n_present"] == pbmc_model.gene_space.n_genes
    assert uns["gene_overlap"]["fraction"] == 1.0
    assert uns["params"]["neuron"] == "hifi" and uns["params"]["encoder"] == "latency"
    assert uns["params"]["min_confidence"] == 0.0


def test_early_exit_decides_earlier(pbmc_model, _pbmc_session):
    a = _pbmc_session.copy()
    full = scsnn.tl.annotate(a, pbmc_model, device="cpu", copy=True)
    # a threshold that half the cells reach by the last step
    thr = float(np.median(full.obs[f"{KEY}_confidence"]))
    scsnn.tl.annotate(a, pbmc_model, device="cpu", early_exit=thr)
    steps = a.obs[f"{KEY}_decision_step"].to_numpy()
    T = pbmc_model.config.timesteps
    assert steps.min() >= 1 and steps.max() <= T and steps.mean() < T
    assert a.uns[KEY]["latency"]["mean_steps"] == pytest.approx(steps.mean())
    # a cell decided at step t carries the label of the readout after step t
    at = np.asarray(a.obsm[f"{KEY}_step_labels"])[np.arange(a.n_obs), steps - 1]
    assert list(a.obs[KEY].astype(str)) == list(at)
    rep = scsnn.evaluate(a, "cell_type")
    assert rep["latency"]["mean_steps_early_exit"] == pytest.approx(steps.mean())


def test_small_model_learns(pbmc_annotated, pbmc_model):
    a = pbmc_annotated
    acc = (a.obs[KEY].astype(str) == a.obs["cell_type"].astype(str)).mean()
    majority = a.obs["cell_type"].value_counts(normalize=True).max()
    assert acc > majority + 0.2  # training cells: far better than the majority class
    m = pbmc_model.metrics
    assert m["epochs_run"] >= 1 and 1 <= m["best_epoch"] <= m["epochs_run"]
    assert sum(m["class_counts"].values()) == a.n_obs
    assert pbmc_model.settings["label_key"] == "cell_type"
    assert pbmc_model.config.hidden == (32, 16)


def test_label_summary(pbmc_annotated):
    s = label_summary(pbmc_annotated)
    assert s["cells"].sum() == pbmc_annotated.n_obs
    assert ((s["mean_confidence"] > 0) & (s["mean_confidence"] <= 1)).all()


def test_min_confidence_gives_unassigned(pbmc, pbmc_model, pbmc_annotated):
    conf = pbmc_annotated.obs[f"{KEY}_confidence"].to_numpy()
    thr = float(np.median(conf))
    scsnn.tl.annotate(pbmc, pbmc_model, min_confidence=thr, device="cpu")
    pred = pbmc.obs[KEY].astype(str).to_numpy()
    low = pbmc.obs[f"{KEY}_confidence"].to_numpy() < thr
    assert 0 < low.sum() < pbmc.n_obs
    assert np.all(pred[low] == UNASSIGNED)
    assert np.all(pred[~low] == pbmc_annotated.obs[KEY].astype(str).to_numpy()[~low])
    # confidences are those before the cut
    np.testing.assert_array_equal(pbmc.obs[f"{KEY}_confidence"].to_numpy(), conf)
    assert pbmc.uns[KEY]["params"]["min_confidence"] == pytest.approx(thr)
    with pytest.raises(InputError, match="min_confidence"):
        scsnn.tl.annotate(pbmc, pbmc_model, min_confidence=1.5, device="cpu")


def test_copy_leaves_input_untouched(pbmc, pbmc_model):
    before_obs = pbmc.obs.copy()
    before_X = pbmc.X.copy()
    uns_keys, obsm_keys = set(pbmc.uns), set(pbmc.obsm)
    out = scsnn.tl.annotate(pbmc, pbmc_model, copy=True, device="cpu")
    assert out is not pbmc and KEY in out.obs and KEY in out.uns
    pd.testing.assert_frame_equal(pbmc.obs, before_obs)
    assert (pbmc.X != before_X).nnz == 0
    assert set(pbmc.uns) == uns_keys and set(pbmc.obsm) == obsm_keys
    # in place: returns None and writes into the object
    assert scsnn.tl.annotate(pbmc, pbmc_model, key_added="pred", device="cpu") is None
    assert "pred" in pbmc.obs and "pred_probabilities" in pbmc.obsm and "pred" in pbmc.uns
    assert list(pbmc.obs["pred"]) == list(out.obs[KEY])


def test_annotated_h5ad_round_trip_and_scanpy(pbmc_annotated, tmp_path):
    p = tmp_path / "annotated.h5ad"
    scsnn.write_h5ad_atomic(pbmc_annotated, p)
    b = ad.read_h5ad(p)
    assert list(b.obs[KEY].cat.categories) == list(pbmc_annotated.obs[KEY].cat.categories)
    assert list(b.obs[KEY]) == list(pbmc_annotated.obs[KEY])
    pd.testing.assert_frame_equal(scsnn.tl.probabilities(b),
                                  scsnn.tl.probabilities(pbmc_annotated))
    np.testing.assert_array_equal(b.obsm[f"{KEY}_step_labels"],
                                  pbmc_annotated.obsm[f"{KEY}_step_labels"])
    assert b.uns[KEY]["model"] == pbmc_annotated.uns[KEY]["model"]
    assert b.uns[KEY]["gene_overlap"]["n_present"] == pbmc_annotated.uns[KEY]["gene_overlap"][
        "n_present"]
    # scanpy reads the slots as ordinary obs data
    df = sc.get.obs_df(b, keys=[KEY, f"{KEY}_confidence", "cell_type"])
    g = df.groupby(KEY, observed=True)[f"{KEY}_confidence"].mean()
    assert ((g > 0) & (g <= 1)).all() and len(g) >= 2
    ct = pd.crosstab(df["cell_type"], df[KEY])
    assert ct.to_numpy().sum() == b.n_obs
    sub = b[b.obs[KEY] == g.index[0]]
    assert sub.n_obs == (df[KEY] == g.index[0]).sum()


def test_counts_and_lognorm_input_agree(pbmc, pbmc_model):
    if scsnn.io.get_expression(pbmc).kind != "counts":
        pytest.skip("needs the shared pbmc68k_reduced file (counts in X)")
    tmp = ad.AnnData(X=pbmc.X.copy())
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    pbmc.layers["mylog"] = sp.csr_matrix(tmp.X)
    a = scsnn.tl.annotate(pbmc, pbmc_model, copy=True, device="cpu")
    b = scsnn.tl.annotate(pbmc, pbmc_model, copy=True, layer="mylog", device="cpu")
    assert a.uns[KEY]["params"]["input_kind"] == "counts"
    assert b.uns[KEY]["params"]["input_kind"] == "lognorm"
    assert b.uns[KEY]["params"]["layer"] == "mylog"
    np.testing.assert_allclose(np.asarray(a.obsm[f"{KEY}_probabilities"]),
                               np.asarray(b.obsm[f"{KEY}_probabilities"]), atol=1e-4)


def test_annotate_from_saved_model_path(pbmc, pbmc_model_dir, pbmc_annotated):
    out = scsnn.tl.annotate(pbmc, str(pbmc_model_dir), copy=True, device="cpu")
    np.testing.assert_array_equal(np.asarray(out.obsm[f"{KEY}_probabilities"]),
                                  np.asarray(pbmc_annotated.obsm[f"{KEY}_probabilities"]))


def test_gene_symbols_and_reordered_query(pbmc, pbmc_model, pbmc_annotated):
    rng = np.random.default_rng(0)
    order = rng.permutation(pbmc.n_vars)
    q = pbmc[:, order].copy()
    q.var["symbol"] = q.var_names.astype(str)
    q.var_names = [f"ENSG{i:05d}" for i in range(q.n_vars)]
    with pytest.raises(InputError, match="holds 0 of the model"):
        scsnn.tl.annotate(q, pbmc_model, device="cpu")
    scsnn.tl.annotate(q, pbmc_model, gene_symbols="symbol", device="cpu")
    np.testing.assert_allclose(np.asarray(q.obsm[f"{KEY}_probabilities"]),
                               np.asarray(pbmc_annotated.obsm[f"{KEY}_probabilities"]), atol=1e-5)


# -- determinism ----------------------------------------------------------------------------
def test_same_seed_same_model_and_probabilities(_pbmc_session, pbmc_model, pbmc_annotated):
    again = scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0))
    assert again.model_id == pbmc_model.model_id
    assert again.gene_space.genes == pbmc_model.gene_space.genes
    out = scsnn.tl.annotate(_pbmc_session, again, copy=True, device="cpu")
    np.testing.assert_array_equal(np.asarray(out.obsm[f"{KEY}_probabilities"]),
                                  np.asarray(pbmc_annotated.obsm[f"{KEY}_probabilities"]))


def test_other_seed_other_model(synth):
    a = scsnn.tl.train(synth, "cell_type", **small(epochs=2, seed=0))
    b = scsnn.tl.train(synth, "cell_type", **small(epochs=2, seed=1))
    assert a.model_id != b.model_id


# -- refusals and small classes -------------------------------------------------------------
def test_too_small_gene_overlap_refused(pbmc, pbmc_model):
    genes = set(pbmc_model.genes)
    n_model = len(genes)
    keep = [g for g in pbmc.var_names if g not in genes]
    keep += [g for g in pbmc.var_names if g in genes][: n_model // 5]  # 20% of model genes
    q = pbmc[:, keep].copy()
    X_before = q.X.copy()
    with pytest.raises(InputError) as ei:
        scsnn.tl.annotate(q, pbmc_model, device="cpu")
    msg = str(ei.value)
    assert_one_line(msg)
    assert f"holds {n_model // 5} of the model's {n_model} genes" in msg
    assert KEY not in q.obs and (q.X != X_before).nnz == 0
    # a lower bar lets it through, with the absent genes neutral
    scsnn.tl.annotate(q, pbmc_model, min_gene_overlap=0.1, device="cpu")
    frac = q.uns[KEY]["gene_overlap"]["fraction"]
    assert frac == pytest.approx((n_model // 5) / n_model)


def test_partial_overlap_warns(pbmc, pbmc_model, caplog):
    drop = set(pbmc_model.genes[:40])  # under 90% of the model genes left
    q = pbmc[:, [g for g in pbmc.var_names if g not in drop]].copy()
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        scsnn.tl.annotate(q, pbmc_model, device="cpu")
    assert "absent genes never fire" in caplog.text
    assert q.uns[KEY]["gene_overlap"]["n_present"] == pbmc_model.gene_space.n_genes - 40


def _with_tiny_classes(adata):
    a = adata.copy()
    labels = np.array(a.obs["cell_type"].astype(str), dtype=object)
    labels[:2] = "Tiny pair"
    labels[2] = "Singleton"
    a.obs["cell_type"] = pd.Categorical(labels)
    return a


def test_one_or_two_cell_classes_train_with_warning(synth, caplog):
    a = _with_tiny_classes(synth)
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        m = scsnn.tl.train(a, "cell_type", **small(epochs=2))
    assert "Singleton (1)" in caplog.text and "Tiny pair (2)" in caplog.text
    assert "too small to split" in caplog.text
    assert "Singleton" in m.classes and "Tiny pair" in m.classes
    assert set(m.metrics["unsplit_classes"]) == {"Singleton", "Tiny pair"}
    out = scsnn.tl.annotate(a, m, copy=True, device="cpu")
    assert out.obsm[f"{KEY}_probabilities"].shape[1] == len(m.classes)


def test_min_cells_per_class_drops_with_message(synth, caplog):
    a = _with_tiny_classes(synth)
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        m = scsnn.tl.train(a, "cell_type", **small(epochs=2, min_cells_per_class=3))
    assert "dropping classes with fewer than 3 cells" in caplog.text
    assert "Singleton (1)" in caplog.text and "Tiny pair (2)" in caplog.text
    assert "Singleton" not in m.classes and "Tiny pair" not in m.classes
    assert len(m.classes) == 4
    assert sum(m.metrics["class_counts"].values()) == a.n_obs - 3
    assert m.metrics["n_train"] + m.metrics["n_alpha"] + m.metrics["n_select"] == a.n_obs - 3


def test_unlabelled_cells_left_out(synth, caplog):
    a = synth.copy()
    labels = np.array(a.obs["cell_type"], dtype=object)
    labels[:25] = None
    a.obs["cell_type"] = pd.Categorical(labels)
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        m = scsnn.tl.train(a, "cell_type", **small(epochs=1))
    assert "25 cells without a label" in caplog.text
    assert m.metrics["n_train"] + m.metrics["n_alpha"] + m.metrics["n_select"] == a.n_obs - 25


def test_missing_label_key(synth):
    with pytest.raises(InputError, match="label key 'celltype' not in obs") as ei:
        scsnn.tl.train(synth, "celltype", **small())
    assert_one_line(str(ei.value))


def test_single_class_refused(synth):
    synth.obs["one"] = "A"
    with pytest.raises(InputError, match="at least 2 classes"):
        scsnn.tl.train(synth, "one", **small())


@pytest.mark.parametrize("kw,match", [({"neuron": "izh"}, "unknown neuron"),
                                      ({"encoder": "morse"}, "unknown encoder")])
def test_unknown_neuron_or_encoder(synth, kw, match):
    with pytest.raises(InputError, match=match):
        scsnn.tl.train(synth, "cell_type", **small(**kw))


@pytest.mark.parametrize("neuron,encoder", [("lif", "rate"), ("plif", "latency"),
                                            ("sj-lif", "rank"), ("ann", "direct")])
def test_other_neurons_and_encoders_end_to_end(synth, neuron, encoder, tmp_path):
    m = scsnn.tl.train(synth, "cell_type", **small(neuron=neuron, encoder=encoder, timesteps=3,
                                                   epochs=3))
    assert m.config.neuron == neuron and m.config.encoder == encoder
    m.save(tmp_path / "m")
    a = scsnn.tl.annotate(synth, m, copy=True, device="cpu")
    b = scsnn.tl.annotate(synth, tmp_path / "m", copy=True, device="cpu")
    np.testing.assert_array_equal(np.asarray(a.obsm[f"{KEY}_probabilities"]),
                                  np.asarray(b.obsm[f"{KEY}_probabilities"]))
    assert a.uns[KEY]["params"]["neuron"] == neuron
    assert a.uns[KEY]["params"]["timesteps"] == 3


# -- end to end on real reference/query pairs ---------------------------------------------
def test_end_to_end_cross_platform_cell_lines():
    ref = scsnn.read_h5ad(shared_file("celllines3_celseq2.h5ad"))
    query = scsnn.read_h5ad(shared_file("celllines3_dropseq.h5ad"))
    m = scsnn.tl.train(ref, "cell_type", **small(genes=list(query.var_names), epochs=10,
                                                 hidden=(64, 32), n_hvg=500))
    assert set(m.genes) <= set(query.var_names)
    scsnn.tl.annotate(query, m, device="cpu")
    rep = scsnn.evaluate(query, "cell_type")
    assert rep["accuracy"] > 0.85 and rep["macro_f1"] > 0.85


def test_end_to_end_pbmc_donor_split():
    b = scsnn.read_h5ad(shared_file("pbmc_3batch.h5ad"))
    ref = b[b.obs["donor"] != "3pv1"].copy()
    query = b[b.obs["donor"] == "3pv1"].copy()
    m = scsnn.tl.train(ref, "cell_type", **small(epochs=15, hidden=(64, 32), n_hvg=500))
    scsnn.tl.annotate(query, m, device="cpu")
    rep = scsnn.evaluate(query, "cell_type")
    assert rep["accuracy"] > 0.8
    assert set(rep["rare_classes"]) >= {"HSC", "MK"}


# -- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda_only
def test_annotation_on_cuda_matches_cpu(pbmc, pbmc_model, pbmc_annotated):
    out = scsnn.tl.annotate(pbmc, pbmc_model, copy=True, device="cuda")
    agree = (out.obs[KEY] == pbmc_annotated.obs[KEY]).mean()
    assert agree >= 0.99
    np.testing.assert_allclose(np.asarray(out.obsm[f"{KEY}_probabilities"]),
                               np.asarray(pbmc_annotated.obsm[f"{KEY}_probabilities"]), atol=1e-3)
    assert next(pbmc_model.network.parameters()).device.type == "cpu"  # moved back


@pytest.mark.gpu
@cuda_only
def test_training_on_cuda(_pbmc_session, pbmc_model):
    m = scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0, device="cuda"))
    assert m.classes == pbmc_model.classes
    assert m.gene_space.genes == pbmc_model.gene_space.genes
    assert m.settings["device"].startswith("cuda")
    assert next(m.network.parameters()).device.type == "cpu"
    cpu = scsnn.tl.annotate(_pbmc_session, m, copy=True, device="cpu")
    gpu = scsnn.tl.annotate(_pbmc_session, m, copy=True, device="cuda")
    assert (cpu.obs[KEY] == gpu.obs[KEY]).mean() >= 0.99
    acc = (gpu.obs[KEY].astype(str) == _pbmc_session.obs["cell_type"].astype(str)).mean()
    majority = _pbmc_session.obs["cell_type"].value_counts(normalize=True).max()
    assert acc > majority + 0.2


@pytest.mark.gpu
@cuda_only
def test_rate_encoder_same_spikes_on_cuda():
    import torch

    from scsnn.encoding import make_encoder

    x = torch.randn(6, 30, generator=torch.Generator().manual_seed(0))
    enc = make_encoder("rate", 5)
    a = enc(x, torch.Generator().manual_seed(7))
    b = enc(x.cuda(), torch.Generator().manual_seed(7))
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())


def test_numpy_integer_seed(synth):
    m = scsnn.tl.train(synth, "cell_type", **small(seed=np.int64(1), epochs=1))
    assert m.settings["seed"] == 1


def test_numpy_integer_settings_save(synth, tmp_path):
    m = scsnn.tl.train(synth, "cell_type", **small(epochs=np.int64(1), n_hvg=np.int64(50)))
    m.save(tmp_path / "m")
    assert scsnn.load_model(tmp_path / "m").settings["n_hvg"] == 50


def test_probabilities_use_the_fitted_temperature(pbmc, pbmc_model):
    from scsnn.bundle import predict

    t = pbmc_model.temperature
    cal = pbmc_model.metrics["calibration"]
    assert t == cal["temperature"] and cal["n_cells"] == pbmc_model.metrics["n_select"]
    a = scsnn.tl.annotate(pbmc, pbmc_model, copy=True, device="cpu")
    from scsnn.io import get_expression

    X, present = pbmc_model.gene_space.project(get_expression(pbmc))
    logits = predict(pbmc_model.network, X, pbmc_model.gene_space, present,
                     seed=pbmc_model.settings["seed"]).logits.astype(np.float64)
    z = logits / t
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(a.obsm[f"{KEY}_probabilities"]), p, atol=1e-5)


# -- outputs that scanpy and anndata take as they are ------------------------------------
ODD_NAMES = ["CD4+/CD25 T Reg", "B cell (naïve)", "γδ T/NK", "T细胞 1"]


@pytest.fixture(scope="module")
def odd_model_and_query():
    """A small model whose class names hold slashes, spaces, brackets and non-Latin script."""
    a = scsnn.datasets.synthetic(n_cells=300, n_genes=200, n_types=4, rare_fraction=0.03,
                                 n_markers=10, seed=3)
    old = list(a.obs["cell_type"].cat.categories)
    a.obs["cell_type"] = a.obs["cell_type"].cat.rename_categories(
        dict(zip(old, ODD_NAMES)))
    m = scsnn.tl.train(a, "cell_type", **small(seed=0, epochs=3))
    return m, a


def test_outputs_write_cleanly_for_any_class_name(odd_model_and_query, tmp_path):
    m, a = odd_model_and_query
    assert sorted(m.classes) == sorted(ODD_NAMES)
    q = scsnn.tl.annotate(a, m, device="cpu", copy=True, min_confidence=0.3,
                          majority_voting=True, celltypist_columns=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any anndata/h5py/zarr warning fails the test...
        scsnn.write_h5ad_atomic(q, tmp_path / "q.h5ad")
        b = ad.read_h5ad(tmp_path / "q.h5ad")
        # ... but anndata's notice that its default zarr format will change (not our data)
        warnings.filterwarnings("ignore", message="Writing zarr v2 data will no longer")
        q.write_zarr(tmp_path / "q.zarr")
        z = ad.read_zarr(tmp_path / "q.zarr")
    for back in (b, z):
        assert list(back.uns[KEY]["classes"]) == m.classes
        np.testing.assert_array_equal(back.obsm[f"{KEY}_probabilities"],
                                      q.obsm[f"{KEY}_probabilities"])
        P = scsnn.tl.probabilities(back)
        assert list(P.columns) == m.classes
        np.testing.assert_array_equal(np.asarray(back.obsm[f"{KEY}_step_labels"]),
                                      q.obsm[f"{KEY}_step_labels"])
        for col in (KEY, f"{KEY}_majority_voting", "predicted_labels", "majority_voting"):
            assert list(back.obs[col].astype(str)) == list(q.obs[col].astype(str))
            assert list(back.obs[col].cat.categories) == list(q.obs[col].cat.categories)
    # the streamed file path writes the same layout, also without a warning
    src = tmp_path / "src.h5ad"
    a.write_h5ad(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scsnn.tl.annotate_file(src, m, output=tmp_path / "s.h5ad", device="cpu",
                               min_confidence=0.3)
        s = ad.read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(s.obsm[f"{KEY}_probabilities"],
                                  q.obsm[f"{KEY}_probabilities"])
    assert list(s.obs[KEY].cat.categories) == list(q.obs[KEY].cat.categories)


def test_rank_genes_groups_on_annotated_pbmc_and_no_write_warning(pbmc, pbmc_model, tmp_path):
    # cells of two true types: most classes get no cell, and their categories must be gone
    two = pbmc.obs["bulk_labels"].value_counts().index[:2]
    pbmc = pbmc[pbmc.obs["bulk_labels"].isin(two).to_numpy()].copy()
    scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", min_confidence=0.5)
    pred = pbmc.obs[KEY]
    assert set(pred.cat.categories) == set(pred.astype(str))  # no empty category
    assert len(pred.cat.categories) < len(pbmc_model.classes) + 1
    p = tmp_path / "pbmc_annotated.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scsnn.write_h5ad_atomic(pbmc, p)
        b = ad.read_h5ad(p)
    counts = b.obs[KEY].value_counts()
    small_groups = counts[counts < 2].index.tolist()  # scanpy needs 2 cells a group
    if small_groups:
        b = b[~b.obs[KEY].isin(small_groups).to_numpy()].copy()
        b.obs[KEY] = b.obs[KEY].cat.remove_unused_categories()
    layer = "log_normalized" if "log_normalized" in b.layers else None
    sc.tl.rank_genes_groups(b, KEY, method="t-test", layer=layer)
    names = b.uns["rank_genes_groups"]["names"].dtype.names
    assert list(names) == list(b.obs[KEY].cat.categories)


# -- majority voting ----------------------------------------------------------------------
def test_majority_vote_by_hand():
    labels = pd.Categorical(["a", "a", "b", "b", "b", "Unassigned", "a", "b"],
                            categories=["b", "a", "Unassigned"])
    clusters = ["x", "x", "x", "y", "y", "y", "z", "z"]
    P = np.array([[.9, .1], [.8, .2], [.3, .7], [.2, .8], [.4, .6], [.5, .5], [.6, .4],
                  [.4, .6]])
    mv = scsnn.tl.majority_vote(labels, clusters, probabilities=P, classes=["a", "b"])
    # x: a wins 2 of 3; y: b wins 2 of 3; z: a tie goes to the first category, "b"
    assert list(mv["majority_voting"].astype(str)) == ["a"] * 3 + ["b"] * 3 + ["b"] * 2
    np.testing.assert_allclose(mv["majority_voting_fraction"], [2 / 3] * 6 + [0.5] * 2,
                               rtol=1e-6)
    np.testing.assert_allclose(mv["majority_voting_probability"],
                               [(.9 + .8 + .3) / 3] * 3 + [(.8 + .6 + .5) / 3] * 3
                               + [0.5] * 2, rtol=1e-6)
    assert list(mv["majority_voting"].cat.categories) == ["b", "a"]  # unused dropped
    het = scsnn.tl.majority_vote(labels, clusters, min_fraction=0.6)
    assert list(het["majority_voting"].astype(str)) == (["a"] * 3 + ["b"] * 3
                                                        + ["Heterogeneous"] * 2)
    assert "majority_voting_probability" not in het


def test_majority_voting_over_an_obs_key(pbmc, pbmc_model):
    if "louvain" not in pbmc.obs:
        pytest.skip("needs obs['louvain']")
    scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", majority_voting=True,
                      over_clustering="louvain", celltypist_columns=True)
    mv = pbmc.obs[f"{KEY}_majority_voting"]
    assert isinstance(mv.dtype, pd.CategoricalDtype)
    assert set(mv.cat.categories) == set(mv.astype(str))
    for cl, cells in pbmc.obs.groupby("louvain", observed=True):
        counts = cells[KEY].astype(str).value_counts()
        # the commonest label; a tie goes to the class first in the model's order
        top = [c for c in pbmc_model.classes if counts.get(c, 0) == counts.max()][0]
        assert set(cells[f"{KEY}_majority_voting"].astype(str)) == {top}
        np.testing.assert_allclose(cells[f"{KEY}_majority_voting_fraction"],
                                   counts.max() / len(cells), rtol=1e-6)
        j = pbmc_model.classes.index(top)
        P = np.asarray(pbmc.obsm[f"{KEY}_probabilities"])[pbmc.obs["louvain"] == cl]
        np.testing.assert_allclose(cells[f"{KEY}_majority_voting_probability"],
                                   P[:, j].mean(), rtol=1e-5)
    assert f"{KEY}_over_clustering" not in pbmc.obs  # the given key is not copied
    params = pbmc.uns[KEY]["params"]
    assert params["majority_voting"] and params["over_clustering"] == "louvain"
    # CellTypist's columns
    assert list(pbmc.obs["predicted_labels"]) == list(pbmc.obs[KEY])
    np.testing.assert_array_equal(pbmc.obs["conf_score"], pbmc.obs[f"{KEY}_confidence"])
    assert list(pbmc.obs["majority_voting"]) == list(mv)
    assert list(pbmc.obs["over_clustering"].astype(str)) == list(
        pbmc.obs["louvain"].astype(str))
    # annotating again without voting removes the voting columns of the earlier run
    scsnn.tl.annotate(pbmc, pbmc_model, device="cpu")
    assert not [c for c in pbmc.obs.columns if c.startswith(f"{KEY}_majority")]
    assert pbmc.uns[KEY]["params"]["majority_voting"] is False or not pbmc.uns[KEY][
        "params"]["majority_voting"]


def test_majority_voting_with_a_computed_over_clustering(pbmc, pbmc_model):
    for k in ("connectivities", "distances"):
        if k in pbmc.obsp:
            del pbmc.obsp[k]
    a = scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", copy=True, majority_voting=True)
    oc = a.obs[f"{KEY}_over_clustering"]
    assert isinstance(oc.dtype, pd.CategoricalDtype)
    # an over-clustering: many more clusters than cell types, as CellTypist's resolution 5
    assert oc.nunique() > a.obs[KEY].nunique()
    assert a.uns[KEY]["params"]["over_clustering_resolution"] == 5.0
    assert a.uns[KEY]["params"]["over_clustering"] == "computed"
    for _, cells in a.obs.groupby(f"{KEY}_over_clustering", observed=True):
        assert cells[f"{KEY}_majority_voting"].nunique() == 1
    # the same input, the same clusters; and the input is left as it was
    b = scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", copy=True, majority_voting=True)
    assert list(b.obs[f"{KEY}_over_clustering"]) == list(oc)
    assert "connectivities" not in pbmc.obsp and KEY not in pbmc.obs
    # a vote can be no more right than its cluster is pure: it gets near that bound (the
    # share of cells whose cluster's commonest true type is their own)
    truth = a.obs["cell_type"].astype(str)
    purity = truth.groupby(oc.to_numpy()).agg(lambda t: t.value_counts().iloc[0]).sum() / len(a)
    acc_mv = (a.obs[f"{KEY}_majority_voting"].astype(str) == truth).mean()
    assert purity - 0.1 < acc_mv <= purity + 1e-9


def test_majority_voting_bad_input_is_refused(pbmc, pbmc_model):
    with pytest.raises(InputError, match="not an obs column") as e:
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", over_clustering="nope")
    assert_one_line(str(e.value))
    assert KEY not in pbmc.obs  # refused before any work
    with pytest.raises(InputError, match="holds 3 values for 700 cells"):
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", over_clustering=[1, 2, 3])
    pbmc.obs["partial"] = pd.Categorical(["a"] * 699 + [None])
    with pytest.raises(InputError, match="1 cells without a cluster"):
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", over_clustering="partial")
    with pytest.raises(InputError, match="majority_min_fraction"):
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", majority_voting=True,
                          majority_min_fraction=2.0)


def test_predictions_table(pbmc, pbmc_model):
    if "louvain" not in pbmc.obs:
        pytest.skip("needs obs['louvain']")
    scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", over_clustering="louvain")
    t = scsnn.tl.predictions_table(pbmc, probabilities_=True)
    assert list(t.columns[:7]) == ["cell", "predicted_label", "confidence", "majority_voting",
                                   "majority_voting_fraction", "majority_voting_probability",
                                   "over_clustering"]
    assert list(t["cell"]) == list(pbmc.obs_names)
    assert list(t["over_clustering"]) == list(pbmc.obs["louvain"].astype(str))
    P = t[[f"p({c})" for c in pbmc_model.classes]].to_numpy()
    np.testing.assert_array_equal(P, pbmc.obsm[f"{KEY}_probabilities"])
    plain = scsnn.tl.predictions_table(scsnn.tl.annotate(pbmc, pbmc_model, device="cpu",
                                                         copy=True))
    assert list(plain.columns) == ["cell", "predicted_label", "confidence"]


# -- Unassigned, honestly -----------------------------------------------------------------
def test_mostly_unassigned_is_warned(pbmc, pbmc_model, caplog):
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", min_confidence=0.999)
    frac = (pbmc.obs[KEY] == UNASSIGNED).mean()
    assert frac > 0.5
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("are Unassigned" in m and "min_confidence 0.999" in m for m in msgs), msgs
    assert all("\n" not in m for m in msgs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scsnn"):
        scsnn.tl.annotate(pbmc, pbmc_model, device="cpu", min_confidence=0.05)
    assert not [r for r in caplog.records if "Unassigned" in r.getMessage()]


def test_step_loss_trains_every_readout_and_is_checked(pbmc):
    """The per-step loss changes what is learned (the same draws otherwise), and a weight
    outside [0, 1] is refused."""
    plain = scsnn.tl.train(pbmc, "cell_type", **small(seed=0, epochs=1))
    stepped = scsnn.tl.train(pbmc, "cell_type", **small(seed=0, epochs=1, step_loss=1.0))
    assert stepped.settings["train"]["step_loss"] == 1.0
    a, b = plain.network.state_dict(), stepped.network.state_dict()
    assert not torch.equal(a["fcs.0.weight"], b["fcs.0.weight"])
    with pytest.raises(InputError, match="step_loss"):
        scsnn.tl.train(pbmc, "cell_type", **small(seed=0, epochs=1, step_loss=1.5))
