"""scsnn.bundle: the saved model directory, prediction through the gene space, refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_one_line
from safetensors import safe_open

import scsnn
from scsnn.bundle import META_FILE, SCHEMA_VERSION, WEIGHTS_FILE, ScsnnModel, predict
from scsnn.errors import ModelError
from scsnn.models import NetworkConfig, build_network
from scsnn.pp import GeneSpace


def _cfg(**kw) -> NetworkConfig:
    base = dict(n_genes=20, n_classes=3, hidden=(8, 6), timesteps=3)
    base.update(kw)
    return NetworkConfig(**base)


# -- a tiny hand-built model for persistence tests ---------------------------------------
@pytest.fixture
def tiny_model() -> ScsnnModel:
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(20)]
    gs = GeneSpace(genes=genes, mean=rng.random(20).astype(np.float32),
                   std=(rng.random(20) + 0.5).astype(np.float32))
    cfg = _cfg(encoder="rate")
    net = build_network(cfg, seed=1)
    Z = torch.from_numpy(gs.scale(_cells(200)))
    net.encoder.fit(Z, torch.from_numpy(gs.floor()))
    with torch.no_grad():  # move batch-norm statistics away from their defaults
        for bn in net.norms:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return ScsnnModel(gs, ["A", "B", "C"], net.eval(), cfg, settings={"seed": 3},
                      metrics={"val_macro_f1": 0.5})


def _cells(n=30, g=20):
    rng = np.random.default_rng(1)
    return sp.csr_matrix(rng.poisson(1.0, size=(n, g)).astype(np.float32))


def test_save_load_round_trip_identical_predictions(tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    assert (d / WEIGHTS_FILE).is_file() and (d / META_FILE).is_file()
    assert sorted(p.name for p in d.iterdir()) == [META_FILE, WEIGHTS_FILE]  # no temp files
    loaded = scsnn.load_model(d)
    assert loaded.classes == ["A", "B", "C"]
    assert loaded.model_id == tiny_model.model_id == tiny_model.compute_id()
    assert loaded.compute_id() == tiny_model.model_id
    assert loaded.config == tiny_model.config
    assert loaded.gene_space.genes == tiny_model.gene_space.genes
    assert loaded.settings == {"seed": 3} and loaded.metrics == {"val_macro_f1": 0.5}
    assert not loaded.network.training
    X = _cells()
    a = predict(tiny_model.network, X, tiny_model.gene_space, seed=3)
    b = predict(loaded.network, X, loaded.gene_space, seed=3)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.step_labels, b.step_labels)
    assert b.step_labels.shape == (30, 3) and b.step_confidence.shape == (30, 3)
    np.testing.assert_array_equal(b.step_labels[:, -1], b.logits.argmax(1))
    assert (b.decision_step == 3).all()
    # another seed draws other rate-coded spikes
    assert not np.array_equal(predict(loaded.network, X, loaded.gene_space, seed=4).logits,
                              b.logits)
    assert "3 classes" in repr(loaded) and "20 genes" in repr(loaded)


def test_weights_are_safetensors_without_pickle(tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    raw = (d / WEIGHTS_FILE).read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # not torch.save/pickle
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "scsnn-model"
    with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(tiny_model.network.state_dict())
    meta = json.loads((d / META_FILE).read_text())
    assert meta["format"] == "scsnn-model" and meta["schema_version"] == SCHEMA_VERSION
    assert meta["weights"]["file"] == WEIGHTS_FILE and len(meta["weights"]["sha256"]) == 64
    assert meta["scsnn_version"] == scsnn.__version__


def test_predict_batch_size_independent_for_direct_encoder(tiny_model):
    cfg = _cfg(encoder="direct")
    net = build_network(cfg, seed=2).eval()
    X = _cells()
    a = predict(net, X, tiny_model.gene_space).logits
    b = predict(net, X, tiny_model.gene_space, batch_size=7).logits
    np.testing.assert_allclose(a, b, atol=1e-5)
    present = np.ones(20, dtype=bool)
    present[:3] = False
    c = predict(net, X, tiny_model.gene_space, present).logits
    assert not np.allclose(a, c)  # absent genes are set to the reference mean
    Xa = X.toarray()
    Xa[:, :3] = tiny_model.gene_space.mean[:3]  # ... which is what they look like there
    np.testing.assert_allclose(predict(net, sp.csr_matrix(Xa), tiny_model.gene_space).logits,
                               c, atol=1e-5)


def test_absent_genes_are_silent_for_spike_encoders(tiny_model):
    net = tiny_model.network
    X = _cells()
    present = np.ones(20, dtype=bool)
    present[:4] = False
    a = predict(net, X, tiny_model.gene_space, present, seed=1)
    Xz = X.toarray()
    Xz[:, :4] = 0.0  # absent = not detected: never fires
    b = predict(net, sp.csr_matrix(Xz), tiny_model.gene_space, seed=1)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_predict_early_exit_takes_first_confident_step(tiny_model):
    net = build_network(_cfg(encoder="direct"), seed=2).eval()
    X = _cells()
    full = predict(net, X, tiny_model.gene_space)
    thr = float(np.median(full.step_confidence))
    ee = predict(net, X, tiny_model.gene_space, early_exit=thr)
    for i in range(X.shape[0]):
        hit = np.flatnonzero(full.step_confidence[i] >= thr)
        step = hit[0] + 1 if hit.size else full.step_labels.shape[1]
        assert ee.decision_step[i] == step
        assert ee.logits[i].argmax() == full.step_labels[i, step - 1]
    assert ee.decision_step.mean() < full.decision_step.mean()


def test_predict_counts_spikes_only_when_asked(tiny_model):
    net = build_network(_cfg(encoder="rate"), seed=2).eval()
    X = _cells()
    assert predict(net, X, tiny_model.gene_space).counter is None
    c = predict(net, X, tiny_model.gene_space, count_spikes=True, batch_size=8).counter
    assert c.n_cells == X.shape[0] and len(c.layer_spikes) == 2 and c.input_events > 0
    assert net.counter is None  # detached again after prediction
    ann = build_network(_cfg(neuron="ann"), seed=2).eval()
    assert predict(ann, X, tiny_model.gene_space, count_spikes=True).counter is None


def test_save_refuses_file_and_overwrite(tiny_model, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ModelError, match="not a directory"):
        tiny_model.save(f)
    tiny_model.save(tmp_path / "m")
    with pytest.raises(ModelError, match="already exists"):
        tiny_model.save(tmp_path / "m", overwrite=False)
    tiny_model.save(tmp_path / "m", overwrite=True)


def _saved(tiny_model, tmp_path):
    return tiny_model.save(tmp_path / "m")


def _edit_meta(d, fn):
    meta = json.loads((d / META_FILE).read_text())
    fn(meta)
    (d / META_FILE).write_text(json.dumps(meta))


def _load_error(d) -> str:
    with pytest.raises(ModelError) as ei:
        ScsnnModel.load(d)
    assert_one_line(str(ei.value))
    return str(ei.value)


def test_load_refuses_missing_dir(tmp_path):
    assert "model directory not found" in _load_error(tmp_path / "nope")
    f = tmp_path / "f"
    f.write_text("")
    assert "model directory not found" in _load_error(f)


def test_load_refuses_missing_model_json(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    (d / META_FILE).unlink()
    assert "has no model.json" in _load_error(d)


def test_load_refuses_invalid_json(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    (d / META_FILE).write_text('{"format": "scsnn-model", ')
    assert "not valid JSON" in _load_error(d)
    (d / META_FILE).write_bytes(b"\xff\xfe\x00garbage")
    assert "damaged model" in _load_error(d)


def test_load_refuses_foreign_json(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    (d / META_FILE).write_text(json.dumps({"name": "some other tool", "version": 1}))
    assert "no scsnn format marker" in _load_error(d)
    (d / META_FILE).write_text(json.dumps([1, 2, 3]))
    assert "no scsnn format marker" in _load_error(d)


def test_load_refuses_newer_schema(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    _edit_meta(d, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    msg = _load_error(d)
    assert "newer" in msg and "upgrade scsnn" in msg
    _edit_meta(d, lambda m: m.pop("schema_version"))
    assert "no schema version" in _load_error(d)


def test_load_refuses_corrupted_weights(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    raw = bytearray((d / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor
    (d / WEIGHTS_FILE).write_bytes(bytes(raw))
    assert "does not match its checksum" in _load_error(d)


def test_load_refuses_missing_weights(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    (d / WEIGHTS_FILE).unlink()
    assert "weights.safetensors is missing" in _load_error(d)


def test_load_refuses_inconsistent_meta(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    _edit_meta(d, lambda m: m.update(classes=["A", "B"]))
    assert "damaged model" in _load_error(d)
    d2 = tiny_model.save(tmp_path / "m2")
    _edit_meta(d2, lambda m: m["network"].update(hidden=[9, 6]))  # weights do not fit
    with pytest.raises(ModelError, match="damaged model"):
        ScsnnModel.load(d2)
    d3 = tiny_model.save(tmp_path / "m3")
    _edit_meta(d3, lambda m: m.pop("gene_space"))
    assert "damaged model" in _load_error(d3)


def test_load_refuses_truncated_weights_without_checksum(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    _edit_meta(d, lambda m: m["weights"].pop("sha256"))
    raw = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])
    assert "damaged model" in _load_error(d)


def test_load_refuses_malformed_weights_entry(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    _edit_meta(d, lambda m: m.update(weights="weights.safetensors"))
    assert "damaged model" in _load_error(d)


def test_load_shape_mismatch_message_is_one_line(tiny_model, tmp_path):
    d = _saved(tiny_model, tmp_path)
    _edit_meta(d, lambda m: m["network"].update(hidden=[9, 6]))
    assert "damaged model" in _load_error(d)


def test_failed_save_leaves_no_temp_files(tiny_model, tmp_path):
    tiny_model.settings["n_hvg"] = np.int64(200)  # not JSON-serialisable as such
    d = tmp_path / "m"
    try:
        tiny_model.save(d)
    except Exception:
        pass
    leftovers = sorted(p.name for p in d.iterdir()) if d.exists() else []
    assert [n for n in leftovers if n.endswith(".tmp")] == []


def test_load_leaves_global_rng_alone(tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    torch.manual_seed(1234)
    torch.rand(3)
    state = torch.get_rng_state()
    ScsnnModel.load(d)
    assert torch.equal(torch.get_rng_state(), state)


def test_metrics_with_nan_are_written_as_valid_json(tiny_model, tmp_path):
    tiny_model.metrics = {"x": float("nan"), "history": [{"alpha_loss": float("inf")}]}
    d = tiny_model.save(tmp_path / "m")
    text = (d / META_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    meta = json.loads(text)
    assert meta["metrics"] == {"x": None, "history": [{"alpha_loss": None}]}


def test_schema_1_models_load_or_are_refused_clearly(tmp_path):
    rng = np.random.default_rng(0)
    gs = GeneSpace(genes=[f"g{i}" for i in range(20)], mean=rng.random(20).astype(np.float32),
                   std=np.ones(20, dtype=np.float32))
    # schema 1's "lif" was SpikingJelly's LIFNode: it loads as sj-lif
    cfg = _cfg(neuron="sj-lif", encoder="direct")
    m = ScsnnModel(gs, ["A", "B", "C"], build_network(cfg).eval(), cfg)
    d = m.save(tmp_path / "old")

    def as_schema_1(meta):
        meta["schema_version"] = 1
        meta["network"]["neuron"] = "lif"

    _edit_meta(d, as_schema_1)
    loaded = ScsnnModel.load(d)
    assert loaded.config.neuron == "sj-lif"
    np.testing.assert_array_equal(predict(loaded.network, _cells(), gs).logits,
                                  predict(m.network, _cells(), gs).logits)
    # its rate / latency encoders were replaced: refused with a message, not a traceback
    _edit_meta(d, lambda meta: meta["network"].update(encoder="latency"))
    msg = _load_error(d)
    assert "'latency' encoder of model schema 1" in msg and "train the model again" in msg


def test_model_files_without_newer_settings_load_as_they_were_trained(tmp_path):
    # model files written before `skip` existed, or before the hidden widths were recorded,
    # ran without input-to-readout synapses at 512-128: they must not take today's defaults
    assert NetworkConfig().skip and NetworkConfig().hidden == (128, 32)
    rng = np.random.default_rng(0)
    gs = GeneSpace(genes=[f"g{i}" for i in range(20)], mean=rng.random(20).astype(np.float32),
                   std=np.ones(20, dtype=np.float32))
    cfg = _cfg(encoder="direct", hidden=(512, 128), skip=False)
    m = ScsnnModel(gs, ["A", "B", "C"], build_network(cfg).eval(), cfg)
    d = m.save(tmp_path / "old")

    def as_older_file(meta):
        del meta["network"]["skip"]
        del meta["network"]["hidden"]

    _edit_meta(d, as_older_file)
    loaded = ScsnnModel.load(d)
    assert not loaded.config.skip and loaded.config.hidden == (512, 128)
    np.testing.assert_array_equal(predict(loaded.network, _cells(), gs).logits,
                                  predict(m.network, _cells(), gs).logits)
