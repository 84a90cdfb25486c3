"""Per-layer learning rates: a pretrained backbone trains slower than the new layers.

Metric-learning recipes fine-tune an ImageNet backbone at a fraction of the rate
of the freshly initialised embedding layer and solver. The embedding layer is the
network's ``head`` attribute (every built-in network and timm model has one).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from knnsolver.errors import ConfigError


def parameter_groups(model: nn.Module, solver: nn.Module, lr: float, backbone_lr: float | None) -> list[dict[str, Any]]:
    """Optimiser parameter groups, each with ``lr_scale``, its rate as a multiple of ``lr``.

    Without ``backbone_lr``, one group of every trainable parameter (network, then
    solver) at ``lr``. With it, the network's parameters outside ``model.head`` form a
    first group at ``backbone_lr``; the embedding layer and the solver a second at ``lr``.
    The trainer multiplies each group's scale by the scheduled rate at every step.
    """
    if backbone_lr is None:
        return [{"params": trainable([*model.parameters(), *solver.parameters()]), "lr": lr, "lr_scale": 1.0}]
    if not backbone_lr > 0:
        raise ConfigError(f"backbone_lr must be > 0 (leave it unset for one rate), got {backbone_lr}")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"backbone_lr needs to know the embedding layer of {type(model).__name__}: "
                          "give the network a `head` attribute holding it, or leave backbone_lr unset")
    new = {id(p) for p in head.parameters()}
    backbone = trainable(p for p in model.parameters() if id(p) not in new)
    fresh = trainable([*head.parameters(), *solver.parameters()])
    groups = [{"params": backbone, "lr": backbone_lr, "lr_scale": backbone_lr / lr}, {"params": fresh, "lr": lr, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that take gradients."""
    return [p for p in params if p.requires_grad]
