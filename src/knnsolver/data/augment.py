"""Training augmentation as named, composable options: ``--augment flip,crop`` or ``augment = ["scale:0.3", "flip"]``.

Each name may carry a strength after a colon; the options apply in the order given:

* ``flip[:P]``: mirror left-right with probability ``P`` (default 0.5). Refused on a dataset
  that declares itself orientation-sensitive (digits: a mirrored 2, 3 or 7 is no digit; the
  same holds for characters and text, b/d, p/q).
* ``crop[:N]``: random shift: zero-pad ``N`` pixels a side, then cut a window of the image's
  size (default: the side / 14, at least 1: 1 px at 8x8, 2 px at 28-32 px).
* ``scale[:S]``: random-resized crop: a region of ``S``-100 % of the area (aspect 3/4 to 4/3)
  resized to the image's size (default ``S`` = the dataset's, 0.5; 0.16 for the benchmarks).

``augment = true`` (``--augment true``) is the dataset's own default set
(:class:`AugmentPolicy`, listed by ``knnsolver datasets``), ``false`` none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from knnsolver.data.transforms import CenterCrop, Compose, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Transform
from knnsolver.errors import ConfigError

NAMES = ("flip", "crop", "scale")


@dataclass(frozen=True)
class AugmentPolicy:
    """What a dataset allows: its default option set, the training image size, and whether flips are wrong for it.

    Attributes:
        default: the options ``augment = true`` stands for, e.g. ``("crop:2", "flip")``.
        size: the (height, width) the augmented image must keep.
        orientation_sensitive: mirrored images would be other classes or no class (digits, characters).
        min_scale: ``scale``'s default smallest area fraction.
        uncropped: the stored images are larger than ``size`` (resized, not yet cropped:
            the benchmark protocol), so options that do not crop (``flip`` alone) end
            with the evaluation's centre crop.
    """

    default: tuple[str, ...]
    size: tuple[int, int]
    orientation_sensitive: bool = False
    min_scale: float = 0.5
    uncropped: bool = False

    def describe(self) -> str:
        """The default set in words, for ``knnsolver datasets``."""
        flips = "; no flips (orientation-sensitive)" if self.orientation_sensitive else ""
        return f"--augment true = {','.join(self.default)}{flips}"


def parse_options(names: list[str]) -> list[tuple[str, float | None]]:
    """``["crop:4", "flip"]`` as ``[("crop", 4.0), ("flip", None)]``; unknown names or bad strengths are refused."""
    parsed = []
    for item in names:
        name, _, strength = item.partition(":")
        if name not in NAMES:
            raise ConfigError(f"unknown augmentation {name!r} in augment; choose from: {', '.join(NAMES)} "
                              "(each optionally name:strength, e.g. crop:4), or true/false")
        try:
            value = float(strength) if strength else None
        except ValueError:
            raise ConfigError(f"augmentation {item!r}: the strength after ':' must be a number") from None
        if value is not None and not (math.isfinite(value) and value >= 1 and value == int(value) if name == "crop"
                                      else 0 < value <= 1):
            limit = "a whole number of pixels >= 1" if name == "crop" else "in (0, 1]"
            raise ConfigError(f"augmentation {item!r}: the strength must be {limit}")
        parsed.append((name, value))
    return parsed


def build_augmentation(augment: bool | list[str], policy: AugmentPolicy | None, dataset: str) -> Transform | None:
    """The training transform ``augment`` asks for on a dataset with ``policy`` (``None``: no augmentation)."""
    if augment is False or augment == []:
        return None
    if policy is None:
        raise ConfigError(f"dataset {dataset!r} has no augmentation (its inputs are not images); drop --augment")
    options = parse_options(list(policy.default) if augment is True else list(augment))
    transforms: list[Transform] = []
    for name, strength in options:
        if name == "flip":
            if policy.orientation_sensitive:
                raise ConfigError(f"dataset {dataset!r} is orientation-sensitive (a mirrored image is another class or "
                                  "none), so flips are refused; drop flip from --augment")
            transforms.append(RandomHorizontalFlip(0.5 if strength is None else strength))
        elif name == "crop":
            padding = round(strength) if strength is not None else max(1, round(min(policy.size) / 14))
            transforms.append(RandomCrop(policy.size, padding=padding))
        else:
            transforms.append(RandomResizedCrop(policy.size, scale=(strength or policy.min_scale, 1.0)))
    if policy.uncropped and not any(name in ("crop", "scale") for name, _ in options):
        transforms.append(CenterCrop(policy.size))
    return transforms[0] if len(transforms) == 1 else Compose(transforms)
