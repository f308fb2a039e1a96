"""scsnn command line: train -> annotate -> evaluate, error handling and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import DATA_DIR
from typer.testing import CliRunner

import scsnn
from scsnn.cli import app
from scsnn.errors import InputError

runner = CliRunner()
TRAIN_SMALL = ["--epochs", "4", "--hidden", "32,16", "--n-hvg", "200", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments):
    """Exit code 1, one 'error: ...' line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in err, err
    return err


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory, _pbmc_session):
    """A folder with the reference file and a model trained by the CLI."""
    d = tmp_path_factory.mktemp("cli")
    ref = d / "ref.h5ad"
    src = DATA_DIR / "pbmc68k_reduced.h5ad"
    if src.is_file():
        shutil.copyfile(src, ref)
    else:
        _pbmc_session.write_h5ad(ref)
    model = d / "model"
    r = invoke("train", ref, "--label-key", "cell_type", "--out", model, *TRAIN_SMALL)
    assert r.exit_code == 0, r.output
    assert "saved to" in r.stdout
    return d, ref, model


def _variant(work, name, fn) -> Path:
    """Write a modified copy of the reference."""
    d, ref, _ = work
    a = ad.read_h5ad(ref)
    a = fn(a) or a
    p = d / name
    a.write_h5ad(p)
    return p


def _fingerprint(p: Path):
    st = p.stat()
    return p.read_bytes(), st.st_mtime_ns


# -- basics -------------------------------------------------------------------------------
def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"scsnn {scsnn.__version__}"
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "annotate", "evaluate", "demo"):
        assert cmd in r.stdout
    r = invoke("annotate", "--help")
    assert r.exit_code == 0 and "--min-confidence" in r.stdout and "--model" in r.stdout


def test_train_writes_loadable_model(work):
    _, _, model = work
    m = scsnn.load_model(model)
    assert m.config.hidden == (32, 16) and len(m.classes) == 10
    assert m.settings["reference"].endswith("ref.h5ad")
    assert m.settings["train"]["epochs"] == 4


def test_annotate_output_then_evaluate(work):
    d, ref, model = work
    before = _fingerprint(ref)
    out = d / "annotated.h5ad"
    r = invoke("annotate", ref, "--model", model, "--output", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"annotated 700 cells -> {out}" in r.stdout
    assert _fingerprint(ref) == before  # --output leaves the input alone
    a = ad.read_h5ad(out)
    assert "scsnn" in a.obs and "scsnn_probabilities" in a.obsm and "scsnn" in a.uns

    rep_dir = d / "report"
    r = invoke("evaluate", out, "--truth-key", "cell_type", "--out", rep_dir)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.stdout and "macro-F1" in r.stdout
    rep = json.loads((rep_dir / "report.json").read_text())
    for k in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert 0.0 <= rep[k] <= 1.0
    acc = (a.obs["scsnn"].astype(str) == a.obs["cell_type"].astype(str)).mean()
    assert rep["accuracy"] == pytest.approx(acc)
    assert len(rep["per_class"]) == 10
    for e in rep["per_class"]:
        assert {"label", "support", "precision", "recall", "f1", "rare"} <= set(e)
        assert isinstance(e["rare"], bool) and e["support"] > 0
    assert sum(e["support"] for e in rep["per_class"]) == 700
    assert (rep_dir / "per_class.csv").is_file() and (rep_dir / "confusion.csv").is_file()


def test_annotate_in_place_keeps_everything(work):
    d, ref, model = work

    def decorate(a):
        a.obs["batch_note"] = np.where(np.arange(a.n_obs) % 2 == 0, "x", "y")
        a.layers["extra"] = sp.csr_matrix(a.X, copy=True)
        a.uns["my_meta"] = {"a": 1}
        a.obsm["X_fake"] = np.arange(a.n_obs * 2, dtype=np.float32).reshape(-1, 2)

    q = _variant(work, "inplace.h5ad", decorate)
    orig = ad.read_h5ad(q)
    r = invoke("annotate", q, "-m", model, "--device", "cpu", "--key-added", "pred")
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(q)
    assert "pred" in a.obs and "pred_confidence" in a.obs and "pred_probabilities" in a.obsm
    assert a.uns["pred"]["model"] == scsnn.load_model(model).model_id
    for col in orig.obs.columns:
        assert col in a.obs
        assert list(a.obs[col].astype(str)) == list(orig.obs[col].astype(str))
    assert set(orig.layers) <= set(a.layers)
    for k in orig.layers:
        assert (a.layers[k] != orig.layers[k]).nnz == 0
    assert (a.X != orig.X).nnz == 0
    assert set(orig.uns) <= set(a.uns) and a.uns["my_meta"]["a"] == 1
    np.testing.assert_array_equal(a.obsm["X_fake"], orig.obsm["X_fake"])
    assert list(a.obs_names) == list(orig.obs_names)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temp


def test_min_confidence_option(work):
    d, ref, model = work
    out = d / "strict.h5ad"
    r = invoke("annotate", ref, "-m", model, "-o", out, "--min-confidence", "0.99",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(out)
    low = a.obs["scsnn_confidence"].to_numpy() < 0.99
    assert low.any()
    assert np.all(a.obs["scsnn"].astype(str).to_numpy()[low] == "Unassigned")
    assert "Unassigned:" in r.stdout


# -- errors: exit 1, one line, no traceback ---------------------------------------------------
def test_missing_input_file(work, tmp_path):
    _, _, model = work
    assert_clean_error(invoke("annotate", tmp_path / "nope.h5ad", "-m", model),
                       "file not found")
    assert_clean_error(invoke("train", tmp_path / "nope.h5ad", "-l", "x", "-o",
                              tmp_path / "m"), "file not found")
    assert_clean_error(invoke("evaluate", tmp_path / "nope.h5ad", "-t", "x", "-o", tmp_path),
                       "file not found")
    assert not (tmp_path / "m").exists()


def test_garbage_input_file(work, tmp_path):
    _, _, model = work
    p = tmp_path / "bad.h5ad"
    p.write_text("hello\nworld\n")
    assert_clean_error(invoke("annotate", p, "-m", model), "cannot read")
    assert p.read_text() == "hello\nworld\n"


def test_missing_label_key(work, tmp_path):
    _, ref, _ = work
    assert_clean_error(invoke("train", ref, "-l", "celltype", "-o", tmp_path / "m",
                              *TRAIN_SMALL), "label key 'celltype' not in obs")
    assert not (tmp_path / "m").exists()


def test_evaluate_missing_keys(work, tmp_path):
    _, ref, _ = work
    assert_clean_error(invoke("evaluate", ref, "-t", "cell_type", "-o", tmp_path / "r"),
                       "no predictions")


def test_corrupt_model_dir(work, tmp_path):
    _, ref, model = work
    bad = tmp_path / "bad_model"
    shutil.copytree(model, bad)
    (bad / "model.json").write_text("{ not json")
    before = _fingerprint(ref)
    assert_clean_error(invoke("annotate", ref, "-m", bad), "damaged model")
    shutil.copyfile(model / "model.json", bad / "model.json")
    w = bytearray((bad / "weights.safetensors").read_bytes())
    w[-1] ^= 0x55
    (bad / "weights.safetensors").write_bytes(bytes(w))
    assert_clean_error(invoke("annotate", ref, "-m", bad), "checksum")
    assert_clean_error(invoke("annotate", ref, "-m", tmp_path / "nomodel"),
                       "model directory not found")
    assert _fingerprint(ref) == before


def _set_value(value):
    def fn(a):
        X = a.X.toarray()
        X[3, 5] = value
        a.X = sp.csr_matrix(X)
    return fn


@pytest.mark.parametrize("value,fragment", [(np.nan, "NaN"), (-1.0, "negative values")])
def test_bad_values_refused_input_unchanged(work, value, fragment):
    d, _, model = work
    q = _variant(work, f"bad_{fragment[:3]}.h5ad", _set_value(value))
    before = _fingerprint(q)
    assert_clean_error(invoke("annotate", q, "-m", model, "--device", "cpu"), fragment)
    assert _fingerprint(q) == before  # same bytes, same mtime
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_bad_values_refused_by_train(work, tmp_path):
    q = _variant(work, "bad_train.h5ad", _set_value(np.inf))
    assert_clean_error(invoke("train", q, "-l", "cell_type", "-o", tmp_path / "m",
                              *TRAIN_SMALL), "NaN or infinite")


def test_query_without_shared_genes(work):
    _, _, model = work

    def rename(a):
        a.var_names = [f"X{i}" for i in range(a.n_vars)]

    q = _variant(work, "nogenes.h5ad", rename)
    before = _fingerprint(q)
    err = assert_clean_error(invoke("annotate", q, "-m", model, "--device", "cpu"),
                             "holds 0 of the model's")
    assert "--gene-symbols" in err
    assert _fingerprint(q) == before


def test_debug_shows_exception(work, tmp_path):
    r = invoke("--debug", "annotate", tmp_path / "nope.h5ad", "-m", work[2])
    assert r.exit_code != 0
    assert isinstance(r.exception, scsnn.ScsnnError)


# -- usage errors: exit 2 ---------------------------------------------------------------------
def test_usage_errors(work, tmp_path):
    _, ref, model = work
    assert_usage_error(invoke("train", ref, "-o", tmp_path / "m"), "--label-key")
    assert_usage_error(invoke("train", ref, "-l", "cell_type", "-o", tmp_path / "m",
                              "--encoder", "morse"), "--encoder")
    assert_usage_error(invoke("annotate", ref), "--model")
    assert_usage_error(invoke("annotate", ref, "-m", model, "--min-confidence", "2"),
                       "--min-confidence")
    assert_usage_error(invoke("nonsense"), "nonsense")
    assert not (tmp_path / "m").exists()


def test_bad_hidden_is_usage_error(work, tmp_path):
    _, ref, _ = work
    assert_usage_error(invoke("train", ref, "-l", "cell_type", "-o", tmp_path / "m",
                              "--hidden", "abc"), "--hidden")


# -- demo -------------------------------------------------------------------------------------
def test_demo_small_budget(tmp_path):
    out = tmp_path / "demo"
    r = invoke("demo", "--out", out, "--epochs", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "pbmc68k_reduced: 525 reference cells, 175 query cells" in r.stdout
    m = scsnn.load_model(out / "model")
    assert len(m.classes) == 10
    a = ad.read_h5ad(out / "query_annotated.h5ad")
    assert a.n_obs == 175 and "scsnn" in a.obs and "true_cell_type" in a.obs
    rep = json.loads((out / "evaluation" / "report.json").read_text())
    assert rep["n_cells"] == 175 and rep["truth_key"] == "true_cell_type"
    assert rep["model"] == m.model_id


# -- a real process ---------------------------------------------------------------------------
def _run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scsnn", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_subprocess_exit_codes(work, tmp_path):
    _, ref, model = work
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"scsnn {scsnn.__version__}"

    q = _variant(work, "sub_nan.h5ad", _set_value(np.nan))
    before = _fingerprint(q)
    r = _run("annotate", q, "--model", model, "--device", "cpu")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: ") and "NaN" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert _fingerprint(q) == before

    r = _run("train", ref, "-l", "cell_type", "-o", tmp_path / "m", "--encoder", "morse")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_module_api_matches_cli_error_class(work, tmp_path):
    # the message printed by the CLI is the library's InputError text
    with pytest.raises(InputError) as ei:
        scsnn.read_h5ad(tmp_path / "nope.h5ad")
    r = invoke("annotate", tmp_path / "nope.h5ad", "-m", work[2])
    assert r.stderr.strip() == f"error: {ei.value}"


def test_output_is_a_directory(work, tmp_path):
    _, ref, model = work
    out = tmp_path / "outdir"
    out.mkdir()
    err = assert_clean_error(invoke("annotate", ref, "-m", model, "-o", out, "--device", "cpu"))
    assert str(out) in err and ".tmp" not in err


def test_quiet_and_verbose(work, tmp_path):
    _, ref, model = work
    r = invoke("-q", "annotate", ref, "-m", model, "-o", tmp_path / "q.h5ad", "--device", "cpu")
    assert r.exit_code == 0 and r.stderr == ""
    assert "annotated 700 cells" in r.stdout
    r = invoke("annotate", ref, "-m", model, "-o", tmp_path / "v.h5ad", "--device", "cpu")
    assert r.exit_code == 0 and "annotated 700 cells (" in r.stderr  # the INFO log line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(work, tmp_path):
    _, ref, _ = work
    assert_clean_error(invoke("-q", "train", ref, "-l", "cell_type", "-o", tmp_path / "m",
                              "--epochs", "1", "--device", "cuda"), "no CUDA device")
    assert not (tmp_path / "m").exists()


def test_chunked_annotate_gather_report_summarize(pbmc_model_dir, pbmc, tmp_path):
    q = tmp_path / "q.h5ad"
    pbmc.write_h5ad(q)
    whole = tmp_path / "whole.h5ad"
    r = invoke("annotate", q, "--model", pbmc_model_dir, "--output", whole, "--device", "cpu",
               "--batch-size", "64", "--chunk-size", "128")
    assert r.exit_code == 0, r.output
    parts = []
    for i in (1, 2, 3):
        p = tmp_path / f"part{i}.h5ad"
        r = invoke("annotate", q, "--model", pbmc_model_dir, "--output", p, "--device", "cpu",
                   "--batch-size", "64", "--chunk", f"{i}/3")
        assert r.exit_code == 0, r.output
        assert f"(chunk {i}/3)" in r.stdout
        parts.append(p)
    gathered = tmp_path / "gathered.h5ad"
    r = invoke("gather", q, *parts, "--output", gathered)
    assert r.exit_code == 0, r.output
    a, b = ad.read_h5ad(whole), ad.read_h5ad(gathered)
    assert a.obs["scsnn"].equals(b.obs["scsnn"])
    np.testing.assert_array_equal(a.obsm["scsnn_probabilities"], b.obsm["scsnn_probabilities"])
    r = invoke("report", gathered, "--out", tmp_path / "rep", "--truth-key", "cell_type",
               "--sample", "pbmc")
    assert r.exit_code == 0, r.output
    assert "pbmc: 700 cells, macro-F1" in r.stdout
    r = invoke("summarize", tmp_path / "rep", "--out", tmp_path / "sum")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sum/summary.md").is_file()


def test_chunk_option_errors(pbmc_model_dir, pbmc, tmp_path):
    q = tmp_path / "q.h5ad"
    pbmc.write_h5ad(q)
    r = invoke("annotate", q, "--model", pbmc_model_dir, "--chunk", "1/2")
    assert r.exit_code == 2 and "--output" in r.output
    for bad in ("0/2", "3/2", "x/2", "2"):
        r = invoke("annotate", q, "--model", pbmc_model_dir, "--chunk", bad, "--output",
                   tmp_path / "o.h5ad")
        assert r.exit_code == 2, (bad, r.output)
    r = invoke("gather", q, q, "--output", tmp_path / "g.h5ad")
    assert_clean_error(r, "not a chunk")


def test_subset_and_dataset_commands(tmp_path, synth):
    src = tmp_path / "s.h5ad"
    synth.write_h5ad(src)
    r = invoke("subset", src, "--obs", "cell_type=type_0,type_1", "--output", tmp_path / "o.h5ad")
    assert r.exit_code == 0, r.output
    assert set(ad.read_h5ad(tmp_path / "o.h5ad").obs["cell_type"]) == {"type_0", "type_1"}
    r = invoke("subset", src, "--obs", "cell_type", "--output", tmp_path / "o.h5ad")
    assert r.exit_code == 2
    r = invoke("subset", src, "--obs", "cell_type=nope", "--output", tmp_path / "o.h5ad")
    assert_clean_error(r, "no value nope")
    r = invoke("dataset", "pbmc68k_reduced", "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    ref, query = (ad.read_h5ad(tmp_path / "demo" / f) for f in ("reference.h5ad", "query.h5ad"))
    assert ref.n_obs + query.n_obs == 700 and not set(ref.obs_names) & set(query.obs_names)
    r = invoke("dataset", "synthetic", "--out", tmp_path / "syn", "--n-cells", "200",
               "--n-query", "100", "--n-genes", "300", "--n-types", "4")
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(tmp_path / "syn/query.h5ad").shape == (100, 300)
    density = {}
    for sparsity in ("realistic", "dense"):
        r = invoke("dataset", "synthetic", "--out", tmp_path / sparsity, "--n-cells", "300",
                   "--n-genes", "3000", "--n-types", "4", "--sparsity", sparsity)
        assert r.exit_code == 0, r.output
        X = ad.read_h5ad(tmp_path / sparsity / "reference.h5ad").X
        density[sparsity] = X.nnz / (X.shape[0] * X.shape[1])
    assert density["realistic"] < 0.3 < density["dense"]
    r = invoke("dataset", "synthetic", "--out", tmp_path / "s", "--sparsity", "thin")
    assert r.exit_code == 2 and "realistic or dense" in r.output
    r = invoke("dataset", "mnist", "--out", tmp_path / "x")
    assert_clean_error(r, "unknown dataset")


def test_threads_option(pbmc_model_dir, pbmc, tmp_path):
    q = tmp_path / "q.h5ad"
    pbmc.write_h5ad(q)
    r = invoke("--threads", "1", "annotate", q, "--model", pbmc_model_dir, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1


def test_train_max_cells_reads_a_balanced_sample(tmp_path, synth):
    src = tmp_path / "s.h5ad"
    synth.write_h5ad(src)
    r = invoke("train", src, "--label-key", "cell_type", "--out", tmp_path / "m",
               "--max-cells", "120", *TRAIN_SMALL)
    assert r.exit_code == 0, r.output
    m = scsnn.ScsnnModel.load(tmp_path / "m")
    assert sum(m.metrics["class_counts"].values()) <= 120
    assert m.settings["max_cells"] == 120
    assert len(m.classes) == synth.obs["cell_type"].nunique()


def test_train_stream_from_disk(tmp_path, synth):
    src = tmp_path / "s.h5ad"
    synth.write_h5ad(src)
    r = invoke("train", src, "--label-key", "cell_type", "--out", tmp_path / "m", "--stream",
               "--max-cells", "80", *TRAIN_SMALL)
    assert r.exit_code == 0, r.output
    m = scsnn.ScsnnModel.load(tmp_path / "m")
    assert sum(m.metrics["class_counts"].values()) == synth.n_obs
    assert m.settings["streamed_from"] == str(src)


def test_train_defaults_are_the_library_defaults():
    """Every `scsnn train` option named like a setting defaults to the library's value."""
    import inspect

    from scsnn import cli
    from scsnn.models import NetworkConfig
    from scsnn.pp import PreprocessConfig
    from scsnn.training import TrainConfig

    library = {**PreprocessConfig().to_dict(), **NetworkConfig().to_dict(),
               **TrainConfig().to_dict()}
    checked = 0
    for name, p in inspect.signature(cli.train).parameters.items():
        if name not in library or name == "seed":
            continue
        default = p.default.value if hasattr(p.default, "value") else p.default
        if name == "hidden":
            default = [int(x) for x in default.split(",")]
        assert default == library[name], name
        checked += 1
    assert checked >= 12


# -- outputs people use: majority voting, CellTypist columns, tables, Unassigned --------------
def test_annotate_majority_voting_celltypist_columns_and_csv(work, tmp_path):
    d, ref, model = work
    if "louvain" not in ad.read_h5ad(ref).obs:
        pytest.skip("needs obs['louvain']")
    before = _fingerprint(ref)
    out, table = tmp_path / "voted.h5ad", tmp_path / "cells.csv"
    r = invoke("annotate", ref, "-m", model, "-o", out, "--device", "cpu",
               "--majority-voting", "--over-clustering", "louvain", "--celltypist-columns",
               "--csv", table, "--csv-probabilities")
    assert r.exit_code == 0, r.output
    assert "majority voting (obs['scsnn_majority_voting']):" in r.stdout
    assert f"table of 700 cells -> {table}" in r.stdout
    assert _fingerprint(ref) == before
    a = ad.read_h5ad(out)
    for c in ("scsnn_majority_voting", "scsnn_majority_voting_fraction",
              "scsnn_majority_voting_probability", "predicted_labels", "conf_score",
              "majority_voting", "over_clustering"):
        assert c in a.obs, c
    t = pd.read_csv(table)
    m = scsnn.load_model(model)
    assert list(t.columns) == ["cell", "predicted_label", "confidence", "majority_voting",
                               "majority_voting_fraction", "majority_voting_probability",
                               "over_clustering"] + [f"p({c})" for c in m.classes]
    assert list(t["cell"]) == list(a.obs_names)
    assert list(t["predicted_label"]) == list(a.obs["scsnn"].astype(str))
    assert list(t["majority_voting"]) == list(a.obs["scsnn_majority_voting"].astype(str))
    np.testing.assert_allclose(t[[f"p({c})" for c in m.classes]].to_numpy(),
                               a.obsm["scsnn_probabilities"], rtol=1e-6)
    # a .tsv without probabilities, and no voting
    tsv = tmp_path / "cells.tsv"
    r = invoke("annotate", ref, "-m", model, "-o", tmp_path / "plain.h5ad", "--device", "cpu",
               "--csv", tsv)
    assert r.exit_code == 0, r.output
    assert list(pd.read_csv(tsv, sep="\t").columns) == ["cell", "predicted_label",
                                                        "confidence"]


def test_annotate_majority_voting_computes_an_over_clustering(work, tmp_path):
    d, ref, model = work
    q = tmp_path / "q.h5ad"
    shutil.copyfile(ref, q)
    r = invoke("annotate", q, "-m", model, "--device", "cpu", "--majority-voting")
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(q)  # in place, atomically
    assert a.obs["scsnn_over_clustering"].nunique() > 10
    assert a.uns["scsnn"]["params"]["over_clustering"] == "computed"
    assert a.n_vars == ad.read_h5ad(ref).n_vars
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_annotate_voting_and_table_errors(work, tmp_path):
    d, ref, model = work
    before = _fingerprint(ref)
    out = tmp_path / "o.h5ad"
    assert_clean_error(invoke("annotate", ref, "-m", model, "-o", out, "--device", "cpu",
                              "--over-clustering", "nope"), "'nope' is not an obs column")
    assert_usage_error(invoke("annotate", ref, "-m", model, "-o", out, "--chunk", "1/2",
                              "--majority-voting"), "scsnn gather")
    assert_usage_error(invoke("annotate", ref, "-m", model, "-o", out,
                              "--csv-probabilities"), "--csv")
    assert_clean_error(invoke("annotate", ref, "-m", model, "-o", out, "--csv", out),
                       "would overwrite")
    assert_clean_error(invoke("annotate", ref, "-m", model, "-o", out, "--csv",
                              tmp_path / "no" / "dir" / "x.csv", "--device", "cpu",
                              "--majority-min-fraction", "0.5", "--over-clustering", "nope"),
                       "not an obs column")
    r = invoke("annotate", ref, "-m", model, "-o", out, "--majority-min-fraction", "2")
    assert r.exit_code == 2
    assert _fingerprint(ref) == before and not out.exists()


def test_mostly_unassigned_warns_but_succeeds(work, tmp_path):
    d, ref, model = work
    out = tmp_path / "strict.h5ad"
    r = invoke("annotate", ref, "-m", model, "-o", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "warning:" not in r.stdout
    # a cut that leaves about three cells in four Unassigned
    cut = float(np.quantile(ad.read_h5ad(out).obs["scsnn_confidence"], 0.75))
    r = invoke("annotate", ref, "-m", model, "-o", out, "--min-confidence", f"{cut:.4f}",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stdout and "are Unassigned" in r.stdout
    r = invoke("evaluate", out, "--truth-key", "cell_type", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "Unassigned: " in r.stdout and "assigned cells" in r.stdout
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert rep["fraction_unassigned"] > 0.5
    assert rep["assigned"]["n_cells"] == 700 - rep["n_unassigned"]


def test_gather_with_majority_voting(pbmc_model_dir, pbmc, tmp_path):
    if "louvain" not in pbmc.obs:
        pytest.skip("needs obs['louvain']")
    q = tmp_path / "q.h5ad"
    pbmc.write_h5ad(q)
    parts = []
    for i in (1, 2):
        p = tmp_path / f"part{i}.h5ad"
        r = invoke("annotate", q, "--model", pbmc_model_dir, "--output", p, "--device", "cpu",
                   "--chunk", f"{i}/2")
        assert r.exit_code == 0, r.output
        parts.append(p)
    g = tmp_path / "g.h5ad"
    r = invoke("gather", q, *parts, "--output", g, "--over-clustering", "louvain",
               "--celltypist-columns", "--csv", tmp_path / "g.csv")
    assert r.exit_code == 0, r.output
    assert "majority voting" in r.stdout
    a = ad.read_h5ad(g)
    assert "scsnn_majority_voting" in a.obs and "majority_voting" in a.obs
    assert "majority_voting" in pd.read_csv(tmp_path / "g.csv").columns
    assert_clean_error(invoke("gather", q, *parts, "--output", tmp_path / "h.h5ad",
                              "--majority-voting"), "needs over_clustering")


# -- help, threads, progress, messages -----------------------------------------------------
def _all_help_pages(columns: int) -> dict[str, str]:
    """Every help page as a terminal of this width shows it (a fresh interpreter: the test
    runner pins click's width to 80)."""
    code = (
        "import sys, typer\n"
        "from scsnn.cli import app\n"
        "for name in ['', *typer.main.get_command(app).commands]:\n"
        "    print(f'=== PAGE {name}', flush=True)\n"
        "    try:\n"
        "        app([name, '--help'] if name else ['--help'], prog_name='scsnn')\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (name, e.code)\n")
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    env.pop("TERMINAL_WIDTH", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    pages: dict[str, str] = {}
    for chunk in r.stdout.split("=== PAGE")[1:]:
        name, _, text = chunk.partition("\n")
        pages[name.strip()] = text
    return pages


def test_help_at_80_columns_names_every_option_in_full():
    import typer

    group = typer.main.get_command(app)
    pages = _all_help_pages(80)
    commands = {"": group, **group.commands}
    for name, cmd in commands.items():
        text = pages[name]
        for param in cmd.params:
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("-"):
                    assert opt in text.split() or f"{opt}," in text, (name, opt)
        assert "…" not in text, name
        assert "<bool>" not in text, name  # switches read --x/--no-x, without a type
        assert max(len(line) for line in text.splitlines()) <= 80, name
    assert "--bilevel / --no-bilevel" in pages["train"]
    assert "--heterogeneous / --no-heterogeneous" in pages["train"]
    assert "--min-cells-per-class" in pages["train"]
    # --out says what is written
    assert "model.json" in pages["train"] and "weights.safetensors" in pages["train"]
    assert "save it to OUT" not in pages["train"]


def test_help_uses_a_wide_terminal():
    wide = _all_help_pages(200)["train"]
    assert max(len(line) for line in wide.splitlines()) > 100  # up to 120 columns
    assert max(len(line) for line in wide.splitlines()) <= 120


def test_threads_set_before_the_libraries_load(tmp_path):
    """--threads reaches BLAS, OpenMP, numba and torch: the variables are set before any of
    them is imported (nothing heavy loads before the command runs)."""
    code = (
        "import json, os, sys\n"
        "from scsnn.cli import app\n"
        "early = [m for m in ('numpy', 'torch', 'numba', 'scipy') if m in sys.modules]\n"
        "try:\n"
        f"    app(['--threads', '1', 'train', {str(tmp_path / 'missing.h5ad')!r}, '-l', 'x',"
        f" '-o', {str(tmp_path / 'm')!r}])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "import numba, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({'early': early, 'code': code, 'numba': numba.config.NUMBA_NUM_THREADS,"
        " 'torch': torch.get_num_threads(), 'pools': [i['num_threads'] for i in "
        "threadpool_info()], 'env': {v: os.environ.get(v) for v in ('OMP_NUM_THREADS', "
        "'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'NUMBA_NUM_THREADS')}}))\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["early"] == []
    assert got["code"] == 1  # the missing file, after the libraries loaded
    assert got["env"] == dict.fromkeys(got["env"], "1")
    assert got["numba"] == 1 and got["torch"] == 1
    assert got["pools"] and all(n == 1 for n in got["pools"])


def test_threads_with_a_torch_free_command_loads_no_torch(pbmc_model_dir):
    code = ("import sys\nfrom scsnn.cli import app\n"
            f"try:\n    app(['--threads', '2', 'info', {str(pbmc_model_dir)!r}])\n"
            "except SystemExit as e:\n    assert not e.code\n"
            "import os\nassert os.environ['OMP_NUM_THREADS'] == '2'\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode == 0, r.stderr


def test_progress_bar_follows_quiet(work, tmp_path, monkeypatch):
    """The training bar: off with -q, otherwise left to training (on when stderr is a
    terminal)."""
    _, ref, _ = work
    seen = []

    def fake_train(*args, **kwargs):
        seen.append(kwargs.get("progress", "absent"))
        raise InputError("stop here")

    monkeypatch.setattr(scsnn.tl, "train", fake_train)
    for flags, expected in ((["-q"], False), ([], None), (["-v"], None)):
        r = invoke(*flags, "train", ref, "-l", "cell_type", "-o", tmp_path / "m", "--epochs",
                   "1")
        assert_clean_error(r, "stop here")
        assert seen[-1] is expected, (flags, seen)


def test_verbose_training_messages_are_concise(work, tmp_path):
    _, ref, _ = work
    r = invoke("-v", "train", ref, "--label-key", "cell_type", "--out", tmp_path / "m",
               "--epochs", "2", "--hidden", "16", "--n-hvg", "100", "--device", "cpu")
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "DEBUG: epoch 1: train loss" in err
    assert "{" not in err and "}" not in err  # no raw dicts
    assert "nan" not in err.lower().replace("nanoseconds", "")
    assert "Traceback" not in err
    assert all(line.startswith(("INFO: ", "DEBUG: ", "WARNING: ")) for line in
               err.splitlines() if line.strip()), err
