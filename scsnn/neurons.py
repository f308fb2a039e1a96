"""Spiking neurons on SpikingJelly 2.0: the self-inhibiting heterogeneous HIFI neuron and the
homogeneous baselines built from the same layer.

HIFI, one step, per neuron i (all parameters are vectors, one entry per neuron)::

    I_t = c * (x_t - gamma * s_{t-1})        # autapse: a neuron's own spike inhibits it
    h_t = leaky_relu((1 - k) * v_{t-1} + I_t, 0.1)
    s_t = H(h_t - theta)                     # surrogate gradient in training
    v_t = h_t - theta * s_t                  # soft reset (or hard reset to u)

with k = sigmoid(a_k) in (0, 1), theta = softplus(a_theta) + theta_min > 0,
c = 2 * sigmoid(a_c) in (0, 2) and gamma = softplus(a_gamma) >= 0, started slightly above 0
so that it receives a gradient from the first step.

The baselines are the same layer with the neuron-level freedom taken away, so that a
comparison measures heterogeneity and the autapse, not a different reset or input gain:

* ``lif``: one fixed leak k = 0.5, threshold 1, gain 1 and no autapse, shared by every neuron
  (nothing neuron-level is learned);
* ``plif``: the same with one learnable leak per layer;
* ``sj-lif`` / ``sj-plif``: SpikingJelly's own ``LIFNode`` / ``ParametricLIFNode`` (tau = 2,
  hard reset to 0, input scaled by 1/tau, no leaky ReLU), kept as named extra baselines.

Nothing here knows about AnnData or the rest of scsnn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate
from torch import nn

from .kernels import check_kernel, hifi_multistep, hifi_step, resolve_kernel

#: Neuron kinds of :func:`make_neuron`.
NEURONS = ("hifi", "lif", "plif", "sj-lif", "sj-plif")

#: Names of the neuron-level ("alpha") parameters of a HIFI layer, in a fixed order.
HIFI_PARAMS = ("a_k", "a_theta", "a_c", "a_gamma")
#: The biophysical quantities behind them.
QUANTITIES = ("k", "theta", "c", "gamma")

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
        Width of the layer.
    init_k, init_theta, init_c, init_gamma
        Starting values of leak, threshold, input gain and autapse strength; a small random
        spread (``init_spread``, in the raw parameterisation) makes a heterogeneous layer
        heterogeneous from the start.
    heterogeneous
        One value of every neuron-level parameter per neuron (True), or one per layer,
        shared by all its neurons (False).
    learn
        Which of ``k``, ``theta``, ``c``, ``gamma`` are trainable; the others are fixed at
        their initial values (stored as buffers). Default: all four.
    hard_reset
        Reset the membrane to a learnable per-neuron ``u`` after a spike instead of
        subtracting the threshold.
    online
        Detach the membrane and the previous spike between steps (gradients flow only
        within a step: online training, lower memory than full BPTT).
    autapse
        The self-inhibiting synapse ``-gamma * s_{t-1}``; without it gamma is 0.
    kernel
        Multi-step implementation: ``"torch"`` the plain autograd loop (the reference),
        ``"torch-fused"`` the hand-fused torch loop of :mod:`scsnn.kernels` (same values,
        hand-written backward, less memory), ``"triton"`` the fused Triton kernels, ``"auto"``
        (default) with the ATan surrogate: Triton where :func:`scsnn.kernels.fused_available`
        (CUDA and triton) and the input is not float64, else the hand-fused torch loop
        (forward bit-equal to the plain loop, 1.4-1.8x faster on the CPU); with another
        surrogate the plain loop.
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
        heterogeneous: bool = True,
        learn: Sequence[str] = QUANTITIES,
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
        unknown = set(learn) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"unknown neuron parameter(s) {sorted(unknown)} "
                             f"(choose from {', '.join(QUANTITIES)})")
        self.n_neurons = int(n_neurons)
        self.heterogeneous = bool(heterogeneous)
        self.learned = tuple(q for q in QUANTITIES if q in learn
                             and (q != "gamma" or autapse))
        self.hard_reset = bool(hard_reset)
        self.online = bool(online)
        self.autapse = bool(autapse)
        self.kernel = check_kernel(kernel)
        self.register_memory("s", 0.0)
        width = self.n_neurons if self.heterogeneous else 1

        def init(name: str, quantity: str, value: float) -> None:
            raw = torch.full((width,), value)
            if self.heterogeneous and init_spread > 0:
                raw = raw + torch.randn(width, generator=generator) * init_spread
            if quantity in self.learned:
                setattr(self, name, nn.Parameter(raw))
            else:
                self.register_buffer(name, raw)

        init("a_k", "k", _logit(init_k))
        init("a_theta", "theta", _inv_softplus(init_theta - _THETA_MIN))
        init("a_c", "c", _logit(init_c / 2.0))
        # the autapse starts slightly above zero, never exactly at a point without gradient
        if autapse:
            init("a_gamma", "gamma", _inv_softplus(init_gamma))
        else:
            self.a_gamma = None
        self.u = nn.Parameter(torch.zeros(width)) if hard_reset else None

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
        """The trainable neuron-level ("alpha") parameters (the upper level of bi-level
        training); fixed ones are buffers and not listed."""
        params = [p for p in (self.a_k, self.a_theta, self.a_c, self.a_gamma, self.u)
                  if isinstance(p, nn.Parameter)]
        return params

    def quantities(self) -> dict[str, torch.Tensor]:
        """k, theta, c and gamma of every neuron, ``{name: [n_neurons]}`` (a homogeneous
        layer's shared value repeated)."""
        n = self.n_neurons
        return {q: getattr(self, q).expand(n) for q in QUANTITIES}

    def alpha_matrix(self) -> torch.Tensor:
        """``(n_neurons, 4)``: k, theta, c, gamma of every neuron, for the smoothness term."""
        return torch.stack(list(self.quantities().values()), dim=1)

    def extra_repr(self) -> str:
        return (
            f"n_neurons={self.n_neurons}, heterogeneous={self.heterogeneous}, "
            f"learned={','.join(self.learned) or 'none'}, hard_reset={self.hard_reset}, "
            f"online={self.online}, autapse={self.autapse}, step_mode={self.step_mode}"
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

    def _step(self, x, v, s_prev, k, theta, c, gamma):
        if self.online:
            v, s_prev = v.detach(), s_prev.detach()
        return hifi_step(x, v, s_prev, k, theta, c, gamma, self.u, autapse=self.autapse,
                         hard_reset=self.hard_reset, spike_fn=self.surrogate_function)

    def single_step_functional_forward(self, inputs, states, **kwargs):
        v, s_prev = states
        spike, v = self._step(inputs[0], v, s_prev, self.k, self.theta, self.c, self.gamma)
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
            s_prev, v = self._step(x_seq[t], v, s_prev, k, theta, c, gamma)
            spikes.append(s_prev)
        return (torch.stack(spikes),), (v, s_prev)


def make_neuron(kind: str, n_neurons: int, *, online: bool = False, autapse: bool = True,
                heterogeneous: bool = True,
                generator: torch.Generator | None = None) -> nn.Module:
    """A multi-step spiking layer of ``n_neurons``.

    Parameters
    ----------
    kind
        ``hifi`` (per-neuron learnable k, theta, c, gamma; ``autapse`` and ``heterogeneous``
        switch parts off for ablations), ``lif`` (the HIFI layer with fixed, shared k = 0.5,
        theta = 1, c = 1, no autapse), ``plif`` (as ``lif`` with one learnable leak per
        layer), ``sj-lif`` / ``sj-plif`` (SpikingJelly's ``LIFNode`` / ``ParametricLIFNode``
        with tau = 2 and their own defaults).
    online
        Detach the state between steps (HIFI-based kinds).
    generator
        Random source of the initial spread of a heterogeneous layer.
    """
    if kind == "hifi":
        return HIFINode(n_neurons, online=online, autapse=autapse,
                        heterogeneous=heterogeneous, generator=generator)
    if kind == "lif":
        return HIFINode(n_neurons, online=online, autapse=False, heterogeneous=False,
                        learn=(), init_spread=0.0)
    if kind == "plif":
        return HIFINode(n_neurons, online=online, autapse=False, heterogeneous=False,
                        learn=("k",), init_spread=0.0)
    if kind == "sj-lif":
        return sj_neuron.LIFNode(
            tau=2.0, detach_reset=False, surrogate_function=surrogate.ATan(), step_mode="m"
        )
    if kind == "sj-plif":
        return sj_neuron.ParametricLIFNode(
            init_tau=2.0, surrogate_function=surrogate.ATan(), step_mode="m"
        )
    raise ValueError(f"unknown neuron '{kind}' (choose from {', '.join(NEURONS)})")


def neuron_summary(layers: Sequence[HIFINode]) -> list[dict[str, dict[str, float]]]:
    """Per layer: mean, standard deviation, min and max of k, theta, c and gamma over its
    neurons (what a layer's biophysics look like, for reports and ``model.json``)."""
    out = []
    with torch.no_grad():
        for layer in layers:
            rec = {}
            for q, v in layer.quantities().items():
                v = v.detach().float().cpu()
                rec[q] = {"mean": float(v.mean()), "sd": float(v.std(unbiased=False)),
                          "min": float(v.min()), "max": float(v.max())}
            out.append(rec)
    return out
