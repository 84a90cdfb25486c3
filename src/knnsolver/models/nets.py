"""Backbones written in torch (no torchvision here), each ending in an embedding layer.

Every net maps ``(B, *input_shape)`` to ``(B, embedding_dim)``. The embedding layer
is a plain linear layer with optional dropout before it and no final ReLU, as
the RBF paper uses, so embeddings may take any sign.
"""
from __future__ import annotations

from torch import Tensor, nn


class EmbeddingHead(nn.Sequential):
    """Dropout (optional) then a linear embedding layer, no activation after it."""

    def __init__(self, in_features: int, embedding_dim: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_features, embedding_dim))
        super().__init__(*layers)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MLPNet(nn.Module):
    """Two hidden layers for feature vectors (e.g. frozen precomputed embeddings)."""

    def __init__(self, in_features: int, embedding_dim: int = 64, dropout: float = 0.0, width: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Linear(width, width), nn.ReLU(inplace=True)
        )
        self.head = EmbeddingHead(width, embedding_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ConvNet8(nn.Module):
    """Small convnet for 8x8 greyscale input (scikit-learn digits)."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, dropout: float = 0.0, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(in_channels, width), _conv_block(width, width), nn.MaxPool2d(2),  # 4x4
            _conv_block(width, 2 * width), nn.MaxPool2d(2),  # 2x2
        )
        self.head = EmbeddingHead(2 * width * 4, embedding_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ConvNet28(nn.Module):
    """Small convnet for 28x28 greyscale input (MNIST, Fashion-MNIST)."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, dropout: float = 0.0, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(in_channels, width), nn.MaxPool2d(2),  # 14
            _conv_block(width, 2 * width), nn.MaxPool2d(2),  # 7
            _conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
        )
        self.head = EmbeddingHead(4 * width, embedding_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv(x) + self.skip(x)).relu()


class ResNetSmall(nn.Module):
    """ResNet-style net (4 stages of basic blocks) for colour images of any size."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 64, dropout: float = 0.0, width: int = 32) -> None:
        super().__init__()
        stages, c = [], width
        for i in range(4):
            stages.append(_BasicBlock(c if i else width, width * 2**i, 1 if i == 0 else 2))
            c = width * 2**i
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.body = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1))
        self.head = EmbeddingHead(c, embedding_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))
