"""Kill injection for tests/test_faults.py, run as its own process:

    python tests/fault_worker.py save OUT_DIR
    python tests/fault_worker.py annotate OUT_DIR QUERY MODEL_DIR

For k = 1, 2, ... it forks a child that runs the writer (saving a model over an old one and
into a fresh folder; annotating a file in place and into --output) and SIGKILLs itself at
its k-th file-system step: halfway through writing a file, or just before or after a rename,
an fsync, a copy or the closing of an HDF5 file. It stops at the first k the writer survives
(every step has then been tried). Each try leaves ``OUT_DIR/<variant>/k<k>`` as the kill
left it, for the test to check; one JSON line per try says whether the child was killed.

This process forks before doing any computation itself: GNU OpenMP (numba, torch) refuses
to run in a child forked from a process that has used it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np


def tiny_model(seed: int):
    """A small untrained model; different seeds give different weights (and ids)."""
    from scsnn.bundle import ScsnnModel
    from scsnn.models import NetworkConfig, build_network
    from scsnn.pp import GeneSpace

    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(20)]
    gs = GeneSpace(genes=genes, mean=rng.random(20).astype(np.float32),
                   std=(rng.random(20) + 0.5).astype(np.float32))
    cfg = NetworkConfig(n_genes=20, n_classes=3, hidden=(8, 6), timesteps=3, encoder="direct")
    m = ScsnnModel(gs, ["A", "B", "C"], build_network(cfg, seed=seed).eval(), cfg,
                   settings={"seed": seed})
    m.model_id = m.compute_id()
    return m


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_points(k: int) -> None:
    """SIGKILL this process at its k-th file-system step (see the module docstring)."""
    import h5py

    from scsnn import bundle

    count = [0]

    def step() -> None:
        count[0] += 1
        if count[0] == k:
            _kill()

    def around(fn):
        def wrapped(*a, **kw):
            step()
            out = fn(*a, **kw)
            step()
            return out
        return wrapped

    real_save = bundle.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        count[0] += 1
        if count[0] == k:  # killed halfway through the weights
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            _kill()
        step()

    real_write_text = Path.write_text

    def write_text(self, data, *a, **kw):
        count[0] += 1
        if count[0] == k:  # killed halfway through model.json
            real_write_text(self, data[: len(data) // 2], *a, **kw)
            _kill()
        out = real_write_text(self, data, *a, **kw)
        step()
        return out

    real_copy = shutil.copyfile

    def copyfile(src, dst, *a, **kw):
        count[0] += 1
        if count[0] == k:  # killed halfway through copying the query
            data = Path(src).read_bytes()
            Path(dst).write_bytes(data[: len(data) // 2])
            _kill()
        out = real_copy(src, dst, *a, **kw)
        step()
        return out

    bundle.save_file = save_file
    Path.write_text = write_text
    shutil.copyfile = copyfile
    os.replace = around(os.replace)
    os.fsync = around(os.fsync)
    h5py.File.close = around(h5py.File.close)


def run_killed_at(k: int, fn) -> bool:
    """Run ``fn`` in a forked child killed at its k-th step: True if it was killed."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            install_kill_points(k)
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code
            print(f"writer failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) != signal.SIGKILL:
            raise SystemExit(f"child {k} ended by signal {os.WTERMSIG(status)}")
        return True
    if os.WEXITSTATUS(status) != 0:
        raise SystemExit(f"child {k}: the writer failed without being killed")
    return False


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "save":  # over an old model, and into a fresh folder
        old, new = tiny_model(1), tiny_model(2)
        for variant in ("old", "fresh"):
            for k in range(1, 200):
                d = out / variant / f"k{k}" / "model"
                if variant == "old":
                    old.save(d)
                killed = run_killed_at(k, lambda d=d: new.save(d))
                print(json.dumps({"variant": variant, "k": k, "killed": killed}), flush=True)
                if not killed:
                    break
    elif mode == "annotate":  # in place, and into --output
        import scsnn

        query, model_dir = Path(argv[2]), argv[3]
        model = scsnn.load_model(model_dir)
        for variant in ("in-place", "output"):
            for k in range(1, 200):
                d = out / variant / f"k{k}"
                d.mkdir(parents=True)
                q = d / "query.h5ad"
                shutil.copyfile(query, q)
                dest = q if variant == "in-place" else d / "out.h5ad"
                killed = run_killed_at(k, lambda q=q, dest=dest: scsnn.tl.annotate_file(
                    q, model, output=dest, device="cpu"))
                print(json.dumps({"variant": variant, "k": k, "killed": killed}), flush=True)
                if not killed:
                    break
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
