"""Thin helpers over ``torch.distributed`` for data-parallel training on several processes.

Every helper is the identity (or a no-op) when no process group is running, so
solvers and the trainer call them unconditionally and single-process code paths
stay exactly as they were. Launch a distributed run with ``torchrun``, e.g.
``torchrun --nproc-per-node 2 --no-python knnsolver train ...``; the trainer
then starts the process group from torchrun's environment variables
(:func:`init_from_env`), or uses one the caller started already.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from knnsolver.errors import ConfigError


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, the process that writes files and shows progress (true when not distributed)."""
    return rank() == 0


def launch_rank() -> int:
    """This process's rank as set by a multi-process launch (torchrun's ``RANK`` with
    ``WORLD_SIZE`` > 1), else 0; valid before the process group starts and after it ends."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_from_env(device: str) -> bool:
    """Start the default process group from torchrun's variables if ``WORLD_SIZE`` > 1.

    Uses ``nccl`` for a CUDA ``device`` (each process takes GPU ``LOCAL_RANK``, so
    the device must be plain ``cuda``), ``gloo`` otherwise. The timeout (2 hours)
    bounds how long the other processes wait while rank 0 validates or tests
    alone. Returns whether this call started the group (the caller then ends it
    with ``dist.destroy_process_group``); ``False`` if one runs already or the run
    is single-process.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support; run one process")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with torchrun "
            "(torchrun --nproc-per-node N --no-python knnsolver train ...)"
        )
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        if dev.index is not None:
            raise ConfigError(f"device {device!r} names one GPU; under torchrun use --device cuda, "
                              "and each process takes the GPU of its LOCAL_RANK")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # On GPUs NCCL carries the CUDA tensors and gloo any CPU tensor (small checks, object broadcasts).
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return True


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new tensor; ``tensor`` itself when alone)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order.

    The first dimension may differ between processes (each is padded to the
    largest for the collective and trimmed after); the other dimensions, dtype
    and device must agree. No gradient flows through the result.
    """
    if not is_distributed():
        return tensor
    size = world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    counts_list = [int(c) for c in counts]
    longest = max(counts_list)
    padded = tensor.detach().new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts_list)])


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled; for small state, checks and summaries)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) into every process's ``module``."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def shard(n: int) -> range:
    """This process's contiguous share of ``range(n)`` (the first ``n % size`` ranks get one more)."""
    size, r = world_size(), rank()
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))
