"""scsnn.kernels: the fused multi-step HIFI neuron against the plain PyTorch loop.

Three tiers of parity tests (spikes, final states and the gradients of the input, the raw
neuron parameters and the initial states, for every autapse / hard_reset / online
combination):

* the hand-fused torch back end (``kernel="torch-fused"``), always;
* the Triton kernels through Triton's interpreter on the CPU, in a subprocess with
  ``TRITON_INTERPRET=1`` (skipped when triton is not installed);
* the Triton kernels on CUDA (``-m gpu``; skipped without CUDA or triton).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spikingjelly.activation_based import functional, surrogate

from scsnn import kernels
from scsnn.kernels import KERNELS, fused_available, hifi_multistep, resolve_kernel
from scsnn.neurons import HIFINode

COMBOS = list(itertools.product([False, True], repeat=3))  # autapse, hard_reset, online
COMBO_IDS = [
    f"{'aut' if a else 'noaut'}-{'hard' if h else 'soft'}-{'online' if o else 'bptt'}"
    for a, h, o in COMBOS
]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]


# -- the parity check (also run by the interpreter subprocess) ---------------------------
def _nodes(F_: int, seed: int, kernel: str, device: str, **kw) -> tuple[HIFINode, HIFINode]:
    """Reference (plain loop) and test node with identical, heterogeneous parameters."""
    g = torch.Generator().manual_seed(seed)
    ref = HIFINode(F_, init_spread=0.5, generator=g, kernel="torch", **kw)
    if ref.u is not None:
        with torch.no_grad():
            ref.u.copy_(torch.randn(F_, generator=g) * 0.2)
    test = HIFINode(F_, kernel=kernel, **kw)
    test.load_state_dict(ref.state_dict())
    return ref.to(device), test.to(device)


def _min_margin(node: HIFINode, x: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> float:
    """Smallest |h - theta| over all steps and elements: distance to a spike/no-spike tie."""
    with torch.no_grad():
        k, theta, c, gamma = node.k, node.theta, node.c, node.gamma
        margin = float("inf")
        for t in range(x.shape[0]):
            drive = x[t] - gamma * s if node.autapse else x[t]
            h = torch.nn.functional.leaky_relu((1 - k) * v + c * drive, 0.1)
            margin = min(margin, float((h - theta).abs().min()))
            s = (h >= theta).to(h)
            v = h * (1 - s) + node.u * s if node.hard_reset else h - theta * s
    return margin


def _case(node: HIFINode, T: int, N: int, F_: int, seed: int, device: str, margin: float):
    """Input, initial states and output weights, away from exact threshold ties."""
    for trial in range(100):
        g = torch.Generator().manual_seed(1000 * seed + trial)
        x = torch.rand(T, N, F_, generator=g) * 2.0 - 0.3  # a good share fires
        v0 = torch.rand(N, F_, generator=g) * 0.6 - 0.1
        s0 = (torch.rand(N, F_, generator=g) < 0.4).float()
        w = [torch.randn(T, N, F_, generator=g), torch.randn(N, F_, generator=g),
             torch.randn(N, F_, generator=g)]
        x, v0, s0 = x.to(device), v0.to(device), s0.to(device)
        if _min_margin(node, x, v0, s0) > margin:
            return x, v0, s0, [t.to(device) for t in w]
    raise AssertionError("no input away from threshold ties")  # pragma: no cover


def _run(node: HIFINode, x, v0, s0, w) -> dict[str, torch.Tensor | None]:
    """Forward + backward through spikes and the final (v, s) states; values and grads."""
    functional.reset_net(node)
    x = x.clone().requires_grad_(True)
    v0 = v0.clone().requires_grad_(True)
    s0 = s0.clone().requires_grad_(True)
    node.v, node.s = v0, s0  # carried states: their gradients are checked too
    node.zero_grad(set_to_none=True)
    spikes = node(x)
    v, s = node.v, node.s
    loss = (spikes * w[0]).sum() + (v * w[1]).sum() + (s * w[2]).sum()
    loss.backward()
    out = {"spikes": spikes.detach(), "v": v.detach(), "s": s.detach(), "x.grad": x.grad,
           "v0.grad": v0.grad, "s0.grad": s0.grad}
    for name in ("a_k", "a_theta", "a_c", "a_gamma", "u"):
        p = getattr(node, name)
        out[f"{name}.grad"] = None if p is None else p.grad
    return out


def _zero_or_none(t: torch.Tensor | None) -> bool:
    return t is None or not bool(t.abs().max() > 0)


def parity(kernel: str, device: str, autapse: bool, hard_reset: bool, online: bool, *,
           T: int = 5, N: int = 6, F_: int = 20, seed: int = 0, margin: float = 1e-4) -> None:
    """Assert that ``kernel`` matches the plain loop (values exactly, gradients to ~1e-5)."""
    kw = {"autapse": autapse, "hard_reset": hard_reset, "online": online}
    ref_node, test_node = _nodes(F_, seed, kernel, device, **kw)
    x, v0, s0, w = _case(ref_node, T, N, F_, seed, device, margin)
    ref, got = _run(ref_node, x, v0, s0, w), _run(test_node, x, v0, s0, w)
    rate = float(ref["spikes"].mean())
    assert 0.1 < rate < 0.9, f"firing rate {rate:.2f}: the case does not exercise both branches"
    for name in ("spikes", "s"):
        assert torch.equal(got[name], ref[name]), name
    torch.testing.assert_close(got["v"], ref["v"], rtol=1e-5, atol=1e-5)
    for name, r in ref.items():
        if not name.endswith(".grad"):
            continue
        g = got[name]
        if _zero_or_none(r):
            assert _zero_or_none(g), f"{name}: expected no gradient"
            continue
        assert g is not None, f"{name}: gradient missing"
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * scale, msg=name)
    if online:  # online: no gradient through the carried states
        assert _zero_or_none(got["v0.grad"]) and _zero_or_none(got["s0.grad"])
    else:
        assert not _zero_or_none(got["v0.grad"])


# -- tier (c): the hand-fused torch back end, always -------------------------------------
@pytest.mark.parametrize(("autapse", "hard_reset", "online"), COMBOS, ids=COMBO_IDS)
def test_torch_fused_parity(autapse, hard_reset, online):
    parity("torch-fused", "cpu", autapse, hard_reset, online)


def test_torch_fused_float64_matches_to_rounding():
    """In double precision the hand-written backward equals autograd's to ~1e-15."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for autapse, hard_reset, online in COMBOS:
            kw = {"autapse": autapse, "hard_reset": hard_reset, "online": online}
            ref_node, node = _nodes(30, 0, "torch-fused", "cpu", **kw)
            x, v0, s0, w = _case(ref_node, 6, 7, 30, 0, "cpu", 1e-4)
            ref, got = _run(ref_node, x, v0, s0, w), _run(node, x, v0, s0, w)
            assert got["spikes"].dtype == torch.float64
            for name, r in ref.items():
                if _zero_or_none(r):
                    assert _zero_or_none(got[name]), name
                else:
                    torch.testing.assert_close(got[name], r, rtol=1e-12, atol=1e-12, msg=name)
    finally:
        torch.set_default_dtype(default)


def test_torch_fused_parity_larger_and_4d_input():
    parity("torch-fused", "cpu", True, False, False, T=8, N=33, F_=70, seed=3)
    # extra middle dimensions: parameters broadcast over the last one
    x = torch.rand(4, 3, 5, 16) * 2.0
    ref, fused = _nodes(16, 1, "torch-fused", "cpu")
    assert torch.equal(ref(x), fused(x))
    assert ref.v.shape == fused.v.shape == (3, 5, 16)
    assert torch.equal(ref.v, fused.v)


def test_torch_fused_expanded_input_and_inference():
    """The constant encoder feeds an expanded [T, N, F] view: no copy needed, same grads."""
    ref, fused = _nodes(32, 2, "torch-fused", "cpu")
    base = (torch.rand(7, 32) * 2.0).requires_grad_(True)
    base2 = base.detach().clone().requires_grad_(True)
    s_ref = ref(base.unsqueeze(0).expand(4, 7, 32))
    s_fus = fused(base2.unsqueeze(0).expand(4, 7, 32))
    assert torch.equal(s_ref, s_fus)
    s_ref.sum().backward()
    s_fus.sum().backward()
    torch.testing.assert_close(base2.grad, base.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: no autograd node
        functional.reset_net(ref)
        functional.reset_net(fused)
        x = torch.rand(4, 7, 32) * 2.0
        out = fused(x)
        assert out.grad_fn is None and torch.equal(out, ref(x))


def test_torch_fused_reset_net_and_stateful_calls():
    ref, fused = _nodes(16, 4, "torch-fused", "cpu")
    x = torch.rand(6, 4, 16) * 1.5
    first = fused(x)
    second = fused(x)  # continues from the stored state
    assert torch.equal(first, ref(x)) and torch.equal(second, ref(x))
    assert torch.equal(fused.v, ref.v) and torch.equal(fused.s, ref.s)
    functional.reset_net(fused)
    assert fused.v == 0.0 and fused.s == 0.0
    assert torch.equal(fused(x), first)


# -- dispatch ----------------------------------------------------------------------------
def test_auto_on_cpu_is_the_hand_fused_loop(monkeypatch):
    """auto on the CPU: the hand-fused back end, whose forward is bit-equal to the plain
    loop's and whose gradients equal autograd's up to float rounding."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.rand(6, 5, 24) * 2.0
    assert not fused_available(x)
    assert resolve_kernel("auto", x, surrogate.ATan()) == "torch"
    for autapse, hard_reset, online in COMBOS:
        kw = {"autapse": autapse, "hard_reset": hard_reset, "online": online}
        ref_node, auto_node = _nodes(24, 5, "auto", "cpu", **kw)
        assert auto_node.kernel == "auto"
        xx, v0, s0, w = _case(ref_node, 6, 5, 24, 5, "cpu", 0.0)
        ref, got = _run(ref_node, xx, v0, s0, w), _run(auto_node, xx, v0, s0, w)
        for name, r in ref.items():
            g = got[name]
            assert (r is None) == (g is None), name
            if r is None:
                continue
            if name in ("spikes", "v", "s"):  # values: bit-identical
                assert torch.equal(r, g), name
            else:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_kernel_names():
    assert KERNELS == ("auto", "torch", "torch-fused", "triton")
    assert HIFINode(4).kernel == "auto"
    with pytest.raises(ValueError, match="unknown kernel 'cuda'"):
        HIFINode(4, kernel="cuda")
    x = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        hifi_multistep(x, None, None, *torch.ones(4, 4), None, autapse=True, hard_reset=False,
                       online=False, backend="cuda")
    # another surrogate: auto keeps the plain loop, an explicit fused kernel refuses
    assert resolve_kernel("auto", x, surrogate.Sigmoid()) is None
    assert resolve_kernel("torch-fused", x, surrogate.ATan(alpha=4.0)) == "torch"
    node = HIFINode(4, kernel="torch-fused", surrogate_function=surrogate.Sigmoid())
    with pytest.raises(ValueError, match="ATan surrogate only"):
        node(x)


def test_triton_kernel_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    node = HIFINode(4, kernel="triton")
    with pytest.raises(RuntimeError, match="Triton HIFI kernel needs triton and a CUDA tensor"):
        node(torch.rand(3, 2, 4))


def test_torch_fused_alpha_follows_the_surrogate():
    sg = surrogate.ATan(alpha=4.0)
    ref = HIFINode(16, generator=torch.Generator().manual_seed(0), kernel="torch",
                   surrogate_function=sg)
    fused = HIFINode(16, kernel="torch-fused", surrogate_function=surrogate.ATan(alpha=4.0))
    fused.load_state_dict(ref.state_dict())
    x = torch.rand(5, 3, 16) * 2.0
    ref(x).sum().backward()
    fused(x).sum().backward()
    torch.testing.assert_close(fused.a_theta.grad, ref.a_theta.grad, rtol=1e-5, atol=1e-5)


def test_module_works_without_triton():
    """With triton unimportable (as in CI), scsnn imports, the torch paths run and the Triton
    kernel is refused with a clear message; scsnn itself never imports triton for CPU work."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('triton blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from scsnn import kernels\n"
        "from scsnn.neurons import HIFINode\n"
        "x = torch.rand(3, 2, 4)\n"
        "assert not kernels.triton_available() and not kernels.fused_available(x)\n"
        "HIFINode(4, kernel='torch-fused')(x).sum().backward()\n"
        "HIFINode(4)(x).sum().backward()\n"
        "try:\n"
        "    HIFINode(4, kernel='triton')(x)\n"
        "    raise SystemExit('the Triton kernel ran without triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton not installed' in str(e), e\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, (r.stdout + r.stderr)[-3000:]


# -- tier (b): the Triton kernels through the interpreter, on the CPU --------------------
def _interpreter_main() -> None:
    """Run by the subprocess with TRITON_INTERPRET=1: every combination, small shapes."""
    torch.set_num_threads(1)
    if not kernels.triton_available():
        print("triton does not import")
        sys.exit(77)
    assert kernels.interpreter_enabled() and fused_available(torch.zeros(1))
    for autapse, hard_reset, online in COMBOS:
        parity("triton", "cpu", autapse, hard_reset, online, T=4, N=5, F_=12)
    # several tiles along both N and F (partial parameter sums over N reduced on the host)
    parity("triton", "cpu", True, True, False, T=3, N=20, F_=200, seed=1)
    # auto picks Triton where it is available, with the same values
    x = torch.rand(4, 3, 16) * 2.0
    assert resolve_kernel("auto", x, surrogate.ATan()) == "triton"
    ref, auto = _nodes(16, 2, "auto", "cpu")
    assert torch.equal(ref(x), auto(x))
    print("interpreter parity ok")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter_parity():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__, "--interpreter"], check=False, env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 77:
        pytest.skip("triton is installed but does not import")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "interpreter parity ok" in r.stdout


# -- tier (a): the Triton kernels on CUDA ------------------------------------------------
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON),
                               reason="needs a CUDA device and triton")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("autapse", "hard_reset", "online"), COMBOS, ids=COMBO_IDS)
# F and N * F not multiples of 16 in both shapes: one Triton specialisation, compiled once
@pytest.mark.parametrize("shape", [(5, 6, 100), (8, 37, 300)], ids=["small", "tiles"])
def test_triton_cuda_parity(autapse, hard_reset, online, shape):
    T, N, F_ = shape
    parity("triton", "cuda", autapse, hard_reset, online, T=T, N=N, F_=F_, margin=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_triton_cuda_auto_dispatch_and_torch_fused():
    x = torch.rand(4, 64, 128, device="cuda") * 2.0
    assert fused_available(x)
    assert resolve_kernel("auto", x, surrogate.ATan()) == "triton"
    ref, auto = _nodes(128, 0, "auto", "cuda")
    triton_node = HIFINode(128, kernel="triton").cuda()
    triton_node.load_state_dict(auto.state_dict())
    s_auto, s_triton = auto(x), triton_node(x)
    assert torch.equal(s_auto, s_triton)
    assert float((s_auto != ref(x)).float().mean()) < 1e-3  # ties aside, the same spikes
    parity("torch-fused", "cuda", True, False, False, T=4, N=16, F_=64, margin=1e-5)
    # half-precision input (autocast-style): computed in float32, promoted like the loop
    xh = x.half()
    functional.reset_net(ref)
    functional.reset_net(auto)
    ref_half, out = ref(xh), auto(xh)
    assert out.dtype == ref_half.dtype == torch.float32
    assert float((out != ref_half).float().mean()) < 1e-3
    out.sum().backward()
    assert auto.a_k.grad is not None and torch.isfinite(auto.a_k.grad).all()


if __name__ == "__main__":
    if "--interpreter" in sys.argv:
        _interpreter_main()
