"""scsnn.models: networks, the saved model directory and its refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import assert_one_line
from safetensors import safe_open
from spikingjelly.activation_based import functional

import scsnn
from scsnn.errors import InputError, ModelError
from scsnn.models import (
    META_FILE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    ANNClassifier,
    NetworkConfig,
    ScsnnModel,
    SpikeCounter,
    SpikingClassifier,
    build_network,
    predict,
    resolve_device,
    softmax,
)
from scsnn.pp import GeneSpace


def _cfg(**kw) -> NetworkConfig:
    base = dict(n_genes=20, n_classes=3, hidden=(8, 6), timesteps=3)
    base.update(kw)
    return NetworkConfig(**base)


def _x(n=5, g=20, seed=0):
    return torch.randn(n, g, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("neuron", ["hifi", "lif", "plif", "ann"])
@pytest.mark.parametrize("encoder", ["direct", "rate", "latency"])
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
    assert lif.neuron_parameters() == [] and lif.hifi_layers() == []
    assert build_network(_cfg(neuron="ann")).neuron_parameters() == []


def test_build_network_seeded():
    a, b = build_network(_cfg(), seed=5), build_network(_cfg(), seed=5)
    c = build_network(_cfg(), seed=6)
    sa, sb, sc_ = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc_[k]) for k in sa)


def test_network_config_round_trip():
    cfg = _cfg(encoder="rate", neuron="plif", online=True)
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


# -- a tiny hand-built model for persistence tests ---------------------------------------
@pytest.fixture
def tiny_model() -> ScsnnModel:
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(20)]
    gs = GeneSpace(genes=genes, mean=rng.random(20).astype(np.float32),
                   std=(rng.random(20) + 0.5).astype(np.float32))
    cfg = _cfg(encoder="rate")
    net = build_network(cfg, seed=1)
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
    assert not np.allclose(a, c)  # absent genes are zeroed before the network


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
