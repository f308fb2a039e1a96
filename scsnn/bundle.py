"""The model bundle: a trained network with its gene space, classes, settings and metrics,
and the model directory it is saved to.

A saved model is a directory with ``weights.safetensors`` (tensors only: loading it cannot
run code) and ``model.json`` (schema version, classes, gene space, network and training
settings, training metrics). :func:`predict` runs a network over projected cells through
their gene space, one mini-batch at a time: sparse where the network runs event-driven,
else densified.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._files import file_mode
from ._version import __version__
from .errors import ModelError
from .models import (
    NetworkConfig,
    Predictions,
    SparseCells,
    build_network,
    is_analog,
    predict_batches,
)
from .pp import GeneSpace

logger = logging.getLogger("scsnn")

MODEL_FORMAT = "scsnn-model"
#: 2: LIF/PLIF are the HIFI layer with frozen, shared parameters (schema 1's ``lif``/``plif``
#: were SpikingJelly's nodes, read as ``sj-lif``/``sj-plif``); spike encoders with fitted
#: per-gene thresholds; three-way training split.
SCHEMA_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"


def predict(
    network: nn.Module,
    X: sp.csr_matrix,
    gene_space: GeneSpace,
    present: np.ndarray | None = None,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    seed: int = 0,
    count_spikes: bool = False,
    early_exit: float | None = None,
    first_batch: int = 0,
    temperature: float = 1.0,
) -> Predictions:
    """Run the network over projected cells, mini-batch by mini-batch (only a batch is dense).

    Genes the query lacks (``present`` False) are given the reference mean for analog input
    and zero expression (silence) for spike encoders. Other arguments: see
    :func:`scsnn.models.predict_batches`; a matrix cut into chunks at multiples of
    ``batch_size`` gives the same predictions as the whole matrix.
    """
    batches = network_batches(network, X, gene_space, present, batch_size=batch_size)
    return predict_batches(network, batches, device=device, seed=seed,
                           count_spikes=count_spikes, early_exit=early_exit,
                           first_batch=first_batch, temperature=temperature)


def network_batches(network: nn.Module, X: sp.csr_matrix, gene_space: GeneSpace,
                    present: np.ndarray | None = None, *, batch_size: int = 1024
                    ) -> Iterator[np.ndarray | SparseCells]:
    """The inference batches of :func:`predict`: projected cells scaled ``batch_size`` at a
    time, sparse where the network reads them event-driven, else dense. Genes the query
    lacks: the reference mean for analog input, zero expression for spike encoders."""
    absent = "mean" if is_analog(network) else "zero"
    sparse = reads_sparse(network)
    for s in range(0, X.shape[0], batch_size):
        rows = X[s : s + batch_size]
        yield (sparse_batch(gene_space, rows, present, absent=absent) if sparse
               else gene_space.scale(rows, present, absent=absent))


def reads_sparse(network: nn.Module) -> bool:
    """Whether the network runs sparse inference batches event-driven (see
    :meth:`scsnn.models.SpikingClassifier.reads_sparse`)."""
    return bool(getattr(network, "reads_sparse", lambda training: False)(False))


def sparse_batch(gene_space: GeneSpace, X: sp.spmatrix, present: np.ndarray | None = None, *,
                 absent: str = "mean") -> SparseCells:
    """Projected CSR rows as a network's sparse input (:meth:`GeneSpace.scale_sparse`)."""
    return SparseCells.from_numpy(*gene_space.scale_sparse(X, present, absent=absent))


def _finite(obj: Any) -> Any:
    """NaN and infinities become None, so that model.json is valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays in settings and metrics become plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _upgrade_network(net: dict[str, Any], schema: int) -> dict[str, Any]:
    """The network settings of an older schema, in this schema's terms."""
    if schema < 2:
        if net.get("encoder", "direct") != "direct":
            raise ModelError(
                f"this model uses the '{net['encoder']}' encoder of model schema {schema}, "
                "which scsnn has since replaced (spike trains with fitted per-gene levels); "
                "train the model again"
            )
        # schema 1's lif / plif were SpikingJelly's own nodes
        net["neuron"] = {"lif": "sj-lif", "plif": "sj-plif"}.get(net.get("neuron"),
                                                                 net.get("neuron"))
    return net


@dataclass
class ScsnnModel:
    """A trained annotator: gene space + classes + network + settings + metrics."""

    gene_space: GeneSpace
    classes: list[str]
    network: nn.Module
    config: NetworkConfig
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""

    @property
    def genes(self) -> list[str]:
        return self.gene_space.genes

    @property
    def temperature(self) -> float:
        """Softmax temperature fitted on held-out reference cells at training (1: none):
        class probabilities are ``softmax(logits / temperature)``."""
        cal = self.metrics.get("calibration") if isinstance(self.metrics, dict) else None
        t = cal.get("temperature") if isinstance(cal, dict) else None
        return float(t) if isinstance(t, int | float) and t > 0 else 1.0

    def __repr__(self) -> str:
        return (
            f"ScsnnModel(id={self.model_id[:12]}, neuron={self.config.neuron}, "
            f"encoder={self.config.encoder}, T={self.config.timesteps}, "
            f"{len(self.classes)} classes, {self.gene_space.n_genes} genes)"
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}

    def compute_id(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.state_tensors().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        h.update(json.dumps(self.gene_space.genes).encode())
        return h.hexdigest()

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the model directory (``weights.safetensors`` + ``model.json``).

        Crash-safe: both files are written to temporary files first; ``model.json`` (which
        holds the checksum of its weights) is renamed into place first, then the weights.
        A process killed before the first rename leaves the previous model as it was; one
        killed between the two leaves the new weights in their temporary file, which
        :meth:`load` recognises by the checksum and uses (finishing the rename). So the
        directory always holds the old model, the new one, or (on a first save) none.
        """
        d = Path(path)
        if d.exists() and not d.is_dir():
            raise ModelError(f"cannot save the model: {d} exists and is not a directory")
        if (d / META_FILE).exists() and not overwrite:
            raise ModelError(f"a model already exists in {d}")
        d.mkdir(parents=True, exist_ok=True)
        _finish_interrupted_save(d)  # so that writing the temporary files loses nothing
        self.model_id = self.model_id or self.compute_id()
        tmp_w, tmp_m = d / _PENDING_WEIGHTS, d / f".{META_FILE}.tmp"
        committed = [False]
        try:
            self._write(d, tmp_w, tmp_m, committed)
        except BaseException:
            if not committed[0]:  # after the commit the pending weights are the model
                tmp_w.unlink(missing_ok=True)
            tmp_m.unlink(missing_ok=True)
            raise
        return d

    def _write(self, d: Path, tmp_w: Path, tmp_m: Path, committed: list[bool]) -> None:
        save_file(self.state_tensors(), str(tmp_w), metadata={"format": MODEL_FORMAT})
        _fsync(tmp_w)
        digest = hashlib.sha256(tmp_w.read_bytes()).hexdigest()
        meta = {
            "format": MODEL_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "scsnn_version": __version__,
            "model_id": self.model_id,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "weights": {"file": WEIGHTS_FILE, "sha256": digest},
            "classes": list(self.classes),
            "network": self.config.to_dict(),
            "settings": _finite(self.settings),
            "metrics": _finite(self.metrics),
            "gene_space": self.gene_space.to_dict(),
        }
        tmp_m.write_text(json.dumps(_finite(json.loads(json.dumps(meta, default=_json_default))),
                                 indent=1, allow_nan=False))
        _fsync(tmp_m)
        for tmp in (tmp_w, tmp_m):
            os.chmod(tmp, file_mode(d / WEIGHTS_FILE))
        os.replace(tmp_m, d / META_FILE)  # the commit: model.json names the new weights
        committed[0] = True
        try:
            os.replace(tmp_w, d / WEIGHTS_FILE)
        except FileNotFoundError:  # a load in between finished the rename for us
            if not _weights_match(d / WEIGHTS_FILE, digest):
                raise
        _fsync(d)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ScsnnModel:
        """Load a model directory, refusing damaged, foreign or newer-schema models."""
        d = Path(path)
        if not d.is_dir():
            raise ModelError(f"model directory not found: {d}")
        meta_path, w_path = d / META_FILE, d / WEIGHTS_FILE
        if not meta_path.is_file():
            raise ModelError(f"not an scsnn model: {d} has no {META_FILE}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"damaged model: {meta_path} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ModelError(f"not an scsnn model: {meta_path} has no scsnn format marker")
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise ModelError(f"damaged model: {meta_path} has no schema version")
        if version > SCHEMA_VERSION:
            raise ModelError(
                f"model schema {version} is newer than this scsnn ({__version__}) reads "
                f"(schema {SCHEMA_VERSION}); upgrade scsnn"
            )
        weights = meta.get("weights")
        expected = weights.get("sha256") if isinstance(weights, dict) else None
        if not expected:
            raise ModelError(f"damaged model: {meta_path} has no weights checksum")
        if not _weights_match(w_path, expected):
            # a save killed between its two renames: the weights wait in their temporary file
            pending = d / _PENDING_WEIGHTS
            if _weights_match(pending, expected):
                _finish_interrupted_save(d)
                if not _weights_match(w_path, expected):  # a read-only folder
                    w_path = pending
            elif not w_path.is_file():
                raise ModelError(f"damaged model: {w_path} is missing")
            else:
                raise ModelError(f"damaged model: {w_path} does not match its checksum")
        try:
            cfg = NetworkConfig.from_dict(_upgrade_network(dict(meta["network"]), version))
            gene_space = GeneSpace.from_dict(meta["gene_space"])
            classes = [str(c) for c in meta["classes"]]
            if cfg.n_genes != gene_space.n_genes or cfg.n_classes != len(classes):
                raise ValueError("network shape disagrees with genes or classes")
            network = build_network(cfg)
            state = load_file(str(w_path))
            network.load_state_dict(state, strict=True)
        except ModelError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())
            if len(detail) > 200:
                detail = detail[:200] + "..."
            raise ModelError(f"damaged model in {d}: {type(exc).__name__}: {detail}") from None
        network.to(device)
        network.eval()
        return cls(
            gene_space=gene_space,
            classes=classes,
            network=network,
            config=cfg,
            settings=meta.get("settings", {}),
            metrics=meta.get("metrics", {}),
            model_id=str(meta.get("model_id", "")),
        )


_PENDING_WEIGHTS = f".{WEIGHTS_FILE}.tmp"


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _weights_match(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _finish_interrupted_save(d: Path) -> bool:
    """Complete a save that was killed after committing ``model.json`` and before renaming
    its weights into place. True when the directory holds a consistent model afterwards
    (or nothing was pending); False when the rename was needed but not possible (a
    read-only directory: :meth:`ScsnnModel.load` then reads the pending file)."""
    pending, meta_path = d / _PENDING_WEIGHTS, d / META_FILE
    if not pending.is_file() or not meta_path.is_file():
        return True
    try:
        expected = json.loads(meta_path.read_text())["weights"]["sha256"]
    except Exception:
        return True  # nothing this save can recover; the next write replaces the file
    if not _weights_match(pending, expected) or _weights_match(d / WEIGHTS_FILE, expected):
        return True
    try:
        os.replace(pending, d / WEIGHTS_FILE)
    except OSError:
        return False
    _fsync(d)
    logger.info("finished an interrupted save of the model in %s", d)
    return True


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ScsnnModel:
    """Load a model directory (see :meth:`ScsnnModel.load`)."""
    return ScsnnModel.load(path, device=device)
