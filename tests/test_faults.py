"""Nothing lost under faults: a process killed while it writes a model or an annotated file,
an output folder that cannot be written, a full disk, a job too large for memory.

Kills are injected at every file-system step of the writer (tests/fault_worker.py: a forked
child SIGKILLs itself there, partway through a file or between two renames), so each moment
is covered deterministically; one test kills a real `scsnn train` process while it saves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from conftest import assert_one_line, shared_file
from fault_worker import tiny_model
from typer.testing import CliRunner

import scsnn
from scsnn import io
from scsnn.bundle import META_FILE, WEIGHTS_FILE, ScsnnModel
from scsnn.cli import app
from scsnn.errors import InputError, ModelError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

runner = CliRunner()
WORKER = Path(__file__).with_name("fault_worker.py")


def _worker(*args: str) -> dict[str, list[dict]]:
    """Run tests/fault_worker.py (kills at every step of a writer): its tries by variant."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    tries: dict[str, list[dict]] = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            t = json.loads(line)
            tries.setdefault(t["variant"], []).append(t)
    for ts in tries.values():  # killed at every step, then a run that finished
        assert not ts[-1]["killed"] and all(t["killed"] for t in ts[:-1])
    return tries


@pytest.fixture(scope="module")
def saves_killed(tmp_path_factory):
    """Model saves killed at every step, over an old model and into a fresh folder."""
    d = tmp_path_factory.mktemp("saves")
    return d, _worker("save", d)


# -- the model directory -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["old", "fresh"], ids=["over-old-model", "fresh"])
def test_kill_during_model_write_leaves_old_or_new_never_half(saves_killed, tmp_path,
                                                              variant):
    """Training killed at any moment while it writes its model directory: the directory
    then holds the old model, the new one, or (on a first save) no model; never a half one."""
    runs, tries = saves_killed
    old, new = tiny_model(1), tiny_model(2)
    assert old.model_id != new.model_id
    tries = tries[variant]
    assert len(tries) >= 9  # every step of the writer was tried: 8 kill points + a clean run
    outcomes = []
    for t in tries:
        d = tmp_path / f"k{t['k']}"
        shutil.copytree(runs / variant / f"k{t['k']}" / "model", d)
        try:
            loaded = ScsnnModel.load(d)
        except ModelError as exc:  # allowed only when there was no model before
            assert variant == "fresh", f"kill point {t['k']}: old model lost: {exc}"
            assert "not an scsnn model" in str(exc) or "not found" in str(exc), (t, str(exc))
            outcomes.append("none")
        else:
            assert loaded.model_id in (old.model_id, new.model_id), t
            assert loaded.compute_id() == loaded.model_id  # weights and metadata agree
            outcomes.append("old" if loaded.model_id == old.model_id else "new")
        new.save(d)  # a later save over whatever the kill left works, and is clean
        assert ScsnnModel.load(d).model_id == new.model_id
        assert sorted(p.name for p in d.iterdir()) == [META_FILE, WEIGHTS_FILE], t
    assert outcomes[-1] == "new"
    assert ("old" if variant == "old" else "none") in outcomes


def test_load_finishes_an_interrupted_save(saves_killed, tmp_path, monkeypatch):
    """A save killed between its two renames leaves model.json naming the new weights,
    still in their temporary file: loading uses them and finishes the rename; where the
    rename is refused (a read-only folder), it reads the temporary file."""
    runs, tries = saves_killed
    old, new = tiny_model(1), tiny_model(2)
    dirs = [runs / "old" / f"k{t['k']}" / "model" for t in tries["old"]]
    between = [d for d in dirs if (d / f".{WEIGHTS_FILE}.tmp").exists()
               and json.loads((d / META_FILE).read_text())["model_id"] == new.model_id]
    assert between, "no kill point between the renames"
    e, ro = tmp_path / "interrupted", tmp_path / "read_only"
    shutil.copytree(between[0], e)
    shutil.copytree(between[0], ro)
    with monkeypatch.context() as mp:
        def refuse(*a, **kw):
            raise PermissionError(13, "Permission denied")
        mp.setattr(os, "replace", refuse)
        assert ScsnnModel.load(ro).model_id == new.model_id
    assert (ro / f".{WEIGHTS_FILE}.tmp").exists()  # left as it was
    assert ScsnnModel.load(e).model_id == new.model_id
    assert sorted(p.name for p in e.iterdir()) == [META_FILE, WEIGHTS_FILE]  # rename finished
    old.save(ro)  # a new save over an interrupted one finishes it first, then writes
    assert ScsnnModel.load(ro).model_id == old.model_id
    assert sorted(p.name for p in ro.iterdir()) == [META_FILE, WEIGHTS_FILE]


def test_kill_real_training_process_while_it_saves(tmp_path, synth):
    """`scsnn train` over an existing model, killed between writing the weights and the
    metadata: the directory still holds one whole model."""
    ref = tmp_path / "ref.h5ad"
    synth.write_h5ad(ref)
    out = tmp_path / "model"
    train = ["train", str(ref), "-l", "cell_type", "-o", str(out), "--hidden", "16",
             "--n-hvg", "100", "--device", "cpu"]
    r = runner.invoke(app, [*train, "--epochs", "2"])
    assert r.exit_code == 0, r.output
    old_id = ScsnnModel.load(out).model_id
    code = (
        "import os, signal, sys\n"
        "n = [0]\n"
        "real = os.replace\n"
        "def replace(a, b):\n"
        "    real(a, b)\n"
        "    n[0] += 1\n"
        "    if n[0] == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        "from scsnn.cli import main\n"
        "sys.argv = ['scsnn'] + sys.argv[1:]\n"
        "main()\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, *train, "--epochs", "3", "--seed", "5"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    m = ScsnnModel.load(out)  # old or new, whole
    assert m.compute_id() == m.model_id
    assert m.model_id != old_id  # the metadata was committed first: the new model is whole


# -- annotated files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_query(tmp_path_factory):
    import scsnn.datasets

    a = scsnn.datasets.synthetic(n_cells=120, n_genes=80, n_types=3, rare_fraction=0.1,
                                 n_markers=8, seed=2)
    d = tmp_path_factory.mktemp("faults")
    p = d / "query.h5ad"
    a.write_h5ad(p)
    m = scsnn.tl.train(a, "cell_type", device="cpu", progress=False,
                       **scsnn.tl.configs(epochs=1, hidden=(8,), n_hvg=40))
    return p, m


@pytest.fixture(scope="module")
def annotations_killed(tiny_query, tmp_path_factory):
    """Annotations killed at every step, in place and into --output."""
    src, model = tiny_query
    d = tmp_path_factory.mktemp("annotations")
    model.save(d / "model")
    return d / "runs", _worker("annotate", d / "runs", src, d / "model")


@pytest.mark.parametrize("variant", ["in-place", "output"])
def test_kill_during_annotation_keeps_the_input(tiny_query, annotations_killed, variant):
    """Annotation killed at any moment (copying the query, writing the predictions into the
    copy, renaming it into place): the query is intact, or (in place, after the rename)
    replaced by the whole annotated file; an --output file is whole or absent."""
    src, _ = tiny_query
    runs, tries = annotations_killed
    before = src.read_bytes()
    tries = tries[variant]
    assert len(tries) >= 6
    seen = set()
    for t in tries:
        d = runs / variant / f"k{t['k']}"
        q = d / "query.h5ad"
        if q.read_bytes() == before:
            seen.add("query intact")
        else:
            assert variant == "in-place", t
            a = ad.read_h5ad(q)  # replaced: by the whole annotated file
            assert "scsnn" in a.obs and a.n_obs == 120 and "scsnn_probabilities" in a.obsm
            seen.add("annotated")
        out = d / "out.h5ad"
        if out.exists():
            assert variant == "output" and "scsnn" in ad.read_h5ad(out).obs, t
            seen.add("output whole")
    assert "query intact" in seen
    assert ("annotated" if variant == "in-place" else "output whole") in seen


# -- outputs that cannot be written fail before any work -------------------------------------


def _no_work(monkeypatch):
    """Make any training or annotation fail loudly: the refusal must come before them."""
    def boom(*a, **kw):
        raise AssertionError("work was started")
    monkeypatch.setattr(scsnn.tl, "annotate_file", boom)
    monkeypatch.setattr(scsnn.tl, "train", boom)


def _unwritable(tmp_path) -> Path:
    """A folder no process can write into, for root too: a path below a regular file."""
    f = tmp_path / "a_file"
    f.write_text("x")
    return f / "sub"


def test_output_in_unwritable_folder_fails_before_work(tiny_query, tmp_path, monkeypatch):
    src, model = tiny_query
    d = tmp_path / "m"
    model.save(d)
    _no_work(monkeypatch)
    bad = _unwritable(tmp_path)
    r = runner.invoke(app, ["annotate", str(src), "-m", str(d), "-o", str(bad / "o.h5ad")])
    assert r.exit_code == 1, r.output
    assert_one_line(r.stderr) and "cannot write" in r.stderr and "is not a directory" in r.stderr
    r = runner.invoke(app, ["train", str(src), "-l", "cell_type", "-o", str(bad / "model")])
    assert r.exit_code == 1 and "cannot write" in r.stderr, r.output
    r = runner.invoke(app, ["train", str(src), "-l", "cell_type", "-o", str(tmp_path / "a_file")])
    assert r.exit_code == 1 and "not a directory" in r.stderr, r.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_read_only_folder_fails_before_work(tiny_query, tmp_path, monkeypatch):
    src, model = tiny_query
    d = tmp_path / "m"
    model.save(d)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    _no_work(monkeypatch)
    try:
        r = runner.invoke(app, ["annotate", str(src), "-m", str(d), "-o", str(ro / "o.h5ad")])
        assert r.exit_code == 1 and "not writable" in r.stderr, r.output
    finally:
        ro.chmod(0o755)


def test_check_writable():
    with pytest.raises(InputError, match="is a directory"):
        io.check_writable(Path.cwd())
    with pytest.raises(InputError, match="not a directory"):
        io.check_writable(Path(__file__) / "x.h5ad")
    io.check_writable(Path.cwd() / "not" / "yet" / "made" / "x.h5ad", folder=False)
    assert not (Path.cwd() / "not").exists()  # the check creates nothing


# -- a full disk -------------------------------------------------------------------------------


def _cli_with_file_size_limit(limit: int, *runs: list[str]) -> list[tuple[int, str]]:
    """Run CLI commands in one process whose files may not grow past ``limit`` bytes (as on
    a full disk: writes fail with EFBIG instead of ENOSPC); (exit code, stderr) of each."""
    code = (
        "import io, json, resource, signal, sys, contextlib\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from scsnn.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['scsnn', *args]\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            main()\n"
        "            rc = 0\n"
        "        except SystemExit as exc:\n"
        "            rc = exc.code\n"
        "    print(json.dumps([rc, err.getvalue()]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, "-c", code, json.dumps([list(r) for r in runs])],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [tuple(json.loads(line)) for line in p.stdout.splitlines() if line.startswith("[")]


def test_disk_full_leaves_the_input_intact(tiny_query, tmp_path):
    src, model = tiny_query
    d = tmp_path / "m"
    model.save(d)
    q = tmp_path / "q.h5ad"
    shutil.copyfile(src, q)
    before, mtime = q.read_bytes(), q.stat().st_mtime_ns
    (rc1, err1), (rc2, err2) = _cli_with_file_size_limit(
        len(before) // 2,
        ["annotate", str(q), "-m", str(d), "--device", "cpu"],  # in place
        ["annotate", str(q), "-m", str(d), "-o", str(tmp_path / "o.h5ad"), "--device", "cpu"])
    for rc, err in ((rc1, err1), (rc2, err2)):
        assert rc == 1, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: cannot write") and "is full" in line, err
        assert "Traceback" not in err
    assert "q.h5ad is unchanged" in err1 and "o.h5ad was not written" in err2
    assert q.read_bytes() == before and q.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "q.h5ad"]  # no temp file left


# -- memory known in advance -------------------------------------------------------------------


def test_training_too_large_for_memory_is_refused_with_the_option(tmp_path, monkeypatch):
    p = shared_file("pbmc3k.h5ad")
    _no_work(monkeypatch)
    monkeypatch.setenv(io.MEMORY_ENV, "480M")
    r = runner.invoke(app, ["train", str(p), "-l", "cell_type", "-o", str(tmp_path / "m")])
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert_one_line(err)
    assert "training on 2,638 cells x 13,714 genes" in err and "of memory" in err, err
    fit = int(re.search(r"--max-cells (\d+)", err).group(1))
    assert 2 < fit < 2638 and "--stream" in err
    info = io.matrix_info(p)
    assert io.train_bytes(info, fit, 9) <= 480 * 2**20  # the suggested sample fits
    assert not (tmp_path / "m").exists()
    # the suggested sample is accepted (the work itself is stubbed out here)
    monkeypatch.setattr(scsnn.io, "read_h5ad_sample", lambda *a, **kw: _stop())
    r = runner.invoke(app, ["train", str(p), "-l", "cell_type", "-o", str(tmp_path / "m"),
                            "--max-cells", str(fit)])
    assert "reached the work" in r.stderr, r.output


def _stop():
    raise InputError("reached the work")


def test_annotation_too_large_for_memory_is_refused_with_the_option(tiny_query, tmp_path,
                                                                    monkeypatch):
    src, model = tiny_query
    d = tmp_path / "m"
    model.save(d)
    _no_work(monkeypatch)
    monkeypatch.setenv(io.MEMORY_ENV, "1M")
    r = runner.invoke(app, ["annotate", str(src), "-m", str(d), "-o", str(tmp_path / "o.h5ad")])
    assert r.exit_code == 1, r.output
    assert_one_line(r.stderr)
    assert "annotating 120 cells" in r.stderr and "free memory" in r.stderr, r.stderr
    monkeypatch.setenv(io.MEMORY_ENV, "lots")
    r = runner.invoke(app, ["annotate", str(src), "-m", str(d), "-o", str(tmp_path / "o.h5ad")])
    assert r.exit_code == 1 and "SCSNN_MEMORY_LIMIT" in r.stderr
    monkeypatch.setenv(io.MEMORY_ENV, "off")  # no check: the work starts
    r = runner.invoke(app, ["annotate", str(src), "-m", str(d), "-o", str(tmp_path / "o.h5ad")])
    assert "work was started" in r.stderr


def test_memory_estimates_and_advice():
    info = io.MatrixInfo(n_obs=1_000_000, n_vars=30_000, nnz=2_000_000_000, dense=False,
                         itemsize=4)
    assert io.train_bytes(info, 1_000_000, 50) > 40 * 2**30
    assert io.train_bytes(info, 10_000, 50) < 2 * 2**30
    args = (2000, 50, 4, 1024)
    small = io.annotate_bytes(info, 1_000_000, 8192, *args)
    large = io.annotate_bytes(info, 1_000_000, 1_000_000, *args)
    assert small < large and small < 4 * 2**30
    advice = io.train_advice(info, 1_000_000, 50, 16 * 2**30)
    fit = int(re.search(r"--max-cells (\d+)", advice).group(1))
    assert io.train_bytes(info, fit, 50) <= 16 * 2**30 < io.train_bytes(info, 2 * fit, 50)
    advice = io.annotate_advice(info, 1_000_000, 1_000_000, *args, 8 * 2**30)
    assert "--chunk-size" in advice
    # the predictions of 1e8 cells x 5,000 classes alone exceed 8 GiB: parts are needed
    huge = io.MatrixInfo(n_obs=100_000_000, n_vars=30_000, nnz=10**11, dense=False,
                         itemsize=4)
    advice = io.annotate_advice(huge, 100_000_000, 65536, 2000, 5000, 4, 1024, 8 * 2**30)
    assert "--chunk I/" in advice and "scsnn gather" in advice
    dense = io.MatrixInfo(n_obs=100_000, n_vars=30_000, nnz=3 * 10**9, dense=True, itemsize=4)
    assert io.annotate_bytes(dense, 100_000, 65536, *args) > 65536 * 30_000 * 4


def test_available_memory_reads_the_limit(monkeypatch):
    monkeypatch.setenv(io.MEMORY_ENV, "2G")
    assert io.available_memory() == 2 * 2**30
    monkeypatch.setenv(io.MEMORY_ENV, "off")
    assert io.available_memory() is None
    monkeypatch.delenv(io.MEMORY_ENV)
    avail = io.available_memory()
    assert avail is None or avail > 0
