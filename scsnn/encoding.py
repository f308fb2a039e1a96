"""Turning standardised expression profiles into input over T time steps.

Each encoder maps a batch ``z`` of shape ``[N, G]`` (log-normalised expression standardised
with the reference's per-gene mean and standard deviation, clipped) to ``[T, N, G]``.
``analog`` tells whether the first layer receives real values (so its multiply-accumulates
count as MACs) or binary spikes (accumulates only).

The spike encoders share two rules:

* a gene that is not detected in the cell (zero expression: ``z`` equal to the gene's
  ``floor``, the standardised value of 0) never fires; genes a query lacks are given the
  floor too, so they are silent;
* a detected gene's strength is its *level*, 1 (weakest) to T (strongest): the equal-frequency
  bin of its value among the reference cells in which the gene is detected (per-gene
  quantile thresholds, fitted once with :meth:`Encoder.fit` and stored with the model).

``latency`` fires each detected gene once, at step ``T - level`` (the strongest first, every
step used); ``rate`` fires Bernoulli spikes with probability ``level / T`` at every step;
``rank`` (rank-order, N-of-M: Thorpe and Gautrais) ranks a cell's detected genes by how far
they stand above the reference (``z``) and fires only the first ``rank_n``, in that order,
``rank_n / T`` per step: per cell, so insensitive to sequencing depth, and the input spike
count is bounded by ``rank_n``.

Nothing here knows about AnnData.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("direct", "rate", "latency", "rank")

#: A standardised value above the gene's floor by more than this counts as detected.
_DETECT_EPS = 1e-5


class Encoder(nn.Module):
    """Base class. ``timesteps`` is T, ``n_genes`` G."""

    analog: bool = False
    #: True when every step carries the same input, so the first layer can be computed once.
    constant: bool = False

    def __init__(self, timesteps: int, n_genes: int, clip: float = 10.0) -> None:
        super().__init__()
        if timesteps < 1:
            raise ValueError("timesteps must be at least 1")
        self.timesteps = int(timesteps)
        self.n_genes = int(n_genes)
        self.clip = float(clip)

    def fit(self, z: torch.Tensor, floor: torch.Tensor) -> Encoder:
        """Fit the encoder's reference statistics (nothing to fit in the base class).

        Parameters
        ----------
        z
            ``[N, G]`` standardised reference cells (a sample is enough).
        floor
            ``[G]``: the standardised value of zero expression of each gene.
        """
        return self

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def silent(self, base: torch.Tensor) -> bool:
        """Whether genes at ``base`` (``[G]``, the value of a sparse batch's unstored entries)
        send no input spikes, so that only stored entries need encoding."""
        return True


class SpikeEncoder(Encoder):
    """Base class of the spike encoders.

    Buffers (saved with the model): ``floor`` [G], the standardised value of zero expression
    of every gene, and ``thresholds`` [T - 1, G], the per-gene level boundaries.
    """

    def __init__(self, timesteps: int, n_genes: int, clip: float = 10.0) -> None:
        super().__init__(timesteps, n_genes, clip)
        self.register_buffer("floor", torch.full((self.n_genes,), -float(clip)))
        self.register_buffer("thresholds", torch.zeros(self.timesteps - 1, self.n_genes))

    @torch.no_grad()
    def fit(self, z: torch.Tensor, floor: torch.Tensor) -> SpikeEncoder:
        """Set the floor and the per-gene level thresholds (equal-frequency bins of each
        gene's detected values) from reference cells."""
        floor = torch.as_tensor(floor).to(self.floor.dtype).reshape(-1)
        if floor.numel() != self.n_genes or z.shape[-1] != self.n_genes:
            raise ValueError("encoder fit: gene dimensions differ")
        self.floor.copy_(floor)
        T = self.timesteps
        if T > 1:
            zf = torch.as_tensor(z).to(self.floor.dtype)
            detected = zf > floor + _DETECT_EPS
            vals = torch.where(detected, zf, torch.full_like(zf, float("nan")))
            probs = torch.arange(1, T, dtype=zf.dtype) / T
            q = torch.nanquantile(vals, probs, dim=0)  # [T-1, G]; NaN where never detected
            # a gene never detected in the reference: any detection is of the weakest level
            self.thresholds.copy_(torch.nan_to_num(q, nan=self.clip + 1.0))
        return self

    def detected(self, z: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N, G]``: the gene has non-zero expression in the cell."""
        return z > self.floor + _DETECT_EPS

    def silent(self, base: torch.Tensor) -> bool:
        return not bool(self.detected(base.unsqueeze(0)).any())

    def entry_levels(self, values: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """:meth:`levels` of single entries: ``values[i]`` of gene ``genes[i]`` (``[nnz]``);
        the same comparisons as on a dense matrix, so the same levels."""
        lev = 1 + (values.unsqueeze(0) > self.thresholds[:, genes]).sum(0)
        detected = values > self.floor[genes] + _DETECT_EPS
        return torch.where(detected, lev, torch.zeros_like(lev))

    def levels(self, z: torch.Tensor) -> torch.Tensor:
        """Integer ``[N, G]``: 0 for undetected genes, else 1 (weakest) .. T (strongest)."""
        lev = 1 + (z.unsqueeze(0) > self.thresholds.unsqueeze(1)).sum(0)
        return torch.where(self.detected(z), lev, torch.zeros_like(lev))


class DirectEncoder(Encoder):
    """The same analog current (the standardised profile) at every step."""

    analog = True
    constant = True

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return z.unsqueeze(0).expand(self.timesteps, *z.shape)


class RateEncoder(SpikeEncoder):
    """Bernoulli spikes at every step with probability ``level / T`` (0 when undetected).

    Spikes are drawn from ``generator`` when given, so inference can be made reproducible.
    """

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = (self.levels(z).to(z.dtype) / self.timesteps).unsqueeze(0)
        shape = (self.timesteps, *z.shape)
        u = torch.rand(shape, generator=generator, device="cpu", dtype=z.dtype).to(z.device)
        return (u < p).to(z.dtype)


class LatencyEncoder(SpikeEncoder):
    """Time to first spike: each detected gene fires once, at step ``T - level``; the
    strongest evidence fires first and every step carries input."""

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        lev = self.levels(z)
        steps = torch.arange(self.timesteps, 0, -1, device=z.device).view(-1, 1, 1)
        return (lev.unsqueeze(0) == steps).to(z.dtype)


class RankEncoder(SpikeEncoder):
    """Rank-order N-of-M code: a cell's detected genes ranked by ``z`` (how far above the
    reference they are); the first ``rank_n`` fire once each, ``rank_n / T`` per step in rank
    order, the rest stay silent."""

    def __init__(self, timesteps: int, n_genes: int, clip: float = 10.0,
                 rank_n: int = 128) -> None:
        super().__init__(timesteps, n_genes, clip)
        if rank_n < 1:
            raise ValueError("rank_n must be at least 1")
        self.rank_n = int(rank_n)

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        N, G = z.shape
        n = min(self.rank_n, G)
        score = torch.where(self.detected(z), z, torch.full_like(z, -float("inf")))
        vals, idx = torch.topk(score, n, dim=1)  # [N, n], strongest first
        step = (torch.arange(n, device=z.device) * self.timesteps) // n  # rank -> step
        fire = torch.isfinite(vals).to(z.dtype)  # fewer than rank_n detected: the rest silent
        out = torch.zeros(self.timesteps * N * G, dtype=z.dtype, device=z.device)
        cell = torch.arange(N, device=z.device).view(N, 1)
        pos = (step.view(1, n) * N + cell) * G + idx  # flat index of (step, cell, gene)
        out.index_put_((pos.reshape(-1),), fire.reshape(-1))
        return out.view(self.timesteps, N, G)

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, rank_n={self.rank_n}"


def make_encoder(name: str, timesteps: int, n_genes: int, clip: float = 10.0, *,
                 rank_n: int = 128) -> Encoder:
    """Build an encoder by name: ``direct``, ``rate``, ``latency`` or ``rank``."""
    if name == "direct":
        return DirectEncoder(timesteps, n_genes, clip)
    if name == "rate":
        return RateEncoder(timesteps, n_genes, clip)
    if name == "latency":
        return LatencyEncoder(timesteps, n_genes, clip)
    if name == "rank":
        return RankEncoder(timesteps, n_genes, clip, rank_n=rank_n)
    raise ValueError(f"unknown encoder '{name}' (choose from {', '.join(ENCODERS)})")
