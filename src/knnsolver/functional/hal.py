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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hal_logits", "hal_loss"]


def hal_logits(embeddings: Tensor, anchors: Tensor, tau: float) -> Tensor:
    """``logits[b, c] = -||x̂_b - â_c||^2 / tau = -(2 - 2 x̂_b·â_c) / tau``, shape ``(B, C)``."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(anchors, dim=1).T
    return (2.0 * cos - 2.0) / tau


# F.normalize's floor on a norm: a vector shorter than this is divided by it instead.
_NORM_EPS = 1e-12


def _unit(v: Tensor) -> tuple[Tensor, Tensor]:
    """``(v / n, n)`` with ``n = max(||v||, eps)`` per row, as :func:`torch.nn.functional.normalize`."""
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return v / norm, norm


def _unit_backward(grad: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """Gradient through ``v / max(||v||, eps)``: the part of ``grad`` across ``v``, over ``||v||``
    (all of it, over eps, where the floor holds)."""
    across = grad - unit * (grad * unit).sum(1, keepdim=True)
    return torch.where(norm > _NORM_EPS, across, grad).div_(norm)


class _HALLoss(torch.autograd.Function):
    """Mean ``-log softmax(s x̂ â^T)[y]`` with ``s = 2 / tau``, and its gradient in closed form.

    The same loss as ``F.cross_entropy(hal_logits(...))``: the logits' constant
    ``-2 / tau`` cancels in the softmax. One autograd node instead of the graph
    through two normalisations, a product, an affine map and the cross-entropy;
    the backward is ``g = s (softmax - onehot) / B``, two products
    (``g â`` and ``g^T x̂``), and each normalisation's backward (the gradient's
    part across the vector, over its norm).
    """

    @staticmethod
    def forward(ctx: Any, embeddings: Tensor, labels: Tensor, anchors: Tensor, scale: float) -> Tensor:
        x, x_norm = _unit(embeddings)
        a, a_norm = _unit(anchors)
        log_p = torch.log_softmax((x @ a.T).mul_(scale), dim=1)
        ctx.save_for_backward(x, x_norm, a, a_norm, log_p, labels)
        ctx.scale = scale
        return -log_p.gather(1, labels.unsqueeze(1)).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        x, x_norm, a, a_norm, log_p, labels = ctx.saved_tensors
        g = log_p.exp().scatter_add_(1, labels.unsqueeze(1), torch.full_like(log_p[:, :1], -1.0))
        g.mul_(grad * (ctx.scale / log_p.shape[0]))
        grad_x = _unit_backward(g @ a, x, x_norm) if ctx.needs_input_grad[0] else None
        grad_a = _unit_backward(g.T @ x, a, a_norm) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_a, None


def hal_loss(embeddings: Tensor, labels: Tensor, anchors: Tensor, tau: float) -> Tensor:
    """Mean over the batch of ``-log softmax(hal_logits)[y]`` (the NCA form over anchors), as one autograd
    node with its gradient in closed form (:class:`_HALLoss`).

    Computed in the anchors' precision with autocast off (the node's backward runs outside autocast, so
    its saved tensors must share one dtype); the embeddings' gradient comes back in their own dtype."""
    if embeddings.dtype != anchors.dtype:
        embeddings = embeddings.to(anchors.dtype)
    if torch.is_autocast_enabled(embeddings.device.type):  # checked first: entering the context costs time
        with torch.autocast(embeddings.device.type, enabled=False):
            return _HALLoss.apply(embeddings, labels.long(), anchors, 2.0 / tau)
    return _HALLoss.apply(embeddings, labels.long(), anchors, 2.0 / tau)
