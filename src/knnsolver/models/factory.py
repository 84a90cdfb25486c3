"""Build a backbone by name, by input shape, from timm, or take any user ``nn.Module``."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.models.backbones import IMAGENET_MEAN, IMAGENET_STD, VGG16, InputNormalize, ResNet, load_torchvision_weights
from knnsolver.registry import MODELS


# Images up to this side (pixels) get the small conv net; larger ones the ResNet.
SMALL_IMAGE_SIDE = 64
# Fewer training rows than this get the small conv net whatever the image size: too little data to
# need the ResNet's depth, and a short run is worth more than a slow one.
SMALL_DATA_ROWS = 2_000


def choose_model(input_shape: tuple[int, ...], num_train: int | None = None) -> tuple[str, str]:
    """The network ``--model auto`` picks for ``input_shape`` and ``num_train`` training rows, and why.

    Feature vectors get ``mlp``; 8x8 images ``conv8``; images of at most
    :data:`SMALL_IMAGE_SIDE` pixels a side, or fewer than :data:`SMALL_DATA_ROWS`
    training rows, the small ``conv28`` net (3 conv blocks, global pooling, so any
    size); larger images the ``resnet``. On 2 CPU cores conv28 trains 32x32 images at
    300-400 images/s where the ResNet managed 18-87 (issue 16), so the ResNet is kept for
    large images, where its depth pays off. Returns ``(name, reason)``.
    """
    if len(input_shape) == 1:
        return "mlp", f"feature vectors of {input_shape[0]} values"
    if len(input_shape) != 3:
        raise ConfigError(f"cannot choose a network for input shape {tuple(input_shape)}; pass a model yourself")
    _, h, w = input_shape
    if (h, w) == (8, 8):
        return "conv8", "8x8 images"
    if max(h, w) <= SMALL_IMAGE_SIDE:
        return "conv28", f"images of {h}x{w} px (at most {SMALL_IMAGE_SIDE} px: the small conv net)"
    if num_train is not None and num_train < SMALL_DATA_ROWS:
        return "conv28", f"{num_train} training rows (fewer than {SMALL_DATA_ROWS}: the small conv net)"
    return "resnet", f"images of {h}x{w} px (over {SMALL_IMAGE_SIDE} px: the ResNet)"


def auto_model(input_shape: tuple[int, ...], embedding_dim: int = 64, dropout: float = 0.0, width: int = 32,
               num_train: int | None = None) -> nn.Module:
    """The net :func:`choose_model` picks for ``input_shape`` and ``num_train``, built."""
    name, _ = choose_model(input_shape, num_train)
    if name == "mlp":  # the same hidden width as --model mlp at this --width
        return MODELS.get("mlp")(input_shape[0], embedding_dim, dropout, width * 8)
    return MODELS.get(name)(input_shape[0], embedding_dim, dropout, width)


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    embedding_dim: int = 64,
    dropout: float = 0.0,
    width: int = 32,
    pretrained: str | None = None,
    num_train: int | None = None,
) -> nn.Module:
    """Construct a backbone mapping ``(B, *input_shape)`` to ``(B, embedding_dim)``.

    ``name`` is a registered model (``auto``, ``mlp``, ``conv8``, ``conv28``,
    ``resnet``, and the ImageNet architectures ``resnet18``, ``resnet50``, ``vgg16``)
    or ``timm:<model>`` when timm is installed (its classifier is replaced by the
    embedding layer, and its input is standardised with the model's own mean and
    std). ``pretrained`` is a path to a state dict (nothing is downloaded at run
    time): torchvision's format for the ImageNet architectures, timm's for timm
    models, else this library's own.
    """
    if name.startswith("timm:"):
        return _timm_model(name[5:], input_shape, embedding_dim, dropout, pretrained)
    if name == "auto":
        model = auto_model(input_shape, embedding_dim, dropout, width, num_train)
    elif name == "mlp":
        model = MODELS.get("mlp")(math.prod(input_shape), embedding_dim, dropout, width * 8)
    else:
        factory = MODELS.get(name)
        takes_width = "width" in inspect.signature(factory).parameters
        model = factory(input_shape[0], embedding_dim, dropout, **({"width": width} if takes_width else {}))
    _check_input(model, name, input_shape)
    if pretrained and isinstance(model, (ResNet, VGG16)):
        load_torchvision_weights(model, pretrained, name)
    elif pretrained:
        _load_own_weights(model, Path(pretrained), name)
    return model


def _check_input(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Refuse, in one line, a network that cannot take ``input_shape`` (one no-grad forward of two zero inputs
    in eval mode: no weight, statistic or random stream changes), instead of a raw error at the first step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    except RuntimeError as err:
        shape = "x".join(map(str, input_shape))
        raise ConfigError(f"the {name} network cannot take the data's {shape} inputs ({str(err).splitlines()[0]}); "
                          "use --model auto, which picks one that fits") from None
    finally:
        model.train(was_training)


def _load_own_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load this library's weights for ``model``: a state dict, or a run's checkpoint (its ``model`` entry);
    every tensor of the network must be there with its shape (a partial load would leave the rest random)."""
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"cannot read pretrained weights {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a run's best.pt or checkpoint.pt
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConfigError(f"pretrained weights {path} are not a state dict of tensors (nor a knnsolver checkpoint)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        first = missing[0] if missing else f"{wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} here"
        raise ConfigError(f"pretrained weights {path} do not fit the {name} network: {len(missing)} tensors missing, "
                          f"{len(wrong)} of the wrong shape (first {first}); pass weights of this network, width and "
                          "embedding size")
    model.load_state_dict({k: state[k] for k in own})


class TimmBackbone(nn.Module):
    """A timm model whose classifier is the embedding layer, standardising its [0, 1] input first."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], in_channels: int) -> None:
        super().__init__()
        self.input_norm = InputNormalize(mean, std) if len(mean) == in_channels else nn.Identity()
        self.net = net

    @property
    def head(self) -> nn.Module:
        """The embedding layer (timm's classifier), which takes the new layers' learning rate."""
        return self.net.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))


def import_timm():
    """``import timm``, with a one-line :class:`MissingDependencyError` that says why it failed.

    timm imports torchvision, so a missing torchvision, or one built for another
    torch (an operator or symbol error), makes ``import timm`` fail even where timm
    is installed: that is reported as such, not as a missing timm.
    """
    alternative = "--model resnet18, resnet50 or vgg16, which load torchvision's weights without timm or torchvision"
    try:
        import timm
    except ModuleNotFoundError as exc:
        if exc.name == "timm":
            raise MissingDependencyError(f"timm models need the timm package: pip install timm (or {alternative})") from None
        raise MissingDependencyError(
            f"timm is installed but cannot be imported: it needs the module {exc.name!r}, which is missing; "
            f"install it (for torchvision, the build matching torch {torch.__version__}) or use {alternative}") from None
    except Exception as exc:  # an installed but broken dependency fails in many ways (OSError, RuntimeError ...)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise MissingDependencyError(
            f"timm is installed but failed to import ({type(exc).__name__}: {detail}), usually a torchvision built for "
            f"another torch than {torch.__version__}: install the matching torchvision, or use {alternative}") from None
    return timm


def _timm_model(name: str, input_shape: tuple[int, ...], embedding_dim: int, dropout: float, pretrained: str | None) -> nn.Module:
    timm = import_timm()
    kwargs: dict[str, object] = {"num_classes": embedding_dim, "in_chans": input_shape[0], "drop_rate": dropout}
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"pretrained weights file {path} does not exist; pass --pretrained the path of the "
                              f"timm {name} weights (.pth, .bin or .safetensors)")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    try:
        net = timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, KeyError) as exc:
        weights = f" with the weights in {pretrained}" if pretrained else ""
        raise ConfigError(f"timm cannot build {name!r}{weights}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return TimmBackbone(net, mean, std, input_shape[0])
