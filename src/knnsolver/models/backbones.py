"""ImageNet backbones written in torch alone, whose parameter names are torchvision's.

:class:`ResNet` (``resnet18``, ``resnet50``) and :class:`VGG16` load the state dicts
torchvision publishes (``resnet18-f37072fd.pth``, ``vgg16-397923af.pth`` ...) with
:func:`load_torchvision_weights`, so a downloaded ``.pth`` fine-tunes here without
torchvision or timm installed. Each replaces ImageNet's 1000-way classifier by the
embedding layer the RBF paper uses: after global pooling (after fc7 for VGG), optional
dropout, one linear layer, no ReLU. Each standardises its [0, 1] input with the
statistics of its pretraining (ImageNet's by default), held as non-persistent buffers so
state dicts stay torchvision's.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError
from knnsolver.models.nets import EmbeddingHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalize(nn.Module):
    """``(x - mean[c]) / std[c]`` per channel; the statistics are not saved in state dicts."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"input normalisation needs one mean and one std > 0 per channel, got {list(mean)} and {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _norm_for(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> InputNormalize | nn.Identity:
    """ImageNet statistics for RGB input unless given; no standardisation for other channel counts."""
    if mean is None and std is None:
        if in_channels != 3:
            return nn.Identity()
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if mean is None or std is None or len(mean) != in_channels:
        raise ConfigError(f"input normalisation needs mean and std for each of the {in_channels} input channels")
    return InputNormalize(mean, std)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34), torchvision's names."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 convolutions with a residual (ResNet-50)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """torchvision's ResNet with an embedding layer (``head``) in place of ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: input channels (3 to load ImageNet weights).
        embedding_dim: size of the embedding.
        dropout: dropout before the embedding layer.
        mean, std: per-channel input statistics; ``None``: ImageNet's for RGB input.
    """

    classifier_prefix = "fc."  # the ImageNet classifier of torchvision's weights, replaced by ``head``

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], in_channels: int = 3,
        embedding_dim: int = 64, dropout: float = 0.0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.input_norm = _norm_for(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(blocks):
                stage.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = EmbeddingHead(inplanes, embedding_dim, dropout)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.input_norm(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.avgpool(x))


def resnet18(in_channels: int = 3, embedding_dim: int = 64, dropout: float = 0.0) -> ResNet:
    """ResNet-18 (torchvision's parameter names) ending in an embedding layer."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, embedding_dim, dropout)


def resnet50(in_channels: int = 3, embedding_dim: int = 64, dropout: float = 0.0) -> ResNet:
    """ResNet-50 (torchvision's parameter names) ending in an embedding layer."""
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, embedding_dim, dropout)


_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """torchvision's VGG-16 (no BatchNorm, as the RBF paper's) with an embedding layer (``head``)
    after fc7 in place of the 1000-way ``classifier.6``; fc6 and fc7 keep their dropout of 0.5."""

    classifier_prefix = "classifier.6."

    def __init__(self, in_channels: int = 3, embedding_dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_norm = _norm_for(in_channels, None, None)
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        )
        self.head = EmbeddingHead(4096, embedding_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(self.input_norm(x)))
        return self.head(self.classifier(torch.flatten(x, 1)))


def vgg16(in_channels: int = 3, embedding_dim: int = 64, dropout: float = 0.0) -> VGG16:
    """VGG-16 (torchvision's parameter names) ending in an embedding layer after fc7."""
    return VGG16(in_channels, embedding_dim, dropout)


def load_torchvision_weights(model: ResNet | VGG16, path: str | Path, name: str) -> int:
    """Load a torchvision state dict file into ``model``; return how many tensors were loaded.

    Every backbone tensor must be in the file with its shape; the file's ImageNet
    classifier (``model.classifier_prefix``) is dropped and the embedding layer keeps
    its fresh initialisation. Anything else raises a one-line :class:`ConfigError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} does not exist; pass --pretrained the path of a downloaded "
                          f"torchvision {name} state dict (.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ConfigError(f"cannot read pretrained weights {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights {path} are not a state dict of tensors (torchvision's .pth format)")
    state = {k: v for k, v in state.items() if not k.startswith(model.classifier_prefix)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    # torchvision's older files lack BatchNorm's num_batches_tracked (torch fills it in): not missing
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(found)} {what} (first {found[0]}{detail(found[0])})" for found, what, detail in (
            (missing, "missing", lambda k: ""), (unexpected, "unexpected", lambda k: ""),
            (wrong, "of the wrong shape", lambda k: f": {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"),
        ) if found]
        raise ConfigError(f"pretrained weights {path} do not fit {name}: {'; '.join(problems)}; "
                          f"pass a torchvision {name} state dict (3-channel input)")
    model.load_state_dict(state, strict=False)
    return len(state)
