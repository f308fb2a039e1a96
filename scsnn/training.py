"""Bi-level training of the spiking classifier.

Lower level: synapse weights W minimise the task loss on the training split (neuron
parameters fixed). Upper level: every ``alpha_interval`` epochs the neuron-level parameters
alpha minimise the loss on a disjoint, stratified validation split plus
``smoothness * trace(A^T L A) / n^2``, the graph-Laplacian term that pulls neurons joined by
strong synapses towards similar biophysics. Rare classes: class-tempered sampling of the
training split, class-weighted loss on the validation split, and early stopping on the
validation macro-F1.

Under torchrun (see :mod:`scsnn.distributed`) every rank draws the same cells and takes an
interleaved shard of every mini-batch; the gradients of whichever parameters are being stepped
(synapses, or neuron parameters in the upper-level step) and the batch-norm running statistics
are averaged across ranks after each backward pass, weighted by each rank's share of the
batch, so all ranks take the same steps and end with bit-identical weights. Validation
predictions are split between the ranks and gathered, so every rank takes the same
early-stopping decisions.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from spikingjelly.activation_based import functional
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import distributed
from .pp import GeneSpace

logger = logging.getLogger("scsnn")


@dataclass
class TrainConfig:
    """Settings of the training loop (see :func:`scsnn.tl.train` for their meaning)."""

    epochs: int = 40
    batch_size: int | None = None
    min_samples_per_epoch: int = 4096
    max_samples_per_epoch: int = 32_768
    max_samples: int = 1_000_000
    refit_epochs: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    alpha_lr: float = 1e-2
    alpha_interval: int = 2
    alpha_min_steps: int = 1
    smoothness: float = 1e-2
    bilevel: bool = True
    val_fraction: float = 0.15
    class_balance: float = 0.5
    label_smoothing: float = 0.1
    ema_decay: float = 0.99
    patience: int = 8
    min_epochs: int = 5
    seed: int = 0
    progress: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    unsplit_classes: list[int] = field(default_factory=list)


def stratified_split(codes: np.ndarray, val_fraction: float, seed: int = 0) -> Split:
    """A validation split that holds every class with 3 or more cells.

    Classes of 1 or 2 cells stay whole in the training split (they are reported back).
    """
    rng = np.random.default_rng(seed)
    train, val, unsplit = [], [], []
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        rng.shuffle(idx)
        if idx.size < 3 or val_fraction <= 0:
            train.append(idx)
            unsplit.append(int(c))
            continue
        n_val = int(np.clip(round(val_fraction * idx.size), 1, idx.size - 2))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    tr = np.sort(np.concatenate(train))
    va = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    return Split(tr, va, unsplit)


def laplacian_smoothness(network: nn.Module) -> torch.Tensor:
    """Sum over consecutive HIFI layers of ``trace(A^T L A) / n^2``.

    The two layers' neurons are the nodes, their (k, theta, c, gamma) vectors the features,
    |W| of the synapses between them the edges (self-loops added); L is the symmetric
    normalised Laplacian. Computed without forming the n x n matrix.
    """
    layers = network.hifi_layers()
    fcs = getattr(network, "fcs", None)
    total = torch.zeros(())
    for i in range(len(layers) - 1):
        a1, a2 = layers[i].alpha_matrix(), layers[i + 1].alpha_matrix()
        W = fcs[i + 1].weight.detach().abs()  # (n2, n1)
        deg1 = 1.0 + W.sum(0)  # self-loop + edges of layer-i neurons
        deg2 = 1.0 + W.sum(1)
        d1, d2 = deg1.rsqrt(), deg2.rsqrt()
        sq = (a1 * a1).sum() + (a2 * a2).sum()
        self_loops = ((a1 * a1).sum(1) / deg1).sum() + ((a2 * a2).sum(1) / deg2).sum()
        cross = ((d2[:, None] * a2) * (W @ (d1[:, None] * a1))).sum()
        n = a1.shape[0] + a2.shape[0]
        total = total.to(sq.device) + (sq - self_loops - 2.0 * cross) / (n * n)
    return total


def _batch(X: sp.csr_matrix, rows: np.ndarray, gs: GeneSpace, device: torch.device) -> torch.Tensor:
    # a reference on disk (scsnn.pp.ProjectedRows) reads the cells of the batch
    block = X.take_rows(rows) if hasattr(X, "take_rows") else X[rows]
    return torch.from_numpy(gs.scale(block)).to(device)


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
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training \
                and m.track_running_stats:
            out.extend([m.running_mean, m.running_var])
    return out


def _data_digest(network: nn.Module, X: sp.csr_matrix, codes: np.ndarray, gs: GeneSpace) -> str:
    """What every rank must agree on before training: cells, labels, genes, initial weights."""
    import hashlib

    h = hashlib.sha256()
    if hasattr(X, "digest"):
        h.update(X.digest().encode())
    else:
        h.update(repr((X.shape, X.nnz, float(np.asarray(X.data, dtype=np.float64).sum())))
                 .encode())
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update("\0".join(gs.genes).encode())
    h.update(distributed.state_digest(network).encode())
    return h.hexdigest()


class BiLevelTrainer:
    """Trains a network built by :func:`scsnn.models.build_network` on projected cells."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.cfg = config
        self.device = device
        # rank and number of processes of the data-parallel group ((0, 1): one process)
        self._rank, self._world = 0, 1

    def _sampling_weights(self, codes: np.ndarray) -> np.ndarray:
        counts = np.bincount(codes)
        w = counts[codes].astype(np.float64) ** (-self.cfg.class_balance)
        return w / w.sum()

    def _predict(self, network: nn.Module, X: sp.csr_matrix, gs: GeneSpace) -> np.ndarray:
        """Logits of the network on X, in eval mode (under DDP: each rank predicts a block of
        X and every rank receives all of them)."""
        if self._world == 1:
            return self._predict_rows(network, X, gs)
        lo, hi = distributed.block(X.shape[0], self._rank, self._world)
        if hi > lo:
            local = self._predict_rows(network, X[lo:hi], gs)
        else:
            network.eval()
            local = np.zeros((0, network.cfg.n_classes), dtype=np.float32)
        return distributed.gather_blocks(local, X.shape[0], self.device)

    @torch.no_grad()
    def _predict_rows(self, network: nn.Module, X: sp.csr_matrix, gs: GeneSpace) -> np.ndarray:
        network.eval()
        preds = []
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for s in range(0, X.shape[0], 1024):
            functional.reset_net(network)
            xb = _batch(X, np.arange(s, min(s + 1024, X.shape[0])), gs, self.device)
            preds.append(network(xb, gen).float().cpu().numpy())
        functional.reset_net(network)
        return np.concatenate(preds)

    def fit(
        self,
        network: nn.Module,
        X: sp.csr_matrix,
        codes: np.ndarray,
        gs: GeneSpace,
        n_classes: int,
    ) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._rank, self._world = rank, world = distributed.group_rank_size()
        # the draws of cells are the same on every rank (then sharded); dropout and spike
        # encoders get a stream of their own on each rank (rank 0: as in a single process)
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, rank) + 1)
        network.to(self.device)
        if world > 1:
            distributed.check_same(_data_digest(network, X, codes, gs),
                                   "reference cells, labels, genes or initial weights")

        split = stratified_split(codes, cfg.val_fraction, cfg.seed)
        Xtr, ytr = X[split.train], codes[split.train]
        Xva, yva = X[split.val], codes[split.val]
        has_val = split.val.size > 0

        alpha = network.neuron_parameters()
        alpha_ids = {id(p) for p in alpha}
        use_bilevel = cfg.bilevel and bool(alpha) and has_val
        weights = [p for p in network.parameters() if id(p) not in alpha_ids]
        if use_bilevel:
            opt_w = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=cfg.weight_decay)
            opt_a = torch.optim.Adam(alpha, lr=cfg.alpha_lr)
        else:
            groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
            if alpha:
                groups.append({"params": alpha, "weight_decay": 0.0})
            opt_w = torch.optim.AdamW(groups, lr=cfg.lr)
            opt_a = None

        # class weights for the validation-split loss: every class counts equally
        va_counts = np.bincount(yva, minlength=n_classes).astype(np.float64)
        va_w = np.where(va_counts > 0, va_counts.sum() / np.maximum(va_counts, 1), 0.0)
        va_w = torch.tensor(va_w / max(va_w[va_counts > 0].mean(), 1e-12) if has_val else
                            np.ones(n_classes), dtype=torch.float32, device=self.device)

        p_train = self._sampling_weights(ytr)
        # small references get enough updates per epoch; large ones one pass per epoch, and
        # no more than max_samples draws in all
        # (an epoch is a round of class-tempered draws, validated at its end: capped at
        # max_samples_per_epoch so that large references are checked, and stop, early)
        n_per_epoch = int(np.clip(len(ytr), cfg.min_samples_per_epoch,
                                  max(cfg.max_samples_per_epoch, cfg.min_samples_per_epoch)))
        n_epochs = max(1, min(cfg.epochs, cfg.max_samples // n_per_epoch))
        batch_size = cfg.batch_size or auto_batch_size(len(ytr))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, T_max=n_epochs)
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        show = show and rank == 0
        best_f1, best_loss, best_state, best_epoch, bad = -1.0, np.inf, None, 0, 0
        history: list[dict[str, float]] = []
        # an exponential moving average of the weights is what gets validated and kept
        ema = (AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                             use_buffers=True) if cfg.ema_decay > 0 else None)
        evaluated = ema.module if ema is not None else network
        bar = tqdm(range(n_epochs), desc="training", disable=not show, leave=False)
        for epoch in bar:
            losses = self._epoch(network, opt_w, Xtr, ytr, p_train, gs, n_per_epoch, batch_size,
                                 rng, gen, ema)
            sched.step()

            alpha_loss = float("nan")
            if use_bilevel and (epoch + 1) % cfg.alpha_interval == 0:
                alpha_loss = self._alpha_step(network, Xva, yva, gs, opt_a, va_w, rng, gen,
                                              batch_size)
                if ema is not None:
                    ema.update_parameters(network)

            rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else 0.0,
                   "alpha_loss": alpha_loss}
            if has_val:
                logits = self._predict(evaluated, Xva, gs)
                pred = logits.argmax(1)
                f1 = float(f1_score(yva, pred, average="macro", labels=np.unique(yva),
                                    zero_division=0))
                vloss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(yva),
                                              weight=va_w.cpu()))
                rec["val_macro_f1"], rec["val_loss"] = f1, vloss
                # macro-F1 decides; on a tie (small validation splits often tie) the
                # lower class-weighted validation loss does. Patience counts epochs without
                # a better macro-F1.
                if f1 > best_f1 + 1e-6:
                    bad = 0
                else:
                    bad += 1
                if f1 > best_f1 + 1e-6 or (f1 > best_f1 - 1e-6 and vloss < best_loss):
                    best_f1, best_loss, best_epoch = max(f1, best_f1), vloss, epoch + 1
                    best_state = copy.deepcopy(evaluated.state_dict())
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val_f1=f"{f1:.3f}")
            history.append(rec)
            logger.debug("epoch %s", rec)
            if has_val and bad >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                break
        bar.close()
        if best_state is not None:
            network.load_state_dict(best_state)
        elif ema is not None:
            network.load_state_dict(ema.module.state_dict())
        else:
            best_epoch = len(history)
        if cfg.refit_epochs > 0 and has_val:
            self._refit(network, X, codes, gs, weights, batch_size, n_per_epoch, rng, gen)
        functional.reset_net(network)
        network.eval()
        metrics = {
            "train_seconds": round(time.perf_counter() - t0, 3),
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "val_macro_f1": best_f1 if has_val else None,
            "n_train": int(split.train.size),
            "n_val": int(split.val.size),
            "bilevel": use_bilevel,
            "unsplit_classes": split.unsplit_classes,
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

    def _refit(self, network, X, codes, gs, weights, batch_size, n_per_epoch, rng, gen) -> None:
        """A few epochs of the synapses on every reference cell (validation cells included),
        at a tenth of the learning rate, neuron parameters fixed."""
        cfg = self.cfg
        opt = torch.optim.AdamW(weights, lr=cfg.lr * 0.1, weight_decay=cfg.weight_decay)
        p_all = self._sampling_weights(codes)
        for _ in range(cfg.refit_epochs):
            self._epoch(network, opt, X, codes, p_all, gs, n_per_epoch, batch_size, rng, gen)

    def _epoch(self, network, opt, X, y, p, gs, n_draws, batch_size, rng, gen,
               ema=None) -> list[float]:
        """One epoch of the synapses: ``n_draws`` cells drawn with probabilities ``p``.

        Under DDP the draw is the same on every rank and each rank trains on its interleaved
        shard of every mini-batch; gradients and batch-norm statistics are averaged.
        """
        network.train()
        order = rng.choice(len(y), size=n_draws, replace=True, p=p)
        rank, world = self._rank, self._world
        stepped = _stepped(opt) if world > 1 else []
        losses = []
        for s in range(0, n_draws, batch_size):
            rows = order[s : s + batch_size]
            if rows.size // world < 2:  # batch norm needs two cells (on every rank)
                continue
            mine = distributed.shard(rows, rank, world)
            xb = _batch(X, mine, gs, self.device)
            yb = torch.from_numpy(y[mine]).to(self.device)
            functional.reset_net(network)
            loss = F.cross_entropy(network(xb, gen), yb, label_smoothing=self.cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = float(loss.detach())
            if world > 1:
                value = distributed.all_reduce_step(stepped, _bn_buffers(network), value,
                                                    mine.size / rows.size)
            opt.step()
            if ema is not None:
                ema.update_parameters(network)
            losses.append(value)
        return losses

    def _alpha_step(self, network, Xva, yva, gs, opt_a, va_w, rng, gen, batch_size) -> float:
        """One pass over the validation split updating only the neuron parameters."""
        cfg = self.cfg
        network.train()
        alpha_ids = {id(p) for p in network.neuron_parameters()}
        frozen = [p for p in network.parameters() if id(p) not in alpha_ids and p.requires_grad]
        for p in frozen:  # no gradient work for the synapses at the upper level
            p.requires_grad_(False)
        # freeze batch-norm statistics: the validation split must not move them
        for m in network.modules():
            if isinstance(m, nn.BatchNorm1d | nn.Dropout):
                m.eval()
        # at least alpha_min_steps updates: small validation splits are passed over again
        n_batches = -(-len(yva) // batch_size)
        passes = -(-max(cfg.alpha_min_steps, 1) // n_batches)
        order = np.concatenate([rng.permutation(len(yva)) for _ in range(passes)])
        rank, world = self._rank, self._world
        w_np = va_w.detach().cpu().numpy().astype(np.float64) if world > 1 else None
        losses = []
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            mine = distributed.shard(rows, rank, world)
            opt_a.zero_grad(set_to_none=True)
            value = 0.0
            if mine.size:  # under DDP a small last batch can leave a rank without cells
                xb = _batch(Xva, mine, gs, self.device)
                yb = torch.from_numpy(yva[mine]).to(self.device)
                functional.reset_net(network)
                loss = F.cross_entropy(network(xb, gen), yb, weight=va_w)
                loss = loss + cfg.smoothness * laplacian_smoothness(network).to(loss.device)
                loss.backward()
                value = float(loss.detach())
            if world > 1:
                # the class-weighted mean over the global batch: shares by summed class weight
                share = w_np[yva[mine]].sum() / w_np[yva[rows]].sum()
                value = distributed.all_reduce_step(_stepped(opt_a), [], value, float(share))
            opt_a.step()
            losses.append(value)
        for p in frozen:
            p.requires_grad_(True)
        network.train()
        return float(np.mean(losses)) if losses else float("nan")
