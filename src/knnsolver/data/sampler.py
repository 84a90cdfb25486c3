"""Class-balanced batch sampler for losses that need positives in every batch (pair/triplet losses)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from knnsolver.data.splits import group_by_class
from knnsolver.errors import ConfigError


def _complete(group: np.ndarray, members: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Pad ``group`` to ``m`` rows of its class: other rows of the class first, repeats only if it is too small."""
    need = m - len(group)
    if need == 0:
        return group
    others = rng.permutation(np.setdiff1d(members, group, assume_unique=True))[:need]
    repeats = rng.choice(members, need - len(others))
    return np.concatenate([group, others, repeats]).astype(np.int64)


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``samples_per_class`` (m) rows from each of ``batch_size // m`` distinct classes.

    Each epoch visits every training row: every class's rows are shuffled and
    cut into groups of m (the last group of a class is padded with other rows of
    that class, repeated only if the class has fewer than m rows). Batches are
    then formed from the P = batch_size // m classes with the most groups left
    (ties broken at random), which keeps full batches of distinct classes going
    as long as possible. End of an epoch: when fewer than P classes still have
    groups (very unequal class sizes), each remaining batch takes one group of
    every class left and is completed with freshly drawn groups of other
    classes. So no batch is short or dropped, every batch has exactly m rows of
    each of P classes, and the only rows seen twice are the padding and those
    filler groups. The order of batches is shuffled.

    ``set_epoch(epoch)`` selects the epoch's shuffle: a given ``(seed, epoch)``
    always gives the same batches, different epochs differ. Use it as a
    ``DataLoader``'s ``batch_sampler``; ``len()`` is the number of batches.
    """

    def __init__(self, labels: Tensor, batch_size: int, samples_per_class: int, seed: int = 0) -> None:
        labels_np = torch.as_tensor(labels).detach().cpu().numpy()
        if labels_np.ndim != 1 or len(labels_np) == 0:
            raise ConfigError(f"the balanced sampler needs a non-empty 1-D label tensor, got shape {labels_np.shape}")
        if not np.issubdtype(labels_np.dtype, np.integer):
            raise ConfigError(f"the balanced sampler needs integer labels, got dtype {labels_np.dtype}")
        if samples_per_class < 1:
            raise ConfigError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size < 1 or batch_size % samples_per_class:
            raise ConfigError(
                f"batch_size ({batch_size}) must be a positive multiple of samples_per_class ({samples_per_class})"
            )
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        _, self._members = group_by_class(labels_np)
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.classes_per_batch = self.batch_size // self.samples_per_class
        if self.classes_per_batch > len(self._members):
            raise ConfigError(
                f"batch_size {batch_size} with samples_per_class {samples_per_class} needs {self.classes_per_batch} "
                f"classes per batch but the labels have only {len(self._members)}; lower batch_size or raise samples_per_class"
            )
        self.seed = int(seed)
        self.epoch = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def _plan(self) -> list[list[int]]:
        """The batches of the current epoch (computed once per epoch)."""
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        m, p, n_classes = self.samples_per_class, self.classes_per_batch, len(self._members)
        queues = []
        for members in self._members:
            shuffled = rng.permutation(members)
            groups = [shuffled[i : i + m] for i in range(0, len(shuffled), m)]
            groups[-1] = _complete(groups[-1], members, m, rng)
            queues.append(groups)
        left = np.array([len(q) for q in queues])
        batches = []
        while left.any():
            chosen = np.lexsort((rng.random(n_classes), -left))[:p]
            chosen = chosen[left[chosen] > 0]
            parts = [queues[c].pop() for c in chosen]
            left[chosen] -= 1
            if len(chosen) < p:
                fillers = rng.choice(np.setdiff1d(np.arange(n_classes), chosen), p - len(chosen), replace=False)
                parts += [_complete(np.empty(0, dtype=np.int64), self._members[c], m, rng) for c in fillers]
            batches.append(np.concatenate(parts).tolist())
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._plan())

    def __len__(self) -> int:
        return len(self._plan())
