"""Turning standardised expression profiles into input over T time steps.

Each encoder maps a batch ``x`` of shape ``[N, G]`` (standardised, clipped expression) to
``[T, N, G]``. ``analog`` tells whether the first layer receives real values (so its
multiply-accumulates count as MACs) or binary spikes (accumulates only).
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("direct", "rate", "latency")


class Encoder(nn.Module):
    """Base class. ``timesteps`` is T."""

    analog: bool = False
    #: True when every step carries the same input, so the first layer can be computed once.
    constant: bool = False

    def __init__(self, timesteps: int, clip: float = 10.0) -> None:
        super().__init__()
        if timesteps < 1:
            raise ValueError("timesteps must be at least 1")
        self.timesteps = int(timesteps)
        self.clip = float(clip)

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        """Expression rescaled to [0, 1]: a logistic map of the z-score (0 -> 0.5)."""
        return torch.sigmoid(x)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class DirectEncoder(Encoder):
    """The same analog current at every step."""

    analog = True
    constant = True

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.timesteps, *x.shape)


class RateEncoder(Encoder):
    """Bernoulli spikes, one draw per gene and step, with probability ``intensity(x)``.

    Spikes are drawn from ``generator`` when given, so inference can be made reproducible.
    """

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.intensity(x).unsqueeze(0).expand(self.timesteps, *x.shape)
        u = torch.rand(p.shape, generator=generator, device="cpu", dtype=x.dtype).to(x.device)
        return (u < p).to(x.dtype)


class LatencyEncoder(Encoder):
    """Time to first spike: one spike per gene, earlier for higher expression.

    A gene at intensity p spikes at step ``round((1 - p) * (T - 1))``; genes at or below the
    reference mean (p <= 0.5) stay silent, so the code stays sparse.
    """

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.intensity(x)
        t_fire = torch.round((1.0 - p) * (self.timesteps - 1)).long()
        steps = torch.arange(self.timesteps, device=x.device).view(-1, *([1] * x.dim()))
        spikes = (steps == t_fire.unsqueeze(0)) & (p > 0.5).unsqueeze(0)
        return spikes.to(x.dtype)


def make_encoder(name: str, timesteps: int, clip: float = 10.0) -> Encoder:
    """Build an encoder by name: ``direct``, ``rate`` or ``latency``."""
    classes = {"direct": DirectEncoder, "rate": RateEncoder, "latency": LatencyEncoder}
    if name not in classes:
        raise ValueError(f"unknown encoder '{name}' (choose from {', '.join(ENCODERS)})")
    return classes[name](timesteps, clip)
