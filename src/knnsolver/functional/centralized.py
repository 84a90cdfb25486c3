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
    return terms.masked_fill(F.one_hot(labels, centres.shape[0]).bool(), 0.0).sum(1).mean()


def gram_schmidt(vectors: Tensor) -> Tensor:
    """Orthonormalise the rows of ``vectors`` (``(n, d)``, ``n <= d``) in order, by Gram-Schmidt.

    ``q_i = normalise(v_i - sum_{j<i} (q_j . v_i) q_j)``, so ``Q Q^T = I`` and ``q_i``
    spans the same space as ``v_1..v_i``. Each projection is applied twice
    ("twice is enough", classical Gram-Schmidt with reorthogonalisation), which keeps
    the rows orthogonal to working precision.
    """
    n, d = vectors.shape
    if n > d:
        raise ValueError(f"cannot orthonormalise {n} vectors in {d} dimensions: need n <= d")
    rows: list[Tensor] = []
    for i in range(n):
        v = vectors[i]
        if rows:
            q = torch.stack(rows)
            for _ in range(2):
                v = v - q.T @ (q @ v)
        norm = v.norm()
        if norm <= torch.finfo(v.dtype).eps * d * vectors[i].norm():
            raise ValueError(f"row {i} is linearly dependent on the rows before it; cannot orthonormalise")
        rows.append(v / norm)
    return torch.stack(rows)
