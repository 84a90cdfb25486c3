"""Tiny replicas of the metric-learning benchmarks, in their official layouts and file formats.

Each writer makes a few small generated JPEGs per class (sizes vary, none square) and the
annotation files as the datasets ship them. Image ``i`` (0-based, in listing order) is filled
with :func:`colour` ``(i)``; where a dataset has boxes, the box is filled with :func:`box_colour`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i % 200 + 20, 91 * i % 200 + 20, 53 * i % 200 + 20)


BOX_COLOUR = (250, 10, 10)


def _photo(path: Path, i: int, box: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    """Write image ``i`` (a JPEG of varying, non-square size); return its (width, height)."""
    width, height = 20 + 3 * (i % 5), 14 + 2 * (i % 3)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = colour(i)
    if box is not None:
        left, top, right, bottom = box
        pixels[top:bottom, left:right] = BOX_COLOUR
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # no chroma bleed at box edges
    return width, height


def cub_box(i: int) -> tuple[int, int, int, int]:
    """Left, top, right, bottom of image ``i``'s bird in a CUB replica."""
    return 2 + i % 3, 3, 12 + i % 3, 11


def write_cub(root: Path, classes: int = 4, per_class: int = 3, test_every: int = 2) -> Path:
    """``root/CUB_200_2011`` with images.txt, image_class_labels.txt, classes.txt,
    train_test_split.txt and bounding_boxes.txt (x y width height); every ``test_every``-th
    image of a class is a test image."""
    base = root / "CUB_200_2011"
    names = [f"{c:03d}.Bird_{c}" for c in range(1, classes + 1)]
    images, labels, split, boxes = [], [], [], []
    i = 0
    for c, name in enumerate(names, start=1):
        for j in range(per_class):
            rel = f"{name}/Bird_{c}_{j:04d}_{100 + i}.jpg"
            box = cub_box(i)
            _photo(base / "images" / rel, i, box)
            images.append(f"{i + 1} {rel}")
            labels.append(f"{i + 1} {c}")
            split.append(f"{i + 1} {0 if j % test_every == test_every - 1 else 1}")
            left, top, right, bottom = box
            boxes.append(f"{i + 1} {float(left)} {float(top)} {float(right - left)} {float(bottom - top)}")
            i += 1
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c} {n}" for c, n in enumerate(names, start=1)) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return base


def write_cars(root: Path, classes: int = 4, per_class: int = 2) -> Path:
    """``root`` with ``car_ims/NNNNNN.jpg`` and ``cars_annos.mat``: a 1 x N struct array
    ``annotations`` (relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test) and a
    1 x C cell array ``class_names``, as Stanford ships the all-images annotation file.
    Odd-numbered images of a class are test images."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = classes * per_class
    annotations = np.empty((1, n), dtype=[(f, object) for f in fields])
    for i in range(n):
        c, j = i // per_class + 1, i % per_class
        rel = f"car_ims/{i + 1:06d}.jpg"
        box = (1 + i % 4, 2, 13, 12)
        _photo(root / rel, i, box)
        values = [np.array([rel]), *(np.array([[v]], dtype=np.uint16) for v in box),
                  np.array([[c]], dtype=np.uint8), np.array([[j % 2]], dtype=np.uint8)]
        annotations[0, i] = tuple(values)
    class_names = np.empty((1, classes), dtype=object)
    for c in range(classes):
        class_names[0, c] = np.array([f"Make{c + 1} Model Sedan 2012"])
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def write_sop(root: Path, train_classes: int = 3, test_classes: int = 3, per_class: int = 2) -> Path:
    """``root/Stanford_Online_Products`` with Ebay_train.txt and Ebay_test.txt
    (``image_id class_id super_class_id path``); class ids of the test list follow the train list's."""
    base = root / "Stanford_Online_Products"
    supers = ["bicycle_final", "chair_final"]
    i = 0
    for part, class_ids in (("train", range(1, train_classes + 1)),
                            ("test", range(train_classes + 1, train_classes + test_classes + 1))):
        lines = ["image_id class_id super_class_id path"]
        for image_id, (c, j) in enumerate(((c, j) for c in class_ids for j in range(per_class)), start=1):
            s = c % 2
            rel = f"{supers[s]}/{111085122000 + c}_{j}.JPG"
            _photo(base / rel, i)
            lines.append(f"{image_id} {c} {s + 1} {rel}")
            i += 1
        (base / f"Ebay_{part}.txt").write_text("\n".join(lines) + "\n")
    return base


def inshop_rows(items: int = 6, per_item: int = 3) -> list[tuple[str, str, str]]:
    """(image_name, item_id, evaluation_status) rows: even-numbered items train, odd ones test
    (interleaved ids, as in In-Shop); of a test item's images the first is a query, the rest gallery."""
    rows = []
    for k in range(items):
        item = f"id_{k + 1:08d}"
        for j in range(per_item):
            status = "train" if k % 2 == 0 else "query" if j == 0 else "gallery"
            rows.append((f"img/WOMEN/Dresses/{item}/{j + 1:02d}_1_front.jpg", item, status))
    return rows


def write_inshop(root: Path, rows: list[tuple[str, str, str]] | None = None) -> Path:
    """``root/Eval/list_eval_partition.txt`` (count line, header line, then one image a line,
    columns padded as DeepFashion pads them) and the images under ``root/Img``."""
    rows = inshop_rows() if rows is None else rows
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for i, (name, item, status) in enumerate(rows):
        _photo(root / "Img" / name, i)
        lines.append(f"{name:<70} {item} {status}")
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root
