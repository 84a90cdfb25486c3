"""Compute embeddings of a whole dataset: eval mode, no gradient, large batches."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from knnsolver.data.batches import iterate_batches, sequential_plan


@contextmanager
def inference_modes(model: nn.Module, batchnorm_batch_stats: bool = False) -> Iterator[None]:
    """The whole model in eval mode (no dropout), its BatchNorm layers in train mode with
    ``batchnorm_batch_stats`` (normalising with each batch's statistics); every module's
    mode is restored on exit."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    if batchnorm_batch_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def embed_dataset(
    model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu",
    rows: Sequence[int] | None = None, batchnorm_batch_stats: bool = False, num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Return ``(embeddings, labels)`` for every item of ``dataset`` (or its ``rows``) in order.

    The model is put in eval mode (no dropout, BatchNorm running statistics) and
    restored to its previous mode afterwards. In-memory datasets are batched on
    the device (:mod:`knnsolver.data.batches`). The global random state is left
    as it was, so whether (and how often) a run embeds never shifts the random
    numbers its training draws. With ``batchnorm_batch_stats`` BatchNorm layers
    normalise with each batch's statistics (and update their running ones:
    the caller saves and restores them). ``num_workers`` DataLoader processes
    decode file-backed data (the benchmarks' images).
    """
    embs, labels = [], []
    with inference_modes(model, batchnorm_batch_stats), torch.random.fork_rng(devices=[]):
        plan = sequential_plan(range(len(dataset)) if rows is None else rows, batch_size)
        for x, y, _ in iterate_batches(dataset, plan, torch.device(device), num_workers):
            embs.append(model(x).float())
            labels.append(y)
    if not embs:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(embs), torch.cat(labels).long().to(device)
