"""Fused multi-step kernels for the HIFI neuron: all T steps in one pass, forward and backward.

The plain PyTorch loop in :meth:`scsnn.neurons.HIFINode.multi_step_functional_forward` (and
its functional twin :func:`hifi_reference` here) is the reference. This module computes the
same dynamics, per element ``(n, f)`` of a ``[T, N, F]`` input::

    d_t = x_t - gamma * s_{t-1}                 (autapse; d_t = x_t without)
    z_t = (1 - k) * v_{t-1} + c * d_t
    h_t = leaky_relu(z_t, 0.1)
    s_t = H(h_t - theta)                        (surrogate ATan: a / (1 + (pi a x)^2), a = alpha/2)
    v_t = h_t - theta * s_t                     (soft reset)
    v_t = h_t * (1 - s_t) + u * s_t             (hard reset)

with per-neuron vectors ``k, theta, c, gamma, u`` of length ``F``, as one
:class:`torch.autograd.Function` (:class:`HIFISequence`) with a hand-written backward: the
forward keeps ``h_t`` of every step (the Triton kernel recomputes ``s_t`` and ``v_t`` from it
bit-exactly, the torch back end also keeps the spikes it returns), the backward runs the
recurrence in reverse time. ``online`` cuts the gradient through ``v_{t-1}`` and ``s_{t-1}``
(gradients flow only within a step), as the reference does.

Two back ends share the Function:

* ``"triton"``: one Triton kernel for the forward (all T steps in registers per element) and
  one for the reverse-time backward, which also reduces the parameter gradients over the batch
  within each tile. Both compute in float32 whatever the input dtype. Triton is imported
  lazily; the module imports fine without it. With ``TRITON_INTERPRET=1`` (set before triton
  is imported) the kernels run on CPU tensors through Triton's interpreter, which is how they
  are tested without a GPU.
* ``"torch"``: the same forward/backward written with plain torch ops, no per-step autograd
  graph (a hand-fused loop for any device).

The Function takes the mapped parameters (``k = sigmoid(a_k)`` etc.); the chain rule through
the maps stays with torch autograd.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "BACKENDS",
    "KERNELS",
    "HIFISequence",
    "check_kernel",
    "fused_available",
    "hifi_multistep",
    "hifi_reference",
    "hifi_step",
    "interpreter_enabled",
    "resolve_kernel",
    "triton_available",
]

#: Back ends of :func:`hifi_multistep`.
BACKENDS = ("triton", "torch")

_SLOPE = 0.1  # leaky_relu negative slope of the HIFI neuron
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- availability ------------------------------------------------------------------------
def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET`` set to a true value).

    Returns
    -------
    bool
        True when the environment asks Triton to interpret kernels on the CPU.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (the result is cached).

    Returns
    -------
    bool
        True when the Triton package imports.
    """
    try:
        importlib.import_module("triton.language")
    except (ImportError, OSError, RuntimeError):  # not installed, or a broken install
        return False
    return True


def fused_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``.

    Parameters
    ----------
    x
        The input sequence (only its device is looked at).

    Returns
    -------
    bool
        True when Triton imports and either ``x`` is on a CUDA device or Triton's interpreter
        is enabled (``TRITON_INTERPRET=1``, kernels on CPU tensors). Never imports triton for
        a CPU tensor when the interpreter is off.
    """
    if x.is_cuda:
        return triton_available()
    if x.device.type == "cpu" and interpreter_enabled():
        return triton_available()
    return False


# -- the reference: the plain autograd loop ----------------------------------------------
def hifi_step(
    x: torch.Tensor,
    v: torch.Tensor,
    s_prev: torch.Tensor,
    k: torch.Tensor,
    theta: torch.Tensor,
    c: torch.Tensor,
    gamma: torch.Tensor | None,
    u: torch.Tensor | None,
    *,
    autapse: bool,
    hard_reset: bool,
    spike_fn: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the HIFI recurrence: the single definition that the neuron's plain loop
    (:class:`scsnn.neurons.HIFINode`) and :func:`hifi_reference` both run, and that the
    fused back ends reproduce.

    Returns
    -------
    spike, v
        ``s_t = spike_fn(h_t - theta)`` and the membrane after the reset.
    """
    drive = x - gamma * s_prev if autapse else x
    h = F.leaky_relu((1.0 - k) * v + c * drive, _SLOPE)
    spike = spike_fn(h - theta)
    v = h * (1.0 - spike) + u * spike if hard_reset else h - theta * spike
    return spike, v


def hifi_reference(
    x_seq: torch.Tensor,
    v0: torch.Tensor,
    s0: torch.Tensor,
    k: torch.Tensor,
    theta: torch.Tensor,
    c: torch.Tensor,
    gamma: torch.Tensor | None,
    u: torch.Tensor | None,
    *,
    autapse: bool,
    hard_reset: bool,
    online: bool,
    alpha: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The HIFI recurrence as a plain PyTorch loop of :func:`hifi_step` (autograd records
    every step), with the ATan surrogate. Arguments and returns as in :func:`hifi_multistep`.
    """
    from spikingjelly.activation_based import surrogate

    sg = surrogate.ATan(alpha=alpha)
    v, s_prev = v0, s0
    spikes = []
    for t in range(x_seq.shape[0]):
        if online:
            v, s_prev = v.detach(), s_prev.detach()
        s_prev, v = hifi_step(x_seq[t], v, s_prev, k, theta, c, gamma, u, autapse=autapse,
                              hard_reset=hard_reset, spike_fn=sg)
        spikes.append(s_prev)
    return torch.stack(spikes), v, s_prev


# -- the hand-fused torch back end -------------------------------------------------------
def _torch_forward(
    x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, k: torch.Tensor, theta: torch.Tensor,
    c: torch.Tensor, gamma: torch.Tensor | None, u: torch.Tensor | None,
    autapse: bool, hard_reset: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the torch back end: returns spikes, v_T, s_T and h of every step.

    The reference's operations on the same values: bit-identical results on the CPU (the
    products with a spike in {0, 1} are exact, so ``x - gamma * s`` as one addcmul and the
    hard reset as a lerp round exactly as the reference does).
    """
    T = x.shape[0]
    dtype = torch.promote_types(torch.promote_types(x.dtype, v.dtype), k.dtype)
    hs = torch.empty(x.shape, dtype=dtype, device=x.device)
    spikes = torch.empty_like(hs)
    one_m_k = 1.0 - k
    for t in range(T):
        drive = torch.addcmul(x[t], gamma, s, value=-1.0) if autapse else x[t]
        h = torch.mul(one_m_k, v, out=hs[t])
        h.add_(c * drive)
        F.leaky_relu_(h, _SLOPE)
        fire = h >= theta  # == (h - theta >= 0) for IEEE floats
        s = spikes[t]
        s.copy_(fire)
        if hard_reset:  # lerp with a weight in {0, 1} is exact: h where s = 0, u where s = 1
            v = torch.lerp(h, u.expand_as(h), s)
        else:
            v = torch.addcmul(h, theta, s, value=-1.0)
    return spikes, v, s.clone(), hs


def _torch_backward(
    g_spk: torch.Tensor, g_v: torch.Tensor | None, g_s: torch.Tensor | None, x: torch.Tensor,
    hs: torch.Tensor, spikes: torch.Tensor, v0: torch.Tensor, s0: torch.Tensor,
    k: torch.Tensor, theta: torch.Tensor, c: torch.Tensor, gamma: torch.Tensor | None,
    u: torch.Tensor | None, autapse: bool, hard_reset: bool, online: bool, alpha: float,
) -> tuple[torch.Tensor | None, ...]:
    """Reverse-time backward of the torch back end (plain tensor ops, no autograd graph).

    Per step only the recurrence runs (about eight [N, F] operations); the surrogate
    derivative and the parameter gradients are batched over all steps.
    """
    T = x.shape[0]
    a = alpha / 2.0
    # surrogate derivative a / (1 + (pi a (h - theta))^2), all steps
    sg = torch.sub(hs, theta).mul_(math.pi * a)
    sg.square_().add_(1.0).reciprocal_()
    if a != 1.0:
        sg.mul_(a)
    # leaky-relu backward from its output h (h > 0 exactly where its input is > 0), the same
    # (vectorised) kernel autograd runs; torch.where on bool masks is far slower on the CPU
    lrelu_bwd = torch.ops.aten.leaky_relu_backward.grad_input
    one_m_k = 1.0 - k
    neg_gc = -(gamma * c) if autapse else None
    g_z_all = torch.empty_like(hs)
    acc_th = torch.zeros_like(hs[0])
    acc_u = torch.zeros_like(hs[0]) if hard_reset else None
    for t in range(T - 1, -1, -1):
        # g_v, g_s: gradients reaching v_t, s_t from later steps (None: zero, e.g. online)
        s = spikes[t]
        g_tot = g_spk[t] if g_s is None else g_spk[t] + g_s
        g_h = None
        if g_v is not None:
            if hard_reset:
                g_h = torch.addcmul(g_v, g_v, s, value=-1.0)  # g_v * (1 - s)
                g_tot = torch.addcmul(g_tot, g_v, torch.sub(u, hs[t]))
                acc_u.addcmul_(g_v, s)
            else:
                g_h = g_v
                g_tot = torch.addcmul(g_tot, theta, g_v, value=-1.0)
                acc_th.addcmul_(g_v, s)
        g_sg = g_tot * sg[t]
        acc_th.add_(g_sg)
        if g_h is not None:
            g_sg.add_(g_h)
        g_z = lrelu_bwd(g_sg, hs[t], _SLOPE, True, grad_input=g_z_all[t])
        if online:
            g_v = g_s = None
        else:
            g_v = one_m_k * g_z
            g_s = neg_gc * g_z if autapse else None

    def dot(prev_all: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        # sum over steps and batch of state_{t-1} * g_z_t, with state_{-1} = first
        out = (first * g_z_all[0]).sum(0)
        if T > 1:
            out += (prev_all[:-1] * g_z_all[1:]).sum((0, 1))
        return out

    if hard_reset:
        v_all = torch.lerp(hs, u.expand_as(hs), spikes)
    else:
        v_all = torch.addcmul(hs, theta, spikes, value=-1.0)
    g_k = -dot(v_all, v0)
    g_x = c * g_z_all
    q = (x * g_z_all).sum((0, 1))
    if autapse:
        p = dot(spikes, s0)
        g_c = q - gamma * p
        g_gamma = -c * p
    else:
        g_c, g_gamma = q, None
    return (
        g_x, g_v, g_s, g_k, -acc_th.sum(0), g_c, g_gamma,
        None if acc_u is None else acc_u.sum(0),
    )


# -- the Triton back end -----------------------------------------------------------------
@functools.cache
def _triton_kernels() -> SimpleNamespace:
    """Define (once) and return the Triton kernels; imports triton on first use."""
    import triton
    import triton.language as tl

    # T, N and the offsets vary from call to call: no recompilation for each new value
    @triton.jit(do_not_specialize=["T", "N"])
    def hifi_fwd_kernel(
        x_ptr, v0_ptr, s0_ptr, k_ptr, th_ptr, c_ptr, g_ptr, u_ptr,
        spk_ptr, h_ptr, vT_ptr, sT_ptr,
        T, N, F, NF,
        AUTAPSE: tl.constexpr, HARD_RESET: tl.constexpr, SAVE_H: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_f = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_f = offs_f < F
        mask = (offs_n < N)[:, None] & mask_f[None, :]
        offs = offs_n.to(tl.int64)[:, None] * F + offs_f[None, :]

        k = tl.load(k_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        th = tl.load(th_ptr + offs_f, mask=mask_f, other=1.0).to(tl.float32)[None, :]
        c = tl.load(c_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        one_m_k = 1.0 - k
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if AUTAPSE:
            g = tl.load(g_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        if HARD_RESET:
            u = tl.load(u_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]

        x_p = x_ptr + offs
        spk_p = spk_ptr + offs
        h_p = h_ptr + offs
        for _t in range(T):
            x = tl.load(x_p, mask=mask, other=0.0).to(tl.float32)
            if AUTAPSE:
                drive = x - g * s
            else:
                drive = x
            z = one_m_k * v + c * drive
            h = tl.where(z > 0, z, z * 0.1)
            s = tl.where(h - th >= 0, 1.0, 0.0)
            if HARD_RESET:
                v = h * (1.0 - s) + u * s
            else:
                v = h - th * s
            tl.store(spk_p, s.to(spk_ptr.dtype.element_ty), mask=mask)
            if SAVE_H:
                tl.store(h_p, h, mask=mask)
            x_p += NF
            spk_p += NF
            h_p += NF
        tl.store(vT_ptr + offs, v.to(vT_ptr.dtype.element_ty), mask=mask)
        tl.store(sT_ptr + offs, s.to(sT_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["T", "N", "LAST", "PS"])
    def hifi_bwd_kernel(
        gspk_ptr, gvT_ptr, gsT_ptr, x_ptr, h_ptr, v0_ptr, s0_ptr,
        k_ptr, th_ptr, c_ptr, g_ptr, u_ptr,
        gx_ptr, gv0_ptr, gs0_ptr, part_ptr,
        T, N, F, NF, LAST, PS, sg_a, sg_pia,
        AUTAPSE: tl.constexpr, HARD_RESET: tl.constexpr, ONLINE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_f = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_f = offs_f < F
        mask = (offs_n < N)[:, None] & mask_f[None, :]
        offs = offs_n.to(tl.int64)[:, None] * F + offs_f[None, :]

        k = tl.load(k_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        th = tl.load(th_ptr + offs_f, mask=mask_f, other=1.0).to(tl.float32)[None, :]
        c = tl.load(c_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        one_m_k = 1.0 - k
        if AUTAPSE:
            g = tl.load(g_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        if HARD_RESET:
            u = tl.load(u_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        v0 = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s0 = tl.load(s0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gv = tl.load(gvT_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gs = tl.load(gsT_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        acc_k = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        acc_th = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        acc_c = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)

        x_p = x_ptr + LAST + offs
        h_p = h_ptr + LAST + offs
        gspk_p = gspk_ptr + LAST + offs
        gx_p = gx_ptr + LAST + offs
        h = tl.load(h_p, mask=mask, other=0.0)
        for i in range(T):
            # a tensor (not a scalar) so that the interpreter accepts it in a mask
            has_prev = (tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.int32) + i) < T - 1
            # the state before this step: recomputed from the saved h of the step before
            h_prev = tl.load(h_p - NF, mask=mask & has_prev, other=0.0)
            s_prev = tl.where(h_prev - th >= 0, 1.0, 0.0)
            if HARD_RESET:
                v_prev = h_prev * (1.0 - s_prev) + u * s_prev
            else:
                v_prev = h_prev - th * s_prev
            v_prev = tl.where(has_prev, v_prev, v0)
            s_prev = tl.where(has_prev, s_prev, s0)

            s = tl.where(h - th >= 0, 1.0, 0.0)
            g_tot = tl.load(gspk_p, mask=mask, other=0.0).to(tl.float32) + gs
            if HARD_RESET:
                g_h = gv * (1.0 - s)
                g_tot = g_tot + gv * (u - h)
                acc_u += gv * s
            else:
                g_h = gv
                g_tot = g_tot - th * gv
                acc_th -= gv * s
            ax = sg_pia * (h - th)
            g_sg = g_tot * (sg_a / (1.0 + ax * ax))
            g_h = g_h + g_sg
            acc_th -= g_sg
            g_z = tl.where(h > 0, g_h, g_h * 0.1)
            acc_k -= v_prev * g_z
            x = tl.load(x_p, mask=mask, other=0.0).to(tl.float32)
            if AUTAPSE:
                drive = x - g * s_prev
            else:
                drive = x
            acc_c += drive * g_z
            g_d = c * g_z
            tl.store(gx_p, g_d.to(gx_ptr.dtype.element_ty), mask=mask)
            if AUTAPSE:
                acc_g -= s_prev * g_d
            if ONLINE:
                gv = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
                gs = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
            else:
                gv = one_m_k * g_z
                if AUTAPSE:
                    gs = -g * g_d
                else:
                    gs = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
            h = h_prev
            x_p -= NF
            h_p -= NF
            gspk_p -= NF
            gx_p -= NF
        tl.store(gv0_ptr + offs, gv, mask=mask)
        tl.store(gs0_ptr + offs, gs, mask=mask)
        # per-tile reduction over the batch rows: one partial row per program along N, in
        # five [n_rows, F] planes PS elements apart (summed over the rows on the host)
        p_p = part_ptr + pid_n.to(tl.int64) * F + offs_f
        tl.store(p_p, tl.sum(acc_k, axis=0), mask=mask_f)
        tl.store(p_p + PS, tl.sum(acc_th, axis=0), mask=mask_f)
        tl.store(p_p + 2 * PS, tl.sum(acc_c, axis=0), mask=mask_f)
        if AUTAPSE:
            tl.store(p_p + 3 * PS, tl.sum(acc_g, axis=0), mask=mask_f)
        if HARD_RESET:
            tl.store(p_p + 4 * PS, tl.sum(acc_u, axis=0), mask=mask_f)

    return SimpleNamespace(fwd=hifi_fwd_kernel, bwd=hifi_bwd_kernel, triton=triton)


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _tiles(F: int) -> tuple[int, int]:
    """Tile shape (BLOCK_N, BLOCK_F): 1024 elements, 128 neurons wide (32 for narrow layers).

    Two shapes only, so that Triton compiles few variants; rows of 128 contiguous floats give
    coalesced loads, and the backward reduces each tile's parameter gradients over its rows.
    """
    block_f = 128 if F > 64 else 32
    return 1024 // block_f, block_f


def _triton_forward(
    x: torch.Tensor, v0: torch.Tensor, s0: torch.Tensor, k: torch.Tensor, theta: torch.Tensor,
    c: torch.Tensor, gamma: torch.Tensor | None, u: torch.Tensor | None,
    autapse: bool, hard_reset: bool, save_h: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    kern = _triton_kernels()
    T, N, F_ = x.shape
    spikes = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    hs = torch.empty(x.shape, dtype=torch.float32, device=x.device) if save_h else spikes
    v_T = torch.empty((N, F_), dtype=out_dtype, device=x.device)
    s_T = torch.empty((N, F_), dtype=out_dtype, device=x.device)
    block_n, block_f = _tiles(F_)
    grid = (kern.triton.cdiv(F_, block_f), kern.triton.cdiv(N, block_n))
    with _on_device(x):
        kern.fwd[grid](
            x, v0, s0, k, theta, c, gamma if autapse else k, u if hard_reset else k,
            spikes, hs, v_T, s_T, T, N, F_, N * F_,
            AUTAPSE=autapse, HARD_RESET=hard_reset, SAVE_H=save_h,
            BLOCK_N=block_n, BLOCK_F=block_f, num_warps=4,
        )
    return spikes, v_T, s_T, (hs if save_h else None)


def _triton_backward(
    g_spk: torch.Tensor, g_v: torch.Tensor, g_s: torch.Tensor, x: torch.Tensor,
    hs: torch.Tensor, v0: torch.Tensor, s0: torch.Tensor, k: torch.Tensor, theta: torch.Tensor,
    c: torch.Tensor, gamma: torch.Tensor | None, u: torch.Tensor | None,
    autapse: bool, hard_reset: bool, online: bool, alpha: float,
) -> tuple[torch.Tensor | None, ...]:
    kern = _triton_kernels()
    T, N, F_ = x.shape
    dev = x.device
    g_x = torch.empty_like(x)
    g_v0 = torch.empty((N, F_), dtype=torch.float32, device=dev)
    g_s0 = torch.empty((N, F_), dtype=torch.float32, device=dev)
    block_n, block_f = _tiles(F_)
    n_rows = kern.triton.cdiv(N, block_n)
    partial = torch.empty((5, n_rows, F_), dtype=torch.float32, device=dev)
    grid = (kern.triton.cdiv(F_, block_f), n_rows)
    a = alpha / 2.0
    with _on_device(x):
        kern.bwd[grid](
            g_spk, g_v, g_s, x, hs, v0, s0,
            k, theta, c, gamma if autapse else k, u if hard_reset else k,
            g_x, g_v0, g_s0, partial,
            T, N, F_, N * F_, (T - 1) * N * F_, n_rows * F_, a, math.pi * a,
            AUTAPSE=autapse, HARD_RESET=hard_reset, ONLINE=online,
            BLOCK_N=block_n, BLOCK_F=block_f, num_warps=4,
        )
    sums = partial.sum(1)
    return (
        g_x, g_v0, g_s0 if autapse else None, sums[0], sums[1], sums[2],
        sums[3] if autapse else None, sums[4] if hard_reset else None,
    )


# -- one forward for both back ends ------------------------------------------------------
def _forward(
    backend: str, x: torch.Tensor, v0: torch.Tensor, s0: torch.Tensor, k: torch.Tensor,
    theta: torch.Tensor, c: torch.Tensor, gamma: torch.Tensor | None, u: torch.Tensor | None,
    autapse: bool, hard_reset: bool, *, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Forward of either back end: spikes, v_T, s_T and what the backward needs (if ``save``)."""
    if backend == "triton":
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, v0.dtype), k.dtype)
        spikes, v_T, s_T, hs = _triton_forward(
            x, v0, s0, k, theta, c, gamma, u, autapse, hard_reset, save, out_dtype
        )
        return spikes, v_T, s_T, ((hs,) if save else ())
    with torch.no_grad():
        spikes, v_T, s_T, hs = _torch_forward(x, v0, s0, k, theta, c, gamma, u, autapse,
                                              hard_reset)
    return spikes, v_T, s_T, ((hs, spikes) if save else ())


# -- the autograd Function ---------------------------------------------------------------
class HIFISequence(torch.autograd.Function):
    """All T steps of a HIFI layer as one autograd node (forward and hand-written backward).

    ``apply(x_seq, v0, s0, k, theta, c, gamma, u, autapse, hard_reset, online, alpha,
    backend)`` with ``x_seq`` ``[T, N, F]``, ``v0``/``s0`` ``[N, F]`` and parameters ``[F]``
    (all contiguous for the Triton back end; ``gamma`` / ``u`` may be None when unused)
    returns ``(spikes [T, N, F], v_T [N, F], s_T [N, F])``. Gradients are returned for the
    tensor inputs that need them (none for ``v0``/``s0`` when ``online``). Prefer
    :func:`hifi_multistep`, which checks and reshapes the arguments.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_seq: torch.Tensor,
        v0: torch.Tensor,
        s0: torch.Tensor,
        k: torch.Tensor,
        theta: torch.Tensor,
        c: torch.Tensor,
        gamma: torch.Tensor | None,
        u: torch.Tensor | None,
        autapse: bool,
        hard_reset: bool,
        online: bool,
        alpha: float,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spikes, v_T, s_T, saved = _forward(
            backend, x_seq, v0, s0, k, theta, c, gamma, u, autapse, hard_reset, save=True
        )
        ctx.flags = (autapse, hard_reset, online, float(alpha), backend)
        ctx.save_for_backward(x_seq, v0, s0, k, theta, c, gamma, u, *saved)
        return spikes, v_T, s_T

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_spk: torch.Tensor | None, g_v: torch.Tensor | None, g_s: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        autapse, hard_reset, online, alpha, backend = ctx.flags
        x, v0, s0, k, theta, c, gamma, u, hs, *spikes = ctx.saved_tensors
        shape_state = v0.shape
        if backend == "triton":
            f32 = {"dtype": torch.float32, "device": x.device}
            g_spk = torch.zeros(x.shape, **f32) if g_spk is None else g_spk.contiguous()
            g_v = torch.zeros(shape_state, **f32) if g_v is None else g_v.contiguous()
            g_s = torch.zeros(shape_state, **f32) if g_s is None else g_s.contiguous()
            grads = _triton_backward(
                g_spk, g_v, g_s, x, hs, v0, s0, k, theta, c, gamma, u,
                autapse, hard_reset, online, alpha,
            )
        else:
            g_spk = torch.zeros_like(hs) if g_spk is None else g_spk
            grads = _torch_backward(
                g_spk, g_v, g_s, x, hs, spikes[0], v0, s0, k, theta, c, gamma, u,
                autapse, hard_reset, online, alpha,
            )
        g_x, g_v0, g_s0, g_k, g_th, g_c, g_g, g_u = grads
        need = ctx.needs_input_grad
        inputs = (x, v0, s0, k, theta, c, gamma, u)
        out: list[torch.Tensor | None] = []
        for i, (grad, inp) in enumerate(zip((g_x, g_v0, g_s0, g_k, g_th, g_c, g_g, g_u), inputs,
                                            strict=True)):
            if not need[i] or grad is None or (online and i in (1, 2)):
                out.append(None)
            else:
                out.append(grad.to(inp.dtype))
        return (*out, None, None, None, None, None)


def hifi_multistep(
    x_seq: torch.Tensor,
    v0: torch.Tensor | None,
    s0: torch.Tensor | None,
    k: torch.Tensor,
    theta: torch.Tensor,
    c: torch.Tensor,
    gamma: torch.Tensor | None,
    u: torch.Tensor | None,
    *,
    autapse: bool,
    hard_reset: bool,
    online: bool,
    alpha: float = 2.0,
    backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a HIFI layer over all T steps with the fused forward/backward.

    Parameters
    ----------
    x_seq
        Input ``[T, N, ..., F]``; the parameters broadcast over the last dimension.
    v0, s0
        Membrane and previous spike at the start, shaped like ``x_seq[0]`` (None: zeros).
    k, theta, c
        Mapped per-neuron parameters, shape ``[F]`` (or scalars): leak in (0, 1), threshold
        > 0, input gain.
    gamma
        Autapse strength ``[F]``; unused (may be None) when ``autapse`` is False.
    u
        Hard-reset potential ``[F]``; unused (may be None) when ``hard_reset`` is False.
    autapse, hard_reset, online
        Dynamics switches, as in :class:`scsnn.neurons.HIFINode`.
    alpha
        Width parameter of the ATan surrogate gradient.
    backend
        ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``) or ``"torch"`` (hand-fused
        torch ops, any device).

    Returns
    -------
    spikes, v, s
        Spikes ``[T, N, ..., F]`` and the final membrane and spike, shaped like ``x_seq[0]``.

    Raises
    ------
    ValueError
        For an unknown back end or mismatched shapes.
    RuntimeError
        For the Triton back end where it cannot run (no triton, or a CPU tensor without the
        interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if x_seq.dim() < 2:
        raise ValueError(f"x_seq must be [T, N, ..., F], got shape {tuple(x_seq.shape)}")
    if gamma is None and autapse:
        raise ValueError("autapse=True needs gamma")
    if u is None and hard_reset:
        raise ValueError("hard_reset=True needs u")
    if backend == "triton" and not fused_available(x_seq):
        raise RuntimeError(
            "the Triton HIFI kernel needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for "
            f"CPU tensors); got a {x_seq.device.type} tensor, triton "
            f"{'installed' if triton_available() else 'not installed'}"
        )
    shape = x_seq.shape
    T, F_ = shape[0], shape[-1]
    contiguous = backend == "triton"  # the torch back end reads strided (e.g. expanded) input
    x = x_seq.reshape(T, -1, F_)
    x = x.contiguous() if contiguous else x
    N = x.shape[1]
    state_shape = shape[1:]

    def state(st: torch.Tensor | None) -> torch.Tensor:
        if st is None:
            return torch.zeros((N, F_), dtype=x.dtype, device=x.device)
        if st.shape != state_shape:
            raise ValueError(f"state shape {tuple(st.shape)} != {tuple(state_shape)}")
        st = st.reshape(N, F_)
        return st.contiguous() if contiguous else st

    def param(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        if p.shape != (F_,):
            p = p.expand(F_)
        return p.contiguous() if contiguous else p

    args = (
        x, state(v0), state(s0), param(k), param(theta), param(c),
        param(gamma) if autapse else None, param(u) if hard_reset else None,
    )
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args):
        spikes, v, s = HIFISequence.apply(
            *args, bool(autapse), bool(hard_reset), bool(online), float(alpha), backend
        )
    else:  # inference: no autograd node, nothing saved
        spikes, v, s, _ = _forward(backend, *args, bool(autapse), bool(hard_reset), save=False)
    return spikes.reshape(shape), v.reshape(state_shape), s.reshape(state_shape)


# -- choice of implementation for HIFINode -----------------------------------------------
#: Values of ``HIFINode(kernel=...)``: ``"torch"`` is the plain autograd loop (the reference),
#: ``"torch-fused"`` the hand-fused torch back end, ``"triton"`` the Triton kernels and
#: ``"auto"`` Triton where :func:`fused_available`, the surrogate is ATan and the input is
#: float32/float16/bfloat16, else the loop.
KERNELS = ("auto", "torch", "torch-fused", "triton")


def check_kernel(kernel: str) -> str:
    """Validate a ``HIFINode`` kernel name.

    Parameters
    ----------
    kernel
        One of :data:`KERNELS`.

    Returns
    -------
    str
        The name, unchanged.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}' (choose from {', '.join(KERNELS)})")
    return kernel


def _is_atan(surrogate_function: Any) -> bool:
    from spikingjelly.activation_based import surrogate

    return type(surrogate_function) is surrogate.ATan and bool(surrogate_function.spiking)


def resolve_kernel(kernel: str, x: torch.Tensor, surrogate_function: Any) -> str | None:
    """The :func:`hifi_multistep` back end for a ``HIFINode`` call, or None for the loop.

    Parameters
    ----------
    kernel
        ``"auto"``, ``"torch"``, ``"torch-fused"`` or ``"triton"``.
    x
        The input sequence.
    surrogate_function
        The neuron's surrogate; the fused back ends implement SpikingJelly's ``ATan``
        (spiking mode, any ``alpha``).

    Returns
    -------
    str or None
        ``"triton"`` or ``"torch"`` (the hand-fused back end), or None: use the plain
        autograd loop.

    Raises
    ------
    ValueError
        For an unknown kernel name, or a fused kernel asked for with another surrogate.
    """
    check_kernel(kernel)
    if kernel == "torch":
        return None
    atan = _is_atan(surrogate_function)
    if kernel == "auto":  # the Triton kernel computes in float32: not for float64 input
        if not atan:
            return None
        return "triton" if x.dtype in _TRITON_DTYPES and fused_available(x) else "torch"
    if not atan:
        raise ValueError(
            f"kernel='{kernel}' implements the ATan surrogate only, got {surrogate_function!r}"
        )
    return "triton" if kernel == "triton" else "torch"
