"""Bi-level training of the spiking classifier (torch only: cells arrive as dense batches).

The reference cells are split three ways, stratified by class:

* the **training split** fits the synapse weights W (lower level);
* the **alpha split** fits the neuron-level parameters alpha (upper level): every
  ``alpha_interval`` epochs, ``alpha_steps`` Adam steps on it at ``alpha_lr``, W fixed, the
  network in evaluation mode (batch-norm statistics frozen, no dropout), minimising the
  class-weighted loss plus ``smoothness`` times the graph-Laplacian term of
  :func:`laplacian_smoothness`;
* the **selection split** picks the epoch to keep (early stopping on its macro-F1) and, at the
  end, measures the model that is saved. It never fits anything.

Without an upper level (``bilevel=False``, or a network with no trainable neuron parameters:
LIF, the ANN) the alpha split joins the training split, so every method fits on the same
cells. After early stopping, the synapses are refitted for ``refit_epochs`` on the training
and alpha splits together (the selection split stays out), and the refit is kept when the
selection split does not score it lower.

Rare classes: class-tempered sampling of the training split (weight ``n_class **
-class_balance``), class-weighted losses on the alpha and selection splits.

Under torchrun (see :mod:`scsnn.distributed`) every rank draws the same cells and takes an
interleaved shard of every mini-batch; the gradients of whichever parameters are being stepped
(synapses, or neuron parameters in the upper-level step) and the batch-norm running statistics
are averaged across ranks after each backward pass, weighted by each rank's share of the
batch, so all ranks take the same steps and end with bit-identical weights. Predictions on the
selection split are split between the ranks and gathered, so every rank takes the same
early-stopping decisions.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import distributed
from .models import SparseCells, is_analog, torch_threads_kept
from .neurons import neuron_summary

logger = logging.getLogger("scsnn")


class CellRows(Protocol):
    """What the trainer reads cells from (for example :class:`scsnn.pp.ScaledCells`)."""

    def __len__(self) -> int: ...

    def rows(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Dense standardised ``[len(idx), genes]`` float32 rows, in the order given; with
        ``rng``, a training batch (which the provider may augment)."""
        ...

    def digest(self) -> str:
        """Identifies the cells (for the check that every process reads the same ones)."""
        ...


def _row_blocks(M, threads: int) -> list:
    """``M`` cut into up to ``threads`` row blocks when it is sparse (else ``[M]``). Each row
    of ``M @ D`` is the same sum, in the same order, whichever block holds it, so a product
    computed block by block does not depend on the number of blocks."""
    from scipy import sparse

    n = M.shape[0]
    if threads <= 1 or not sparse.issparse(M) or n < 2 * threads:
        return [M]
    cuts = np.linspace(0, n, threads + 1).astype(np.int64)
    return [M[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def lbfgs_logreg(X, y: np.ndarray, n_classes: int, steps: int, *, balanced: bool,
                 C: float = 1.0, threads: int | None = None) -> np.ndarray:
    """Multinomial logistic regression with an L2 penalty, by ``steps`` L-BFGS iterations
    from zero (torch's ``LBFGS``: fewer only where its 1.25 x ``steps`` evaluations run out);
    the coefficients ``[n_classes, features]`` (the unpenalised intercept is fitted and
    dropped).

    The objective is scikit-learn's (``sum_i w_i log-loss_i + |W|^2 / (2 C)``, with
    ``class_weight="balanced"`` weights ``n / (n_classes * count)`` when ``balanced``), divided
    by the total weight. Loss and gradient are computed in float64 with numpy / scipy
    (``X^T`` times the residuals for the weights), torch's L-BFGS takes the steps, all on one
    thread (BLAS included), except that the sparse products of ``X`` and ``X^T`` are cut
    into row blocks for ``threads`` threads (default: torch's thread count), which leaves
    every sum as it is: the result is the same on any machine and at any thread count.
    With few steps, the early stop regularizes the fit beyond the penalty.
    """
    from concurrent.futures import ThreadPoolExecutor

    from scipy import sparse
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    X = sparse.csr_matrix(X, dtype=np.float64) if sparse.issparse(X) else np.asarray(
        X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = (len(y) / (n_classes * np.maximum(counts, 1.0)))[y] if balanced else np.ones(len(y))
    # per unit of total weight: (sum_i w_i l_i + |W|^2 / (2C)) / sum_i w_i
    reg = 1.0 / (2.0 * C * float(w.sum()))
    w = w / w.sum()
    Xt = X.T.tocsr() if sparse.issparse(X) else X.T
    n_threads = torch.get_num_threads() if threads is None else max(int(threads), 1)
    x_blocks, xt_blocks = _row_blocks(X, n_threads), _row_blocks(Xt, n_threads)
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=10,
                            tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")
    rows = np.arange(len(y))

    def times(blocks: list, D: np.ndarray) -> np.ndarray:
        if len(blocks) == 1:
            return np.asarray(blocks[0] @ D)
        # scipy's sparse products release the GIL: the blocks run at once
        return np.vstack(list(pool.map(lambda B: np.asarray(B @ D), blocks)))

    def closure() -> torch.Tensor:
        Wn, bn = W.detach().numpy(), b.detach().numpy()
        z = times(x_blocks, Wn) + bn
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        loss = float(np.dot(w, lse - z[rows, y])) + reg * float((Wn * Wn).sum())
        g = np.exp(z - lse[:, None])
        g[rows, y] -= 1.0
        g *= w[:, None]
        W.grad = torch.from_numpy(times(xt_blocks, g) + 2.0 * reg * Wn)
        b.grad = torch.from_numpy(g.sum(axis=0))
        return torch.tensor(loss, dtype=torch.float64)

    with ThreadPoolExecutor(n_threads) as pool, torch_threads_kept(), threadpool_limits(1):
        torch.set_num_threads(1)
        opt.step(closure)
    return W.detach().numpy().T.astype(np.float32)


@dataclass
class TrainConfig:
    """Settings of the training loop.

    Parameters
    ----------
    epochs
        Most epochs (an epoch is a round of class-tempered draws from the training split,
        validated at its end).
    batch_size
        Cells per mini-batch (None: 128 under 20,000 training cells, else 512).
    min_samples_per_epoch, max_samples_per_epoch, max_samples
        Draws per epoch (the training split's size, within these bounds) and in all. The
        cosine schedule spans ``min(epochs, max_samples // draws per epoch)`` epochs: for
        references of up to ~5,000 training cells the ``epochs`` bound applies, above that
        the draws are capped (200,000 draws: six epochs of 32,768 above ~33,000 training
        cells, each cell drawn about twice at 100,000), so large references train in one
        short annealed schedule instead of stopping, late, on a long one.
    refit_epochs
        Epochs of the synapses on the training and alpha splits after early stopping, at a
        tenth of the learning rate (0: none).
    lr, weight_decay
        AdamW on the synapse weights (cosine schedule).
    bilevel
        Fit the neuron parameters on the alpha split (True) or jointly with the weights,
        by the same optimiser and without weight decay (False).
    alpha_lr, alpha_interval, alpha_steps
        Upper level: Adam learning rate, epochs between rounds, and steps per round.
    smoothness
        Weight of :func:`laplacian_smoothness` in the upper-level loss.
    alpha_fraction, select_fraction
        Fractions of every class held out for the alpha and the selection split.
    class_balance
        Exponent b of the sampling weight ``n_class ** -b`` (0: as in the data, 1: balanced).
    label_smoothing
        Of the training loss.
    augment_depth, augment_gene_noise
        Augmentation of training batches that imitates technical variation (see
        :class:`scsnn.pp.ScaledCells`): binomial thinning of a cell's counts to a fraction
        drawn from [augment_depth, 1] (1: off; raw-count references only), and a per-gene
        log-normal factor of sd augment_gene_noise per batch (0: off). Input dropout (of
        whole genes) is the network's ``input_dropout``.
    logit_adjust
        Logit-adjusted training loss (Menon et al. 2021): ``tau * log(prior)`` is added to the
        logits in the training loss, with the prior the class frequencies of the training
        draws, so that the network's own logits favour no class for being common (0: off).
    step_loss
        Weight w of the per-step loss: the training loss is ``(1 - w)`` times the loss of the
        final readout plus ``w`` times the mean over steps t of the loss of the readout after
        step t (after temporal efficient training, Deng et al. 2022), so that early steps
        are trained to decide too (0: the final readout only).
    skip_fit
        How a network's input-to-readout synapses (``NetworkConfig.skip``) are learnt:
        ``"logreg"``: first, by multinomial logistic regression with an L2 penalty (C = 1) on
        the spike counts that reach the readout (with the latency code, each detected gene's
        level) of the training and alpha cells (at most ``skip_fit_cells`` of them; the
        selection split stays out), and then held fixed while the rest of the network
        trains on top of them; ``"joint"``: from zero, with the other synapses.
    skip_fit_cells
        Cells (drawn at random) that the ``logreg`` fit reads at most.
    skip_fit_steps
        The solver of the ``logreg`` fit. 0: scikit-learn's ``LogisticRegression`` (lbfgs)
        at its default tolerance, where it stops after a few dozen iterations; that early
        stop regularizes the fit, and where it happens depends on scikit-learn's version
        (``docs/benchmarks.md`` section 1). K > 0: K L-BFGS iterations from zero
        (:func:`lbfgs_logreg`: torch's L-BFGS with a strong-Wolfe line search, float64, its
        sparse products in row blocks on torch's threads) on the same objective, the class-weighted mean log-loss plus
        ``|W|^2 / (2 C)`` per unit of total weight: the same synapses on every machine and
        every library version. The default, 20, lies inside the range where scikit-learn
        stops (15-67 iterations on the 12 real tasks); it ties scikit-learn's fit there and
        is ahead on the synthetic shift task (``docs/benchmarks.md`` section 8).
    skip_class_weight
        Class weights of the ``logreg`` fit: ``"none"`` (every cell counts once) or
        ``"balanced"`` (each class weighs as much in total, scikit-learn's
        ``class_weight="balanced"``, the default: 3 wins and 9 ties against ``"none"`` over
        the 12 real tasks, and ahead on the synthetic shift task, ``docs/benchmarks.md``
        section 8), so that rare classes' synapses are not shrunk towards the common ones'.
    skip_hidden_gain
        With ``skip_fit="logreg"``: after training, the hidden layers' readout synapses (the
        output layer's weights and bias) are scaled by this factor, so the readout is the
        fixed skip read plus this share of the hidden layers' correction (1: unchanged,
        0: the skip read alone; 0.5, the default, is measured against 1 in
        ``docs/benchmarks.md`` section 8). Applied before the selection score and the
        calibration.
    ema_decay
        Decay of the exponential moving average of the weights that is validated and kept
        (0: off).
    patience, min_epochs
        Early stopping: epochs without a better selection macro-F1, and the fewest epochs.
    sparse_input
        Give the network sparse batches where it reads them event-driven (latency encoding,
        and direct encoding in evaluation): its first layer then works only on the input
        spikes or the non-zero entries. The draws are those of the dense path, so the model
        is the same up to float rounding; False: dense batches throughout.
    seed
        Same seed, same data, same model on the CPU.
    split_seed
        Seed of the three-way split (None: ``seed``). The members of an ensemble share the
        split of the ensemble's seed, so that its selection split fitted none of them.
    progress
        A progress bar over epochs (None: when stderr is a terminal).
    """

    epochs: int = 40
    batch_size: int | None = None
    min_samples_per_epoch: int = 4096
    max_samples_per_epoch: int = 32_768
    max_samples: int = 200_000
    refit_epochs: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    bilevel: bool = True
    alpha_lr: float = 1e-2
    alpha_interval: int = 2
    alpha_steps: int = 32
    smoothness: float = 1.0
    alpha_fraction: float = 0.1
    select_fraction: float = 0.1
    class_balance: float = 0.5
    label_smoothing: float = 0.1
    augment_depth: float = 1.0
    augment_gene_noise: float = 0.0
    logit_adjust: float = 0.0
    step_loss: float = 0.0
    skip_fit: str = "logreg"
    skip_fit_cells: int = 20_000
    skip_fit_steps: int = 20
    skip_class_weight: str = "balanced"
    skip_hidden_gain: float = 0.5
    ema_decay: float = 0.99
    patience: int = 8
    min_epochs: int = 5
    sparse_input: bool = True
    seed: int = 0
    split_seed: int | None = None
    progress: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Split:
    """Positions of the cells of each split (sorted), and the classes kept whole in training."""

    train: np.ndarray
    alpha: np.ndarray
    select: np.ndarray
    unsplit_classes: list[int] = field(default_factory=list)


def stratified_split(codes: np.ndarray, alpha_fraction: float, select_fraction: float,
                     seed: int = 0) -> Split:
    """A three-way split stratified by class.

    Every class of 3 or more cells has at least one cell in the selection split and two in
    the training split; every class of 4 or more also at least one in the alpha split.
    Classes of 1 or 2 cells stay whole in the training split (they are reported back).
    """
    rng = np.random.default_rng(seed)
    train, alpha, select, unsplit = [], [], [], []
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        rng.shuffle(idx)
        n = idx.size
        if n < 3 or select_fraction <= 0:
            train.append(idx)
            unsplit.append(int(c))
            continue
        n_sel = int(np.clip(round(select_fraction * n), 1, n - 2))
        room = n - 2 - n_sel
        n_alpha = 0
        if alpha_fraction > 0 and room >= 1:
            n_alpha = int(np.clip(round(alpha_fraction * n), 1, room))
        select.append(idx[:n_sel])
        alpha.append(idx[n_sel : n_sel + n_alpha])
        train.append(idx[n_sel + n_alpha :])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)

    return Split(cat(train), cat(alpha), cat(select), unsplit)


def laplacian_smoothness(network: nn.Module) -> torch.Tensor:
    """Graph-Laplacian smoothness of the neuron parameters, summed over consecutive layers.

    The neurons of two consecutive HIFI layers are the nodes of a bipartite graph whose edge
    weights are the absolute synapse weights |W| between them; with the combinatorial
    Laplacian L = D - |W| of that graph and A the nodes' (k, theta, c, gamma) vectors, the
    term is ``trace(A^T L A) / sum|W|``: the |W|-weighted mean of ``||alpha_i - alpha_j||^2``
    over connected pairs. Its null space is the constant vectors, so it pulls connected
    neurons towards the same biophysics and nothing else. (The symmetric normalised Laplacian
    would instead vanish for ``alpha_i`` proportional to sqrt(degree_i), pulling
    ``alpha / sqrt(d)`` together.) The synapse weights only define the graph: no gradient
    reaches them. Computed without forming the n x n matrix.
    """
    layers = network.hifi_layers()
    fcs = getattr(network, "fcs", None)
    total = torch.zeros(())
    for i in range(len(layers) - 1):
        a1, a2 = layers[i].alpha_matrix(), layers[i + 1].alpha_matrix()
        W = fcs[i + 1].weight.detach().abs()  # (n2, n1)
        deg1, deg2 = W.sum(0), W.sum(1)
        quad = (deg1 * (a1 * a1).sum(1)).sum() + (deg2 * (a2 * a2).sum(1)).sum()
        cross = (a2 * (W @ a1)).sum()
        total = total.to(quad.device) + (quad - 2.0 * cross) / W.sum().clamp_min(1e-12)
    return total


def auto_batch_size(n_train: int) -> int:
    """128 cells per mini-batch for references under 20,000 cells, 512 above."""
    return 128 if n_train < 20_000 else 512


def _stepped(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters an optimiser steps (their gradients are averaged across ranks)."""
    return [p for g in opt.param_groups for p in g["params"] if p.requires_grad]


def _bn_buffers(network: nn.Module) -> list[torch.Tensor]:
    """Running statistics of the batch-norm layers that update them (those in train mode)."""
    out: list[torch.Tensor] = []
    for m in network.modules():
        if not m.training or not isinstance(getattr(m, "running_mean", None), torch.Tensor):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            continue
        out.extend([m.running_mean, m.running_var])
    return out


def _class_weights(y: np.ndarray, n_classes: int, device: torch.device) -> torch.Tensor:
    """Loss weights under which every class present in ``y`` counts equally."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if not counts.any():
        return torch.ones(n_classes, device=device)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
    w = w / max(w[counts > 0].mean(), 1e-12)
    return torch.tensor(w, dtype=torch.float32, device=device)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in ``y`` (numpy only)."""
    scores = []
    for c in np.unique(y):
        tp = float(np.sum((pred == c) & (y == c)))
        fp = float(np.sum((pred == c) & (y != c)))
        fn = float(np.sum((pred != c) & (y == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the cell-weighted mean gap between confidence and accuracy over equal-width
    confidence bins."""
    conf = proba.max(1)
    hit = proba.argmax(1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - hit[inside].mean())
    return float(total)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def calibrate(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the negative
    log-likelihood of ``softmax(logits / T)`` on held-out cells (a golden-section search on
    log T in [-3, 3]). Returns ``{"temperature", "ece_before", "ece_after", "nll_before",
    "nll_after", "n_cells"}``; probabilities are then ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        p = _softmax(z / math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    lo, hi = -3.0, 3.0
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    log_t = (lo + hi) / 2
    if nll(log_t) > nll(0.0):  # never worse than no calibration on these cells
        log_t = 0.0
    t = math.exp(log_t)
    return {"temperature": t,
            "ece_before": expected_calibration_error(_softmax(z), y),
            "ece_after": expected_calibration_error(_softmax(z / t), y),
            "nll_before": nll(0.0), "nll_after": nll(log_t), "n_cells": int(len(y))}


def _moved(start: dict[str, torch.Tensor], network: nn.Module) -> list[dict[str, float]]:
    """Per layer, the mean absolute change of every neuron quantity since ``start``."""
    out = []
    with torch.no_grad():
        for i, layer in enumerate(network.hifi_layers()):
            now = layer.quantities()
            out.append({q: float((now[q] - start[f"{i}.{q}"]).abs().mean()) for q in now})
    return out


class BiLevelTrainer:
    """Trains a network built by :func:`scsnn.models.build_network` on standardised cells."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.cfg = config
        self.device = device
        # rank and number of processes of the data-parallel group ((0, 1): one process)
        self._rank, self._world = 0, 1
        # whether batches go to the network sparse, in evaluation and in training
        self._sparse = {False: False, True: False}

    def _sampling_weights(self, codes: np.ndarray) -> np.ndarray:
        counts = np.bincount(codes)
        w = counts[codes].astype(np.float64) ** (-self.cfg.class_balance)
        return w / w.sum()

    def _tensor(self, cells: CellRows, rows: np.ndarray,
                rng: np.random.Generator | None = None, *,
                training: bool = False) -> torch.Tensor | SparseCells:
        """A batch of cells: sparse when the provider can give one and the network reads it
        event-driven (in training or in evaluation), else dense."""
        if self._sparse[training] and hasattr(cells, "sparse_rows"):
            arrays = cells.sparse_rows(rows, rng) if rng is not None else cells.sparse_rows(rows)
            return SparseCells.from_numpy(*arrays).to(self.device)
        block = cells.rows(rows, rng) if rng is not None else cells.rows(rows)
        return torch.from_numpy(block).to(self.device)

    def _fit_skip(self, network: nn.Module, cells: CellRows, rows: np.ndarray,
                  y: np.ndarray) -> None:
        """Fit the input-to-readout synapses by L2 logistic regression (C = 1) on the spike
        counts that reach the readout, and freeze them (``skip_fit="logreg"``).

        The readout receives ``W @ input_trace(x)``. The regression is fitted on the spike
        counts ``T * input_trace`` (with the latency code: each detected gene's level,
        0 .. T), so that its penalty is on the readout's weight per spike, and ``W`` is
        ``T`` times its coefficients (the same logits; its intercept is left to the output
        layer's bias, which trains with the network). Deterministic (lbfgs) given the cells, so every rank and every ensemble member fits
        the same synapses from the same split.
        """
        from scipy import sparse
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        cap = int(self.cfg.skip_fit_cells)
        if cap > 0 and len(rows) > cap:
            pick = np.sort(np.random.default_rng([self.cfg.seed, 5]).choice(
                len(rows), size=cap, replace=False))
            rows, y = rows[pick], y[pick]
        T = network.cfg.timesteps
        analog = is_analog(network)
        blocks = []
        with torch.no_grad():
            for s in range(0, len(rows), 4096):
                part = rows[s : s + 4096]
                levels = self._skip_levels(network, cells, part)
                if levels is not None:
                    blocks.append(levels)
                    continue
                z = torch.from_numpy(cells.rows(part)).to(self.device)
                f = (network.input_trace(z) * T).cpu().numpy()
                # spike counts are mostly zero: kept sparse; analog input is dense
                blocks.append(f if analog else sparse.csr_matrix(f))
        feats = np.vstack(blocks) if analog else sparse.vstack(blocks).tocsr()
        balanced = self.cfg.skip_class_weight == "balanced"
        coef = np.zeros((network.cfg.n_classes, network.cfg.n_genes), dtype=np.float32)
        if int(self.cfg.skip_fit_steps) > 0:
            present, codes = np.unique(y, return_inverse=True)
            coef[present] = lbfgs_logreg(feats, codes, len(present), int(self.cfg.skip_fit_steps),
                                         balanced=balanced)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=1.0, max_iter=1000,
                                         class_weight="balanced" if balanced else None)
                clf.fit(feats, y)
            if len(clf.classes_) == 2:  # binary: one coefficient row, for the second class
                coef[clf.classes_[1]] = clf.coef_[0] / 2
                coef[clf.classes_[0]] = -clf.coef_[0] / 2
            else:
                coef[clf.classes_] = clf.coef_
        with torch.no_grad():
            network.skip.weight.copy_(torch.from_numpy(coef * T).to(network.skip.weight))
        network.skip.weight.requires_grad_(False)

    @staticmethod
    def _skip_levels(network: nn.Module, cells: CellRows, rows: np.ndarray):
        """With the latency code, the spike counts that reach the readout are the levels of
        the detected genes (0 .. T; ``T * input_trace``), read from the stored entries of
        sparse rows as a CSR matrix without densifying the cells; None where that does not
        apply (another encoder, or a provider without sparse rows)."""
        from scipy import sparse

        # analog input (the ANN twin, direct encoding) is read as it is
        if (is_analog(network) or network.cfg.encoder != "latency"
                or not hasattr(cells, "sparse_rows")):
            return None
        enc = network.encoder
        indptr, indices, values, base = cells.sparse_rows(rows)
        dev = enc.floor.device
        if not enc.silent(torch.from_numpy(np.asarray(base, dtype=np.float32)).to(dev)):
            return None
        level = enc.entry_levels(torch.from_numpy(np.asarray(values, dtype=np.float32)).to(dev),
                                 torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(dev))
        m = sparse.csr_matrix((level.cpu().numpy().astype(np.float32), indices, indptr),
                              shape=(len(rows), network.cfg.n_genes))
        m.eliminate_zeros()
        m.sort_indices()
        return m

    def _predict(self, network: nn.Module, cells: CellRows, rows: np.ndarray) -> np.ndarray:
        """Logits of the network on the given cells, in eval mode (under DDP: each rank
        predicts a block of them and every rank receives all)."""
        if self._world == 1:
            return self._predict_rows(network, cells, rows)
        lo, hi = distributed.block(len(rows), self._rank, self._world)
        if hi > lo:
            local = self._predict_rows(network, cells, rows[lo:hi])
        else:
            network.eval()
            local = np.zeros((0, network.cfg.n_classes), dtype=np.float32)
        return distributed.gather_blocks(local, len(rows), self.device)

    @torch.no_grad()
    def _predict_rows(self, network: nn.Module, cells: CellRows, rows: np.ndarray) -> np.ndarray:
        network.eval()
        preds = []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for s in range(0, len(rows), 1024):
            functional.reset_net(network)
            xb = self._tensor(cells, rows[s : s + 1024])
            preds.append(network(xb, gen).float().cpu().numpy())
        functional.reset_net(network)
        return np.concatenate(preds)

    def _score(self, network: nn.Module, cells: CellRows, rows: np.ndarray, y: np.ndarray,
               weight: torch.Tensor) -> tuple[float, float]:
        """Macro-F1 and class-weighted loss on a split."""
        logits = self._predict(network, cells, rows)
        f1 = macro_f1(y, logits.argmax(1))
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y),
                                     weight=weight.cpu()))
        return f1, loss

    def fit(
        self,
        network: nn.Module,
        cells: CellRows,
        codes: np.ndarray,
        n_classes: int,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Train ``network`` on ``cells`` (labels ``codes``); returns it and the metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._rank, self._world = rank, world = distributed.group_rank_size()
        # the draws of cells are the same on every rank (then sharded); dropout and spike
        # encoders get a stream of their own on each rank (rank 0: as in a single process)
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, rank) + 1)
        self._place(network)
        if world > 1:
            h = hashlib.sha256(cells.digest().encode())
            h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
            h.update(distributed.state_digest(network).encode())
            distributed.check_same(h.hexdigest(),
                                   "reference cells, labels, genes or initial weights")

        split = self._split(codes)
        alpha = network.neuron_parameters()
        alpha_ids = {id(p) for p in alpha}
        use_bilevel = cfg.bilevel and bool(alpha) and split.alpha.size > 0
        train_rows = split.train if use_bilevel else np.sort(np.concatenate([split.train,
                                                                             split.alpha]))
        fit_rows = np.sort(np.concatenate([split.train, split.alpha]))  # for the refit
        ytr = codes[train_rows]
        has_sel = split.select.size > 0
        ysel = codes[split.select]
        if getattr(network, "skip", None) is not None and cfg.skip_fit == "logreg":
            self._fit_skip(network, cells, fit_rows, codes[fit_rows])
        weights = [p for p in network.parameters() if id(p) not in alpha_ids and p.requires_grad]
        if use_bilevel:
            opt_w = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=cfg.weight_decay)
            opt_a = torch.optim.Adam(alpha, lr=cfg.alpha_lr)
        else:
            groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
            if alpha:
                groups.append({"params": alpha, "weight_decay": 0.0})
            opt_w = torch.optim.AdamW(groups, lr=cfg.lr)
            opt_a = None
        w_alpha = _class_weights(codes[split.alpha], n_classes, self.device)
        w_sel = _class_weights(ysel, n_classes, self.device)
        start = {f"{i}.{q}": v.detach().clone()
                 for i, layer in enumerate(network.hifi_layers())
                 for q, v in layer.quantities().items()}
        summary_start = neuron_summary(network.hifi_layers())

        p_train = self._sampling_weights(ytr)
        # the prior of the logit-adjusted loss: class frequencies of the training draws
        prior = np.bincount(ytr, weights=p_train, minlength=n_classes)
        self._log_prior = torch.tensor(np.log(np.clip(prior, 1e-12, None)),
                                       dtype=torch.float32, device=self.device)
        # augmentation of training batches draws from its own stream (the same on every rank)
        self._aug_rng = np.random.default_rng([cfg.seed, 3])
        # small references get enough updates per epoch; large ones one pass per epoch, and
        # no more than max_samples draws in all (an epoch is capped at max_samples_per_epoch
        # so that large references are checked, and stop, early)
        n_per_epoch = int(np.clip(len(ytr), cfg.min_samples_per_epoch,
                                  max(cfg.max_samples_per_epoch, cfg.min_samples_per_epoch)))
        n_epochs = max(1, min(cfg.epochs, cfg.max_samples // n_per_epoch))
        batch_size = cfg.batch_size or auto_batch_size(len(ytr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=n_epochs)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        show = show and rank == 0
        best_f1, best_loss, best_state, best_epoch, bad = -1.0, np.inf, None, 0, 0
        history: list[dict[str, Any]] = []
        ratios: list[float] = []
        alpha_steps = 0
        # an exponential moving average of the weights is what gets validated and kept
        ema = (AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                             use_buffers=True) if cfg.ema_decay > 0 else None)
        evaluated = ema.module if ema is not None else network
        from tqdm.auto import tqdm

        bar = tqdm(range(n_epochs), desc="training", unit="epoch", disable=not show,
                   leave=False)
        for epoch in bar:
            losses = self._epoch(network, opt_w, cells, train_rows, ytr, p_train,
                                 n_per_epoch, batch_size, rng, gen, ema)
            sched.step()

            rec: dict[str, Any] = {"epoch": epoch + 1,
                                   "train_loss": float(np.mean(losses)) if losses else 0.0,
                                   "alpha_loss": None}
            if use_bilevel and (epoch + 1) % cfg.alpha_interval == 0:
                a_loss, ratio, n_steps = self._alpha_round(network, cells, split.alpha,
                                                           codes[split.alpha], opt_a, w_alpha,
                                                           rng, gen, batch_size)
                rec["alpha_loss"] = a_loss
                rec["smoothness_grad_ratio"] = ratio
                ratios.append(ratio)
                alpha_steps += n_steps
                if ema is not None:
                    ema.update_parameters(network)

            if has_sel:
                f1, vloss = self._score(evaluated, cells, split.select, ysel, w_sel)
                rec["select_macro_f1"], rec["select_loss"] = f1, vloss
                # macro-F1 decides; on a tie (small selection splits often tie) the lower
                # class-weighted loss does. Patience counts epochs without a better macro-F1.
                bad = 0 if f1 > best_f1 + 1e-6 else bad + 1
                if f1 > best_f1 + 1e-6 or (f1 > best_f1 - 1e-6 and vloss < best_loss):
                    best_f1, best_loss, best_epoch = max(f1, best_f1), vloss, epoch + 1
                    best_state = copy.deepcopy(evaluated.state_dict())
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", select_f1=f"{f1:.3f}")
            history.append(rec)
            logger.debug("epoch %d: train loss %.4f%s%s", rec["epoch"], rec["train_loss"],
                         "" if rec["alpha_loss"] is None else f", alpha loss {rec['alpha_loss']:.4f}",
                         f", selection macro-F1 {rec['select_macro_f1']:.3f}" if has_sel else "")
            if has_sel and bad >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                break
        bar.close()
        if best_state is not None:
            network.load_state_dict(best_state)
        elif ema is not None:
            network.load_state_dict(ema.module.state_dict())
        if not has_sel:
            best_epoch = len(history)

        refit = {"epochs": 0, "kept": False}
        final_f1 = best_f1 if has_sel else None
        if cfg.refit_epochs > 0 and has_sel:
            before = copy.deepcopy(network.state_dict())
            self._refit(network, cells, fit_rows, codes[fit_rows], weights, batch_size,
                        n_per_epoch, rng, gen)
            f1_refit, _ = self._score(network, cells, split.select, ysel, w_sel)
            refit = {"epochs": cfg.refit_epochs, "select_macro_f1": f1_refit,
                     "kept": f1_refit >= best_f1 - 1e-9}
            if refit["kept"]:
                final_f1 = f1_refit
            else:
                network.load_state_dict(before)
        # the hidden layers' share of a fitted skip network's readout (None: no fitted skip)
        gain = (float(cfg.skip_hidden_gain)
                if getattr(network, "skip", None) is not None and cfg.skip_fit == "logreg"
                else None)
        scaled = gain is not None and gain != 1.0
        if scaled:
            network.scale_hidden_readout(gain)
        calibration = None
        if has_sel:
            logits = self._predict(network, cells, split.select)
            if scaled:
                final_f1 = macro_f1(ysel, logits.argmax(1))
            calibration = calibrate(logits, ysel)
        functional.reset_net(network)
        network.eval()
        metrics = {
            "train_seconds": round(time.perf_counter() - t0, 3),
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            # of the saved model, on cells it never fitted
            "select_macro_f1": final_f1,
            "select_macro_f1_best_epoch": best_f1 if has_sel else None,
            "refit": refit,
            "skip_hidden_gain": gain,
            "skip_class_weight": cfg.skip_class_weight if gain is not None else None,
            "skip_fit_steps": int(cfg.skip_fit_steps) if gain is not None else None,
            "n_train": int(train_rows.size),
            "n_alpha": int(split.alpha.size) if use_bilevel else 0,
            "n_select": int(split.select.size),
            "bilevel": use_bilevel,
            "unsplit_classes": split.unsplit_classes,
            "splits": {
                "train": "fits the synapse weights"
                + ("" if use_bilevel else " (and the neuron parameters, jointly)"),
                "alpha": "fits the neuron parameters (upper level)" if use_bilevel
                else "merged into the training split (no upper level)",
                "select": "picks the epoch kept and whether the refit is kept; "
                          "select_macro_f1 is the saved model's score on it",
                "refit": "training + alpha splits",
            },
            # temperature of the softmax, fitted on the selection split (see calibrate)
            "calibration": calibration,
            "alpha": {"steps": alpha_steps, "rounds": len(ratios), "lr": cfg.alpha_lr,
                      "smoothness": cfg.smoothness,
                      "smoothness_grad_ratio": float(np.mean(ratios)) if ratios else None},
            "neurons": {"start": summary_start, "end": neuron_summary(network.hifi_layers()),
                        "mean_abs_change": _moved(start, network)},
            "history": history,
        }
        if world > 1:
            digests = distributed.all_digests(distributed.state_digest(network))
            if len(set(digests)) > 1:
                logger.error("the ranks ended with different weights: %s", digests)
            metrics["distributed"] = {"world_size": world,
                                      "backend": distributed.backend(),
                                      "rank_weights_sha256": digests}
        return network, metrics

    def _place(self, network: nn.Module) -> None:
        """Move the network to the device and note whether it reads sparse batches."""
        network.to(self.device)
        reads = getattr(network, "reads_sparse", None)
        self._sparse = {t: bool(reads(t)) if reads is not None and self.cfg.sparse_input
                        else False for t in (False, True)}

    def _split(self, codes: np.ndarray) -> Split:
        cfg = self.cfg
        seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        return stratified_split(codes, cfg.alpha_fraction, cfg.select_fraction, int(seed))

    def score_select(self, network: nn.Module, cells: CellRows,
                     codes: np.ndarray) -> dict[str, Any]:
        """A trained network (an ensemble of members trained with this split) on the selection
        split: its macro-F1 and the temperature fitted there (see :func:`calibrate`)."""
        self._rank, self._world = distributed.group_rank_size()
        self._place(network)
        split = self._split(codes)
        if split.select.size == 0:
            return {"select_macro_f1": None, "calibration": None}
        logits = self._predict(network, cells, split.select)
        functional.reset_net(network)
        network.eval()
        y = codes[split.select]
        return {"select_macro_f1": macro_f1(y, logits.argmax(1)),
                "calibration": calibrate(logits, y)}

    def _refit(self, network, cells, rows, y, weights, batch_size, n_per_epoch, rng,
               gen) -> None:
        """A few epochs of the synapses on the given cells at a tenth of the learning rate,
        neuron parameters fixed."""
        cfg = self.cfg
        opt = torch.optim.AdamW(weights, lr=cfg.lr * 0.1, weight_decay=cfg.weight_decay)
        p_all = self._sampling_weights(y)
        for _ in range(cfg.refit_epochs):
            self._epoch(network, opt, cells, rows, y, p_all, n_per_epoch, batch_size, rng, gen)

    def _epoch(self, network, opt, cells, rows, y, p, n_draws, batch_size, rng, gen,
               ema=None) -> list[float]:
        """One epoch of the synapses: ``n_draws`` cells of ``rows`` drawn with probabilities
        ``p``.

        Under DDP the draw is the same on every rank and each rank trains on its interleaved
        shard of every mini-batch; gradients and batch-norm statistics are averaged.
        """
        network.train()
        order = rng.choice(len(y), size=n_draws, replace=True, p=p)
        rank, world = self._rank, self._world
        stepped = _stepped(opt) if world > 1 else []
        losses = []
        for s in range(0, n_draws, batch_size):
            pos = order[s : s + batch_size]
            if pos.size // world < 2:  # batch norm needs two cells (on every rank)
                continue
            mine = distributed.shard(pos, rank, world)
            xb = self._tensor(cells, rows[mine], getattr(self, "_aug_rng", None),
                              training=True)
            yb = torch.from_numpy(y[mine]).to(self.device)
            functional.reset_net(network)
            w_step = float(self.cfg.step_loss)
            steps = network.forward_steps(xb, gen) if w_step else network(xb, gen)[None]
            if self.cfg.logit_adjust:
                steps = steps + self.cfg.logit_adjust * self._log_prior
            loss = F.cross_entropy(steps[-1], yb, label_smoothing=self.cfg.label_smoothing)
            if w_step:
                per_step = F.cross_entropy(steps.flatten(0, 1), yb.repeat(steps.shape[0]),
                                           label_smoothing=self.cfg.label_smoothing)
                loss = (1.0 - w_step) * loss + w_step * per_step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if world > 1:
                value = distributed.all_reduce_step(stepped, _bn_buffers(network), value,
                                                    mine.size / pos.size)
            opt.step()
            if ema is not None:
                ema.update_parameters(network)
            losses.append(value)
        return losses

    def _alpha_round(self, network, cells, rows, y, opt_a, w_cls, rng, gen,
                     batch_size) -> tuple[float, float, int]:
        """``alpha_steps`` steps of the neuron parameters on the alpha split, synapses fixed,
        the network in evaluation mode (no dropout, batch-norm statistics frozen).

        Returns the mean loss, the ratio of the smoothness term's gradient norm to the task
        loss's (first step of the round), and the number of steps taken.
        """
        cfg = self.cfg
        network.eval()
        alpha = network.neuron_parameters()
        alpha_ids = {id(p) for p in alpha}
        frozen = [p for p in network.parameters() if id(p) not in alpha_ids and p.requires_grad]
        for p in frozen:  # no gradient work for the synapses at the upper level
            p.requires_grad_(False)
        rank, world = self._rank, self._world
        w_np = w_cls.detach().cpu().numpy().astype(np.float64) if world > 1 else None
        n = len(rows)
        whole = n <= batch_size  # a small split: every step sees all of it
        cached = self._tensor(cells, rows[distributed.shard(np.arange(n), rank, world)]) \
            if whole else None
        order = np.zeros(0, dtype=np.int64)
        losses, ratio = [], float("nan")
        try:
            for step in range(max(int(cfg.alpha_steps), 1)):
                if whole:
                    pos = np.arange(n)
                else:
                    if order.size < batch_size:
                        order = np.concatenate([order, rng.permutation(n)])
                    pos, order = order[:batch_size], order[batch_size:]
                mine = distributed.shard(pos, rank, world)
                opt_a.zero_grad(set_to_none=True)
                value = 0.0
                if step == 0:
                    norms = torch.zeros(2, dtype=torch.float64)
                if mine.size:  # under DDP a small batch can leave a rank without cells
                    xb = cached if whole else self._tensor(cells, rows[mine])
                    yb = torch.from_numpy(y[mine]).to(self.device)
                    functional.reset_net(network)
                    task = F.cross_entropy(network(xb, gen), yb, weight=w_cls)
                    smooth = cfg.smoothness * laplacian_smoothness(network).to(task.device)
                    if step == 0:
                        norms = self._grad_norms(task, smooth, alpha)
                    loss = task + smooth
                    loss.backward()
                    value = float(loss.detach())
                if world > 1:
                    # the class-weighted mean over the global batch: shares by summed weight
                    share = w_np[y[mine]].sum() / w_np[y[pos]].sum()
                    value = distributed.all_reduce_step(_stepped(opt_a), [], value,
                                                        float(share))
                if step == 0:  # the gradient norms of the first step, averaged over ranks
                    norms = distributed.all_reduce_mean(norms.to(self.device)).cpu()
                    ratio = float(norms[1] / norms[0]) if norms[0] > 0 else float("nan")
                opt_a.step()
                losses.append(value)
        finally:
            for p in frozen:
                p.requires_grad_(True)
            functional.reset_net(network)
            network.train()
        return float(np.mean(losses)), ratio, len(losses)

    @staticmethod
    def _grad_norms(task: torch.Tensor, smooth: torch.Tensor,
                    params: list[nn.Parameter]) -> torch.Tensor:
        """``[||d task / d alpha||, ||d smooth / d alpha||]``."""
        out = torch.zeros(2, dtype=torch.float64)
        for i, term in enumerate((task, smooth)):
            if term.requires_grad:
                grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                out[i] = math.sqrt(sum(float((g.detach() ** 2).sum()) for g in grads
                                       if g is not None))
        return out
