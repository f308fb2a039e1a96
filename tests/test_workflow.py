"""The Snakemake workflow: lint, dry runs (local and with the SLURM profile), and a real run
on pbmc_3batch whose predictions must equal the CLI's, whole or in chunks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snakemake") is None,
                                reason="snakemake is not installed (pip install -e '.[test]')")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the rules call the `scsnn` console script of this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def snakemake(*args: str | os.PathLike, cwd: Path = ROOT,
              timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def test_lint_passes():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


def test_dry_run_of_the_default_config(tmp_path):
    r = snakemake("-n", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile",
                  "--configfile", ROOT / "workflows/config/config.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for rule in ("demo_data", "train", "annotate", "report", "summary"):
        assert rule in out


def _test_config(tmp_path: Path, **changes) -> Path:
    """The committed test config with paths made absolute and outputs under tmp_path."""
    cfg = yaml.safe_load((ROOT / "workflows/config/test_pbmc3batch.yaml").read_text())
    for entry in (cfg["reference"], *cfg["queries"].values()):
        p = (ROOT / entry["path"]).resolve()
        if not p.is_file():
            pytest.skip(f"shared data file not available: {p}")
        entry["path"] = str(p)
    cfg.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_plans_chunks_and_skips_training_for_a_given_model(tmp_path):
    cfg = _test_config(tmp_path, model=str(tmp_path / "given_model"))
    (tmp_path / "given_model").mkdir()
    r = snakemake("-n", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile",
                  "--configfile", cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "annotate_chunk" in out and "gather" in out
    stats = out[out.index("Job stats"):]
    assert "train" not in stats.split("total")[0]
    assert "subset_input" in stats


def test_majority_voting_options_reach_annotate_and_gather(tmp_path):
    cfg = _test_config(tmp_path)
    c = yaml.safe_load(cfg.read_text())
    c["annotate"].update(majority_voting=True, over_clustering="leiden",
                         majority_min_fraction=0.2, celltypist_columns=True)
    c["queries"]["pbmc_5p_chunked"]["over_clustering"] = "louvain"  # a query's own column
    cfg.write_text(yaml.safe_dump(c))
    r = snakemake("-n", "-p", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile",
                  "--configfile", cfg)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    cmds = [line for line in out.splitlines() if "scsnn " in line]
    whole = [x for x in cmds if " annotate " in x and "--chunk " not in x]
    chunks = [x for x in cmds if "--chunk " in x]
    gathers = [x for x in cmds if " gather " in x]
    assert whole and chunks and gathers
    assert all("--majority-voting --over-clustering leiden --majority-min-fraction 0.2 "
               "--celltypist-columns" in x for x in whole)
    assert all("--over-clustering louvain" in x for x in gathers)
    assert not any("--majority-voting" in x or "--celltypist" in x for x in chunks)


def test_invalid_config_is_refused(tmp_path):
    cfg = _test_config(tmp_path)
    bad = yaml.safe_load(cfg.read_text())
    bad["train"]["neuron"] = "hodgkin-huxley"
    cfg.write_text(yaml.safe_dump(bad))
    r = snakemake("-n", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile",
                  "--configfile", cfg)
    assert r.returncode != 0
    assert "hodgkin-huxley" in r.stdout + r.stderr


def _user_config(tmp_path: Path, **changes) -> dict:
    """A user's own config: one reference and one query of their own (empty files do for a
    dry run), nothing of the demo."""
    for name in ("my_ref.h5ad", "my_query.h5ad"):
        (tmp_path / name).touch()
    cfg = {"outdir": "results/mine",
           "reference": {"path": "my_ref.h5ad", "label_key": "cell_type"},
           "queries": {"my_sample": {"path": "my_query.h5ad"}}}
    cfg.update(changes)
    return cfg


def _dry_run(tmp_path: Path, cfg: dict | None) -> subprocess.CompletedProcess:
    args = ["-n", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile"]
    if cfg is not None:
        path = tmp_path / "my.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args += ["--configfile", path]
    return snakemake(*args)


def _job_counts(out: str) -> dict[str, int]:
    stats = out[out.index("Job stats"):].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def test_a_user_config_is_used_alone(tmp_path):
    """--configfile is not merged into the demo's config: only the user's samples are
    planned, and no demo data."""
    r = _dry_run(tmp_path, _user_config(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert _job_counts(out) == {"train": 1, "annotate": 1, "report": 1, "summary": 1, "all": 1}
    assert "demo_data" not in out and "pbmc_query" not in out and "results/demo" not in out
    assert "results/mine/annotated/my_sample.h5ad" in out


def test_without_a_configfile_the_demo_runs(tmp_path):
    r = _dry_run(tmp_path, None)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    jobs = _job_counts(out)
    assert jobs["demo_data"] == 1 and jobs["annotate"] == 1
    assert "results/demo/annotated/pbmc_query.h5ad" in out


@pytest.mark.parametrize(("edit", "fragments"), [
    (lambda c: c["reference"].update(lable_key=c["reference"].pop("label_key")),
     ["'lable_key'", "under reference", "did you mean 'label_key'"]),
    (lambda c: c.update(trian={"epochs": 3}), ["'trian'", "top level", "did you mean 'train'"]),
    (lambda c: c["queries"]["my_sample"].update(truthkey="cell_type"),
     ["'truthkey'", "queries.my_sample", "did you mean 'truth_key'"]),
    (lambda c: c.update(annotate={"batchsize": 64}), ["'batchsize'", "under annotate"]),
    (lambda c: c["reference"].update(subset=["donor"]), ["reference.subset", "object"]),
    (lambda c: c["queries"]["my_sample"].pop("path"), ["queries.my_sample", "'path'"]),
    (lambda c: c.update(train={"epochs": 0}), ["train.epochs", "minimum"]),
])
def test_a_config_mistake_stops_the_run_with_one_line(tmp_path, edit, fragments):
    cfg = _user_config(tmp_path)
    edit(cfg)
    r = _dry_run(tmp_path, cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    msg = (r.stdout + r.stderr).strip()
    assert msg.startswith("config error: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_slurm_profile_parses_and_dry_runs(tmp_path):
    profile = yaml.safe_load((ROOT / "workflows/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    rules = {"train", "annotate", "annotate_chunk"}
    assert set(profile["set-resources"]) <= rules | {"gather", "report", "summary"}
    assert profile["set-resources"]["train"]["gpu"] == 1
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    cfg = _test_config(tmp_path)
    r = snakemake("-n", "--directory", tmp_path, "--snakefile", ROOT / "Snakefile",
                  "--configfile", cfg, "--profile", ROOT / "workflows/profiles/slurm")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "annotate_chunk" in out


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    """One real run of the test config with 2 cores."""
    if not (DATA_DIR / "pbmc_3batch.h5ad").is_file():
        pytest.skip("shared data not available")
    tmp = tmp_path_factory.mktemp("workflow")
    cfg = _test_config(tmp)
    r = snakemake("--cores", "2", "--directory", tmp, "--snakefile", ROOT / "Snakefile",
                  "--configfile", cfg)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return tmp / "results/test_pbmc3batch"


def _predictions(path: Path) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    a = ad.read_h5ad(path)
    return (a.obs["scsnn"].astype(str), np.asarray(a.obsm["scsnn_probabilities"]),
            np.asarray(a.obsm["scsnn_step_labels"]))


def test_workflow_outputs(workflow_run):
    out = workflow_run
    for sample in ("pbmc_5p", "pbmc_5p_chunked", "pbmc3k"):
        a = ad.read_h5ad(out / "annotated" / f"{sample}.h5ad")
        assert "scsnn" in a.obs and "scsnn_probabilities" in a.obsm
        assert a.n_vars > 0  # the expression is kept: ready for scanpy
        rep = out / "reports" / sample
        for f in ("report.md", "report.json", "labels.csv", "composition.png",
                  "confidence.png"):
            assert (rep / f).is_file(), f
        assert (out / "logs" / "report" / f"{sample}.log").is_file()
    # evaluation only where a truth key is given
    assert (out / "reports/pbmc_5p/per_class.csv").is_file()
    assert (out / "reports/pbmc_5p/confusion.png").is_file()
    assert not (out / "reports/pbmc3k/per_class.csv").exists()
    summary = pd.read_csv(out / "summary/summary.tsv", sep="\t").set_index("sample")
    assert set(summary.index) == {"pbmc_5p", "pbmc_5p_chunked", "pbmc3k"}
    assert summary.loc["pbmc_5p", "n_cells"] == 430
    assert summary.loc["pbmc_5p", "macro_f1"] > 0.5
    assert np.isnan(summary.loc["pbmc3k", "macro_f1"])
    assert (out / "model/model.json").is_file()
    assert not any((out / "chunks").rglob("*.h5ad"))  # chunk files are temporary


def test_chunked_run_equals_whole_run(workflow_run):
    whole = _predictions(workflow_run / "annotated/pbmc_5p.h5ad")
    chunked = _predictions(workflow_run / "annotated/pbmc_5p_chunked.h5ad")
    assert whole[0].equals(chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_array_equal(whole[2], chunked[2])


def test_workflow_predictions_equal_the_cli(workflow_run, tmp_path):
    query = workflow_run / "inputs/pbmc_5p.h5ad"
    out = tmp_path / "cli.h5ad"
    r = subprocess.run(
        [shutil.which("scsnn", path=_env()["PATH"]) or "scsnn", "annotate", str(query),
         "--model", str(workflow_run / "model"), "--output", str(out), "--device", "cpu",
         "--batch-size", "64"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cli = _predictions(out)
    wf = _predictions(workflow_run / "annotated/pbmc_5p.h5ad")
    assert cli[0].equals(wf[0])
    np.testing.assert_array_equal(cli[1], wf[1])
