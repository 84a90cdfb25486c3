"""Data parallelism's orchestration: the same settings on every process, rank 0's file work handed to all, and
the wrapping of network and solver in ``DistributedDataParallel`` (the scheme: :mod:`knnsolver.training.trainer`)."""
from __future__ import annotations

import inspect
import pickle
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from knnsolver import distributed
from knnsolver.data import DataBundle, data_fingerprint
from knnsolver.errors import ConfigError
from knnsolver.training.config import TrainConfig

# Not broadcasting a module's buffers at each forward: ``forward_sync_buffers`` from torch 2.13 on.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                    else {"broadcast_buffers": False})


def data_parallel(model: nn.Module, solver: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``model`` and ``solver`` wrapped in ``DistributedDataParallel`` when distributed (the solver only if it
    has trainable parameters, and without broadcasting its buffers, which the solvers keep equal on every
    process themselves, the RBF bank included); as they are otherwise."""
    if not distributed.is_distributed():
        return model, solver
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    model = DistributedDataParallel(model, device_ids=ids)
    if any(p.requires_grad for p in solver.parameters()):
        solver = DistributedDataParallel(solver, device_ids=ids, **_NO_BUFFER_SYNC)
    return model, solver


def check_same_config(config: TrainConfig) -> None:
    """Refuse, on every process, a launch whose processes were given different settings
    (the data folder and run folder may differ between machines)."""
    if not distributed.is_distributed():
        return
    own = {**config.to_dict(), "progress": None, "data_dir": None, "out": None}
    differs = distributed.broadcast_object(own) != own
    if distributed.all_reduce_sum(torch.tensor([float(differs)], device=config.torch_device)).item():
        raise ConfigError("the processes were launched with different settings; give every process the same flags")


def check_same_data(data: DataBundle, device: torch.device) -> None:
    """Refuse, on every process, a launch whose processes loaded different data (their portable
    :func:`~knnsolver.data.data_fingerprint`: the folders may differ between machines, the data not). A process
    that cannot fingerprint its data raises after the collectives, so the others do not wait for it."""
    if not distributed.is_distributed():
        return
    own, failure = None, None
    try:
        own = data_fingerprint(data, portable=True)
    except Exception as err:  # re-raised below, once every process has taken part
        failure = err
    main = distributed.broadcast_object(own)
    differs = own is None or main != own
    bad = distributed.all_reduce_sum(torch.tensor([float(differs)], device=device)).item()
    if failure is not None:
        raise failure
    if bad:
        if main is None:
            raise ConfigError("rank 0 could not read its data (its error ends the run there)")
        rows = lambda fp: ", ".join(f"{k} {fp.get(k)}" for k in ("train", "val", "test"))  # noqa: E731
        here = f"; this process (rank {distributed.rank()}) has rows {rows(own)}, hash {own.get('hash')}" if differs else ""
        raise ConfigError(f"the processes loaded different data: rank 0 has rows {rows(main)}, hash {main.get('hash')}"
                          f"{here}; give every process the same data (its --data-dir may differ, its content not)")


def on_main(work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and hand its result, or the error it raised, to every process.

    So a failure on rank 0 (a refused run folder, a full disk) stops every
    process at once instead of leaving them waiting in the next collective.
    """
    if not distributed.is_distributed():
        return work()
    result: tuple[str, Any] = ("ok", None)
    failure: Exception | None = None
    if distributed.is_main():
        try:
            result = ("ok", work())
        except Exception as err:  # re-raised on every process below
            failure = err
            result = ("error", err if _picklable(err) else RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}"))
    status, value = distributed.broadcast_object(result)
    if failure is not None:
        raise failure
    if status == "error":
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True
