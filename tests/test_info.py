"""`scsnn info MODEL`: what a model directory holds, read from model.json without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line
from typer.testing import CliRunner

import scsnn
from scsnn import bundle
from scsnn.cli import _MODEL_FORMAT, _MODEL_SCHEMA, app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert_one_line(err)
    return err


def test_constants_are_the_bundles():
    assert _MODEL_FORMAT == bundle.MODEL_FORMAT
    assert _MODEL_SCHEMA == bundle.SCHEMA_VERSION


def test_info_text(pbmc_model, pbmc_model_dir):
    r = invoke("info", pbmc_model_dir)
    assert r.exit_code == 0, r.output
    out = r.stdout
    m = pbmc_model
    assert m.model_id[:12] in out
    assert f"scsnn {scsnn.__version__}, model schema {bundle.SCHEMA_VERSION}" in out
    assert f"genes          {m.gene_space.n_genes}" in out
    net = m.config
    assert f"{net.neuron}" in out and f"{net.encoder} encoder" in out
    assert f"T={net.timesteps}" in out
    assert "hidden " + ",".join(str(h) for h in net.hidden) in out
    assert f"macro-F1 {m.metrics['select_macro_f1']:.3f}" in out
    cal = m.metrics["calibration"]
    assert f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}" in out
    assert f"{m.metrics['epochs_run']} epochs run" in out
    assert m.metrics["libraries"]["torch"] == torch.__version__  # what trained it
    assert f"trained with   torch {torch.__version__}, numpy " in out
    counts = m.metrics["class_counts"]
    lines = out.splitlines()
    for c in m.classes:  # every class on its own line, with its labelled cells
        assert any(line.split() == [*c.split(), str(counts[c])] for line in lines), c
    assert "nan" not in out.lower() and "{" not in out  # no raw dicts, no NaN


def test_info_json(pbmc_model, pbmc_model_dir):
    r = invoke("info", pbmc_model_dir, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    m = pbmc_model
    assert info["model_id"] == m.model_id
    assert info["schema_version"] == bundle.SCHEMA_VERSION
    assert info["scsnn_version"] == scsnn.__version__
    assert [c["name"] for c in info["classes"]] == m.classes
    assert {c["name"]: c["n_cells"] for c in info["classes"]} == m.metrics["class_counts"]
    assert info["n_genes"] == m.gene_space.n_genes == len(m.genes)
    assert info["network"]["encoder"] == m.config.encoder
    assert info["network"]["timesteps"] == m.config.timesteps
    assert info["network"]["neuron"] == m.config.neuron
    assert tuple(info["network"]["hidden"]) == tuple(m.config.hidden)
    assert info["training"]["select_macro_f1"] == pytest.approx(m.metrics["select_macro_f1"])
    assert info["training"]["epochs_run"] == m.metrics["epochs_run"]
    assert info["training"]["libraries"] == m.metrics["libraries"]
    assert info["training"]["label_key"] == "cell_type"
    assert info["calibration"]["ece_after"] == pytest.approx(
        m.metrics["calibration"]["ece_after"])
    assert info["weights"]["present"] is True


def test_info_needs_no_torch(pbmc_model_dir):
    code = (
        "import sys\n"
        "from scsnn.cli import app\n"
        f"try:\n    app(['info', {str(pbmc_model_dir)!r}, '--json'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'scanpy', 'anndata', 'numba', 'spikingjelly') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["classes"]


def _model_copy(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir()
    meta = json.loads((src / "model.json").read_text())
    if edit is not None:
        edit(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def test_info_errors(pbmc_model_dir, tmp_path):
    assert "model directory not found" in _error(invoke("info", tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not an scsnn model" in _error(invoke("info", empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    assert "not valid JSON" in _error(invoke("info", bad))
    foreign = _model_copy(pbmc_model_dir, tmp_path / "foreign",
                          lambda m: m.update(format="something-else"))
    assert "format marker" in _error(invoke("info", foreign))
    newer = _model_copy(pbmc_model_dir, tmp_path / "newer",
                        lambda m: m.update(schema_version=bundle.SCHEMA_VERSION + 1))
    assert "newer than this scsnn" in _error(invoke("info", newer))
    r = invoke("info")
    assert r.exit_code == 2  # usage error: MODEL is required


def test_info_without_weights_or_metrics(pbmc_model_dir, tmp_path):
    """Only model.json: still described, the missing weights said; older models without
    class counts list their classes alone."""
    def strip(meta):
        meta["metrics"].pop("class_counts")
        meta["metrics"].pop("calibration")

    d = _model_copy(pbmc_model_dir, tmp_path / "m", strip)
    r = invoke("info", d)
    assert r.exit_code == 0, r.output
    assert "weights        MISSING" in r.stdout
    assert "labelled reference cells)" not in r.stdout
    assert "calibration" not in r.stdout
    info = json.loads(invoke("info", d, "--json").stdout)
    assert all(c["n_cells"] is None for c in info["classes"])
    assert info["weights"]["present"] is False
