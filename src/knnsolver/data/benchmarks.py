"""Readers for the metric-learning benchmarks in their official on-disk layouts (nothing is downloaded).

* ``cub200``: CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
  ``train_test_split.txt``, optional ``bounding_boxes.txt``, ``images/``).
* ``cars196``: Stanford Cars as ``cars_annos.mat`` beside ``car_ims/``.
* ``sop``: Stanford Online Products (``Ebay_train.txt``, ``Ebay_test.txt``).
* ``inshop``: DeepFashion In-Shop Clothes Retrieval (``Eval/list_eval_partition.txt``, ``Img/``).

Protocols. ``--split disjoint`` is the metric-learning protocol on unseen classes: CUB's first
100 classes train and its last 100 test, Cars' first 98 / last 98 (by class id, in the
datasets' own class order, through the generic first-half rule of
:func:`knnsolver.data.splits.disjoint_classes`); SOP and In-Shop train on the classes of their
own training lists and test on the rest, and In-Shop's test rows are a query set searched
against a separate gallery (:attr:`Source.query_rows`). ``--split standard`` is the
classification split of CUB (``train_test_split.txt``) and Cars (the annotation's ``test``
flag); SOP and In-Shop have none (their test classes are unseen).

Images follow the standard protocol: decoded in the DataLoader workers as RGB, cropped to the
object's bounding box for the ``-bbox`` variants, resized so the shorter side is
``resize_size`` (aspect kept; default ``image_size * 8 / 7``, i.e. 256 for 224); evaluation
takes the centre ``image_size`` square, training (``--augment``) a random-resized crop of
16-100 % of the area (as Musgrave et al., "A Metric Learning Reality Check", 2020) resized to
``image_size``, flipped left-right half the time (``--augment true`` = ``scale,flip``, ``scale``
from 0.16; see :mod:`knnsolver.data.augment` for the other options). Pixels stay in [0, 1]: a backbone that wants
standardised input (ImageNet statistics) standardises it itself (:mod:`knnsolver.models.backbones`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from knnsolver.data.augment import AugmentPolicy
from knnsolver.data.datasets import PROTOCOL_CROP_SCALE, PhotoPool, Source
from knnsolver.data.transforms import CenterCrop
from knnsolver.errors import ConfigError, DataError

DEFAULT_IMAGE_SIZE = 224
# Recall@K cut-offs each benchmark is reported at in the literature.
CUB_CARS_KS = (1, 2, 4, 8)
SOP_KS = (1, 10, 100, 1000)
INSHOP_KS = (1, 10, 20, 30, 40, 50)

def _sizes(image_size: int | None, resize_size: int | None) -> tuple[int, int]:
    """The crop side and the shorter side images are resized to, checked."""
    image_size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    resize_size = round(image_size * 8 / 7) if resize_size is None else int(resize_size)
    if resize_size < image_size:
        raise ConfigError(f"resize_size ({resize_size}) must be >= image_size ({image_size}): the centre crop is cut from the resized image")
    return image_size, resize_size


def _photo_source(
    name: str, paths: list[Path], labels: np.ndarray, class_names: list[str], train_rows: np.ndarray, test_rows: np.ndarray,
    image_size: int | None, resize_size: int | None, boxes: list[tuple[float, float, float, float]] | None = None, **protocol: object,
) -> Source:
    """A :class:`Source` of photos under the standard resize / crop protocol, after checking every file exists."""
    if not paths:
        raise DataError(f"{name}: the annotation files list no images")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {len(missing)} of {len(paths)} listed images are missing, the first {missing[0]}; "
                        "check --data-dir points at the dataset's own folder, unpacked completely")
    crop, resize = _sizes(image_size, resize_size)
    return Source(
        name=name,
        pool=PhotoPool(paths, resize, boxes),
        labels=labels,
        train_rows=np.asarray(train_rows, dtype=np.int64),
        test_rows=np.asarray(test_rows, dtype=np.int64),
        class_names=class_names,
        input_shape=(3, crop, crop),
        augment_policy=AugmentPolicy(("scale", "flip"), (crop, crop), min_scale=PROTOCOL_CROP_SCALE[0], uncropped=True),
        eval_transform=CenterCrop(crop),
        **protocol,
    )


def _root(name: str, data_dir: str | None, marker: str, nested: str) -> Path:
    """The folder holding ``marker``: ``data_dir`` itself or its ``nested`` sub-folder."""
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} needs --data-dir: the folder of the dataset as unpacked (holding {marker})")
    root = Path(data_dir)
    for candidate in (root, root / nested):
        if (candidate / marker).is_file():
            return candidate
    raise DataError(f"{name}: neither {root / marker} nor {root / nested / marker} exists; "
                    f"pass --data-dir the folder that holds {marker}")


def _read_table(path: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """The whitespace-separated rows of a text file (after ``skip`` header lines), each of ``columns`` fields."""
    try:
        lines = path.read_text().splitlines()[skip:]
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    rows = [line.split() for line in lines if line.strip()]
    for i, row in enumerate(rows):
        if len(row) != columns:
            raise DataError(f"{path} line {i + 1 + skip}: expected {columns} fields, got {len(row)}: {' '.join(row)!r}")
    return rows


def _by_image_id(path: Path, columns: int, ids: list[str]) -> list[list[str]]:
    """The rows of a CUB per-image file (image id first), in the order of ``ids``; every id must be present."""
    table = {row[0]: row[1:] for row in _read_table(path, columns)}
    absent = [i for i in ids if i not in table]
    if absent:
        raise DataError(f"{path} has no line for image id {absent[0]} (of {len(absent)} missing ids)")
    return [table[i] for i in ids]


def load_cub200(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None,
                bbox: bool = False) -> Source:
    """CUB-200-2011 from ``CUB_200_2011/`` (or its parent); ``bbox`` crops each image to ``bounding_boxes.txt``.

    Labels follow ``classes.txt`` in class-id order, so the disjoint split's first half
    is classes 1-100. ``train_test_split.txt`` (1 = training image) is the standard split.
    """
    root = _root("cub200", data_dir, "images.txt", "CUB_200_2011")
    images = _read_table(root / "images.txt", 2)
    ids = [row[0] for row in images]
    class_of = [row[0] for row in _by_image_id(root / "image_class_labels.txt", 2, ids)]
    is_train = [row[0] for row in _by_image_id(root / "train_test_split.txt", 2, ids)]
    classes = sorted(_read_table(root / "classes.txt", 2), key=lambda row: int(row[0]))
    position = {row[0]: i for i, row in enumerate(classes)}
    unknown = sorted(set(class_of) - set(position), key=int)
    if unknown:
        raise DataError(f"{root / 'image_class_labels.txt'} uses class id {unknown[0]}, absent from {root / 'classes.txt'}")
    if set(is_train) - {"0", "1"}:
        raise DataError(f"{root / 'train_test_split.txt'} must flag each image 1 (train) or 0 (test)")
    boxes = None
    if bbox:
        if not (root / "bounding_boxes.txt").is_file():
            raise DataError(f"cub200-bbox needs {root / 'bounding_boxes.txt'}, which is missing")
        boxes = []
        for x, y, w, h in (map(float, row) for row in _by_image_id(root / "bounding_boxes.txt", 5, ids)):
            boxes.append((x, y, x + w, y + h))
    train = np.asarray([flag == "1" for flag in is_train])
    return _photo_source(
        "cub200-bbox" if bbox else "cub200", [root / "images" / row[1] for row in images],
        np.asarray([position[c] for c in class_of], dtype=np.int64), [row[1] for row in classes],
        np.flatnonzero(train), np.flatnonzero(~train), image_size, resize_size, boxes, recall_ks=CUB_CARS_KS,
    )


def load_cub200_bbox(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None) -> Source:
    """CUB-200-2011 with every image cropped to its bounding box (:func:`load_cub200` with ``bbox``)."""
    return load_cub200(data_dir, image_size, resize_size, bbox=True)


def _mat_scalar(value: object) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def _mat_string(value: object) -> str:
    return str(np.asarray(value).reshape(-1)[0])


def load_cars196(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None,
                 bbox: bool = False) -> Source:
    """Stanford Cars from ``cars_annos.mat`` (the all-images annotation file) beside ``car_ims/``.

    Labels are the annotation's class ids 1-196 in order (the disjoint split's first half is
    classes 1-98); its ``test`` flag is the standard split; ``bbox`` crops to ``bbox_x1..y2``.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    root = _root("cars196", data_dir, "cars_annos.mat", "stanford_cars")
    path = root / "cars_annos.mat"
    try:
        mat = loadmat(path, squeeze_me=False)
        annotations = mat["annotations"].reshape(-1)
        class_names = [_mat_string(n) for n in mat["class_names"].reshape(-1)]
        fields = {f: annotations[f] for f in ("relative_im_path", "class", "test", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")}
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, MatReadError) as err:
        raise DataError(f"cannot read {path} as Stanford Cars' cars_annos.mat "
                        f"(struct array 'annotations', cell array 'class_names'): {err}") from None
    classes = np.asarray([int(_mat_scalar(c)) for c in fields["class"]], dtype=np.int64)
    if len(classes) and not (classes.min() >= 1 and classes.max() <= len(class_names)):
        raise DataError(f"{path}: class ids must lie in 1..{len(class_names)} (its class_names), got {classes.min()}..{classes.max()}")
    test = np.asarray([_mat_scalar(t) != 0 for t in fields["test"]])
    boxes = None
    if bbox:
        boxes = [tuple(_mat_scalar(fields[k][i]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
                 for i in range(len(annotations))]
    return _photo_source(
        "cars196-bbox" if bbox else "cars196", [root / _mat_string(p) for p in fields["relative_im_path"]],
        classes - 1, class_names, np.flatnonzero(~test), np.flatnonzero(test), image_size, resize_size, boxes,
        recall_ks=CUB_CARS_KS,
    )


def load_cars196_bbox(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None) -> Source:
    """Stanford Cars with every image cropped to its bounding box (:func:`load_cars196` with ``bbox``)."""
    return load_cars196(data_dir, image_size, resize_size, bbox=True)


def load_sop(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None) -> Source:
    """Stanford Online Products from ``Ebay_train.txt`` and ``Ebay_test.txt`` (header, then
    ``image_id class_id super_class_id path``). Classes are product ids; the training list's
    classes train and the test list's test."""
    root = _root("sop", data_dir, "Ebay_train.txt", "Stanford_Online_Products")
    parts = [_read_table(root / f"Ebay_{part}.txt", 4, skip=1) for part in ("train", "test")]
    rows = parts[0] + parts[1]
    try:
        class_ids = np.asarray([int(row[1]) for row in rows], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{root}: Ebay class_id column is not an integer: {err}") from None
    values, labels = np.unique(class_ids, return_inverse=True)
    n_train = len(parts[0])
    return _photo_source(
        "sop", [root / row[3] for row in rows], labels.astype(np.int64), [str(v) for v in values],
        np.arange(n_train), np.arange(n_train, len(rows)), image_size, resize_size, recall_ks=SOP_KS,
        disjoint_train_classes=np.unique(labels[:n_train]).tolist(),
    )


INSHOP_STATUSES = ("train", "query", "gallery")


def load_inshop(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None) -> Source:
    """In-Shop Clothes from ``Eval/list_eval_partition.txt`` (a count line, a header line, then
    ``image_name item_id evaluation_status``) with the images under ``Img/``. Classes are item
    ids; ``train`` items train, and on the test items each ``query`` image searches the ``gallery``."""
    eval_dir = _root("inshop", data_dir, "list_eval_partition.txt", "Eval")
    rows = _read_table(eval_dir / "list_eval_partition.txt", 3, skip=2)
    bad = sorted({row[2] for row in rows} - set(INSHOP_STATUSES))
    if bad:
        raise DataError(f"{eval_dir / 'list_eval_partition.txt'}: unknown evaluation_status {bad[0]!r}; "
                        f"expected one of {', '.join(INSHOP_STATUSES)}")
    root = Path(str(data_dir))
    candidates = (root / "Img", root, eval_dir.parent / "Img")
    image_root = next((d for d in candidates if rows and (d / rows[0][0]).is_file()), root / "Img")
    values, labels = np.unique([row[1] for row in rows], return_inverse=True)
    labels = labels.astype(np.int64)
    status = np.asarray([row[2] for row in rows])
    return _photo_source(
        "inshop", [image_root / row[0] for row in rows], labels, [str(v) for v in values],
        np.flatnonzero(status == "train"), np.flatnonzero(status != "train"), image_size, resize_size,
        recall_ks=INSHOP_KS, disjoint_train_classes=np.unique(labels[status == "train"]).tolist(),
        query_rows=np.flatnonzero(status == "query"),
    )
