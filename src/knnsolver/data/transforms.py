"""Small image transforms written in torch (torchvision is not a dependency).

Every transform is a callable taking and returning one ``(C, H, W)`` float
tensor. The random ones draw from torch's global RNG, which the trainer seeds
per epoch, so a run is reproducible without passing generators around.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from knnsolver.errors import ConfigError

Transform = Callable[[Tensor], Tensor]


def _pair(size: int | tuple[int, int], what: str) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ConfigError(f"{what} must be >= 1, got {size}")
    return int(h), int(w)


def _check_image(x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"image transforms expect a (C, H, W) tensor, got shape {tuple(x.shape)}")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize to ``size`` (an int gives a square) by bilinear interpolation.

    With ``antialias`` (the default) downscaling averages over the source
    pixels instead of aliasing, which matters when shrinking photos.
    """

    def __init__(self, size: int | tuple[int, int], antialias: bool = True) -> None:
        self.size = _pair(size, "resize size")
        self.antialias = antialias

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        if tuple(x.shape[-2:]) == self.size:
            return x
        out = F.interpolate(x[None].float(), size=self.size, mode="bilinear", align_corners=False, antialias=self.antialias)
        return out[0]

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomCrop:
    """Zero-pad by ``padding`` pixels on each side, then crop a random ``size`` window.

    The classic small-image augmentation (shifts of up to ``padding`` pixels).
    """

    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size = _pair(size, "crop size")
        if padding < 0:
            raise ConfigError(f"crop padding must be >= 0, got {padding}")
        self.padding = int(padding)

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        if self.padding:
            x = F.pad(x, (self.padding,) * 4)
        h, w = self.size
        top_max, left_max = x.shape[-2] - h, x.shape[-1] - w
        if top_max < 0 or left_max < 0:
            raise ValueError(f"crop {self.size} is larger than the padded image {tuple(x.shape[-2:])}")
        top = int(torch.randint(top_max + 1, ()))
        left = int(torch.randint(left_max + 1, ()))
        return x[:, top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.padding})"


class RandomResizedCrop:
    """Crop a random region (``scale`` of the area, aspect ``ratio``) and resize it to ``size``.

    The region's area fraction is uniform in ``scale`` and its log aspect ratio
    uniform in ``log(ratio)``; sides are clipped to the image, so it always succeeds.
    """

    def __init__(
        self, size: int | tuple[int, int], scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        self.resize = Resize(size)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        height, width = x.shape[-2:]
        area = height * width * float(torch.empty(()).uniform_(*self.scale))
        aspect = math.exp(float(torch.empty(()).uniform_(*self.log_ratio)))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        return self.resize(x[:, top : top + h, left : left + w])

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.resize.size}, scale={self.scale})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        return x.flip(-1) if float(torch.rand(())) < self.p else x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """Standardise each channel: ``(x - mean[c]) / std[c]``.

    The built-in datasets keep pixels in [0, 1]; use this when a backbone
    expects standardised input (e.g. ImageNet statistics for pretrained nets).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ConfigError(f"normalize needs one mean and one std per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"normalize std values must be > 0, got {list(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(f"normalize was given {self.mean.shape[0]} channel statistics but the image has {x.shape[0]} channels")
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class CenterCrop:
    """Cut the central ``size`` window (the evaluation half of the resize-then-crop protocol)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _pair(size, "crop size")

    def __call__(self, x: Tensor) -> Tensor:
        _check_image(x)
        h, w = self.size
        height, width = x.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"centre crop {self.size} is larger than the image {(height, width)}")
        top, left = (height - h) // 2, (width - w) // 2
        return x[:, top : top + h, left : left + w]

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"
