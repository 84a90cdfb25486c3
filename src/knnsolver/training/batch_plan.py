"""The batch plan: which training rows each step of an epoch takes, on every process.

A pure function of the seed and the epoch, so a resumed run draws exactly the batches the
uninterrupted run would have.
"""
from __future__ import annotations

import torch
from torch.utils.data import BatchSampler

from knnsolver import distributed
from knnsolver.data.sampler import ClassBalancedBatchSampler
from knnsolver.errors import ConfigError
from knnsolver.training.run import Run, epoch_seed


def samples_per_class(batch_size: int, num_classes: int, requested: int = 0) -> int:
    """The class-balanced sampler's m: ``requested`` if set, else the smallest m >= 4
    dividing ``batch_size`` into 2 to ``num_classes`` classes per batch."""
    if requested:
        return requested
    for m in range(4, batch_size // 2 + 1):
        if batch_size % m == 0 and batch_size // m <= num_classes:
            return m
    raise ConfigError(
        f"batch_size {batch_size} cannot be split into equal groups of >= 4 samples from 2 to {num_classes} "
        f"classes; choose a batch size with such a divisor or set samples_per_class"
    )


def epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    """Row-index batches for one epoch (all processes together).

    Without ``epoch_steps`` an epoch is one pass (:func:`_pass`). With it, the
    passes form one stream (pass ``q`` is seeded by ``q``, as epoch ``q`` is
    without it) cut into epochs of ``epoch_steps`` batches per process
    (``epoch_steps * world_size`` in all, dealt out by :func:`process_batches`):
    epoch ``e`` is the ``e``-th such slice of the stream, a pure function of
    ``e``, so a resumed run draws what the straight run did.
    """
    if run.config.epoch_steps is None:
        return _pass(run, epoch)
    steps = run.config.epoch_steps * distributed.world_size()
    first = _pass(run, 0)
    per_pass = len(first)
    if per_pass == 0:
        return first
    start = epoch * steps
    q, offset = divmod(start, per_pass)
    out: list[list[int]] = []
    while len(out) < steps:
        batches = first if q == 0 else _pass(run, q)
        out += batches[offset : offset + steps - len(out)]
        q, offset = q + 1, 0
    return out


def _pass(run: Run, q: int) -> list[list[int]]:
    """Row-index batches of pass ``q`` over the training set: class-balanced where needed, else a seeded shuffle."""
    cfg = run.config
    balanced = run.solver.needs_balanced_sampler if cfg.balanced is None else cfg.balanced
    if balanced:
        m = samples_per_class(cfg.batch_size, run.data.num_classes, cfg.samples_per_class)
        sampler = ClassBalancedBatchSampler(run.data.train_labels, cfg.batch_size, m, seed=cfg.seed)
        sampler.set_epoch(q)
        return list(sampler)
    n = len(run.data.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, q))).tolist()
    # A last batch of one sample would break BatchNorm in training mode: fold it away.
    return list(BatchSampler(order, cfg.batch_size, drop_last=n % cfg.batch_size == 1))


def process_batches(run: Run, epoch: int) -> list[list[int]]:
    """This process's share of the epoch's batches: every ``world_size``-th, from its rank."""
    batches = epoch_batches(run, epoch)
    size = distributed.world_size()
    if size == 1:
        return batches
    if len(batches) < size:
        raise ConfigError(
            f"an epoch has {len(batches)} batches, fewer than the {size} processes; lower batch_size or use fewer processes"
        )
    return batches[distributed.rank() : len(batches) - len(batches) % size : size]
