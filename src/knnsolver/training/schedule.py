"""Learning-rate schedules as pure functions of the optimiser step.

The rate depends only on ``(step, steps_per_epoch)`` and the config, never on
state kept between steps, so a resumed run sets exactly the rates an
uninterrupted one would (no scheduler state in the checkpoint).
"""
from __future__ import annotations

import math

from knnsolver.training.config import TrainConfig


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` for optimiser step ``step`` (0-based, counted over the whole run).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps =
    round(warmup_epochs * steps_per_epoch)`` steps. Then ``constant``: 1;
    ``cosine``: ``0.5 (1 + cos(pi t))`` with ``t`` the fraction of the
    post-warm-up steps done (1 at the first step after warm-up, near 0 at the
    last); ``step``: ``lr_gamma ** (epoch // lr_step_epochs)``.
    """
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "cosine":
        span = max(1, config.epochs * steps_per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    if config.lr_schedule == "step":
        return config.lr_gamma ** (step // steps_per_epoch // config.lr_step_epochs)
    return 1.0
