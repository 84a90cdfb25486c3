"""Nearest-neighbour RBF solver maths (Meyer, Harwood & Drummond, ICIP 2018), in log space.

With centres ``c_j``, labels ``y_j``, log-weights ``theta_j`` (``w_j = exp(theta_j)``),
a global ``sigma`` and the neighbour set ``N(x)`` of an embedding ``x``::

    a_j(x)     = theta_j - ||x - c_j||^2 / (2 sigma^2)                      (log of w_j f(x, c_j), Eq. 1)
    log P(Q|x) = logsumexp_{j in Q ∩ N(x)} a_j - logsumexp_{j in N(x)} a_j  (Eq. 4)
    loss(x)    = -log P(y|x)                                                (Eq. 3)

Neighbour lists are ``(B, k)`` indices into the centres; an index of ``-1`` is
padding (a slot holding no centre) and is ignored. Every row needs at least one
real neighbour. Centres are constants: they are detached, so gradients reach
the embeddings, the log-weights and ``sigma`` only.

**Hard case.** When no true-class centre is in ``N(x)`` the paper's ``P(y|x)``
is 0 (its code clamps it at 1e-10: a constant loss with no gradient). Here
``N(x)`` is then augmented with the nearest true-class centre in the whole bank
(the sample's own centre excluded), so the loss stays finite and its gradient
pulls ``x`` towards its class and away from the wrong neighbours. Rows whose
class has no other centre in the bank cannot be scored and are left out of the
mean.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RBFTerms",
    "auto_sigma",
    "nearest_class_centres",
    "rbf_log_probs",
    "rbf_logits",
    "rbf_loss",
    "rbf_terms",
]

_NEG_INF = float("-inf")


def rbf_logits(
    embeddings: Tensor, centres: Tensor, neighbours: Tensor, log_weights: Tensor, sigma: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Log RBF contributions ``a_j = theta_j - ||x - c_j||^2 / (2 sigma^2)`` of each row's neighbours.

    Distances are taken as differences (not ``|x|^2 - 2x.c + |c|^2``) so a tiny
    ``sigma`` does not amplify cancellation error. Returns ``(logits, sq_distances)``,
    both ``(B, k)``; padding slots hold ``-inf`` and ``+inf``; the distances are detached.
    """
    index = neighbours.long()
    padding = index < 0
    index = index.clamp(min=0)
    gathered = centres.detach()[index].to(embeddings.dtype)  # (B, k, d)
    sq = (embeddings.unsqueeze(1) - gathered).pow(2).sum(-1)
    logits = log_weights[index].to(sq.dtype) - sq / (2.0 * sigma**2)
    return logits.masked_fill(padding, _NEG_INF), sq.detach().masked_fill(padding, float("inf"))


def _class_logsumexp(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``out[b, c] = logsumexp_{j: labels[b, j] = c} logits[b, j]``, ``-inf`` for empty classes.

    Vectorised with scatter: a per-class max (detached; it cancels in the
    gradient) keeps the exponentials in range, then a scatter-add of ``exp``.
    """
    shape = (logits.shape[0], num_classes)
    peak = logits.new_full(shape, _NEG_INF).scatter_reduce(1, labels, logits.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = logits.new_zeros(shape).scatter_add(1, labels, (logits - peak.gather(1, labels)).exp())
    # A class with a finite logit has sums >= 1 (its max contributes exp(0)); the
    # clamp keeps log() and its gradient finite on the classes that are absent.
    return torch.where(sums > 0, peak + sums.clamp(min=1.0).log(), torch.full_like(sums, _NEG_INF))


def rbf_log_probs(
    embeddings: Tensor,
    centres: Tensor,
    centre_labels: Tensor,
    neighbours: Tensor,
    log_weights: Tensor,
    sigma: float | Tensor,
    num_classes: int,
) -> Tensor:
    """``(B, num_classes)`` log-probabilities of Eq. 4 over each row's neighbours.

    Shapes: embeddings ``(B, d)``, centres ``(N, d)``, centre_labels ``(N,)``,
    neighbours ``(B, k)`` (``-1`` = padding), log_weights ``(N,)``. Classes with
    no centre among a row's neighbours get ``-inf``.
    """
    logits, _ = rbf_logits(embeddings, centres, neighbours, log_weights, sigma)
    labels = centre_labels[neighbours.long().clamp(min=0)].long()
    return _class_logsumexp(logits, labels, num_classes) - torch.logsumexp(logits, dim=1, keepdim=True)


@torch.no_grad()
def nearest_class_centres(
    queries: Tensor, labels: Tensor, centres: Tensor, centre_labels: Tensor, exclude: Tensor | None = None
) -> Tensor:
    """Index of the nearest centre with each query's label, or ``-1`` when there is none.

    Only centres of the queried classes are compared (``(Q, n_candidates)``
    distances, never ``N x N``). ``exclude`` (``(Q,)`` row indices) removes each
    query's own centre.
    """
    candidates = torch.isin(centre_labels, labels).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return torch.full_like(labels, -1, dtype=torch.long)
    points = centres[candidates].float()
    dist = (points * points).sum(1) - 2.0 * (queries.detach().float() @ points.T)
    dist.masked_fill_(centre_labels[candidates].unsqueeze(0) != labels.unsqueeze(1), float("inf"))
    if exclude is not None:
        dist.masked_fill_(candidates.unsqueeze(0) == exclude.unsqueeze(1), float("inf"))
    best = dist.argmin(1)
    found = torch.isfinite(dist.gather(1, best.unsqueeze(1)).squeeze(1))
    return torch.where(found, candidates[best], torch.full_like(best, -1))


class RBFTerms(NamedTuple):
    """Per-row pieces of the RBF loss (see :func:`rbf_terms`)."""

    nll: Tensor  # (B,) -log P(y|x); +inf where the row's class has no other centre in the bank
    sq_distances: Tensor  # (B, k) detached squared distances to the given neighbours N(x)
    true_absent: Tensor  # (B,) bool: no true-class centre among the given neighbours (the hard case)


def rbf_terms(
    embeddings: Tensor,
    centres: Tensor,
    centre_labels: Tensor,
    neighbours: Tensor,
    log_weights: Tensor,
    sigma: float | Tensor,
    labels: Tensor,
    *,
    exclude: Tensor | None = None,
) -> RBFTerms:
    """Negative log-likelihood of each row's label under Eq. 4, with the hard-case rule.

    Rows whose neighbours hold no centre of their class get one extra neighbour,
    the nearest centre of their class in the bank (``exclude`` = each row's own
    centre, skipped); every other row gets a padding slot. Then
    ``nll = logsumexp_{N'} a_j - logsumexp_{y ∩ N'} a_j``.
    """
    labels = labels.long()
    index = neighbours.long()
    neighbour_labels = centre_labels[index.clamp(min=0)].long()
    true_absent = ~((neighbour_labels == labels.unsqueeze(1)) & (index >= 0)).any(1)
    extra = torch.full_like(labels, -1)
    if bool(true_absent.any()):
        hard = true_absent.nonzero().squeeze(1)
        extra[hard] = nearest_class_centres(
            embeddings[hard], labels[hard], centres, centre_labels, None if exclude is None else exclude[hard].long()
        )
    index = torch.cat([index, extra.unsqueeze(1)], dim=1)
    logits, sq = rbf_logits(embeddings, centres, index, log_weights, sigma)
    is_true = (centre_labels[index.clamp(min=0)].long() == labels.unsqueeze(1)) & (index >= 0)
    scorable = is_true.any(1, keepdim=True)
    # Unscorable rows get finite dummy logits so no NaN reaches the gradient.
    true_logits = torch.where(scorable, logits.masked_fill(~is_true, _NEG_INF), torch.zeros_like(logits))
    nll = torch.logsumexp(logits, 1) - torch.logsumexp(true_logits, 1)
    nll = torch.where(scorable.squeeze(1), nll, torch.full_like(nll, float("inf")))
    return RBFTerms(nll, sq[:, :-1], true_absent)


def rbf_loss(
    embeddings: Tensor,
    centres: Tensor,
    centre_labels: Tensor,
    neighbours: Tensor,
    log_weights: Tensor,
    sigma: float | Tensor,
    labels: Tensor,
    *,
    exclude: Tensor | None = None,
) -> Tensor:
    """Mean of ``-log P(y|x)`` (Eq. 3) over the scorable rows of :func:`rbf_terms`; 0 if none."""
    return _mean_finite(rbf_terms(embeddings, centres, centre_labels, neighbours, log_weights, sigma, labels, exclude=exclude).nll)


def _mean_finite(nll: Tensor) -> Tensor:
    finite = torch.isfinite(nll)
    return torch.where(finite, nll, torch.zeros_like(nll)).sum() / finite.sum().clamp(min=1)


@torch.no_grad()
def auto_sigma(centres: Tensor, neighbours: Tensor) -> float:
    """``sigma`` = (lower) median over centres of the distance to their farthest (k-th) listed neighbour.

    The typical neighbourhood then lies within one ``sigma`` (every listed
    neighbour has ``f >= exp(-1/2)``), so no centre is negligible when training
    starts and the scale follows the embedding's. Falls back to 1 if all
    centres coincide.
    """
    points = centres.float()
    far = points[neighbours[:, -1].long()]
    value = float((points - far).norm(dim=1).median())
    return value if value > 0 else 1.0
