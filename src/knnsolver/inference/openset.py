"""Open-set rejection: answer "unknown" when the top class probability is too low, at a chosen false-accept rate."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from knnsolver.constraints import Interval
from knnsolver.errors import ConfigError

UNKNOWN = -1


@dataclass(frozen=True)
class RejectThreshold:
    """A rejection threshold chosen on validation data, and how it did there.

    Attributes:
        threshold: predictions whose top class probability is below it are answered unknown (-1).
        false_accept_rate: share of the wrong predictions (inputs of unknown classes included) it accepts.
        true_accept_rate: share of the right predictions it accepts.
    """

    threshold: float
    false_accept_rate: float
    true_accept_rate: float


def reject(probabilities: Tensor, reject_below: float | None) -> Tensor:
    """The top class of each row of ``(N, C)`` probabilities, or :data:`UNKNOWN` where its probability < ``reject_below``
    (a value above 1 rejects every input)."""
    top, predicted = probabilities.max(1)
    if reject_below is None:
        return predicted
    Interval(0, hint=" (above 1 rejects every input)").check("reject_below", reject_below)
    return torch.where(top >= reject_below, predicted, torch.full_like(predicted, UNKNOWN))


def reject_threshold(top_probability: Tensor, correct: Tensor, false_accept_rate: float) -> RejectThreshold:
    """The lowest threshold that accepts at most ``false_accept_rate`` of the wrong predictions.

    A prediction is accepted when its top probability is at least the threshold.
    ``top_probability`` and ``correct`` hold one value per validation input: its top
    class probability and whether that class is its true one (never, for an input
    of a class the model does not know). The lowest such threshold keeps the most
    right predictions. With no wrong prediction the threshold is 0 (accept all); when
    too many wrong predictions are certain (probability 1, as when all of a kNN
    solver's neighbours agree) it is just above 1 (reject all).
    """
    Interval(0, 1).check("false_accept_rate", false_accept_rate)
    if top_probability.shape != correct.shape or top_probability.dim() != 1 or not len(correct):
        raise ConfigError(f"reject_threshold takes one top probability and one correct flag per input, got shapes "
                          f"{tuple(top_probability.shape)} and {tuple(correct.shape)}")
    top, correct = top_probability.float().cpu(), correct.bool().cpu()  # float32, as predict compares
    wrong = top[~correct].sort(descending=True).values
    allowed = math.floor(false_accept_rate * len(wrong) + 1e-9)
    # Just above the first wrong prediction that must be rejected (the next float32, so predict's comparison agrees).
    threshold = 0.0 if allowed >= len(wrong) else float(torch.nextafter(wrong[allowed], torch.tensor(math.inf)))
    accepted = top >= threshold
    far = float(accepted[~correct].float().mean()) if len(wrong) else 0.0
    tar = float(accepted[correct].float().mean()) if bool(correct.any()) else 0.0
    return RejectThreshold(threshold, far, tar)
