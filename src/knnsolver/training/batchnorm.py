"""BatchNorm statistics that match the network being evaluated ("precise BN").

Training in PyTorch's train mode keeps BatchNorm running statistics as an
exponential average (momentum 0.1) of past batches, taken while the weights
moved; evaluation then normalises with statistics of a network that no longer
exists. For solvers that predict through a linear or centre head this swings
test accuracy by tens of points from epoch to epoch. :func:`calibrate_batchnorm`
re-estimates them for the current weights; :func:`freeze_batchnorm` makes the
training forward use them too (``bn_mode="frozen"``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from knnsolver.data.batches import iterate_batches, sequential_plan
from knnsolver.evaluation.embed import inference_modes

__all__ = ["batchnorm_layers", "calibrate_batchnorm", "calibration_rows", "freeze_batchnorm", "kept_running_statistics",
           "mixed_order"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def calibration_rows(n: int, max_rows: int | None) -> list[int]:
    """``min(n, max_rows)`` evenly spaced row indices of ``range(n)``: deterministic and spread over the data."""
    if max_rows is None or max_rows >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, max_rows).round().long().unique().tolist()


def mixed_order(rows: Sequence[int]) -> list[int]:
    """``rows`` in a fixed pseudo-random order (seed 0, the same at every call and on every process).

    Batches taken in this order are samples of the data however its rows are stored, so their batch
    statistics are the data's. In storage order they need not be: an image folder is read class by class,
    and a batch of one class normalised with its own statistics loses what sets the class apart (precise BN
    then averages within-class variances, a tenth of the data's on ten separated classes).
    """
    rows = list(rows)
    shuffled = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return [rows[i] for i in shuffled]


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, max_rows: int | None = None,
    num_workers: int = 0,
) -> bool:
    """Re-estimate every BatchNorm layer's running statistics from a no-grad pass over ``dataset``.

    The statistics are reset and then averaged over the batches with equal
    weight (momentum ``None``), over at most ``max_rows`` evenly spaced rows
    batched in :func:`mixed_order`, so the result depends only on the weights
    and the data, not on the order its rows are stored in.
    Only the BatchNorm layers run in train mode (dropout stays off) and the
    global random state is left as it was, so a skipped re-estimation does not
    shift a run's random stream; a last batch of one row is skipped. Weights never
    change; the model's modes are restored. Returns whether the model has
    BatchNorm at all. ``num_workers`` DataLoader processes load file-backed data.
    """
    norms = batchnorm_layers(model)
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        plan = sequential_plan(mixed_order(calibration_rows(len(dataset), max_rows)), batch_size)
        # Loading draws a seed: fork the random state so the run's stream is left alone.
        with inference_modes(model, batchnorm_batch_stats=True), torch.random.fork_rng(devices=[]):
            for x, _, _ in iterate_batches(dataset, plan, device, num_workers):
                if len(x) > 1:
                    model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return True


def freeze_batchnorm(model: nn.Module) -> None:
    """Put the BatchNorm layers in eval mode (normalise with running statistics) while the rest trains."""
    for m in batchnorm_layers(model):
        m.eval()


class kept_running_statistics:
    """Context manager: the BatchNorm running statistics are restored on exit (``bn_mode="matched"``
    embeds the bank with batch statistics, which would otherwise update them)."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = batchnorm_layers(model)

    def __enter__(self) -> None:
        self.saved = [{k: v.clone() for k, v in m.named_buffers()} for m in self.norms]

    def __exit__(self, *exc: object) -> None:
        for m, buffers in zip(self.norms, self.saved):
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
