"""Dataset sources: the loaders named in the ``DATASETS`` registry and the row dataset.

A loader returns a :class:`Source`: every row of the dataset in one pool (images
or feature vectors) with integer class ids, the official train/test rows, the
class names, the input shape and the training augmentation. :func:`knnsolver.data.build_data`
turns a source into train / validation / test :class:`RowDataset` objects.

Image pixels are kept in [0, 1] and not standardised: the networks start with
batch normalisation, and a single scale keeps every source comparable; the
ImageNet backbones (:mod:`knnsolver.models.backbones`, timm models) standardise
their input with their pretraining's statistics themselves.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import operator
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from knnsolver.data.splits import official_split
from knnsolver.data.augment import AugmentPolicy
from knnsolver.data.transforms import CenterCrop, Resize, Transform
from knnsolver.errors import ConfigError, DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_EMBEDDING_FILES = {"x": "features.npy", "y": "labels.npy", "x_test": "test_features.npy", "y_test": "test_labels.npy"}
# The standard protocol's training crop: 16-100% of the area (Musgrave et al., "A Metric Learning Reality Check").
PROTOCOL_CROP_SCALE = (0.16, 1.0)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})

_FASHION_HINT = (
    "Run `make data` (installs the Debian package dataset-fashion-mnist into "
    f"{FASHION_MNIST_DIR}) or pass --data-dir pointing at a folder with the four Fashion-MNIST IDX .gz files."
)
_EMBEDDINGS_HINT = (
    "embeddings expect an .npz file with arrays x (N, D) and y (N,), optionally x_test and y_test, "
    "or a folder with features.npy and labels.npy, optionally test_features.npy and test_labels.npy"
)


class Pool:
    """Random access to the input of every row of a source."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> Tensor:
        """Return row ``index`` as a new float32 tensor."""
        raise NotImplementedError

    def fingerprint(self, portable: bool = False) -> str:
        """A hash that changes when the pool's content changes (see :func:`knnsolver.data.data_fingerprint`);
        ``portable``: the same for the same data at another path (another machine's copy)."""
        raise NotImplementedError


class TensorPool(Pool):
    """Rows held in memory; ``scale`` converts stored values (e.g. uint8 pixels) to floats."""

    def __init__(self, data: Tensor, scale: float = 1.0) -> None:
        self.data = data
        self.scale = float(scale)

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, index: int) -> Tensor:
        x = self.data[index].to(torch.float32, copy=True)
        return x.mul_(self.scale) if self.scale != 1.0 else x

    def fingerprint(self, portable: bool = False) -> str:
        """Hash of the stored values, their dtype, shape and scale (portable as it is)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.data.dtype} {tuple(self.data.shape)} {self.scale}".encode())
        digest.update(self.data.contiguous().numpy().tobytes())
        return digest.hexdigest()


# Pillow modes of more than 8 bits per sample, and the value that is full scale in each
# (16-bit PNGs open as I;16 or as 32-bit I holding 0..65535).
_HIGH_DEPTH_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def image_to_rgb(img: Image.Image) -> Tensor:
    """A Pillow image as a (3, H, W) float32 tensor in [0, 1].

    8-bit modes go through ``convert("RGB")``; high-bit-depth greyscale (16-bit
    PNG/TIFF, 32-bit integer or float) is scaled by its own full scale instead,
    since ``convert("RGB")`` saturates every value above 255 to white.
    """
    full_scale = _HIGH_DEPTH_FULL_SCALE.get(img.mode)
    if full_scale is None:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div_(255.0)
    grey = torch.from_numpy(np.asarray(img).astype(np.float32) / full_scale).clamp_(0.0, 1.0)
    return grey.unsqueeze(0).expand(3, -1, -1).contiguous()


def image_to_grey(img: Image.Image) -> Tensor:
    """A Pillow image as a (1, H, W) float32 tensor in [0, 1] (colour is converted to luminance,
    high-bit-depth greyscale scaled by its own full scale, as in :func:`image_to_rgb`)."""
    full_scale = _HIGH_DEPTH_FULL_SCALE.get(img.mode)
    if full_scale is None:
        return torch.from_numpy(np.asarray(img.convert("L")).copy())[None].float().div_(255.0)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / full_scale).clamp_(0.0, 1.0)[None]


# Pillow modes that hold one grey value per pixel (greyscale folders load as 1 channel by default).
GREY_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageFilePool(Pool):
    """Image files read lazily with Pillow, as RGB (:func:`image_to_rgb`) or with ``channels=1`` as
    greyscale (:func:`image_to_grey`), resized to ``size`` (an int: a square; ``(height, width)``).

    Images of another size are stretched, not cropped, so nothing of the object is lost.
    """

    def __init__(self, paths: list[Path], size: int | tuple[int, int], channels: int = 3) -> None:
        self.paths = list(paths)
        self.resize = Resize(size)
        self.to_tensor = image_to_grey if channels == 1 else image_to_rgb

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                x = self.to_tensor(img)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {err}; fix or delete the file") from None
        return self.resize(x)

    def fingerprint(self, portable: bool = False) -> str:
        """Hash of every file's path, size and modification time (reading every image would be slow)."""
        return files_fingerprint(self.paths, portable=portable)


class CachedImagePool(TensorPool):
    """8-bit image files decoded once, at loading, into memory (:class:`ImageFilePool`'s values,
    after any resizing rounded to 1/255), so no epoch decodes a file again and in-memory
    batching applies (:mod:`knnsolver.data.batches`). Its fingerprint is still the files'."""

    def __init__(self, files: ImageFilePool) -> None:
        first = files.get(0)
        data = torch.empty(len(files), *first.shape, dtype=torch.uint8)
        for i in range(len(files)):
            data[i] = (first if i == 0 else files.get(i)).mul_(255.0).round_()
        super().__init__(data, scale=1.0 / 255.0)
        self.paths = files.paths

    def fingerprint(self, portable: bool = False) -> str:
        return files_fingerprint(self.paths, portable=portable)


def files_fingerprint(paths: list[Path], extra: str = "", portable: bool = False) -> str:
    """Hash of ``extra`` and every file's path, size and modification time (not the contents: reading
    every image would be slow); ``portable``: each path below the files' common folder, and sizes only, so a
    copy elsewhere (another machine's) hashes the same."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(extra.encode())
    root = os.path.commonpath([str(p) for p in paths]) if portable and paths else ""
    for path in paths:
        st = path.stat()
        line = (f"{os.path.relpath(path, root)}\0{st.st_size}" if portable
                else f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()


Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


class PhotoPool(Pool):
    """Image files decoded on access as RGB, cropped to an optional box, shorter side resized to ``resize_size``.

    Resizing keeps the aspect ratio (Pillow's bilinear filter, which averages when
    shrinking), so a later centre or random crop sees the object undistorted.
    """

    def __init__(self, paths: list[Path], resize_size: int, boxes: list[Box] | None = None) -> None:
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(boxes)} boxes")
        self.paths = list(paths)
        self.resize_size = int(resize_size)
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self, portable: bool = False) -> str:
        """Hash of the files (:func:`files_fingerprint`), the resize and the boxes."""
        return files_fingerprint(self.paths, f"{self.resize_size} {self.boxes}", portable)

    def get(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                full_scale = _HIGH_DEPTH_FULL_SCALE.get(img.mode)
                if full_scale is None:
                    img = img.convert("RGB")
                else:  # as image_to_rgb: by its own full scale, kept as float ("F") through crop and resize
                    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) / full_scale, 0.0, 1.0), mode="F")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {err}; fix or delete the file") from None
        if self.boxes is not None:
            img = img.crop(_clip_box(self.boxes[index], img.size))
        width, height = img.size
        scale = self.resize_size / min(width, height)
        size = (max(self.resize_size, round(width * scale)), max(self.resize_size, round(height * scale)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        if img.mode == "F":
            return torch.from_numpy(np.asarray(img).copy()).unsqueeze(0).expand(3, -1, -1).contiguous()
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255.0)


def _clip_box(box: Box, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` rounded to whole pixels inside the image, at least one pixel wide and high."""
    width, height = image_size
    left = min(max(0, round(box[0])), width - 1)
    top = min(max(0, round(box[1])), height - 1)
    right = min(max(left + 1, round(box[2])), width)
    bottom = min(max(top + 1, round(box[3])), height)
    return left, top, right, bottom


@dataclass
class Source:
    """A dataset as loaded, before splitting.

    Attributes:
        name: registry name of the dataset.
        pool: the input of every row.
        labels: class id of every pool row (an index into ``class_names``).
        train_rows, test_rows: sorted pool rows of the official train and test sets.
        class_names: name of every class id.
        input_shape: shape of one input, e.g. ``(1, 8, 8)`` or ``(D,)``.
        augment_policy: the augmentation options the dataset allows and its default set
            (:mod:`knnsolver.data.augment`), or ``None`` where augmentation makes no sense.
        eval_transform: transform of every row not augmented (e.g. a centre crop), or ``None``.
        disjoint_train_classes: the class ids that train under the dataset's own unseen-class
            protocol (SOP's and In-Shop's training lists); ``None``: the first half of the classes.
        query_rows: pool rows (among the test rows) that query a gallery of the other test rows
            (In-Shop); ``None``: test rows are queried against each other.
        recall_ks: the Recall@K cut-offs the dataset is reported at.
    """

    name: str
    pool: Pool
    labels: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    class_names: list[str]
    input_shape: tuple[int, ...]
    augment_policy: AugmentPolicy | None = None
    eval_transform: Transform | None = None
    disjoint_train_classes: list[int] | None = None
    query_rows: np.ndarray | None = None
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    notes: str = ""  # how the inputs were converted (size, channels, cache), for the run's first lines


class RowDataset(Dataset):
    """Selected rows of a pool with their (remapped) labels.

    Items are ``(input, label, row_index)`` where ``row_index`` is the item's
    position in this dataset, so stateful solvers can index a bank by it.
    ``transform`` (augmentation) is applied to the input when given.
    """

    def __init__(self, pool: Pool, rows: np.ndarray, labels: np.ndarray, transform: Transform | None = None) -> None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        self.pool = pool
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for a dataset of {len(self)} rows")
        x = self.pool.get(int(self.rows[index]))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index], index


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as (1, 8, 8) floats in [0, 1].

    The data has no official test set: a stratified 20% is held out with a fixed
    seed (:func:`knnsolver.data.splits.official_split`), the same in every run.
    Augmentation (``--augment true``): ``crop:1``, random 1-pixel shifts. Orientation-sensitive:
    flips are refused (a mirrored 2, 3 or 7 is no digit).
    """
    from sklearn import datasets as sk_datasets

    digits = sk_datasets.load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0)[:, None]
    labels = digits.target.astype(np.int64)
    train_rows, test_rows = official_split(labels)
    return Source(
        name="digits",
        pool=TensorPool(images),
        labels=labels,
        train_rows=train_rows,
        test_rows=test_rows,
        class_names=[str(d) for d in range(10)],
        input_shape=(1, 8, 8),
        augment_policy=AugmentPolicy(("crop:1",), (8, 8), orientation_sensitive=True),
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes, checking its magic number and size.

    Raises DataError naming ``path`` when it is missing, not gzip, has the wrong
    magic number, or holds more or fewer bytes than its header announces.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file {path} is missing. {_FASHION_HINT}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"Fashion-MNIST file {path} is not a valid gzip file ({err}). {_FASHION_HINT}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"Fashion-MNIST file {path} is truncated: {len(raw)} bytes, shorter than its header. {_FASHION_HINT}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"Fashion-MNIST file {path} has IDX magic number {found:#010x}, expected {magic:#010x}. {_FASHION_HINT}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"Fashion-MNIST file {path} holds {len(raw) - header} data bytes but its header {dims} "
            f"announces {expected} (truncated or corrupt). {_FASHION_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(data_dir: str | None = None) -> Source:
    """Fashion-MNIST from its four IDX .gz files, as (1, 28, 28) floats in [0, 1].

    Reads ``data_dir`` or, by default, ``/usr/share/datasets/fashion-mnist``.
    Pixels stay uint8 in memory and are scaled on access. Official split:
    60000 train / 10000 test. Augmentation (``--augment true``): ``crop:2,flip``, random shifts
    of up to 2 pixels and horizontal flips. Not orientation-sensitive: a mirrored shirt, shoe or
    bag is still one (the classes are left-right symmetric), so flips are allowed.
    """
    root = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist. {_FASHION_HINT}")
    paths = {key: root / fname for key, fname in FASHION_MNIST_FILES.items()}
    arrays = {key: read_idx(p, IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC) for key, p in paths.items()}
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"Fashion-MNIST {part} files disagree: {paths[f'{part}_images']} holds {n_img} images but "
                f"{paths[f'{part}_labels']} holds {n_lab} labels. {_FASHION_HINT}"
            )
        if n_lab and arrays[f"{part}_labels"].max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(
                f"Fashion-MNIST file {paths[f'{part}_labels']} has label {arrays[f'{part}_labels'].max()}, "
                f"but the data has {len(FASHION_MNIST_CLASSES)} classes. {_FASHION_HINT}"
            )
    image_hw = arrays["train_images"].shape[1:]
    if arrays["test_images"].shape[1:] != image_hw:
        raise DataError(
            f"Fashion-MNIST image sizes differ: {paths['train_images']} has {image_hw}, "
            f"{paths['test_images']} has {arrays['test_images'].shape[1:]}. {_FASHION_HINT}"
        )
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    images = torch.from_numpy(np.concatenate([arrays["train_images"], arrays["test_images"]]))[:, None]
    return Source(
        name="fashion-mnist",
        pool=TensorPool(images, scale=1.0 / 255.0),
        labels=np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64),
        train_rows=np.arange(n_train),
        test_rows=np.arange(n_train, n_train + n_test),
        class_names=list(FASHION_MNIST_CLASSES),
        input_shape=(1, *image_hw),
        augment_policy=AugmentPolicy(("crop:2", "flip"), tuple(image_hw)),
    )


def _scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Map each class sub-folder name of ``root`` to its sorted image files."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders; put the images of each class in their own sub-folder")
    found = {}
    for d in class_dirs:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        if not files:
            raise DataError(
                f"class folder {d} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        found[d.name] = files
    return found


def _check_image(path: Path) -> None:
    """Fail before training, naming the file, when Pillow cannot decode an image (unknown format, truncated).

    JPEGs are decoded at 1/8 scale (``draft``), which reads every byte at a fraction of the cost.
    """
    try:
        with Image.open(path) as img:
            img.draft(img.mode, (1, 1))
            img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}; fix or delete the file") from None


# What ``knnsolver datasets`` says about image folders (load_image_folder's docstring in short).
IMAGE_FOLDER_HELP = """\
image-folder (--dataset image-folder --data-dir D):
  layout      D/<class>/<image> (png, jpg, jpeg, bmp, gif, tif, tiff, webp, ppm; only images directly in a
              class folder count), or D/train/<class>/... and D/test/<class>/... for your own split
  split       standard: D/train and D/test when present, else a stratified 20% of each class is held out
              as test (fixed seed); disjoint: the first half of the sorted class names train, the rest test
              (the train/test folders are pooled); validation: --val-fraction of the training rows
  size        native when every image has the same size (any aspect, sides up to 256 px); else stretched to 64x64;
              --image-size N stretches every image to NxN
  channels    1 when every image is greyscale, else RGB (greyscale repeated); --image-channels 1|3 forces it
  memory      decoded once at start-up and kept in memory (8-bit) when that takes at most --image-cache-mb
              (default 1024 MB; 0 turns it off); else each epoch reads the files again (use --num-workers)
  augment     --augment true = scale,flip; for characters, digits or text use --augment scale or crop
              (options: flip[:p], crop[:pixels], scale[:min area], comma-separated, applied in order)
  network     --model auto: conv28 up to 64 px (or under 2,000 training rows), else resnet
"""

# Default cap on the memory an image folder's decoded cache may take (``image_cache_mb``).
IMAGE_CACHE_MB = 1024
# The side images are stretched to when a folder's images differ in size and no image_size is given.
IMAGE_FOLDER_SIZE = 64
NATIVE_MAX_SIDE = 256  # a shared native size up to this side is kept; larger photos are stretched to the default


def _scan_headers(paths: list[Path]) -> tuple[set[tuple[int, int]], bool, bool]:
    """The (width, height) sizes found, whether every image is greyscale and whether any is over 8 bits,
    from each file's header (Pillow reads no pixels for this); unreadable files are refused, naming them."""
    sizes, grey, deep = set(), True, False
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
                grey = grey and img.mode in GREY_MODES
                deep = deep or img.mode in _HIGH_DEPTH_FULL_SCALE
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read image {path}: {err}; fix or delete the file") from None
    return sizes, grey, deep


def load_image_folder(data_dir: str | None = None, image_size: int | None = None, resize_size: int | None = None,
                      image_channels: int | None = None, image_cache_mb: int = IMAGE_CACHE_MB) -> Source:
    """Images in one sub-folder per class (the CUB-200 / Cars196 layout), as (C, H, W) floats in [0, 1].

    Layout and split: ``data_dir/<class>/<image>``; only images directly in a class folder count
    (extensions: png, jpg, jpeg, bmp, gif, tif, tiff, webp, ppm). When ``data_dir`` has ``train/``
    and ``test/`` sub-folders (each with one folder per class) they are the official split;
    otherwise a stratified 20 % of each class is held out as the test set with a fixed seed.
    ``--split disjoint`` ignores that split: the first half of the sorted class names train, the
    rest test.

    Conversions: with no ``image_size``, images keep their native size when all share it (any
    aspect, sides up to :data:`NATIVE_MAX_SIDE`), else are stretched to 64x64; ``image_size`` stretches them to that square. Channels:
    ``image_channels`` 1 (greyscale; colour converted to luminance) or 3 (RGB; greyscale repeated);
    ``None`` picks 1 when every image is greyscale, else 3. 16-bit greyscale is scaled by its own
    full scale. Cache: when the decoded images take at most ``image_cache_mb`` MB (one byte per
    value; 0 turns it off), every file is decoded once at loading and kept in memory as 8-bit
    values, instead of decoding each file again in every epoch; otherwise files are read lazily
    (use ``--num-workers``). Every file is read once at loading either way, so a broken image is
    reported before training.

    Augmentation (``--augment true``): ``scale,flip``, a random crop of 50-100 % of the area resized
    back and horizontal flips; for characters, digits or text use ``--augment scale`` or ``crop``.

    With ``resize_size`` images follow the benchmarks' protocol instead of being stretched: RGB,
    shorter side resized to ``resize_size`` (aspect kept), the centre ``image_size`` square for
    evaluation (default 224), a random-resized crop of 16-100 % of the area and flips for
    training; nothing is cached.
    """
    if data_dir is None:
        raise ConfigError("dataset 'image-folder' needs data_dir (--data-dir): a folder with one sub-folder of images per class")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    if image_channels not in (None, 1, 3):
        raise ConfigError(f"image_channels must be 1 (greyscale), 3 (RGB) or null (automatic), got {image_channels}")
    if resize_size is not None:
        if image_channels == 1:
            raise ConfigError("image_channels 1 does not apply with resize_size (the benchmark protocol is RGB); drop one")
        image_size = image_size or 224
        if resize_size < image_size:
            raise ConfigError(f"resize_size ({resize_size}) must be >= image_size ({image_size}): the centre crop is cut "
                              "from the resized image")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    subdirs = {d.name for d in root.iterdir() if d.is_dir()}
    if "train" in subdirs or "test" in subdirs:
        if not {"train", "test"} <= subdirs:
            present, absent = ("train", "test") if "train" in subdirs else ("test", "train")
            raise DataError(f"image folder {root} has a {present}/ folder but no {absent}/; provide both or neither")
        parts = [_scan_class_folders(root / "train"), _scan_class_folders(root / "test")]
    else:
        parts = [_scan_class_folders(root)]
    class_names = sorted(set().union(*parts))
    paths, labels, part_of = [], [], []
    for p, found in enumerate(parts):
        for name, files in found.items():
            paths += files
            labels += [class_names.index(name)] * len(files)
            part_of += [p] * len(files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if len(parts) == 2:
        part_arr = np.asarray(part_of)
        train_rows, test_rows = np.flatnonzero(part_arr == 0), np.flatnonzero(part_arr == 1)
    else:
        train_rows, test_rows = official_split(labels_arr)
    common = dict(name="image-folder", labels=labels_arr, train_rows=train_rows, test_rows=test_rows,
                  class_names=class_names)
    if resize_size is not None:
        for path in paths:  # every split's images, before any training
            _check_image(path)
        return Source(**common, pool=PhotoPool(paths, resize_size), input_shape=(3, image_size, image_size),
                      augment_policy=AugmentPolicy(("scale", "flip"), (image_size, image_size),
                                                   min_scale=PROTOCOL_CROP_SCALE[0], uncropped=True),
                      eval_transform=CenterCrop(image_size), notes="RGB, benchmark resize and centre crop")
    sizes, grey, deep = _scan_headers(paths)
    channels = image_channels or (1 if grey else 3)
    if image_size is not None:
        hw, how = (image_size, image_size), f"stretched to {image_size}x{image_size} (--image-size)"
    elif len(sizes) == 1 and max(next(iter(sizes))) <= NATIVE_MAX_SIDE:
        (w, h), = sizes
        hw, how = (h, w), f"native size {h}x{w}"
    elif len(sizes) == 1:
        (w, h), = sizes
        hw = (IMAGE_FOLDER_SIZE, IMAGE_FOLDER_SIZE)
        how = (f"native size {h}x{w} is over {NATIVE_MAX_SIDE} px, stretched to {IMAGE_FOLDER_SIZE}x{IMAGE_FOLDER_SIZE} "
               "(set --image-size)")
    else:
        hw = (IMAGE_FOLDER_SIZE, IMAGE_FOLDER_SIZE)
        how = f"{len(sizes)} sizes found, stretched to {IMAGE_FOLDER_SIZE}x{IMAGE_FOLDER_SIZE} (set --image-size)"
    colour = ("greyscale, 1 channel" if channels == 1 and grey else "converted to greyscale" if channels == 1
              else "greyscale repeated to 3 channels" if grey else "RGB")
    pool: Pool = ImageFilePool(paths, hw, channels)
    megabytes = len(paths) * channels * hw[0] * hw[1] / 2**20
    if megabytes <= image_cache_mb and not deep:
        pool, cache = CachedImagePool(pool), f"decoded once into memory ({megabytes:.0f} MB)"
    else:
        for path in paths:  # every split's images, before any training
            _check_image(path)
        why = ("16-bit images are not cached" if deep else "image_cache_mb=0" if not image_cache_mb
               else f"{megabytes:.0f} MB decoded exceeds image_cache_mb={image_cache_mb}")
        cache = f"read from disk every epoch ({why})"
    return Source(**common, pool=pool, input_shape=(channels, *hw),
                  augment_policy=AugmentPolicy(("scale", "flip"), hw), notes=f"{how}, {colour}, {cache}")


def _read_array(read: Callable[[], np.ndarray], where: str) -> np.ndarray:
    """Run ``read``, turning any failure to parse the array into a DataError naming ``where``."""
    try:
        return read()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read embeddings array {where}: {err}") from None


def _check_present(present: set[str], names: dict[str, str]) -> None:
    """Require the training arrays, and both test arrays or neither."""
    missing = [names[k] for k in ("x", "y") if k not in present]
    if missing:
        raise DataError(f"embeddings array(s) {', '.join(missing)} missing; {_EMBEDDINGS_HINT}")
    if len(present & {"x_test", "y_test"}) == 1:
        raise DataError(f"only one of {names['x_test']} and {names['y_test']} is present; provide both or neither")


def _check_pair(x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    """Validate one features/labels pair: 2-D finite numeric features, 1-D integer labels, same length."""
    if x.ndim != 2:
        raise DataError(f"embeddings {xname} must be 2-D (samples, features), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"embeddings {xname} must be numeric, got dtype {x.dtype}")
    if y.ndim != 1:
        raise DataError(f"embeddings labels {yname} must be 1-D, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"embeddings labels {yname} must be integers, got dtype {y.dtype}")
    if len(x) != len(y):
        raise DataError(f"embeddings {xname} has {len(x)} rows but labels {yname} has {len(y)}")
    if len(x) == 0:
        raise DataError(f"embeddings {xname} holds no rows")
    if x.shape[1] == 0:
        raise DataError(f"embeddings {xname} has 0 features (shape {x.shape}); nothing could be learnt from it")
    with np.errstate(over="ignore", invalid="ignore"):
        as_float32 = x.astype(np.float32)
    if not np.isfinite(as_float32).all():
        bad = int((~np.isfinite(as_float32)).any(1).sum())
        raise DataError(f"embeddings {xname} has {bad} row(s) holding NaN or infinite values, or values beyond "
                        "float32's range (|x| > 3.4e38) that become infinite when cast to float32; fix or drop them")


def load_embeddings(data_dir: str | None = None) -> Source:
    """Precomputed feature vectors and integer labels, as (D,) float32 inputs.

    ``data_dir`` is either an ``.npz`` file with arrays ``x`` (N, D) and ``y``
    (N,), optionally ``x_test`` and ``y_test``; or a folder with
    ``features.npy`` and ``labels.npy``, optionally ``test_features.npy`` and
    ``test_labels.npy``. Without test arrays a stratified 20% is held out with a
    fixed seed. Labels may be any integers: they are renumbered 0..C-1 in sorted
    order (labels 3, 7, 9 become class ids 0, 1, 2, which ``train_classes`` and
    ``val_classes`` name), and class names are the original labels' decimal text. No
    augmentation.
    """
    if data_dir is None:
        raise ConfigError(f"dataset 'embeddings' needs data_dir (--data-dir); {_EMBEDDINGS_HINT}")
    path = Path(data_dir)
    if path.is_file() and path.suffix == ".npz":
        npz = _read_array(lambda: np.load(path, allow_pickle=False), str(path))
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"embeddings file {path} is a single .npy array, not an .npz archive; {_EMBEDDINGS_HINT}")
        with npz:
            present = set(npz.files)
            names = {k: f"{path} [{k}]" for k in ("x", "y", "x_test", "y_test")}
            _check_present(present, names)
            arrays = {k: _read_array(lambda k=k: npz[k], names[k]) for k in names if k in present}
    elif path.is_dir():
        names = {k: str(path / f) for k, f in _EMBEDDING_FILES.items()}
        present = {k for k, f in _EMBEDDING_FILES.items() if (path / f).is_file()}
        _check_present(present, names)
        arrays = {k: _read_array(lambda k=k: np.load(names[k], allow_pickle=False), names[k]) for k in names if k in present}
    elif not path.exists():
        raise DataError(f"embeddings path {path} does not exist; {_EMBEDDINGS_HINT}")
    else:
        raise DataError(f"embeddings path {path} is neither an .npz file nor a folder; {_EMBEDDINGS_HINT}")
    _check_pair(arrays["x"], arrays["y"], names["x"], names["y"])
    x, y = arrays["x"], arrays["y"]
    if "x_test" in arrays:
        _check_pair(arrays["x_test"], arrays["y_test"], names["x_test"], names["y_test"])
        if arrays["x_test"].shape[1] != x.shape[1]:
            raise DataError(
                f"embeddings {names['x_test']} has {arrays['x_test'].shape[1]} features but {names['x']} has {x.shape[1]}"
            )
        x, y = np.concatenate([x, arrays["x_test"]]), np.concatenate([y, arrays["y_test"]])
    class_values, labels = np.unique(y, return_inverse=True)
    labels = labels.astype(np.int64)
    if "x_test" in arrays:
        n_train = len(arrays["x"])
        train_rows, test_rows = np.arange(n_train), np.arange(n_train, len(x))
    else:
        train_rows, test_rows = official_split(labels)
    return Source(
        name="embeddings",
        pool=TensorPool(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))),
        labels=labels,
        train_rows=train_rows,
        test_rows=test_rows,
        class_names=[str(v) for v in class_values],
        input_shape=(x.shape[1],),
    )
