"""Build a backbone by name, by input shape, from timm, or take any user ``nn.Module``."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.registry import MODELS


def auto_model(input_shape: tuple[int, ...], embedding_dim: int = 64, dropout: float = 0.0, width: int = 32) -> nn.Module:
    """Pick a net for ``input_shape``: conv8 for 8x8, conv28 for 28x28, resnet for
    other images, mlp for feature vectors."""
    if len(input_shape) == 1:
        return MODELS.get("mlp")(input_shape[0], embedding_dim, dropout)
    if len(input_shape) != 3:
        raise ConfigError(f"cannot choose a network for input shape {tuple(input_shape)}; pass a model yourself")
    c, h, w = input_shape
    if (h, w) == (8, 8):
        return MODELS.get("conv8")(c, embedding_dim, dropout, width)
    if (h, w) == (28, 28):
        return MODELS.get("conv28")(c, embedding_dim, dropout, width)
    return MODELS.get("resnet")(c, embedding_dim, dropout, width)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    embedding_dim: int = 64,
    dropout: float = 0.0,
    width: int = 32,
    pretrained: str | None = None,
) -> nn.Module:
    """Construct a backbone mapping ``(B, *input_shape)`` to ``(B, embedding_dim)``.

    ``name`` is a registered model (``auto``, ``mlp``, ``conv8``, ``conv28``,
    ``resnet``) or ``timm:<model>`` when timm is installed (its classifier is
    replaced by the embedding layer). ``pretrained`` is a path to a state dict
    loaded into the backbone (nothing is downloaded at run time).
    """
    if name.startswith("timm:"):
        model = _timm_model(name[5:], input_shape, embedding_dim, pretrained is not None)
    elif name == "auto":
        model = auto_model(input_shape, embedding_dim, dropout, width)
    elif name == "mlp":
        model = MODELS.get("mlp")(math.prod(input_shape), embedding_dim, dropout, width * 8)
    else:
        model = MODELS.get(name)(input_shape[0], embedding_dim, dropout, width)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"pretrained weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(unexpected) == len(state):
            raise ConfigError(f"no weight in {path} matches the {name} network")
    return model


def _timm_model(name: str, input_shape: tuple[int, ...], embedding_dim: int, pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm models need the timm package: pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False, num_classes=embedding_dim, in_chans=input_shape[0])
    except RuntimeError as exc:
        raise ConfigError(f"timm cannot build {name!r}: {exc}") from None
