"""What a loaded model takes as input, turned into network inputs preprocessed as the run's evaluation split was.

A user hands :class:`~knnsolver.inference.model.KnnModel` image files, folders of
images, ``.npy`` files, numpy arrays or torch tensors (or a list of those).
:func:`collect` resolves them into :class:`Inputs`: one row per input, each with
a name (the file, or ``FILE.npy[i]``) and the image file behind it where there
is one. Images are decoded lazily, batch by batch, so a large folder never sits
in memory at once.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from knnsolver.data import DataBundle
from knnsolver.data.datasets import (
    IMAGE_EXTENSIONS,
    CachedImagePool,
    ImageFilePool,
    PhotoPool,
    TensorPool,
    _scan_class_folders,
    image_to_rgb,
)
from knnsolver.data.transforms import CenterCrop, Resize
from knnsolver.errors import ConfigError, DataError

IMAGE_MODES = ("grey", "stretch", "crop")
# ITU-R 601 luma weights, as Pillow's convert("L").
_LUMA = torch.tensor([0.299, 0.587, 0.114])[:, None, None]


@dataclass(frozen=True)
class InputSpec:
    """The shape of one network input and how an image file becomes one.

    Attributes:
        shape: one input's shape, e.g. ``(1, 8, 8)``, ``(3, 64, 64)`` or ``(D,)``.
        images: how an image file is read; ``None``: the network takes feature vectors, not images.
            ``grey``: greyscale in [0, 1] resized to the shape (digits, Fashion-MNIST: the
            in-memory datasets, whose pixels are in [0, 1]); ``stretch``: read as the run's
            image folder was (its channels, resized to its height and width; ``image-folder``
            without ``resize_size``); ``crop``:
            RGB, shorter side resized to ``resize_size``, then the centre square (the
            benchmarks' protocol; bounding boxes of a ``*-bbox`` dataset do not apply to new images).
        resize_size: the shorter side before the centre crop (``crop`` only).
        quantized: ``stretch`` values rounded to 1/255 after resizing, as a folder decoded
            into memory at loading was (:class:`~knnsolver.data.datasets.CachedImagePool`).
    """

    shape: tuple[int, ...]
    images: str | None
    resize_size: int | None = None
    quantized: bool = False

    @classmethod
    def of_data(cls, data: DataBundle) -> InputSpec:
        """The spec of a run's evaluation split: the pool its rows are read from, and its transform."""
        shape = tuple(int(s) for s in data.input_shape)
        pool = data.test.pool
        if isinstance(pool, PhotoPool):
            return cls(shape, "crop", pool.resize_size)
        if isinstance(pool, ImageFilePool):
            return cls(shape, "stretch")
        if isinstance(pool, CachedImagePool):
            return cls(shape, "stretch", quantized=True)
        if isinstance(pool, TensorPool) and len(shape) == 3:
            return cls(shape, "grey" if shape[0] == 1 else "stretch")
        return cls(shape, None)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "images": self.images, "resize_size": self.resize_size,
                "quantized": self.quantized}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(tuple(data["shape"]), data["images"], data.get("resize_size"), data.get("quantized", False))

    def describe(self) -> str:
        """What the network takes, in words (for error messages)."""
        rows = f"arrays of shape (N, {', '.join(map(str, self.shape))})"
        if self.images is None:
            return f"feature vectors: {rows} (a tensor, a numpy array or an .npy file)"
        return f"image files, folders of images, or {rows} already preprocessed"

    def read_image(self, path: Path) -> Tensor:
        """The image file ``path`` as one network input."""
        if self.images is None:
            raise ConfigError(f"{path} is an image, but this model takes {self.describe()}")
        if self.images == "crop":
            return CenterCrop(self.shape[1:])(PhotoPool([path], self.resize_size).get(0))
        if self.images == "stretch":
            x = ImageFilePool([path], tuple(self.shape[1:]), channels=self.shape[0]).get(0)
            return x.mul_(255.0).round_().mul_(1.0 / 255.0) if self.quantized else x
        try:
            with Image.open(path) as img:
                rgb = image_to_rgb(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read image {path}: {err}; fix or delete the file") from None
        return Resize(self.shape[1:])((rgb * _LUMA).sum(0, keepdim=True))


@dataclass
class Inputs:
    """Resolved inputs: per row a name, the image file behind it (or None) and, for array rows, the data."""

    names: list[str] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    _rows: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, spec: InputSpec, size: int) -> Iterator[Tensor]:
        """Stacked ``(B, *spec.shape)`` float32 batches of the rows, in order; images are read here."""
        for start in range(0, len(self), size):
            rows = [row if row is not None else spec.read_image(Path(path))
                    for row, path in zip(self._rows[start : start + size], self.paths[start : start + size])]
            yield torch.stack(rows)

    def _add_array(self, array: Tensor, name: str, spec: InputSpec) -> None:
        if not array.is_floating_point() and array.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                                  torch.int64):
            raise ConfigError(f"{name} holds {array.dtype} values; the model takes numbers")
        if spec.images is not None and not array.is_floating_point():
            raise ConfigError(f"{name} holds {array.dtype} values, but this model takes images as floats in [0, 1] "
                              "(divide 8-bit pixels by 255), or image files")
        if tuple(array.shape) == spec.shape:
            array = array[None]
        if tuple(array.shape[1:]) != spec.shape:
            raise ConfigError(f"{name} has shape {tuple(array.shape)}, but this model takes {spec.describe()}")
        array = array.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(array).all()):
            raise DataError(f"{name} holds NaN or infinite values; fix or drop those rows")
        single = len(array) == 1 and name.endswith(".npy")
        for i, row in enumerate(array):
            self.names.append(name if single else f"{name}[{i}]")
            self.paths.append(None)
            self._rows.append(row)

    def _add_path(self, path: Path, spec: InputSpec) -> None:
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not images:
                raise DataError(f"folder {path} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            for image in images:
                self._add_path(image, spec)
        elif path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise DataError(f"cannot read array {path}: {err}") from None
            if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
                raise DataError(f"{path} holds {array.dtype} values; the model takes numbers")
            self._add_array(torch.from_numpy(_native(array)), str(path), spec)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            if spec.images is None:
                raise ConfigError(f"{path} is an image, but this model takes {spec.describe()}")
            self.names.append(str(path))
            self.paths.append(str(path.resolve()))  # a reference set's file, found from any working folder
            self._rows.append(None)
        else:
            raise ConfigError(f"{path} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), an .npy file nor "
                              f"a folder; this model takes {spec.describe()}")


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` contiguous, in the machine's byte order (torch takes no other: a big-endian .npy file)."""
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))


def collect(inputs: Any, spec: InputSpec) -> Inputs:
    """Resolve ``inputs`` (a tensor, an array, a path, or a list of paths) into :class:`Inputs`; empty is refused.

    Already resolved :class:`Inputs` are returned as they are.
    """
    if isinstance(inputs, Inputs):
        return inputs
    out = Inputs()
    if isinstance(inputs, Tensor):
        out._add_array(inputs, "input", spec)
    elif isinstance(inputs, np.ndarray):
        if not (np.issubdtype(inputs.dtype, np.integer) or np.issubdtype(inputs.dtype, np.floating)):
            raise ConfigError(f"the input array holds {inputs.dtype} values; the model takes numbers")
        out._add_array(torch.from_numpy(_native(inputs)), "input", spec)
    elif isinstance(inputs, (str, Path)):
        out._add_path(Path(inputs), spec)
    elif isinstance(inputs, Sequence) and all(isinstance(i, (str, Path)) for i in inputs):
        for item in inputs:
            out._add_path(Path(item), spec)
    else:
        raise ConfigError(f"the model takes {spec.describe()}, or paths of them; got {type(inputs).__name__}")
    if not len(out):
        raise ConfigError("no inputs given")
    return out


def class_folders(root: str | Path) -> list[tuple[str, list[Path]]]:
    """``(class name, sorted image files)`` for each sub-folder of ``root``, in name order.

    Only images directly in a class folder count; a missing or empty tree, or an
    empty class folder, is refused with one line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist or is not a folder")
    return list(_scan_class_folders(root).items())
