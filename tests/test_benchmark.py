"""The side-by-side benchmark: every method on the same splits, one table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn
import torch
from conftest import SMALL
from typer.testing import CliRunner

import scsnn
from scsnn import benchmark as bm
from scsnn.cli import app
from scsnn.errors import InputError

FAST = {k: v for k, v in SMALL.items() if k != "progress"} | {"epochs": 3}


@pytest.fixture(scope="module")
def data():
    return scsnn.datasets.synthetic(n_cells=240, n_genes=150, n_types=4, rare_fraction=0.025,
                                    n_markers=8, seed=5)


def test_cv_splits_are_stratified_and_disjoint(data):
    splits = list(bm.cv_splits(data, "cell_type", 3, seed=0))
    assert len(splits) == 3
    seen = set()
    for s in splits:
        q = set(s.query.obs_names)
        assert not q & set(s.reference.obs_names)
        assert not q & seen
        seen |= q
        assert set(s.query.obs["cell_type"]) == set(data.obs["cell_type"])  # every class
    assert seen == set(data.obs_names)


def test_run_scores_every_method_on_the_same_cells(data):
    splits = list(bm.cv_splits(data, "cell_type", 2, seed=0))
    res = bm.run(splits, "cell_type", methods=["hifi", "lif", "ann", "logreg", "celltypist"],
                 train_kwargs=FAST)
    rows = res["rows"]
    scored = [r for r in rows if "macro_f1" in r]
    assert {r["method"] for r in scored} >= {"hifi", "lif", "ann", "logreg"}
    for r in scored:
        assert 0 <= r["macro_f1"] <= 1 and r["n_query"] in (120,)
    by = {r["method"]: r for r in res["summary"]}
    assert by["hifi"]["splits"] == 2 and "macro_f1_sd" in by["hifi"]
    assert by["ann"]["energy_ratio"] == 1.0 and "steps_to_99pct" not in by["ann"]
    assert by["hifi"]["energy_ratio"] > 0 and 1 <= by["hifi"]["steps_to_99pct"] <= 4
    assert "type_3" in by["hifi"]["rare_recall"]  # the rare type is reported by name
    ct = by["celltypist"]
    assert ("unavailable" in ct) == (bm.celltypist_status() is not None)
    table = bm.markdown(res, "synthetic")
    for m in ("hifi", "lif", "ann", "logreg", "celltypist"):
        assert f"| {m} |" in table
    v = res["versions"]  # what produced the result, stored with it
    assert v["torch"] == torch.__version__ and v["scikit-learn"] == sklearn.__version__
    assert v["scsnn"] == scsnn.__version__ and set(v) >= {"numpy", "scipy", "scanpy"}


def test_unknown_method_refused(data):
    with pytest.raises(InputError, match="unknown method"):
        bm.run([], "cell_type", methods=["hifi", "svm"])


def test_pair_split_uses_shared_genes(data):
    q = data[:, 20:].copy()
    s = bm.pair_split(data, q, "cell_type")
    assert s.genes == list(q.var_names)
    with pytest.raises(InputError, match="share no gene"):
        bm.pair_split(data[:, :10].copy(), data[:, 10:].copy(), "cell_type")


def test_cli_benchmark_writes_table(data, tmp_path):
    ref, query = data[:160].copy(), data[160:].copy()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    r = CliRunner().invoke(app, ["-q", "benchmark", str(tmp_path / "ref.h5ad"), "-l",
                                 "cell_type", "--query", str(tmp_path / "query.h5ad"),
                                 "--methods", "hifi,logreg", "--epochs", "2", "--device", "cpu",
                                 "--out", str(tmp_path / "bm")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "bm" / "benchmark.md").read_text()
    assert "| hifi |" in md and "| logreg |" in md
    res = json.loads((tmp_path / "bm" / "benchmark.json").read_text())
    assert {s["method"] for s in res["summary"]} == {"hifi", "logreg"}
    assert np.isfinite(res["summary"][0]["macro_f1"])


def test_tie_is_a_difference_under_the_larger_seed_spread():
    from scsnn.benchmark import tie

    a = {"macro_f1": 0.90, "macro_f1_sd": 0.02}
    assert tie(a, {"macro_f1": 0.91, "macro_f1_sd": 0.0})  # 0.01 under a's sd
    assert not tie(a, {"macro_f1": 0.95, "macro_f1_sd": 0.01})
    # equal means with no spread (the same predictions) are a tie, not a win or a loss
    assert tie({"macro_f1": 0.993, "macro_f1_sd": 0.0}, {"macro_f1": 0.993, "macro_f1_sd": 0.0})
    assert not tie({"macro_f1": 0.993, "macro_f1_sd": 0.0}, {"macro_f1": 0.992})
