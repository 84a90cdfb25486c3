"""Process bodies for tests/test_distributed.py (importable by spawned children).

Each worker joins a gloo process group through torchrun's environment variables,
does its part, and saves what the parent test checks to ``<folder>/rank<r>.pt``.
"""
from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from knnsolver import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, folder: str, body: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = body(*args)
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def spawn(body: Callable, folder: Path, *args: Any, size: int = 2) -> list[Any]:
    """Run ``body(*args)`` in ``size`` processes of one group; return each rank's result.

    The port is free when chosen but another process may take it before the group
    binds it, so a start that fails with the address in use is tried once more.
    """
    try:
        mp.spawn(_entry, args=(size, free_port(), str(folder), body, args), nprocs=size)
    except mp.ProcessRaisedException as err:
        if "address already in use" not in str(err).lower() and "EADDRINUSE" not in str(err):
            raise
        mp.spawn(_entry, args=(size, free_port(), str(folder), body, args), nprocs=size)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(size)]


def _with_group(work: Callable[[], Any]) -> Any:
    started = distributed.init_from_env("cpu")
    try:
        return work()
    finally:
        if started:
            gc.collect()  # DDP wrappers in reference cycles hold the group: free them first (as train() does)
            torch.distributed.destroy_process_group()


def gather_and_shard(n: int) -> dict[str, Any]:
    """Each rank contributes ``rank + 1`` rows; also report the rank's shard of ``range(n)``."""
    def work():
        r = distributed.rank()
        mine = torch.full((r + 1, 3), float(r))
        return {"rank": r, "size": distributed.world_size(), "gathered": distributed.all_gather_rows(mine),
                "shard": list(distributed.shard(n)), "sum": distributed.all_reduce_sum(torch.tensor([r + 1.0])),
                "broadcast": distributed.broadcast_object(f"from {r}")}
    return _with_group(work)


def bank_graph(points: torch.Tensor, k: int) -> torch.Tensor:
    """The neighbour lists of an ``EmbeddingBank`` refreshed under the group (sharded graph)."""
    from knnsolver.bank import EmbeddingBank

    def work():
        bank = EmbeddingBank(points.shape[0], points.shape[1], k)
        bank.refresh(points, torch.zeros(points.shape[0], dtype=torch.long))
        return bank.neighbours
    return _with_group(work)


def one_step(make: Callable[[], tuple[torch.nn.Module, torch.nn.Module]], x: torch.Tensor, y: torch.Tensor,
             rows: torch.Tensor, fill: Callable[[torch.nn.Module, torch.nn.Module], None]) -> dict[str, Any]:
    """One SGD step of ``loss_step`` on this rank's half of the batch; return the states after it."""
    from types import SimpleNamespace

    from knnsolver.training.loop import loss_step

    def work():
        model, solver = make()
        fill(model, solver)
        run = SimpleNamespace(model=model, solver=solver, device=torch.device("cpu"),
                              config=SimpleNamespace(compile=False, precision="fp32"))
        step = loss_step(run)
        part = torch.arange(len(y)).chunk(distributed.world_size())[distributed.rank()]
        opt = torch.optim.SGD([*model.parameters(), *solver.parameters()], lr=0.5)
        loss, _ = step(x[part], y[part], rows[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"model": model.state_dict(), "solver": solver.state_dict()}
    return _with_group(work)


def small_net() -> torch.nn.Module:
    """A digits (1 x 8 x 8) network with BatchNorm, so DDP's buffer broadcast is exercised."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 16))


def train_run(config: dict[str, Any], resume: bool = False, overwrite: bool = False,
              per_rank: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``knnsolver.training.train`` of :func:`small_net` under the group (``per_rank``:
    settings that differ on some ranks): the summary and the network's final
    weights, or the error the call raised."""
    from knnsolver.errors import KnnSolverError
    from knnsolver.training import TrainConfig, train

    model = small_net()
    config = {**config, **(per_rank or {}).get(distributed.launch_rank(), {})}
    try:
        summary = train(TrainConfig(**config), resume=resume, overwrite=overwrite, model=model)
    except KnnSolverError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"summary": summary, "model": model.state_dict()}


def ddp_left_after_train(config: dict[str, Any]) -> int:
    """How many DistributedDataParallel wrappers ``train`` (of its own network) leaves alive when it returns.

    The cyclic collector is off, so what the run left in reference cycles stays countable: such a wrapper
    holds the process group, and freed at interpreter exit, after the group's teardown, it can abort the
    process ("terminate called without an active exception").
    """
    from torch.nn.parallel import DistributedDataParallel

    from knnsolver.training import TrainConfig, train

    gc.disable()
    try:
        train(TrainConfig(**config))
        return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    finally:
        gc.enable()
