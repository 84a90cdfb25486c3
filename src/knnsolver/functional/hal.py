"""HAL, the hypersphere anchor loss (Ye, He, Wang, Li; Applied Intelligence 2023).

One anchor ``a_c`` per class; features and anchors are L2-normalised onto the unit
hypersphere and the NCA softmax is taken over sample-to-anchor distances
(METHODS.md section 2, a reading of the abstract):

    loss(x) = -log( exp(-||x̂ - â_y||^2 / tau) / sum_c exp(-||x̂ - â_c||^2 / tau) )

On the unit sphere ``||x̂ - â||^2 = 2 - 2 cos(x, a)``, so the logits are an affine
function of the cosine similarities and cost O(B C d), not the O(B^2 d) of a
batch NCA loss.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["hal_logits", "hal_loss"]


def hal_logits(embeddings: Tensor, anchors: Tensor, tau: float) -> Tensor:
    """``logits[b, c] = -||x̂_b - â_c||^2 / tau = -(2 - 2 x̂_b·â_c) / tau``, shape ``(B, C)``."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(anchors, dim=1).T
    return (2.0 * cos - 2.0) / tau


def hal_loss(embeddings: Tensor, labels: Tensor, anchors: Tensor, tau: float) -> Tensor:
    """Mean over the batch of ``-log softmax(hal_logits)[y]`` (the NCA form over anchors)."""
    return F.cross_entropy(hal_logits(embeddings, anchors, tau), labels)
