"""Batches without per-item Python: in-memory datasets indexed on the training device.

A :class:`~knnsolver.data.datasets.RowDataset` over a
:class:`~knnsolver.data.datasets.TensorPool` with no per-item transform (digits,
Fashion-MNIST, embeddings, without augmentation) is copied to the device once,
in its stored dtype (uint8 pixels stay uint8), and each batch is one gather
there: no ``__getitem__`` per row, no collation, no host-to-device copy per
step. Everything else (image files, augmentation) goes through a
``DataLoader``, with worker processes and pinned memory when asked.

Both paths give the same tensors, and the fast path draws the one random number
a ``DataLoader`` iterator draws (its base seed), so a run's random stream, and
hence its result, does not depend on which path served it.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from knnsolver.data.datasets import RowDataset, TensorPool

__all__ = ["DeviceRows", "gathers_on_device", "iterate_batches", "sequential_plan"]

Batch = tuple[Tensor, Tensor, Tensor]


class DeviceRows:
    """A transform-free in-memory :class:`RowDataset` held on ``device``; :meth:`batch` gathers rows there."""

    def __init__(self, dataset: RowDataset, device: torch.device) -> None:
        pool = dataset.pool
        assert isinstance(pool, TensorPool) and dataset.transform is None
        self.inputs = pool.data[torch.as_tensor(dataset.rows)].to(device)
        self.scale = pool.scale
        self.labels = dataset.labels.to(device)
        self.device = device

    def batch(self, index: Tensor) -> Batch:
        """Inputs (float32, scaled as :meth:`TensorPool.get` does), labels and row indices of ``index``."""
        x = self.inputs[index].to(torch.float32, copy=True)
        if self.scale != 1.0:
            x.mul_(self.scale)
        return x, self.labels[index], index


def gathers_on_device(dataset: Dataset) -> bool:
    """Whether batches of ``dataset`` are gathered on the device (in memory, no per-item transform), not loaded."""
    return isinstance(dataset, RowDataset) and isinstance(dataset.pool, TensorPool) and dataset.transform is None


def device_rows(dataset: Dataset, device: torch.device) -> DeviceRows | None:
    """The dataset's device copy (made once and kept on the dataset), or ``None`` where it needs a DataLoader."""
    if not gathers_on_device(dataset):
        return None
    cached = getattr(dataset, "_device_rows", None)
    if cached is None or cached.device != device:
        cached = DeviceRows(dataset, device)
        dataset._device_rows = cached
    return cached


def sequential_plan(rows: Sequence[int] | range, batch_size: int) -> list[list[int]]:
    """``rows`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    rows = list(rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def iterate_batches(
    dataset: Dataset, plan: Sequence[Sequence[int]], device: torch.device, num_workers: int = 0
) -> Iterator[Batch]:
    """Yield ``(inputs, labels, row_indices)`` on ``device`` for each batch of row indices in ``plan``."""
    device = torch.device(device)
    rows = device_rows(dataset, device)
    if rows is None:
        loader = DataLoader(dataset, batch_sampler=plan, num_workers=num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        for x, y, idx in loader:
            yield (x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True),
                   torch.as_tensor(idx).to(device, non_blocking=True))
        return
    torch.empty((), dtype=torch.int64).random_()  # the base seed a DataLoader iterator draws (module docstring)
    if not plan:
        return
    sizes = [len(b) for b in plan]
    flat = torch.tensor([i for b in plan for i in b], dtype=torch.long).to(device, non_blocking=True)
    for index in flat.split(sizes):
        yield rows.batch(index)
