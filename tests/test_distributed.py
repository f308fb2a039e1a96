"""scsnn.distributed: data-parallel training under torchrun (gloo, two CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scsnn
from scsnn import distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two ranks on the CPU, one thread each; scsnn imported from this checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([*TORCHRUN, *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- one process: everything is a no-op ----------------------------------------------------
@pytest.fixture
def no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_single_process_helpers(no_launcher):
    assert not distributed.launched() and not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process()
    assert distributed.group_rank_size() == (0, 1)
    assert distributed.backend() is None
    assert distributed.init_from_env(torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    with distributed.process_group(torch.device("cpu")) as dev:
        assert dev == torch.device("cpu") and not torch.distributed.is_initialized()
    t = torch.arange(3.0)
    assert torch.equal(distributed.all_reduce_mean(t), torch.arange(3.0))
    p = torch.nn.Parameter(torch.ones(2))
    assert distributed.all_reduce_step([p], [], 1.25, 0.5) == 1.25 and p.grad is None
    local = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert distributed.gather_blocks(local, 3, torch.device("cpu")) is local
    assert distributed.all_digests("ab" * 32) == ["ab" * 32]
    distributed.check_same("ab" * 32, "anything")
    distributed.barrier()


def test_rank_from_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched() and not distributed.is_distributed()
    assert distributed.rank() == 1 and distributed.world_size() == 2
    assert not distributed.is_main_process()
    assert distributed.group_rank_size() == (0, 1)  # no process group: train as one process
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


# -- sharding ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 128, 130])
def test_shards_partition_the_batch(world, n):
    rows = np.random.default_rng(n).choice(1000, size=n, replace=True)  # repeats allowed
    positions = np.arange(n)
    shards = [distributed.shard(positions, r, world) for r in range(world)]
    union = np.concatenate(shards)
    assert np.array_equal(np.sort(union), positions)  # every cell once, none twice
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) == n // world
    cells = np.concatenate([distributed.shard(rows, r, world) for r in range(world)])
    assert np.array_equal(np.sort(cells), np.sort(rows))
    if world == 1:
        assert np.array_equal(distributed.shard(rows, 0, 1), rows)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 10, 11])
def test_blocks_cover_rows_in_order(world, n):
    bounds = [distributed.block(n, r, world) for r in range(world)]
    got = np.concatenate([np.arange(lo, hi) for lo, hi in bounds])
    assert np.array_equal(got, np.arange(n))
    assert all(hi - lo <= -(-n // world) for lo, hi in bounds)


def test_rank_seeds():
    assert distributed.rank_seed(7, 0) == 7  # rank 0 is the single-process run
    assert len({distributed.rank_seed(7, r) for r in range(8)}) == 8


def test_weighted_shards_give_the_global_batch_gradient():
    """The shares used in training: sum over ranks of share * shard gradient equals the
    gradient of the mean loss over the whole batch (plain and class-weighted losses)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x, y = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    w = torch.tensor([0.5, 2.0, 1.0])
    rows = np.arange(11)
    for kw in ({"label_smoothing": 0.1}, {"weight": w}):
        lin.zero_grad()
        F.cross_entropy(lin(x), y, **kw).backward()
        full = lin.weight.grad.clone()
        summed = torch.zeros_like(full)
        for r in range(3):
            mine = distributed.shard(rows, r, 3)
            if "weight" in kw:
                share = float(w[y[mine]].sum() / w[y[rows]].sum())
            else:
                share = mine.size / rows.size
            lin.zero_grad()
            F.cross_entropy(lin(x[mine]), y[mine], **kw).backward()
            summed += share * lin.weight.grad
        assert torch.allclose(summed, full, atol=1e-6)


# -- two processes under torchrun ----------------------------------------------------------
WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import scsnn
    from scsnn import distributed

    out = sys.argv[1]
    # preprocessing (scanpy, numba) before the process group, as scsnn.tl.train does: numba's
    # first compilation stalled for minutes in processes that had already started gloo
    from scsnn.io import get_expression
    from scsnn.models import NetworkConfig, build_network
    from scsnn.pp import ScaledCells, fit_gene_space
    from scsnn.training import BiLevelTrainer, TrainConfig

    data = scsnn.datasets.synthetic(n_cells=200, n_genes=120, n_types=3, rare_fraction=0.05,
                                    n_markers=8, seed=5)
    codes = data.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    classes = list(data.obs["cell_type"].cat.categories)
    gs, X = fit_gene_space(get_expression(data), codes, classes, n_hvg=60, n_markers=5)

    dev = distributed.init_from_env(torch.device("cpu"))
    r, world = distributed.group_rank_size()
    res = {"rank": r, "world": world, "backend": distributed.backend(),
           "main": distributed.is_main_process()}

    # all_reduce_step: weighted sum of gradients (a missing gradient counts as zero),
    # buffers and the loss, identical on every rank
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(r + 1))
    if r == 0:
        b.grad = torch.tensor([4.0, 8.0])
    buf = torch.full((2,), 10.0 * (r + 1))
    share = [0.25, 0.75][r]
    loss = distributed.all_reduce_step([a, b], [buf], 2.0 + r, share)
    res["grad_a"], res["grad_b"] = a.grad.tolist(), b.grad.tolist()
    res["buf"], res["loss"] = buf.tolist(), loss

    # gather_blocks: rank r predicts block r, every rank gets all rows in order
    lo, hi = distributed.block(5, r, world)
    local = np.arange(lo, hi, dtype=np.float32)[:, None].repeat(2, 1)
    res["gathered"] = distributed.gather_blocks(local, 5, dev)[:, 0].tolist()
    res["digests"] = distributed.all_digests(("%064x" % (r + 1)))
    try:
        distributed.check_same("%064x" % r, "test values")
        res["check_same"] = "passed"
    except RuntimeError as exc:
        res["check_same"] = str(exc)

    # the trainer with early stopping (nothing learns at learning rate 0)
    net = build_network(NetworkConfig(n_genes=gs.n_genes, n_classes=len(classes),
                                      hidden=(16, 8)), seed=0)
    # about 20 alpha cells in batches of 19: some steps leave rank 1 without a cell
    cfg = TrainConfig(epochs=40, patience=2, min_epochs=3, lr=0.0, alpha_lr=0.0,
                      alpha_interval=1, alpha_steps=4, batch_size=19,
                      min_samples_per_epoch=400, progress=False)
    net, m = BiLevelTrainer(cfg, dev).fit(net, ScaledCells(X, gs), codes, len(classes))
    res["n_alpha"], res["n_select"] = m["n_alpha"], m["n_select"]
    res["epochs_run"] = m["epochs_run"]
    res["history"] = m["history"]
    res["distributed"] = m.get("distributed")

    # tl.train trains in the group that exists (scsnn.train under torchrun creates it)
    model = scsnn.tl.train(data, "cell_type", device="cpu", progress=False,
                           **scsnn.tl.configs(epochs=1, hidden=(8,), n_hvg=30, refit_epochs=0))
    res["model_id"] = model.model_id
    res["initialized_after"] = torch.distributed.is_initialized()
    with open(f"{out}/rank{r}.json", "w") as f:
        json.dump(res, f)
''')


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_worker")
    (d / "worker.py").write_text(WORKER)
    proc = _torchrun([str(d / "worker.py"), str(d)], cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


def test_collectives_across_two_processes(worker_results):
    r0, r1 = worker_results
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["backend"] == "gloo" and r0["main"] and not r1["main"]
    for r in (r0, r1):
        assert r["grad_a"] == pytest.approx([0.25 * 1 + 0.75 * 2] * 3)
        assert r["grad_b"] == pytest.approx([1.0, 2.0])  # rank 1 had none: zeros
        assert r["buf"] == pytest.approx([0.25 * 10 + 0.75 * 20] * 2)
        assert r["loss"] == pytest.approx(0.25 * 2 + 0.75 * 3)
        assert r["gathered"] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert r["digests"] == [f"{1:064x}", f"{2:064x}"]
        assert "ranks [1] differ from rank 0 in test values" in r["check_same"]
    for k in ("grad_a", "grad_b", "buf", "loss"):
        assert r0[k] == r1[k]  # bit-identical on both ranks


def test_early_stopping_and_weights_agree_across_ranks(worker_results):
    r0, r1 = worker_results
    assert r0["n_alpha"] == r1["n_alpha"] > 0 and r0["n_select"] == r1["n_select"] > 0
    assert r0["epochs_run"] == r1["epochs_run"] < 40  # both stopped, at the same epoch
    assert r0["history"] == r1["history"]  # losses and validation scores are global
    assert r0["model_id"] == r1["model_id"]
    dist0 = r0["distributed"]
    assert dist0 == r1["distributed"]
    assert dist0["world_size"] == 2 and dist0["backend"] == "gloo"
    assert len(set(dist0["rank_weights_sha256"])) == 1
    assert r0["initialized_after"] and r1["initialized_after"]  # the group stays up


def test_torchrun_train_command(tmp_path):
    """The documented command: every rank trains, rank 0 alone logs and writes the model."""
    a = scsnn.datasets.synthetic(n_cells=300, n_genes=200, n_types=4, rare_fraction=0.03,
                                 n_markers=10, seed=3)
    ref = tmp_path / "ref.h5ad"
    a.write_h5ad(ref)
    out = tmp_path / "model"
    proc = _torchrun(["-m", "scsnn", "train", str(ref), "--label-key", "cell_type",
                      "--out", str(out), "--epochs", "4", "--hidden", "32,16", "--n-hvg", "100",
                      "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved to") == 1, proc.stdout
    assert proc.stderr.count("trained ScsnnModel") == 1  # rank 1 does not log
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]

    model = scsnn.ScsnnModel.load(out)
    info = model.metrics["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    digests = info["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical weights
    assert distributed.state_digest(model.network) == digests[0]  # and those were saved
    assert model.model_id == model.compute_id()

    scsnn.tl.annotate(a, model, device="cpu")
    acc = float((a.obs["scsnn"].astype(str) == a.obs["cell_type"].astype(str)).mean())
    assert acc > 0.8  # chance is about 0.25
