"""The spiking classifier, its ANN twin, and the model bundle that is saved to disk.

The networks are plain torch modules: they know nothing of AnnData. A saved model is a
directory with ``weights.safetensors`` (tensors only: loading it cannot run code) and
``model.json`` (schema version, classes, gene space, settings, training metrics).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file
from spikingjelly.activation_based import functional
from torch import nn

from ._files import file_mode
from ._version import __version__
from .encoding import make_encoder
from .errors import InputError, ModelError
from .neurons import HIFINode, make_neuron
from .pp import GeneSpace

logger = logging.getLogger("scsnn")

MODEL_FORMAT = "scsnn-model"
SCHEMA_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"


@dataclass
class NetworkConfig:
    """Everything needed to rebuild a network before loading its weights."""

    n_genes: int
    n_classes: int
    hidden: tuple[int, ...] = (512, 128)
    timesteps: int = 4
    encoder: str = "direct"
    neuron: str = "hifi"
    dropout: float = 0.2
    input_dropout: float = 0.2
    online: bool = False
    autapse: bool = True
    clip: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["hidden"] = tuple(int(h) for h in known.get("hidden", (512, 128)))
        return cls(**known)


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from 8-bit random numbers.

    The same regularisation as :class:`torch.nn.Dropout` (the drop probability is rounded to
    a multiple of 1/256), at a fraction of its cost on the CPU, where drawing one float per
    element made dropout a quarter of the training time.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self._cut = round(self.p * 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._cut == 0:
            return x
        n = x.numel()
        # one 64-bit draw gives 8 independent uniform bytes
        r = torch.empty(-(-n // 8), dtype=torch.int64, device=x.device)
        r = r.random_(-(2**63), 2**63 - 1).view(torch.uint8)[:n].view(x.shape)
        keep = (r >= self._cut).to(x.dtype).mul_(256.0 / (256 - self._cut))
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SpikingClassifier(nn.Module):
    """Linear layers with spiking neurons between them; the class scores are the output
    layer's potential accumulated over the T steps.

    Input ``[N, G]`` (standardised expression); :meth:`forward` returns ``[N, C]`` logits,
    :meth:`forward_steps` the readout after each step, ``[T, N, C]``.
    """

    def __init__(self, cfg: NetworkConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg.encoder, cfg.timesteps, cfg.clip)
        self.input_dropout = Dropout(cfg.input_dropout)
        sizes = [cfg.n_genes, *cfg.hidden]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in sizes[1:])
        self.spiking = nn.ModuleList(
            make_neuron(cfg.neuron, b, online=cfg.online, autapse=cfg.autapse, generator=generator)
            for b in sizes[1:]
        )
        self.dropout = Dropout(cfg.dropout)
        self.head = nn.Linear(sizes[-1], cfg.n_classes)
        #: when set, every forward pass adds its cells and spikes to it
        self.counter: SpikeCounter | None = None

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Linear + batch norm over a ``[T, N, F]`` sequence."""
        T, N = x.shape[:2]
        y = self.norms[i](self.fcs[i](x.reshape(T * N, -1)))
        return y.view(T, N, -1)

    def forward_steps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Readout after each step t: the mean of the output layer's drive over steps 1..t."""
        T = self.cfg.timesteps
        x = self.input_dropout(x)
        input_events = 0.0
        if self.encoder.constant:
            # same analog input at every step: compute the first layer once per cell
            y = self.norms[0](self.fcs[0](x))
            seq = y.unsqueeze(0).expand(T, *y.shape)
        else:
            spikes_in = self.encoder(x, generator)
            if self.counter is not None:
                input_events = float(spikes_in.detach().sum())
            seq = self._layer(0, spikes_in)
        layer_spikes = []
        s = self.spiking[0](seq)
        layer_spikes.append(s)
        for i in range(1, len(self.fcs)):
            s = self.spiking[i](self._layer(i, self.dropout(s)))
            layer_spikes.append(s)
        if self.counter is not None:
            self.counter.add(x.shape[0], input_events,
                             [float(z.detach().sum()) for z in layer_spikes])
        out = self.head(self.dropout(s))  # [T, N, C]
        steps = torch.arange(1, T + 1, device=out.device, dtype=out.dtype).view(T, 1, 1)
        return out.cumsum(0) / steps

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward_steps(x, generator)[-1]

    def hifi_layers(self) -> list[HIFINode]:
        return [m for m in self.spiking if isinstance(m, HIFINode)]

    def neuron_parameters(self) -> list[nn.Parameter]:
        """Neuron-level parameters (the upper level of bi-level training)."""
        params: list[nn.Parameter] = []
        for m in self.spiking:
            if isinstance(m, HIFINode):
                params.extend(m.neuron_parameters())
        return params


class ANNClassifier(nn.Module):
    """The ANN twin: same layer sizes, ReLU, no time dimension (the energy reference)."""

    def __init__(self, cfg: NetworkConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        sizes = [cfg.n_genes, *cfg.hidden]
        layers: list[nn.Module] = [Dropout(cfg.input_dropout)]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), Dropout(cfg.dropout)]
        layers.append(nn.Linear(sizes[-1], cfg.n_classes))
        self.net = nn.Sequential(*layers)

    def forward_steps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.net(x).unsqueeze(0)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.net(x)

    def neuron_parameters(self) -> list[nn.Parameter]:
        return []

    def hifi_layers(self) -> list[HIFINode]:
        return []


def build_network(cfg: NetworkConfig, seed: int = 0) -> nn.Module:
    """A freshly initialised network; the seed fixes the initial weights.

    The caller's global torch random state is left as it was.
    """
    seed = int(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if cfg.neuron == "ann":
            return ANNClassifier(cfg, gen)
        return SpikingClassifier(cfg, gen)


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Keep torch's intra-op thread count across code that may change it.

    numba (used by scanpy) can reset the count when it starts its own threads; CPU results
    depend on the count, so a seed only reproduces a model when it stays fixed.
    """
    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device '{device}' (auto, cpu or cuda)")
    return torch.device(device)


@dataclass
class SpikeCounter:
    """Cells seen and spikes counted during inference, summed over cells and steps."""

    n_cells: int = 0
    #: binary input events into the first layer (spike encoders; 0 for analog input)
    input_events: float = 0.0
    #: spikes emitted by each hidden layer
    layer_spikes: list[float] = field(default_factory=list)

    def add(self, n_cells: int, input_events: float, layer_spikes: list[float]) -> None:
        self.n_cells += int(n_cells)
        self.input_events += input_events
        if not self.layer_spikes:
            self.layer_spikes = [0.0] * len(layer_spikes)
        self.layer_spikes = [a + b for a, b in zip(self.layer_spikes, layer_spikes)]

    def merge(self, other: SpikeCounter | None) -> None:
        """Add the counts of another counter (e.g. of another chunk of cells)."""
        if other is not None and other.n_cells:
            self.add(other.n_cells, other.input_events, other.layer_spikes)


@dataclass
class Predictions:
    """What a network says about a set of cells."""

    logits: np.ndarray  # [N, C], the readout at the decision step (the last one by default)
    step_labels: np.ndarray  # [N, T], the class index of the readout after each step
    step_confidence: np.ndarray  # [N, T], its top softmax probability
    decision_step: np.ndarray  # [N], 1-based step whose readout was taken
    counter: SpikeCounter | None = None


def batch_seed(seed: int, batch: int) -> int:
    """The seed of the spike generator for one inference batch."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1)[0])


@torch.no_grad()
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
) -> Predictions:
    """Run the network over projected cells, mini-batch by mini-batch (only a batch is dense).

    With ``count_spikes`` the spikes of every layer are counted (for energy accounting).
    With ``early_exit`` a cell's decision is the readout at the first step whose top
    probability reaches that value (the last step when none does).
    Spike encoders draw from a generator seeded from ``seed`` and the index of the batch
    (``first_batch`` for the first batch of ``X``), so predictions reproduce, and a matrix cut
    into chunks at multiples of ``batch_size`` gives the same predictions as the whole matrix.
    """
    device = torch.device(device)
    network.eval()
    gen = torch.Generator()
    counter = SpikeCounter() if count_spikes and hasattr(network, "counter") else None
    if counter is not None:
        network.counter = counter
    logits, labels, conf, steps = [], [], [], []
    try:
        for i, start in enumerate(range(0, X.shape[0], batch_size)):
            gen.manual_seed(batch_seed(seed, first_batch + i))
            xb = gene_space.scale(X[start : start + batch_size], present)
            functional.reset_net(network)
            y = network.forward_steps(torch.from_numpy(xb).to(device), gen).float()  # [T,N,C]
            p = torch.softmax(y, dim=-1).max(dim=-1)
            T = y.shape[0]
            if early_exit is None:
                step = torch.full((y.shape[1],), T - 1, device=y.device)
            else:
                reached = p.values >= early_exit  # [T, N]
                first = torch.where(reached.any(0), reached.float().argmax(0),
                                    torch.full_like(reached[0], T - 1, dtype=torch.long))
                step = first
            logits.append(y[step, torch.arange(y.shape[1], device=y.device)].cpu().numpy())
            steps.append(step.cpu().numpy() + 1)
            labels.append(p.indices.T.cpu().numpy().astype(np.int32))
            conf.append(p.values.T.cpu().numpy())
    finally:
        functional.reset_net(network)
        if counter is not None:
            network.counter = None
    return Predictions(np.concatenate(logits), np.concatenate(labels), np.concatenate(conf),
                       np.concatenate(steps).astype(np.int32), counter)


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays in settings and metrics become plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


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
        """Write the model directory (``weights.safetensors`` + ``model.json``)."""
        d = Path(path)
        if d.exists() and not d.is_dir():
            raise ModelError(f"cannot save the model: {d} exists and is not a directory")
        if (d / META_FILE).exists() and not overwrite:
            raise ModelError(f"a model already exists in {d}")
        d.mkdir(parents=True, exist_ok=True)
        self.model_id = self.model_id or self.compute_id()
        tmp_w, tmp_m = d / f".{WEIGHTS_FILE}.tmp", d / f".{META_FILE}.tmp"
        try:
            self._write(d, tmp_w, tmp_m)
        except BaseException:
            tmp_w.unlink(missing_ok=True)
            tmp_m.unlink(missing_ok=True)
            raise
        return d

    def _write(self, d: Path, tmp_w: Path, tmp_m: Path) -> None:
        save_file(self.state_tensors(), str(tmp_w), metadata={"format": MODEL_FORMAT})
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
            "settings": self.settings,
            "metrics": self.metrics,
            "gene_space": self.gene_space.to_dict(),
        }
        tmp_m.write_text(json.dumps(meta, indent=1, default=_json_default))
        for tmp in (tmp_w, tmp_m):
            os.chmod(tmp, file_mode(d / WEIGHTS_FILE))
        os.replace(tmp_w, d / WEIGHTS_FILE)
        os.replace(tmp_m, d / META_FILE)

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
        if not w_path.is_file():
            raise ModelError(f"damaged model: {w_path} is missing")
        weights = meta.get("weights")
        expected = weights.get("sha256") if isinstance(weights, dict) else None
        if not expected:
            raise ModelError(f"damaged model: {meta_path} has no weights checksum")
        if expected and hashlib.sha256(w_path.read_bytes()).hexdigest() != expected:
            raise ModelError(f"damaged model: {w_path} does not match its checksum")
        try:
            cfg = NetworkConfig.from_dict(meta["network"])
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
