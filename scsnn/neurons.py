"""Spiking neurons on SpikingJelly 2.0: the self-inhibiting heterogeneous HIFI neuron and
the homogeneous baselines (LIF, PLIF).

HIFI, one step, per neuron i (all parameters are vectors, one entry per neuron)::

    I_t = c * (x_t - gamma * s_{t-1})        # autapse: a neuron's own spike inhibits it
    h_t = leaky_relu((1 - k) * v_{t-1} + I_t, 0.1)
    s_t = H(h_t - theta)                     # surrogate gradient in training
    v_t = h_t - theta * s_t                  # soft reset (or hard reset to u)

with k = sigmoid(a_k) in (0, 1), theta = softplus(a_theta) + theta_min > 0,
c = 2 * sigmoid(a_c) in (0, 2) and gamma = softplus(a_gamma) >= 0, started slightly above 0
so that it receives a gradient from the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate
from torch import nn

from .kernels import check_kernel, hifi_multistep, resolve_kernel

NEURONS = ("hifi", "lif", "plif")

#: Names of the neuron-level ("alpha") parameters of a HIFI layer, in a fixed order.
HIFI_PARAMS = ("a_k", "a_theta", "a_c", "a_gamma")

_THETA_MIN = 0.05


def _inv_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class HIFINode(sj_neuron.BaseNode):
    """Heterogeneous self-inhibiting integrate-and-fire neuron (multi-step capable).

    Parameters
    ----------
    n_neurons
        Width of the layer; each neuron gets its own leak, threshold, gain and autapse.
    init_k, init_theta, init_c, init_gamma
        Starting values; a small random spread (``init_spread``) makes the layer
        heterogeneous from the start.
    hard_reset
        Reset the membrane to a learnable per-neuron ``u`` after a spike instead of
        subtracting the threshold.
    online
        Detach the membrane and the previous spike between steps (gradients flow only
        within a step: online training, lower memory than full BPTT).
    kernel
        Multi-step implementation: ``"torch"`` the plain autograd loop below (the reference),
        ``"torch-fused"`` the hand-fused torch loop of :mod:`scsnn.kernels` (same values,
        hand-written backward, less memory), ``"triton"`` the fused Triton kernels, ``"auto"``
        (default) Triton where :func:`scsnn.kernels.fused_available` (CUDA and triton), the
        surrogate is ATan and the input is not float64, else the plain loop.
    """

    def __init__(
        self,
        n_neurons: int,
        *,
        init_k: float = 0.5,
        init_theta: float = 1.0,
        init_c: float = 1.0,
        init_gamma: float = 0.05,
        init_spread: float = 0.1,
        hard_reset: bool = False,
        online: bool = False,
        autapse: bool = True,
        surrogate_function: surrogate.SurrogateFunctionBase | None = None,
        step_mode: str = "m",
        generator: torch.Generator | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__(
            v_threshold=1.0,
            v_reset=None,
            surrogate_function=surrogate_function or surrogate.ATan(),
            detach_reset=False,
            step_mode=step_mode,
        )
        self.n_neurons = int(n_neurons)
        self.hard_reset = bool(hard_reset)
        self.online = bool(online)
        self.autapse = bool(autapse)
        self.kernel = check_kernel(kernel)
        self.register_memory("s", 0.0)

        def init(value: float) -> nn.Parameter:
            noise = torch.randn(self.n_neurons, generator=generator) * init_spread
            return nn.Parameter(torch.full((self.n_neurons,), value) + noise)

        self.a_k = init(_logit(init_k))
        self.a_theta = init(_inv_softplus(init_theta - _THETA_MIN))
        self.a_c = init(_logit(init_c / 2.0))
        # the autapse starts slightly above zero, never exactly at a point without gradient
        self.a_gamma = init(_inv_softplus(init_gamma)) if autapse else None
        self.u = nn.Parameter(torch.zeros(self.n_neurons)) if hard_reset else None

    # -- the biophysical parameters in their ranges --------------------------------------
    @property
    def k(self) -> torch.Tensor:
        return torch.sigmoid(self.a_k)

    @property
    def theta(self) -> torch.Tensor:
        return F.softplus(self.a_theta) + _THETA_MIN

    @property
    def c(self) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.a_c)

    @property
    def gamma(self) -> torch.Tensor:
        if self.a_gamma is None:
            return torch.zeros_like(self.a_k)
        return F.softplus(self.a_gamma)

    def neuron_parameters(self) -> list[nn.Parameter]:
        """The neuron-level ("alpha") parameters, trained on the validation split."""
        params = [self.a_k, self.a_theta, self.a_c]
        if self.a_gamma is not None:
            params.append(self.a_gamma)
        if self.u is not None:
            params.append(self.u)
        return params

    def alpha_matrix(self) -> torch.Tensor:
        """``(n_neurons, 4)``: k, theta, c, gamma of every neuron, for the smoothness term."""
        return torch.stack([self.k, self.theta, self.c, self.gamma], dim=1)

    def extra_repr(self) -> str:
        return (
            f"n_neurons={self.n_neurons}, hard_reset={self.hard_reset}, online={self.online}, "
            f"autapse={self.autapse}, step_mode={self.step_mode}"
        )

    # -- dynamics ------------------------------------------------------------------------
    def materialize_states(self, inputs, states, step_mode):
        x = inputs[0][0] if step_mode == "m" else inputs[0]
        out = []
        for st in states:
            if not isinstance(st, torch.Tensor) or st.shape != x.shape:
                st = torch.zeros_like(x)
            out.append(st)
        return tuple(out)

    def single_step_functional_forward(self, inputs, states, **kwargs):
        x = inputs[0]
        v, s_prev = states
        if self.online:
            v, s_prev = v.detach(), s_prev.detach()
        k, theta, c = self.k, self.theta, self.c
        drive = x - self.gamma * s_prev if self.autapse else x
        h = F.leaky_relu((1.0 - k) * v + c * drive, 0.1)
        spike = self.surrogate_function(h - theta)
        if self.hard_reset:
            v = h * (1.0 - spike) + self.u * spike
        else:
            v = h - theta * spike
        return (spike,), (v, spike)

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        # parameters mapped once per sequence, not once per step
        x_seq = inputs[0]
        v, s_prev = states
        k, theta, c, gamma = self.k, self.theta, self.c, self.gamma
        fused = resolve_kernel(getattr(self, "kernel", "auto"), x_seq, self.surrogate_function)
        if fused is not None:  # all T steps in one autograd node (scsnn.kernels)
            spikes, v, s_prev = hifi_multistep(
                x_seq, v, s_prev, k, theta, c, gamma if self.autapse else None, self.u,
                autapse=self.autapse, hard_reset=self.hard_reset, online=self.online,
                alpha=float(self.surrogate_function.alpha), backend=fused,
            )
            return (spikes,), (v, s_prev)
        spikes = []
        for t in range(x_seq.shape[0]):
            if self.online:
                v, s_prev = v.detach(), s_prev.detach()
            drive = x_seq[t] - gamma * s_prev if self.autapse else x_seq[t]
            h = F.leaky_relu((1.0 - k) * v + c * drive, 0.1)
            s_prev = self.surrogate_function(h - theta)
            v = h * (1.0 - s_prev) + self.u * s_prev if self.hard_reset else h - theta * s_prev
            spikes.append(s_prev)
        return (torch.stack(spikes),), (v, s_prev)


def make_neuron(kind: str, n_neurons: int, *, online: bool = False, autapse: bool = True,
                generator: torch.Generator | None = None) -> nn.Module:
    """A multi-step spiking layer of ``n_neurons``: ``hifi``, ``lif`` or ``plif``.

    LIF is homogeneous with fixed leak (tau = 2), threshold 1 and no autapse; PLIF learns one
    time constant per layer (SpikingJelly's ParametricLIFNode).
    """
    if kind == "hifi":
        return HIFINode(n_neurons, online=online, autapse=autapse, generator=generator)
    if kind == "lif":
        return sj_neuron.LIFNode(
            tau=2.0, detach_reset=False, surrogate_function=surrogate.ATan(), step_mode="m"
        )
    if kind == "plif":
        return sj_neuron.ParametricLIFNode(
            init_tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"
        )
    raise ValueError(f"unknown neuron '{kind}' (choose from {', '.join(NEURONS)})")
