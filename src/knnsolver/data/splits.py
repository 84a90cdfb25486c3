"""Deterministic index bookkeeping behind the splits: stratified carving, per-class
caps, disjoint class partitions and label remapping.

Everything works on numpy label arrays and returns sorted positions into them,
so the datasets built from the result keep the source's row order.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from knnsolver.errors import ConfigError

SPLITS = ("standard", "disjoint")

# Sources without an official test set (digits, a class-folder pool, embeddings
# without test arrays) hold out this stratified fraction with this fixed seed, so
# the test set is the same whatever seed a run uses.
STANDARD_TEST_FRACTION = 0.2
STANDARD_SPLIT_SEED = 0


def group_by_class(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return the sorted class ids and, for each, the ascending positions holding it."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return classes, np.split(order, np.cumsum(counts)[:-1])


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into ``(kept, carved)`` with ``carved`` about ``fraction`` of each class.

    The carved total is ``round(fraction * N)``, shared out between classes in
    proportion to their size (largest remainder), except that every class keeps
    at least one row. Which rows are carved is drawn from ``rng``. Both outputs
    are sorted positions into ``labels``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    _, groups = group_by_class(labels)
    counts = np.array([len(g) for g in groups])
    ideal = counts * fraction
    take = np.floor(ideal).astype(np.int64)
    extra = int(np.floor(fraction * len(labels) + 0.5)) - int(take.sum())
    take[np.argsort(-(ideal - take), kind="stable")[:extra]] += 1
    take = np.minimum(take, counts - 1)
    carved = [rng.permutation(g)[:n] for g, n in zip(groups, take)]
    carved_pos = np.sort(np.concatenate(carved)) if carved else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), carved_pos, assume_unique=True)
    return kept, carved_pos


def official_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split used where a source has no official one."""
    return stratified_split(labels, STANDARD_TEST_FRACTION, np.random.default_rng(STANDARD_SPLIT_SEED))


def cap_per_class(labels: np.ndarray, max_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions keeping at most ``max_per_class`` rows of each class, drawn from ``rng``."""
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1, got {max_per_class}")
    _, groups = group_by_class(labels)
    kept = [g if len(g) <= max_per_class else rng.choice(g, max_per_class, replace=False) for g in groups]
    return np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)


def disjoint_classes(class_ids: Sequence[int], train_classes: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Partition class ids into ``(train, test)`` for unseen-class evaluation.

    By default the first half of the sorted ids train (the larger half when the
    count is odd) and the rest test, as in the CUB-200 / Cars196 protocol.
    ``train_classes`` picks the training ids explicitly; the others test.
    """
    ids = sorted(int(c) for c in class_ids)
    if len(ids) < 2:
        raise ConfigError(f"split 'disjoint' needs at least 2 classes, the data has {len(ids)}; use split 'standard'")
    if train_classes is None:
        half = (len(ids) + 1) // 2
        return ids[:half], ids[half:]
    chosen = sorted({int(c) for c in train_classes})
    unknown = sorted(set(chosen) - set(ids))
    if unknown:
        raise ConfigError(f"train_classes {unknown} are not class ids of the data; valid ids are {ids[0]}..{ids[-1]}")
    if not chosen or len(chosen) == len(ids):
        raise ConfigError(
            f"train_classes must name at least one class and leave at least one for testing, got {len(chosen)} of {len(ids)}"
        )
    taken = set(chosen)
    return chosen, [c for c in ids if c not in taken]


def remap(labels: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """Map each label to its position in the sorted ``class_ids``, which must contain every label."""
    ids = np.asarray(class_ids, dtype=np.int64)
    pos = np.searchsorted(ids, labels).clip(max=len(ids) - 1)
    if not np.array_equal(ids[pos], labels):
        raise ValueError("remap: some labels are not in class_ids")
    return pos
