"""The Fashion-MNIST subset of the unseen-classes benchmarks, written once as IDX files.

The ``disjoint`` split pools the official train and test images, so the test
classes would give 7,000 images each, and MAP@R plus NMI over them takes
minutes per run. The subset keeps the *official training* images of the
training classes :data:`TRAIN_CLASSES`, :data:`VAL_PER_CLASS` official training
images of each validation class :data:`VAL_CLASSES`, and the *official test*
images of the other four classes (1,000 per class). Loaded with
``split="disjoint"``, ``train_classes`` = training plus validation classes and
``val_classes`` = the validation classes (:data:`knnsolver.bench.suites`), it
trains on T-shirt, trouser, pullover and dress, chooses checkpoints and
hyperparameters by retrieval on coat and shirt, which the network never trains
on, and tests retrieval on sandal, sneaker, bag and ankle boot, never used for
a choice (Musgrave et al. 2020: class-disjoint train, validation and test
classes). Coat and shirt are a confusable pair, as sandal, sneaker and ankle
boot are: two distinct validation classes (coat and sandal) left validation
Precision@1 at 99.5%, too high to tell settings apart. It is stored in the
loader's own format, so the dataset is still ``fashion-mnist`` (with
``data_dir`` pointing at the subset).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from knnsolver.data.datasets import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    read_idx,
)

TRAIN_CLASSES = (0, 1, 2, 3)  # T-shirt/top, trouser, pullover, dress
VAL_CLASSES = (4, 6)  # coat, shirt
VAL_PER_CLASS = 750  # 1,500 validation images, evaluated every few epochs
# Test: the official test images of the other classes, 5, 7, 8, 9 (sandal, sneaker, bag, ankle boot).


def _write_idx(array: np.ndarray, magic: int, path: Path) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, atomically."""
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # workers may prepare the same folder at once
    with gzip.open(tmp, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def prepare_unseen_subset(folder: str | Path, source: str | Path = FASHION_MNIST_DIR) -> Path:
    """Write the unseen-classes subset of Fashion-MNIST into ``folder`` unless it is there already."""
    folder = Path(folder)
    paths = {key: folder / name for key, name in FASHION_MNIST_FILES.items()}
    if all(p.is_file() for p in paths.values()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    arrays = {
        key: read_idx(src / name, IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC)
        for key, name in FASHION_MNIST_FILES.items()
    }
    labels = arrays["train_labels"]
    val_rows = [np.flatnonzero(labels == c)[:VAL_PER_CLASS] for c in VAL_CLASSES]  # the first ones, in file order
    kept = np.sort(np.concatenate([np.flatnonzero(np.isin(labels, TRAIN_CLASSES)), *val_rows]))
    unseen_test = ~np.isin(arrays["test_labels"], TRAIN_CLASSES + VAL_CLASSES)
    subset = {
        "train_images": arrays["train_images"][kept],
        "train_labels": labels[kept],
        "test_images": arrays["test_images"][unseen_test],
        "test_labels": arrays["test_labels"][unseen_test],
    }
    for key in FASHION_MNIST_FILES:  # each file appears whole (atomic rename), so a partial folder is redone
        _write_idx(subset[key], IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC, paths[key])
    return folder
