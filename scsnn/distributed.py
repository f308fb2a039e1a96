"""Data-parallel training across processes with PyTorch distributed (launched by torchrun).

``torchrun --nproc-per-node N -m scsnn train ...`` starts N processes (ranks). Every rank
loads the same reference and builds the same split, gene space and initial network (all
deterministic given the seed); each epoch's draw of cells is made identically on every rank,
and each rank takes an interleaved shard of every mini-batch, so the global batch is the
single-process batch. After each backward pass the gradients of the parameters being stepped
(and the batch-norm running statistics) are averaged across ranks in one all-reduce, weighted
by each rank's share of the batch, so every rank takes the same optimiser step and all ranks
keep bit-identical weights. Without torchrun's environment nothing here does anything.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError

logger = logging.getLogger("scsnn")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: from the process group, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def is_main_process() -> bool:
    """True on rank 0 (and in every single-process run): the rank that logs and saves."""
    return rank() == 0


def backend() -> str | None:
    """Backend of the process group (``nccl`` or ``gloo``), None without one."""
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return None


def group_rank_size() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group, ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device means this process's own GPU, ``cuda:LOCAL_RANK``."""
    if not launched() or device.type != "cuda":
        return device
    local = _env_int("LOCAL_RANK", 0)
    n_gpus = torch.cuda.device_count()
    if local >= n_gpus:
        raise InputError(
            f"process {local} on this node has no GPU of its own: {n_gpus} visible "
            f"(start at most {n_gpus} processes per node)"
        )
    if device.index is not None and device.index != local:
        logger.info("device %s replaced by cuda:%d, the GPU of local rank %d", device, local,
                    local)
    return torch.device("cuda", local)


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment.

    Does nothing in a single-process run, or when a process group already exists (only the
    device is mapped to the local GPU then). The backend is NCCL on CUDA, gloo on the CPU.

    Parameters
    ----------
    device
        The device asked for (``cpu`` or ``cuda``).

    Returns
    -------
    The device this rank computes on (``cuda:LOCAL_RANK`` for CUDA under torchrun).
    """
    if not launched():
        return device
    if not dist.is_available():
        raise InputError("torch.distributed is not available in this PyTorch build; "
                         "train without torchrun")
    dev = local_device(device)
    if dist.is_initialized():
        return dev
    if dev.type == "cuda":
        if not dist.is_nccl_available():
            raise InputError("multi-GPU training needs NCCL, which this PyTorch build lacks")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    logger.info("distributed training: %d processes, backend %s; rank %d on %s",
                dist.get_world_size(), backend, dist.get_rank(), dev)
    return dev


def cleanup() -> None:
    """Leave and destroy the process group, when there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Run a block inside torchrun's process group; yields this rank's device.

    A group created here stays up for later blocks of the same process and is destroyed
    when the process exits: destroying it and creating it again in the same processes
    races on the keys the first group left in torchrun's rendezvous store (a rank can pass
    the second group's start-up barrier early and hang in its first collective).
    """
    created = launched() and dist.is_available() and not dist.is_initialized()
    dev = init_from_env(device)
    if created:
        atexit.register(cleanup)
    yield dev


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place across ranks (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


# -- sharding --------------------------------------------------------------------------------
def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s own random streams (dropout, spike encoders).

    Rank 0 keeps ``seed`` (a single-process run is rank 0); the other ranks get other seeds so
    that their cells do not all share one dropout mask.
    """
    return int(seed) + 1_000_003 * int(rank)


def shard(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s interleaved share of a mini-batch: ``rows[rank::world]``.

    The shards of all ranks are disjoint, their union is ``rows``, and their sizes differ by
    at most one.
    """
    return rows[rank::world]


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[lo, hi)``: rank ``rank``'s contiguous block of ``n`` rows (blocks of ``ceil(n/world)``,
    the last ones shorter or empty)."""
    per = -(-n // world)
    lo = min(n, rank * per)
    return lo, min(n, lo + per)


def gather_blocks(local: np.ndarray, n: int, device: torch.device) -> np.ndarray:
    """Concatenate every rank's :func:`block` of a ``[rows, C]`` array; every rank gets it all.

    All ranks receive the same bytes, so decisions taken on the result (early stopping)
    agree across ranks.
    """
    if not is_distributed():
        return local
    world = dist.get_world_size()
    per = -(-n // world)
    padded = np.zeros((per, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    t = torch.from_numpy(padded).to(device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.cat(out).cpu().numpy()[:n]


# -- gradient averaging ----------------------------------------------------------------------
def all_reduce_step(
    params: Sequence[nn.Parameter],
    buffers: Sequence[torch.Tensor],
    loss: float,
    share: float,
) -> float:
    """Weighted sum across ranks of gradients, buffers and the loss, in one all-reduce per dtype.

    Each rank contributes ``share`` times its values; with ``share`` its fraction of the global
    batch (the shares of all ranks sum to 1) the summed gradient is that of the mean loss over
    the global batch. Missing gradients count as zeros (a rank with no cells in a batch).

    Parameters
    ----------
    params
        Parameters the optimiser is about to step (same order on every rank).
    buffers
        Floating buffers to average in place (batch-norm running statistics).
    loss
        This rank's loss on its shard.
    share
        This rank's weight in the global batch.

    Returns
    -------
    The loss of the global batch (the same on every rank).
    """
    if not is_distributed():
        return loss
    tensors: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tensors.append(p.grad)
    tensors.extend(buffers)
    ref = tensors[0] if tensors else torch.zeros((), dtype=torch.float64)
    # the loss rides in the first tensor's bucket: one collective per step in the usual case
    loss_t = torch.tensor([loss], dtype=ref.dtype, device=ref.device)
    tensors.append(loss_t)
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault(t.dtype, []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        flat.mul_(share)
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return float(loss_t.item())


# -- consistency -----------------------------------------------------------------------------
def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names and bytes of every tensor, in name order)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def all_digests(digest: str) -> list[str]:
    """Every rank's hex sha256 digest, in rank order (just ``[digest]`` in one process)."""
    if not is_distributed():
        return [digest]
    dev = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [bytes(o.cpu().tolist()).hex() for o in out]


def check_same(digest: str, what: str) -> None:
    """Stop with an error when the ranks disagree on ``what`` (given as a digest)."""
    digests = all_digests(digest)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"ranks {bad} differ from rank 0 in {what}; every rank must read "
                           "the same reference with the same settings")
