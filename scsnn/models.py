"""The spiking classifier and its ANN twin: plain torch modules that know nothing of AnnData.

A network takes ``[N, G]`` standardised expression (see :mod:`scsnn.encoding`), dense or as
:class:`SparseCells`, and returns class logits; :func:`predict_batches` runs it over batches
of cells and counts the spikes that the energy figures are computed from. The model bundle that ties a network to its gene
space and files on disk lives in :mod:`scsnn.bundle`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch import nn

from .encoding import make_encoder
from .errors import InputError
from .neurons import HIFINode, make_neuron

#: ``neuron`` values of :class:`NetworkConfig`: the spiking kinds of
#: :func:`scsnn.neurons.make_neuron`, and ``ann`` (the ANN twin).
NETWORKS = ("hifi", "lif", "plif", "sj-lif", "sj-plif", "ann")


@dataclass
class NetworkConfig:
    """Everything needed to rebuild a network before loading its weights.

    Parameters
    ----------
    n_genes, n_classes
        Input width (the gene space) and number of classes; :func:`scsnn.tl.train` fills
        them in from the reference.
    hidden
        Widths of the hidden spiking layers.
    timesteps
        T, the number of time steps.
    encoder
        ``direct``, ``rate``, ``latency`` or ``rank`` (:mod:`scsnn.encoding`).
    rank_n
        Genes that fire per cell with the ``rank`` encoder.
    neuron
        One of :data:`NETWORKS`.
    heterogeneous
        HIFI: one value of each neuron parameter per neuron (False: one per layer).
    autapse
        HIFI: the self-inhibiting autapse.
    online
        Detach the neuron state between steps (online gradients) instead of full BPTT.
    norm_affine
        Batch norm after each linear layer with a learnable per-neuron scale and shift (True)
        or a plain standardisation (False).
    norm_per_step
        Batch norm through time (BNTT: statistics, scale and shift of their own at every time
        step, so that a layer can weigh early and late input spikes differently) instead of
        one batch norm shared by all steps.
    dropout, input_dropout
        Dropout between hidden layers, and of whole input genes.
    clip
        The gene space's clip of standardised values.
    ensemble
        Networks of these settings trained from different seeds (:func:`member_seed`) whose
        class probabilities are averaged (:class:`EnsembleClassifier`; 1: one network).
    skip
        Input-to-readout synapses: every input spike also drives the output layer, through
        a current-based synapse that does not decay over the T steps, so that a gene firing
        at step ``T - level`` adds its weight ``level`` times to the final readout (with
        direct encoding the analog input drives it at every step). The readout is then the
        hidden path's plus a linear read of the input code; its weights start at zero.
    """

    n_genes: int = 0
    n_classes: int = 0
    hidden: tuple[int, ...] = (128, 32)
    timesteps: int = 4
    encoder: str = "latency"
    rank_n: int = 128
    neuron: str = "hifi"
    heterogeneous: bool = True
    autapse: bool = True
    online: bool = False
    norm_affine: bool = True
    norm_per_step: bool = False
    dropout: float = 0.2
    input_dropout: float = 0.2
    clip: float = 10.0
    ensemble: int = 1
    skip: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        # a setting a model file lacks was written before the setting existed: it takes the
        # value every model had then, not today's default
        for key, value in _LEGACY_NETWORK.items():
            known.setdefault(key, value)
        known["hidden"] = tuple(int(h) for h in known["hidden"])
        return cls(**known)


# What model files written before a NetworkConfig field existed (or before its default
# changed and files always recorded it) ran with.
_LEGACY_NETWORK: dict[str, Any] = {"hidden": (512, 128), "skip": False}


@dataclass
class SparseCells:
    """A batch of N cells as sparse rows of standardised expression.

    Row ``n`` holds ``values[indptr[n]:indptr[n+1]]`` at genes ``indices[...]`` (CSR); every
    other entry of gene ``g`` is ``base[g]``: the standardised value of zero expression (the
    gene's floor), or what a gene the query lacks is given. :meth:`to_dense` is the ``[N, G]``
    matrix it stands for. A :class:`SpikingClassifier` reads it without densifying when it
    can (:meth:`SpikingClassifier.reads_sparse`): its first layer then does work only for the
    stored entries.
    """

    indptr: torch.Tensor  # [N + 1] int64
    indices: torch.Tensor  # [nnz] int64
    values: torch.Tensor  # [nnz] float32
    base: torch.Tensor  # [G] float32

    @classmethod
    def from_numpy(cls, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                   base: np.ndarray) -> SparseCells:
        return cls(torch.from_numpy(np.asarray(indptr, dtype=np.int64)),
                   torch.from_numpy(np.asarray(indices, dtype=np.int64)),
                   torch.from_numpy(np.asarray(values, dtype=np.float32)),
                   torch.from_numpy(np.asarray(base, dtype=np.float32)))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.indptr.numel()) - 1, int(self.base.numel()))

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, device: torch.device | str) -> SparseCells:
        return SparseCells(self.indptr.to(device), self.indices.to(device),
                           self.values.to(device), self.base.to(device))

    def row_index(self) -> torch.Tensor:
        """``[nnz]``: the row of every stored entry."""
        n = self.shape[0]
        return torch.repeat_interleave(torch.arange(n, device=self.device),
                                       self.indptr[1:] - self.indptr[:-1])

    def to_dense(self) -> torch.Tensor:
        out = self.base.unsqueeze(0).repeat(self.shape[0], 1)
        out[self.row_index(), self.indices] = self.values
        return out


def stable_order(keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The permutation that sorts integer ``keys`` in ``[0, n_keys)``, ties in their order
    (on the CPU a radix sort of 8- or 16-bit keys)."""
    if keys.device.type == "cpu" and n_keys <= 65536:
        small = keys.numpy().astype(np.uint8 if n_keys <= 256 else np.uint16)
        return torch.from_numpy(np.argsort(small, kind="stable"))
    return torch.argsort(keys, stable=True)


class _EventLinear(torch.autograd.Function):
    """``y[b] = sum of w[i] * W[:, genes[i]]`` over the entries i of bag b: a linear layer
    driven by events (input spikes, or non-zero entries), with work in proportion to the
    number of events both ways (forward: an embedding bag; backward: a sparse matrix product
    for the weight's gradient)."""

    @staticmethod
    def forward(ctx, genes, bags, n_bags, weight, w):
        y = _bag_sums(genes, torch.bincount(bags, minlength=n_bags), weight.t().contiguous(), w)
        ctx.save_for_backward(genes, bags, w)
        ctx.n_bags, ctx.n_genes = int(n_bags), int(weight.shape[1])
        return y

    @staticmethod
    def backward(ctx, grad):
        genes, bags, w = ctx.saved_tensors
        if not ctx.needs_input_grad[3]:
            return None, None, None, None, None
        # the weight's gradient is itself a sum over bags: gene g's bag holds its entries,
        # each reading the output gradient of the entry's bag
        order = stable_order(genes, ctx.n_genes)
        counts = torch.bincount(genes, minlength=ctx.n_genes)
        offsets = torch.cumsum(counts, 0) - counts
        g = F.embedding_bag(bags[order], grad.contiguous(), offsets, mode="sum",
                            per_sample_weights=None if w is None else w[order].to(grad.dtype))
        return None, None, None, g.t().contiguous(), None


def _bag_sums(genes: torch.Tensor, counts: torch.Tensor, table: torch.Tensor,
              w: torch.Tensor | None) -> torch.Tensor:
    """``[len(counts), H]``: row sums of ``table`` (``[G, H]``) over consecutive runs of
    ``genes``, run b holding ``counts[b]`` entries (weighted by ``w`` when given)."""
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(genes, table, offsets, mode="sum", per_sample_weights=w)


def event_linear(genes: torch.Tensor, bags: torch.Tensor, n_bags: int, weight: torch.Tensor,
                 w: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_bags, H]``: the synaptic input ``weight @ x`` of ``n_bags`` sparse inputs ``x``
    given as entries (``bags`` ascending, ``genes``, values ``w``; None: 1), bias excluded."""
    return _EventLinear.apply(genes, bags, n_bags, weight, w)


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

    def mask(self, shape: torch.Size | tuple[int, ...], device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        """A keep mask (0, or 1 / keep probability) of ``shape``."""
        return (self.draw(shape, device) >= self._cut).to(dtype).mul_(self.scale)

    @property
    def scale(self) -> float:
        """The value of a kept element in the mask: 1 / keep probability."""
        return 256.0 / (256 - self._cut)

    def draw(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The uniform random bytes of a mask of ``shape``: kept where ``>= self._cut``."""
        n = int(np.prod(shape))
        # one 64-bit draw gives 8 independent uniform bytes
        r = torch.empty(-(-n // 8), dtype=torch.int64, device=device)
        return r.random_(-(2**63), 2**63 - 1).view(torch.uint8)[:n].view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._cut == 0:
            return x
        return x * self.mask(x.shape, x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StepBatchNorm(nn.Module):
    """Batch norm through time (BNTT, Kim and Panda 2021) over ``[T, N, F]``: every time step
    has its own running statistics and, with ``affine``, its own per-feature scale and
    shift."""

    def __init__(self, timesteps: int, n_features: int, *, affine: bool = True,
                 eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.timesteps, self.n_features = int(timesteps), int(n_features)
        self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
        shape = (self.timesteps, self.n_features)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))
        else:
            self.weight = self.bias = None
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            n = y.shape[1]
            mean = y.mean(1)
            var = y.var(1, unbiased=False)
            with torch.no_grad():
                unbiased = var * (n / max(n - 1, 1))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        out = (y - mean.unsqueeze(1)) * torch.rsqrt(var + self.eps).unsqueeze(1)
        if self.affine:
            out = out * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)
        return out

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, features={self.n_features}, affine={self.affine}"


class SpikingClassifier(nn.Module):
    """Linear layers with spiking neurons between them; the class scores are the output
    layer's potential accumulated over the T steps.

    Input ``[N, G]`` (standardised expression); :meth:`forward` returns ``[N, C]`` logits,
    :meth:`forward_steps` the readout after each step, ``[T, N, C]``.
    """

    def __init__(self, cfg: NetworkConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg.encoder, cfg.timesteps, cfg.n_genes, cfg.clip,
                                    rank_n=cfg.rank_n)
        self.input_dropout = Dropout(cfg.input_dropout)
        sizes = [cfg.n_genes, *cfg.hidden]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        if cfg.norm_per_step:
            self.norms = nn.ModuleList(StepBatchNorm(cfg.timesteps, b, affine=cfg.norm_affine)
                                       for b in sizes[1:])
        else:
            self.norms = nn.ModuleList(nn.BatchNorm1d(b, affine=cfg.norm_affine)
                                       for b in sizes[1:])
        self.spiking = nn.ModuleList(
            make_neuron(cfg.neuron, b, online=cfg.online, autapse=cfg.autapse,
                        heterogeneous=cfg.heterogeneous, generator=generator)
            for b in sizes[1:]
        )
        self.dropout = Dropout(cfg.dropout)
        self.head = nn.Linear(sizes[-1], cfg.n_classes)
        #: input-to-readout synapses (``skip``), zero at the start
        self.skip = nn.Linear(cfg.n_genes, cfg.n_classes, bias=False) if cfg.skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)
        #: when set, every forward pass adds its cells and spikes to it
        self.counter: SpikeCounter | None = None

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Linear + batch norm over a ``[T, N, F]`` sequence."""
        T, N = x.shape[:2]
        return self._norm(i, self.fcs[i](x.reshape(T * N, -1)), T, N)

    def _norm(self, i: int, y: torch.Tensor, T: int, N: int) -> torch.Tensor:
        """Batch norm of layer ``i`` over its linear output ``[T * N, F]``; ``[T, N, F]``."""
        if self.cfg.norm_per_step:
            return self.norms[i](y.view(T, N, -1))
        return self.norms[i](y).view(T, N, -1)

    def reads_sparse(self, training: bool | None = None) -> bool:
        """Whether :class:`SparseCells` input runs event-driven (else it is densified).

        The latency encoder fires once per detected gene, and only stored entries can be
        detected, so the first layer accumulates the weights of the input spikes alone, in
        training and inference. Direct (analog) input is affine in the stored entries, so
        inference folds the zero entries into the bias; training densifies it, since input
        dropout acts on the zero entries too.
        """
        training = self.training if training is None else training
        if self.cfg.encoder == "latency":
            return True
        return self.cfg.encoder == "direct" and not (training and self.input_dropout._cut)

    def _event_weight(self) -> torch.Tensor:
        """The synapses that input events drive, ``[H (+ C), G]``: the first layer's, and
        with ``skip`` the input-to-readout ones below them."""
        w = self.fcs[0].weight
        return w if self.skip is None else torch.cat([w, self.skip.weight])

    def _weight_table(self) -> torch.Tensor:
        """:meth:`_event_weight` as ``[G, H (+ C)]`` rows for the embedding bag, kept while
        the weights are unchanged (inference reuses it batch after batch)."""
        ws = [self.fcs[0].weight] + ([] if self.skip is None else [self.skip.weight])
        key = tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in ws)
        cached = getattr(self, "_table_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._event_weight().detach().t().contiguous())
            self._table_cache = cached
        return cached[1]

    def _sparse_first_layer(self, x: SparseCells
                            ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """The first linear layer and its batch norm, ``[T, N, H]``, event-driven; the
        number of input spikes; and with ``skip`` the input's drive of the readout after
        each step, ``[T, N, C]``."""
        T = self.cfg.timesteps
        N, G = x.shape
        fc = self.fcs[0]
        H = fc.out_features
        rows, genes = x.row_index(), x.indices
        if self.encoder.constant:  # direct: y = W base + b + sum over entries of W (v - base)
            w = x.values - x.base[genes]
            if torch.is_grad_enabled():
                y = event_linear(genes, rows, N, self._event_weight(), w)
            else:
                y = _bag_sums(genes, x.indptr[1:] - x.indptr[:-1], self._weight_table(), w)
            base = self._event_weight() @ x.base  # the unstored entries' drive
            y = y + torch.cat([fc.bias + base[:H], base[H:]])
            y, direct = y[:, :H], y[:, H:]
            skip = None if self.skip is None else self._constant_skip(direct)
            if self.cfg.norm_per_step:
                return self.norms[0](y.unsqueeze(0).expand(T, *y.shape)), 0.0, skip
            y = self.norms[0](y)
            return y.unsqueeze(0).expand(T, *y.shape), 0.0, skip
        level = self.encoder.entry_levels(x.values, genes)  # 0: silent
        scale = 1.0
        if self.training and self.input_dropout._cut:
            # the draw of the dense path (random bytes over all N x G entries), read at the
            # entries: dropped ones are left out, kept ones count 1 / keep probability
            drop = self.input_dropout
            keep = drop.draw((N, G), x.device).view(-1)[rows * G + genes] >= drop._cut
            rows, genes, level = rows[keep], genes[keep], level[keep]
            scale = drop.scale
        # the bag of an input spike is (step, cell), step T - level: the strongest evidence
        # first; silent entries go to bags past the last step, which are dropped
        step = T - level
        order = stable_order(step, T + 1)  # entries are in cell order within each step
        if torch.is_grad_enabled():
            bag = (step * N + rows)[order]
            y = event_linear(genes[order], bag, (T + 1) * N, self._event_weight())[: T * N]
        else:  # inference: the same sums, without the bags' gather or the weight's copy
            counts = torch.bincount(step * N + rows, minlength=(T + 1) * N)
            y = _bag_sums(genes[order], counts, self._weight_table(), None)[: T * N]
        if scale != 1.0:
            y = y * scale
        n_in = float((level > 0).sum()) if self.counter is not None else 0.0
        skip = None if self.skip is None else y[:, H:].reshape(T, N, -1).cumsum(0)
        return self._norm(0, y[:, :H] + fc.bias, T, N), n_in, skip

    def _constant_skip(self, drive: torch.Tensor) -> torch.Tensor:
        """``[T, N, C]``: the readout's synaptic current after each step when the same
        input drive ``[N, C]`` arrives at every step (direct encoding)."""
        T = self.cfg.timesteps
        steps = torch.arange(1, T + 1, device=drive.device, dtype=drive.dtype).view(T, 1, 1)
        return drive.unsqueeze(0) * steps

    def input_trace(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, G]``: what each gene of dense input ``z`` adds, per unit of skip weight, to the
        final readout (the time mean of its cumulated input)."""
        T = self.cfg.timesteps
        if self.encoder.constant:
            return z * ((T + 1) / 2)
        return self.encoder(z).cumsum(0).mean(0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The input spike trains ``[T, N, G]`` of a spike encoder; in training, input dropout
        silences whole genes of a cell (all their spikes)."""
        spikes = self.encoder(x, generator)
        if self.training and self.input_dropout._cut:
            spikes = spikes * self.input_dropout.mask(x.shape, x.device, x.dtype)
        return spikes

    def forward_steps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Readout after each step t: the mean of the output layer's drive over steps 1..t."""
        T = self.cfg.timesteps
        input_events = 0.0
        if isinstance(x, SparseCells) and not (
                self.reads_sparse() and self.encoder.silent(x.base)):
            x = x.to_dense()
        skip = None
        if isinstance(x, SparseCells):
            seq, input_events, skip = self._sparse_first_layer(x)
        elif self.encoder.constant:
            # same analog input at every step: compute the first layer once per cell
            x = self.input_dropout(x)
            y = self.fcs[0](x)
            if self.skip is not None:
                skip = self._constant_skip(self.skip(x))
            if self.cfg.norm_per_step:
                seq = self.norms[0](y.unsqueeze(0).expand(T, *y.shape))
            else:
                y = self.norms[0](y)
                seq = y.unsqueeze(0).expand(T, *y.shape)
        else:
            spikes_in = self.encode(x, generator)
            if self.counter is not None:
                input_events = float(spikes_in.detach().sum())
            seq = self._layer(0, spikes_in)
            if self.skip is not None:  # the input spikes' current into the readout
                skip = self.skip(spikes_in).cumsum(0)
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
        if skip is not None:
            out = out + skip
        steps = torch.arange(1, T + 1, device=out.device, dtype=out.dtype).view(T, 1, 1)
        return out.cumsum(0) / steps

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward_steps(x, generator)[-1]

    @torch.no_grad()
    def scale_hidden_readout(self, gain: float) -> None:
        """Scale the output layer's synapses and bias (the hidden layers' share of the
        readout; the ``skip`` synapses are left as they are)."""
        self.head.weight.mul_(gain)
        self.head.bias.mul_(gain)

    def hifi_layers(self) -> list[HIFINode]:
        """The spiking layers built on :class:`~scsnn.neurons.HIFINode` (HIFI, LIF, PLIF)."""
        return [m for m in self.spiking if isinstance(m, HIFINode)]

    def neuron_parameters(self) -> list[nn.Parameter]:
        """Trainable neuron-level parameters (the upper level of bi-level training)."""
        params: list[nn.Parameter] = []
        for m in self.spiking:
            if isinstance(m, HIFINode):
                params.extend(m.neuron_parameters())
            else:  # SpikingJelly's ParametricLIFNode: its learnable time constant
                params.extend(m.parameters())
        return params


class ANNClassifier(nn.Module):
    """The ANN twin: same layer sizes, ReLU, no time dimension (the energy reference)."""

    def __init__(self, cfg: NetworkConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        sizes = [cfg.n_genes, *cfg.hidden]
        layers: list[nn.Module] = [Dropout(cfg.input_dropout)]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b, affine=cfg.norm_affine), nn.ReLU(),
                       Dropout(cfg.dropout)]
        layers.append(nn.Linear(sizes[-1], cfg.n_classes))
        self.net = nn.Sequential(*layers)
        #: ``skip``: a linear read of the input added to the output, zero at the start
        self.skip = nn.Linear(cfg.n_genes, cfg.n_classes, bias=False) if cfg.skip else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)

    def forward_steps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward(x, generator).unsqueeze(0)

    def input_trace(self, z: torch.Tensor) -> torch.Tensor:
        """The input as the ``skip`` synapses read it (``skip(x)`` is added to the output)."""
        return z

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.skip is None:
            return self.net(x)
        x = self.net[0](x)  # input dropout, shared by both paths
        return self.net[1:](x) + self.skip(x)

    def neuron_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def scale_hidden_readout(self, gain: float) -> None:
        """Scale the last layer's weights and bias (the ``skip`` read is left as it is)."""
        self.net[-1].weight.mul_(gain)
        self.net[-1].bias.mul_(gain)

    def hifi_layers(self) -> list[HIFINode]:
        return []


def member_seed(seed: int, k: int) -> int:
    """The training seed of member ``k`` of an ensemble trained with ``seed``: member 0 is
    the seed itself (an ensemble of one is the single network), the others are drawn from
    it, so that the ensembles of neighbouring seeds share no member."""
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0] % 2**31)


class EnsembleClassifier(nn.Module):
    """Networks of one configuration whose class probabilities are averaged.

    Member ``k``'s probabilities are ``softmax(logits_k / t_k)`` with its own temperature
    ``t_k`` (fitted at training; 1 until then); the ensemble's logits, after every step, are
    the log of their mean, so its softmax is the mean probability. Spike counts add up over
    the members (see :class:`SpikeCounter`): an ensemble of K costs K networks' energy.
    """

    def __init__(self, cfg: NetworkConfig, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(members)
        if len(self.members) != int(cfg.ensemble):
            raise ValueError(f"an ensemble of {cfg.ensemble} got {len(self.members)} members")
        self.register_buffer("member_temperature", torch.ones(len(self.members)))

    @property
    def encoder(self) -> Any:
        return getattr(self.members[0], "encoder", None)

    @property
    def counter(self) -> SpikeCounter | None:
        if not hasattr(self.members[0], "counter"):  # ANN members count no spikes
            raise AttributeError("counter")
        return self.members[0].counter

    @counter.setter
    def counter(self, value: SpikeCounter | None) -> None:
        for m in self.members:
            if hasattr(m, "counter"):
                m.counter = value

    def reads_sparse(self, training: bool | None = None) -> bool:
        read = getattr(self.members[0], "reads_sparse", None)
        return bool(read(training)) if read is not None else False

    def forward_steps(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        logp = [F.log_softmax(m.forward_steps(x, generator).float() / t, dim=-1)
                for m, t in zip(self.members, self.member_temperature.tolist())]
        return torch.logsumexp(torch.stack(logp), 0) - float(np.log(len(logp)))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.forward_steps(x, generator)[-1]

    def neuron_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.neuron_parameters()]

    def hifi_layers(self) -> list[HIFINode]:
        """Member 0's spiking layers (each member has its own; see ``members``)."""
        return self.members[0].hifi_layers()


def build_network(cfg: NetworkConfig, seed: int = 0) -> nn.Module:
    """A freshly initialised network; the seed fixes the initial weights.

    With ``cfg.ensemble`` K > 1, an :class:`EnsembleClassifier` of K members initialised
    from :func:`member_seed`. The caller's global torch random state is left as it was.
    """
    if cfg.neuron not in NETWORKS:
        raise ValueError(f"unknown neuron '{cfg.neuron}' (choose from {', '.join(NETWORKS)})")
    seed = int(seed)
    if int(cfg.ensemble) < 1:
        raise ValueError(f"ensemble must be at least 1 (one network), got {cfg.ensemble}")
    if int(cfg.ensemble) > 1:
        one = dataclasses.replace(cfg, ensemble=1)
        return EnsembleClassifier(cfg, [build_network(one, member_seed(seed, k))
                                        for k in range(int(cfg.ensemble))])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if cfg.neuron == "ann":
            return ANNClassifier(cfg, gen)
        return SpikingClassifier(cfg, gen)


def is_analog(network: nn.Module) -> bool:
    """Whether the network's first layer reads analog values (the ANN, direct encoding)."""
    enc = getattr(network, "encoder", None)
    return enc is None or bool(enc.analog)


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
    """Cells seen and spikes counted during inference, summed over cells and steps.

    Every network adds the cells it ran: the members of an :class:`EnsembleClassifier` each
    add them, so that the counts per cell are the members' mean."""

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


def _batch(xb: np.ndarray | torch.Tensor | SparseCells,
           device: torch.device) -> torch.Tensor | SparseCells:
    if isinstance(xb, SparseCells):
        return xb.to(device)
    return torch.as_tensor(xb).to(device)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of the spike generator for one inference batch."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1)[0])


@torch.no_grad()
def predict_batches(
    network: nn.Module,
    batches: Iterable[np.ndarray | torch.Tensor | SparseCells],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    count_spikes: bool = False,
    early_exit: float | None = None,
    first_batch: int = 0,
    temperature: float = 1.0,
) -> Predictions:
    """Run the network over batches of standardised cells ``[n, G]`` (dense or sparse).

    ``temperature`` divides the logits before the per-step softmax (confidences and the
    early-exit decision); the returned logits are not divided.

    With ``count_spikes`` the spikes of every layer are counted (for energy accounting).
    With ``early_exit`` a cell's decision is the readout at the first step whose top
    probability reaches that value (the last step when none does).
    Spike encoders draw from a generator seeded from ``seed`` and the index of the batch
    (``first_batch`` for the first one), so predictions reproduce, and cells cut into chunks
    at batch boundaries give the same predictions as all cells at once.
    """
    device = torch.device(device)
    network.eval()
    gen = torch.Generator()
    counter = SpikeCounter() if count_spikes and hasattr(network, "counter") else None
    if counter is not None:
        network.counter = counter
    logits, labels, conf, steps = [], [], [], []
    T = int(getattr(network.cfg, "timesteps", 1)) if hasattr(network, "encoder") else 1
    try:
        for i, xb in enumerate(batches):
            gen.manual_seed(batch_seed(seed, first_batch + i))
            xb = _batch(xb, device)
            functional.reset_net(network)
            y = network.forward_steps(xb, gen).float()  # [T,N,C]
            p = torch.softmax(y / float(temperature), dim=-1).max(dim=-1)
            T = y.shape[0]
            if early_exit is None:
                step = torch.full((y.shape[1],), T - 1, device=y.device)
            else:
                reached = p.values >= early_exit  # [T, N]
                step = torch.where(reached.any(0), reached.float().argmax(0),
                                   torch.full_like(reached[0], T - 1, dtype=torch.long))
            logits.append(y[step, torch.arange(y.shape[1], device=y.device)].cpu().numpy())
            steps.append(step.cpu().numpy() + 1)
            labels.append(p.indices.T.cpu().numpy().astype(np.int32))
            conf.append(p.values.T.cpu().numpy())
    finally:
        functional.reset_net(network)
        if counter is not None:
            network.counter = None
    if not logits:
        C = int(network.cfg.n_classes)
        return Predictions(np.zeros((0, C), np.float32), np.zeros((0, T), np.int32),
                           np.zeros((0, T), np.float32), np.zeros(0, np.int32), counter)
    return Predictions(np.concatenate(logits), np.concatenate(labels), np.concatenate(conf),
                       np.concatenate(steps).astype(np.int32), counter)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@torch.no_grad()
def adapt_batchnorm(
    network: nn.Module,
    batches: Callable[[], Iterable[np.ndarray | torch.Tensor | SparseCells]],
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> int:
    """Test-time adaptation of the batch-norm statistics (AdaBN, Li et al. 2017) to a query.

    Every batch-norm layer's running mean and variance are replaced by those of the query's
    own cells, layer after layer in forward order (each layer's statistics are computed
    with the earlier layers already adapted), over all cells that ``batches()`` yields (it
    is called once per layer; spike encoders draw as :func:`predict_batches` does). The
    statistics are exact sums over the cells, so any split of the query into batches gives
    the same result up to float rounding. Learned scales and shifts are kept. ``weights``:
    one per cell that ``batches()`` yields, in order (weighted statistics; None: every cell
    counts once). Returns the number of layers adapted.
    """
    device = torch.device(device)
    norms = [m for m in network.modules()
             if isinstance(m, nn.BatchNorm1d | StepBatchNorm) and m.track_running_stats
             is not False]
    network.eval()
    gen = torch.Generator()
    w_all = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    for norm in norms:
        acc: dict[str, Any] = {"s": 0.0, "ss": 0.0, "n": 0.0, "w": None}

        def capture(mod, args, acc=acc):
            y = args[0].detach().double()
            per_step = isinstance(mod, StepBatchNorm)  # [T, N, F]; else pooled over steps
            dims = 1 if per_step else 0
            if acc["w"] is None:
                acc["s"] = acc["s"] + y.sum(dims)
                acc["ss"] = acc["ss"] + (y * y).sum(dims)
                acc["n"] = acc["n"] + y.shape[dims]
                return
            w = acc["w"].to(y.device)
            # pooled rows are [T * N] step-major, or [N]: the cells' weights repeated per step
            ww = w.view(1, -1, 1) if per_step else w.repeat(y.shape[0] // w.shape[0]).view(-1, 1)
            acc["s"] = acc["s"] + (y * ww).sum(dims)
            acc["ss"] = acc["ss"] + (y * y * ww).sum(dims)
            acc["n"] = acc["n"] + float(w.sum() if per_step else ww.sum())

        hook = norm.register_forward_pre_hook(capture)
        try:
            start = 0
            for i, xb in enumerate(batches()):
                xb = _batch(xb, device)
                if w_all is not None:
                    acc["w"] = w_all[start : start + xb.shape[0]]
                    start += xb.shape[0]
                gen.manual_seed(batch_seed(seed, i))
                functional.reset_net(network)
                network.forward_steps(xb, gen)
        finally:
            hook.remove()
            functional.reset_net(network)
        n = float(acc["n"])
        if n < 2:
            continue
        mean = acc["s"] / n
        var = (acc["ss"] / n - mean * mean).clamp_min(0.0) * (n / (n - 1))
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))
    return len(norms)
