"""The data layer: dataset sources, splits, a class-balanced sampler and torch image transforms.

:func:`build_data` is the entry point: it loads a dataset named in
:data:`knnsolver.registry.DATASETS` and returns a :class:`DataBundle` of train,
validation and test datasets whose items are ``(input, label, row_index)``.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from knnsolver.data.augment import build_augmentation
from knnsolver.data.datasets import RowDataset, Source
from knnsolver.data.transforms import Transform
from knnsolver.data.sampler import ClassBalancedBatchSampler
from knnsolver.data.splits import SPLITS, cap_per_class, disjoint_classes, remap, stratified_split
from knnsolver.errors import ConfigError, DataError
from knnsolver.registry import DATASETS

__all__ = ["DataBundle", "build_data", "data_fingerprint", "ClassBalancedBatchSampler", "RowDataset", "Source"]


@dataclass
class DataBundle:
    """The datasets of one experiment.

    Attributes:
        train: training rows, augmented when requested (otherwise the same object as ``train_eval``).
        train_eval: the same rows in the same order without augmentation (for embedding banks).
        val: validation rows carved from the training classes, or ``None`` when ``val_fraction`` is 0
            (or too small to carve a single row); with ``val_classes``, every row of the classes held out
            for validation, labelled ``0..V-1`` among themselves (``val_class_names``).
        test: test rows.
        train_labels: labels of the training rows in row order.
        num_classes: number of training classes; train and val labels are ``0..num_classes-1``.
        input_shape: shape of one input, e.g. ``(1, 8, 8)``.
        class_names: names of the training classes, indexed by train label.
        test_class_names: names of the test classes, indexed by test label.
        val_class_names: names of the validation classes when they are held out whole (``val_classes``),
            indexed by validation label; empty when validation shares the training classes.
        name: dataset name.
        split: ``"standard"`` or ``"disjoint"``.
        train_class_ids, test_class_ids: the source's class ids behind train and test labels
            (label ``i`` of the training set is source class ``train_class_ids[i]``).
        test_query: for a query/gallery protocol (In-Shop), a bool per test row, true for the
            queries, which search the other test rows (the gallery); ``None``: all against all.
        recall_ks: the Recall@K cut-offs the dataset is reported at.
        notes: how the inputs were converted (size, channels, cache), for the run's first lines.
    """

    train: RowDataset
    train_eval: RowDataset
    val: RowDataset | None
    test: RowDataset
    train_labels: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    test_class_names: list[str]
    name: str
    split: str
    train_class_ids: list[int]
    test_class_ids: list[int]
    test_query: Tensor | None = None
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    notes: str = ""
    val_class_names: list[str] = field(default_factory=list)


def data_fingerprint(data: DataBundle, portable: bool = False) -> dict[str, Any]:
    """The rows of each split and a hash of the inputs, rows and labels behind them.

    A run records it, so ``knnsolver eval`` and ``--resume`` can tell when the
    data changed since training (a scored number would then describe other data).
    ``portable`` hashes image files by their paths below the data folder and sizes, so the same data at
    another path matches (torchrun's processes on several machines compare it).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(data.train_eval.pool.fingerprint(portable).encode())
    parts = {"train": data.train_eval, "val": data.val, "test": data.test}
    for name, part in parts.items():
        if part is not None:
            digest.update(name.encode())
            digest.update(part.rows.tobytes())
            digest.update(part.labels.numpy().tobytes())
    if data.test_query is not None:  # In-Shop: which test rows query and which are the gallery
        digest.update(data.test_query.numpy().tobytes())
    return {**{name: 0 if part is None else len(part) for name, part in parts.items()}, "hash": digest.hexdigest()}


def _load_source(name: str, data_dir: str | None, image_size: int | None, resize_size: int | None,
                 image_channels: int | None = None, image_cache_mb: int | None = None) -> Source:
    """Call the registered loader with the options it takes (``None``: the loader's default)."""
    loader = DATASETS.get(name)
    params = inspect.signature(loader).parameters
    if data_dir is not None and "data_dir" not in params:
        raise ConfigError(f"dataset {name!r} is bundled and takes no data_dir; drop --data-dir")
    if resize_size is not None and "resize_size" not in params:
        raise ConfigError(f"dataset {name!r} does not resize and crop its images; drop --resize-size")
    if image_size is not None and "image_size" not in params:
        raise ConfigError(f"dataset {name!r} has a fixed input size and does not resize; drop --image-size")
    if image_channels is not None and "image_channels" not in params:
        raise ConfigError(f"dataset {name!r} has a fixed number of channels; drop --image-channels")
    given = {"data_dir": data_dir, "image_size": image_size, "resize_size": resize_size,
             "image_channels": image_channels, "image_cache_mb": image_cache_mb}
    return loader(**{k: v for k, v in given.items() if v is not None and k in params})


def build_data(
    name: str,
    *,
    split: str = "standard",
    val_fraction: float = 0.1,
    max_per_class: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool | list[str] = False,
    image_size: int | None = None,
    resize_size: int | None = None,
    train_classes: list[int] | None = None,
    image_channels: int | None = None,
    image_cache_mb: int | None = None,
    val_classes: int | Sequence[int] = 0,
) -> DataBundle:
    """Load dataset ``name`` and split it into train / validation / test.

    Splits:
        ``standard``: the official train/test split (a fixed stratified 80/20 where
        the source has none); validation is a stratified ``val_fraction`` of train.
        ``disjoint``: unseen-class evaluation as in the metric-learning papers. All
        rows (official train and test together) of the first half of the sorted
        class ids, or of the dataset's own training classes (SOP, In-Shop), or of
        ``train_classes``, train; all rows of the other classes test (for In-Shop,
        its query images against its gallery: ``DataBundle.test_query``).
        Validation is carved from the training classes, or, with ``val_classes``,
        is every row of some training classes, held out whole (a count: the last
        ones; or their class ids):
        class-disjoint validation (Musgrave et al. 2020), so a checkpoint and a
        hyperparameter are chosen on classes the network never trained on, as the
        test classes are (``val_fraction`` is then unused). Labels are remapped to
        ``0..C-1`` separately within train, validation classes and test.

    Validation is drawn with ``seed``; ``max_per_class`` then keeps at most that
    many training rows per class, drawn with ``seed`` from a separate stream, so
    validation and test stay the same whatever the cap. ``augment`` applies
    training augmentation to ``train`` only: ``True`` the source's default set, or
    a list of named options (:mod:`knnsolver.data.augment`); the source's evaluation
    transform (the benchmarks' centre crop) applies to every other dataset.
    ``image_size`` is the side of the images (``None``: the dataset's default: an
    image folder's native size when all its images share one, else 64; 224 for the
    benchmarks) and ``resize_size`` the shorter side benchmark images are resized
    to before cropping. ``image_channels`` and ``image_cache_mb`` go to the
    image-folder loader (:func:`~knnsolver.data.datasets.load_image_folder`).
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"max_per_class must be >= 1 (or None for no cap), got {max_per_class}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    for option, value in (("image_size", image_size), ("resize_size", resize_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
    if train_classes is not None and split != "disjoint":
        raise ConfigError("train_classes only applies to split 'disjoint'")
    if val_classes and split != "disjoint":
        raise ConfigError("val_classes only applies to split 'disjoint' (class-disjoint validation); "
                          "use val_fraction with split 'standard'")
    source = _load_source(name, data_dir, image_size, resize_size, image_channels, image_cache_mb)
    augmentation = build_augmentation(augment, source.augment_policy, name)

    labels = source.labels
    if split == "standard":
        pool_train, test_rows = source.train_rows, source.test_rows
        train_ids = np.unique(labels[pool_train]).tolist()
        unseen = sorted(set(np.unique(labels[test_rows]).tolist()) - set(train_ids))
        if unseen:
            raise DataError(
                f"the test set of {name!r} has classes absent from its training set "
                f"({', '.join(source.class_names[c] for c in unseen)}); use split 'disjoint' for unseen classes"
            )
        test_ids = train_ids
    else:
        every = np.sort(np.concatenate([source.train_rows, source.test_rows]))
        own = train_classes is None and source.disjoint_train_classes is not None
        train_ids, test_ids = disjoint_classes(
            np.unique(labels[every]).tolist(), source.disjoint_train_classes if own else train_classes)
        in_train = np.isin(labels[every], train_ids)
        pool_train, test_rows = every[in_train], every[~in_train]

    val_ids: list[int] = []
    if val_classes:
        if isinstance(val_classes, (int, np.integer)):
            asked = int(val_classes)  # the count given, not the slice (a slice stops at the list's length)
            val_ids = list(train_ids[-asked:])
        else:
            val_ids = sorted({int(c) for c in val_classes})
            stray = [c for c in val_ids if c not in train_ids]
            if stray:
                raise ConfigError(f"val_classes {stray} are not training classes (the training classes are "
                                  f"{', '.join(map(str, train_ids))}); hold out some of those")
            asked = len(val_ids)
        if not 2 <= asked <= len(train_ids) - 2:
            raise ConfigError(
                f"val_classes must hold out at least 2 of the {len(train_ids)} training classes (retrieval within "
                f"one class is always right) and leave at least 2 to train on, got {asked}")
        train_ids = [c for c in train_ids if c not in val_ids]
        in_val = np.isin(labels[pool_train], val_ids)
        pool_train, val_rows = pool_train[~in_val], pool_train[in_val]
        train_rows = pool_train
    else:
        kept, carved = stratified_split(labels[pool_train], val_fraction, np.random.default_rng([seed, 1]))
        train_rows, val_rows = pool_train[kept], pool_train[carved]
    if max_per_class is not None:
        train_rows = train_rows[cap_per_class(labels[train_rows], max_per_class, np.random.default_rng([seed, 2]))]

    def dataset(rows: np.ndarray, ids: list[int], transform: Transform | None = source.eval_transform) -> RowDataset:
        return RowDataset(source.pool, rows, remap(labels[rows], ids), transform)

    train_eval = dataset(train_rows, train_ids)
    return DataBundle(
        train=dataset(train_rows, train_ids, augmentation) if augmentation is not None else train_eval,
        train_eval=train_eval,
        val=dataset(val_rows, val_ids or train_ids) if len(val_rows) else None,
        test=dataset(test_rows, test_ids),
        train_labels=train_eval.labels.clone(),
        num_classes=len(train_ids),
        input_shape=tuple(source.input_shape),
        class_names=[source.class_names[c] for c in train_ids],
        test_class_names=[source.class_names[c] for c in test_ids],
        name=name,
        split=split,
        train_class_ids=[int(c) for c in train_ids],
        test_class_ids=[int(c) for c in test_ids],
        test_query=_query_mask(source, test_rows) if split == "disjoint" and train_classes is None else None,
        recall_ks=tuple(source.recall_ks),
        notes=source.notes,
        val_class_names=[source.class_names[c] for c in val_ids],
    )


def _query_mask(source: Source, test_rows: np.ndarray) -> Tensor | None:
    """The query flag of each test row under the source's query/gallery protocol, if it has one."""
    if source.query_rows is None:
        return None
    return torch.from_numpy(np.isin(test_rows, source.query_rows))
