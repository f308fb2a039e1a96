"""Forward+backward time and memory of one HIFI layer: the plain PyTorch loop against the fused
kernels (scsnn.kernels).

    python benchmarks/gpu_bench.py                       # CUDA: T in 4 8 16, N 4096, F 512 128
    python benchmarks/gpu_bench.py --cpu --threads 1     # CPU: loop vs hand-fused torch
                                                         # (T 4, N 512, F 512 128)

Implementations (``HIFINode(kernel=...)``): ``torch`` the plain autograd loop (the reference),
``torch-fused`` the hand-fused torch loop, ``triton`` the Triton kernels (CUDA with triton
only). Every configuration runs the same parameters and input through each implementation:
a warm-up, then the median of ``--repeats`` timed runs (CUDA-synchronised), the peak CUDA
memory above the inputs, and the bytes autograd keeps for the backward ("saved"). The spikes
of each implementation are compared with the loop's (``match``: the share of equal spikes).
Prints a table and a one-line summary; exits with a message on a machine without CUDA unless
``--cpu`` is given. Nothing is estimated; no files are written unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from spikingjelly.activation_based import functional

from scsnn.kernels import fused_available, triton_available
from scsnn.neurons import HIFINode


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> tuple[
        torch.Tensor, int]:
    """Run ``fn`` and count the storage bytes autograd saves for the backward."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(node: HIFINode, x: torch.Tensor, grad: torch.Tensor, warmup: int, repeats: int,
              device: torch.device) -> dict[str, float]:
    """Median fwd+bwd and fwd-only milliseconds, peak CUDA MiB and saved MiB of one layer."""
    params = list(node.parameters())

    def step() -> torch.Tensor:
        functional.reset_net(node)
        x.grad = None
        for p in params:
            p.grad = None
        out = node(x)
        out.backward(grad)
        return out

    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    fwd_times = []
    with torch.no_grad():
        for _ in range(max(3, repeats // 2)):
            functional.reset_net(node)
            sync(device)
            t0 = time.perf_counter()
            node(x)
            sync(device)
            fwd_times.append(time.perf_counter() - t0)
    functional.reset_net(node)
    _, saved = saved_bytes(lambda: node(x), [x, *params])
    peak = float("nan")
    if device.type == "cuda":
        functional.reset_net(node)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    functional.reset_net(node)
    return {
        "fwd_bwd_ms": statistics.median(times) * 1e3,
        "fwd_ms": statistics.median(fwd_times) * 1e3,
        "peak_mib": peak,
        "saved_mib": saved / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="benchmark on the CPU (loop vs torch-fused)")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="time steps (4 8 16; CPU: 4)")
    ap.add_argument("--N", type=int, default=None, help="batch (4096; CPU: 512)")
    ap.add_argument("--F", type=int, nargs="+", default=[512, 128], help="neurons per layer")
    ap.add_argument("--kernels", nargs="+", default=None,
                    help="implementations (CUDA: torch torch-fused triton; CPU: torch torch-fused)")
    ap.add_argument("--hard-reset", action="store_true")
    ap.add_argument("--online", action="store_true")
    ap.add_argument("--no-autapse", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu:
        device = torch.device("cpu")
        Ts, N = args.T or [4], args.N or 512
        names = args.kernels or ["torch", "torch-fused"]
        where = f"CPU, {torch.get_num_threads()} thread(s)"
    else:
        if not torch.cuda.is_available():
            print(f"gpu_bench: no CUDA device (torch {torch.__version__}, CUDA build "
                  f"{torch.version.cuda}): nothing to benchmark; use --cpu for the CPU "
                  "comparison", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        Ts, N = args.T or [4, 8, 16], args.N or 4096
        names = args.kernels or ["torch", "torch-fused", "triton"]
        if "triton" in names and not triton_available():
            print("gpu_bench: triton is not installed: the Triton kernel is left out")
            names = [n for n in names if n != "triton"]
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    if "torch" not in names:
        names = ["torch", *names]
    kw = {"hard_reset": args.hard_reset, "online": args.online, "autapse": not args.no_autapse}
    print(f"HIFI layer fwd+bwd on {where}; N={N}, "
          + ", ".join(f"{k}={v}" for k, v in kw.items()) + f"; median of {args.repeats}")
    header = (f"{'T':>3} {'F':>5} {'kernel':<12} {'fwd+bwd ms':>11} {'fwd ms':>8} "
              f"{'speedup':>8} {'peak MiB':>9} {'saved MiB':>10} {'match':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for F_ in args.F:
        for T in Ts:
            g = torch.Generator().manual_seed(args.seed)
            ref = HIFINode(F_, init_spread=0.3, generator=g, kernel="torch", **kw).to(device)
            x = (torch.rand(T, N, F_, generator=g) * 2.0 - 0.3).to(device).requires_grad_(True)
            grad = torch.randn(T, N, F_, generator=g).to(device)
            with torch.no_grad():
                spikes_ref = ref(x)
            base_ms = None
            for name in names:
                node = HIFINode(F_, kernel=name, **kw).to(device)
                node.load_state_dict(ref.state_dict())
                if name == "triton" and not fused_available(x):
                    continue
                with torch.no_grad():
                    functional.reset_net(node)
                    match = float((node(x) == spikes_ref).float().mean())
                r = bench_one(node, x, grad, args.warmup, args.repeats, device)
                base_ms = r["fwd_bwd_ms"] if name == "torch" else base_ms
                r.update(T=T, F=F_, N=N, kernel=name, match=match,
                         speedup=base_ms / r["fwd_bwd_ms"])
                rows.append(r)
                print(f"{T:>3} {F_:>5} {name:<12} {r['fwd_bwd_ms']:>11.3f} {r['fwd_ms']:>8.3f} "
                      f"{r['speedup']:>7.2f}x {r['peak_mib']:>9.1f} {r['saved_mib']:>10.1f} "
                      f"{match:>7.4f}")
            del x, grad, ref
            if device.type == "cuda":
                torch.cuda.empty_cache()
    parts = []
    for name in names[1:]:
        sp = [r["speedup"] for r in rows if r["kernel"] == name]
        if not sp:
            continue
        mem = [r["saved_mib"] / base["saved_mib"] for r in rows if r["kernel"] == name
               for base in rows if base["kernel"] == "torch" and base["T"] == r["T"]
               and base["F"] == r["F"] and base["saved_mib"] > 0]
        worst = min(r["match"] for r in rows if r["kernel"] == name)
        parts.append(f"{name} {statistics.median(sp):.2f}x median (min {min(sp):.2f}x, max "
                     f"{max(sp):.2f}x), saved memory x{statistics.median(mem):.2f}, "
                     f"spike match >= {worst:.4f}")
    print(f"summary ({where}): fwd+bwd speedup over the torch loop: " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": where, "N": N, **kw, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
