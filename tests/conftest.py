"""Shared fixtures for the scsnn test suite.

Real labelled data live in ``../shared/data`` beside the repository (``/work/shared/data``
here; CI clones put ``shared`` beside the checkout too). Tests that need a particular file
skip when it is missing; the PBMC fixtures fall back on the copy that ships with scanpy.
"""

from __future__ import annotations

import logging
import os
import warnings

# scanpy's numba kernels (normalize_total) reset the OpenMP thread count, which torch shares,
# to NUMBA_NUM_THREADS once torch has started its pool. Pin both to one thread: the same seed
# then gives the same model in every test, and tiny networks run fastest on one thread
# (several threads spin-wait badly, tens of times slower, when another process shares the
# cores). Must be set before numba is imported.
os.environ["NUMBA_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import scsnn  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(1)

#: Small training settings: seconds, not minutes, on two CPU cores (flat, see tl.configs).
SMALL = dict(epochs=6, hidden=(32, 16), n_hvg=200)

#: Keyword arguments of scsnn.tl.train that are not training settings.
_TRAIN_ARGS = ("seed", "device", "progress", "genes", "layer", "use_raw", "gene_symbols",
               "stream_from")


def small(**overrides) -> dict:
    """Keyword arguments for ``scsnn.tl.train``: the small settings with ``overrides`` (flat
    settings and tl.train's own arguments mixed), on the CPU, without a progress bar."""
    flat = {**SMALL, **overrides}
    own = {k: flat.pop(k) for k in _TRAIN_ARGS if k in flat}
    return {"device": "cpu", "progress": False, **own, **scsnn.tl.configs(**flat)}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def shared_file(name: str) -> Path:
    """Path of a file in the shared data folder; skips the test when it is missing."""
    p = DATA_DIR / name
    if not p.is_file():
        pytest.skip(f"shared data file not available: {p}")
    return p


@pytest.fixture(autouse=True)
def _restore_global_state():
    """The CLI reconfigures the 'scsnn' logger and warning filters: undo that after each test,
    so that caplog keeps working in the tests that run after CLI tests."""
    torch.set_num_threads(1)
    log = logging.getLogger("scsnn")
    saved = (list(log.handlers), log.level, log.propagate)
    with warnings.catch_warnings():
        yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder not available: {DATA_DIR}")
    return DATA_DIR


def _load_pbmc() -> ad.AnnData:
    p = DATA_DIR / "pbmc68k_reduced.h5ad"
    if p.is_file():
        return scsnn.read_h5ad(p)  # X: counts, layers['log_normalized'], obs['cell_type']
    return scsnn.datasets.pbmc68k_reduced()  # X: log-normalised, obs['cell_type']


@pytest.fixture(scope="session")
def _pbmc_session() -> ad.AnnData:
    return _load_pbmc()


@pytest.fixture
def pbmc(_pbmc_session) -> ad.AnnData:
    """700 labelled PBMCs (a fresh copy for every test)."""
    return _pbmc_session.copy()


@pytest.fixture(scope="session")
def pbmc_model(_pbmc_session) -> scsnn.ScsnnModel:
    """A small HIFI model trained once on pbmc68k_reduced (shared by every module)."""
    return scsnn.tl.train(_pbmc_session, "cell_type", **small(seed=0))


@pytest.fixture(scope="session")
def pbmc_model_dir(pbmc_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "pbmc_model"
    pbmc_model.save(d)
    return d


@pytest.fixture(scope="session")
def pbmc_annotated(_pbmc_session, pbmc_model) -> ad.AnnData:
    """pbmc68k_reduced annotated by ``pbmc_model`` (do not modify: copy it)."""
    return scsnn.tl.annotate(_pbmc_session, pbmc_model, device="cpu", copy=True)


@pytest.fixture
def synth() -> ad.AnnData:
    """Small synthetic counts: 4 types, one rare (9 cells), 200 genes."""
    return scsnn.datasets.synthetic(
        n_cells=300, n_genes=200, n_types=4, rare_fraction=0.03, n_markers=10, seed=3
    )


def assert_one_line(msg: str) -> None:
    assert msg.strip(), "empty message"
    assert "\n" not in msg.strip(), f"message spans several lines: {msg!r}"
    assert "Traceback" not in msg
