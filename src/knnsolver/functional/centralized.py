"""Normalize-Scale layer and the decorrelated global centralized ranking loss.

Zheng, Ji et al., AAAI 2019; METHODS.md section 4, a reading of the abstract.

    x̂ = s x / ||x||                                                  (Normalize-Scale)
    loss(x) = sum_{k != y} max(0, m + ||x̂ - c_y||^2 - ||x̂ - c_k||^2)  (hinge, default)
    loss(x) = sum_{k != y} softplus(m + ||x̂ - c_y||^2 - ||x̂ - c_k||^2) (smooth variant)

averaged over the batch. The centres ``c_k`` are global (one per class for the
whole training set) and are decorrelated by :func:`gram_schmidt`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.hostsync import avoid_host_sync

__all__ = ["RANKING_FORMS", "normalize_scale", "centre_sq_distances", "centralized_ranking_loss", "gram_schmidt"]

RANKING_FORMS = ("hinge", "softplus")


def normalize_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """``x̂ = s x / ||x||`` row-wise (rows of norm 0 stay 0)."""
    return scale * F.normalize(x, dim=1)


def centre_sq_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``d[b, k] = ||x_b - c_k||^2 = ||x_b||^2 - 2 x_b.c_k + ||c_k||^2``, clamped at 0, shape ``(B, C)``."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ centres.T + (centres * centres).sum(1)).clamp_min(0.0)


def centralized_ranking_loss(x: Tensor, labels: Tensor, centres: Tensor, margin: float, form: str = "hinge") -> Tensor:
    """Batch mean of ``sum_{k != y} g(m + d_y - d_k)``, ``g`` = ``relu`` (hinge) or ``softplus``,
    with ``d_k = ||x - c_k||^2`` for already normalise-scaled ``x`` and centres."""
    if form not in RANKING_FORMS:
        raise ConfigError(f"unknown ranking form {form!r}; choose one of: {', '.join(RANKING_FORMS)}")
    if not margin > 0:
        raise ConfigError(f"margin must be > 0, got {margin}")
    d = centre_sq_distances(x, centres)
    gap = margin + d.gather(1, labels[:, None]) - d
    terms = F.relu(gap) if form == "hinge" else F.softplus(gap)
    own = labels.unsqueeze(1) == torch.arange(centres.shape[0], device=labels.device)  # not one_hot: no host read
    return terms.masked_fill(own, 0.0).sum(1).mean()


def gram_schmidt(vectors: Tensor) -> Tensor:
    """Orthonormalise the rows of ``vectors`` (``(n, d)``, ``n <= d``) in order: Gram-Schmidt's result.

    ``q_i = normalise(v_i - sum_{j<i} (q_j . v_i) q_j)``, so ``Q Q^T = I`` and ``q_i``
    spans the same space as ``v_1..v_i``. Computed as a Householder QR of ``V^T``
    with each column's sign set so ``q_i . v_i > 0`` (the same rows as Gram-Schmidt,
    orthogonal to working precision, in a few kernels instead of a loop over the
    rows). A row linearly dependent on the rows before it is refused where the host
    may read the result (:func:`~knnsolver.hostsync.avoid_host_sync`); on an
    accelerator it is left unchecked, and its ``q_i`` is then some unit vector
    orthogonal to the others.
    """
    n, d = vectors.shape
    if n > d:
        raise ValueError(f"cannot orthonormalise {n} vectors in {d} dimensions: need n <= d")
    work = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()  # QR takes no halves
    q, r = torch.linalg.qr(work.T)
    diag = r.diagonal()
    if not avoid_host_sync(vectors.device):
        small = diag.abs() <= torch.finfo(work.dtype).eps * d * work.norm(dim=1)  # the precision it is computed in
        if bool(small.any()):
            raise ValueError(f"row {int(small.int().argmax())} is linearly dependent on the rows before it; "
                             "cannot orthonormalise")
    return (q * torch.where(diag < 0, -1.0, 1.0).to(q.dtype)).T.to(vectors.dtype)
