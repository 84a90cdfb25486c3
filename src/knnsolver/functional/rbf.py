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
mean (the solver counts them); a NaN anywhere else propagates into the loss.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from knnsolver.hostsync import avoid_host_sync
from knnsolver.search.exact import ExactSearch

__all__ = [
    "RBFTerms",
    "rbf_auto_sigma",
    "rbf_nearest_class_centres",
    "rbf_log_probs",
    "rbf_logits",
    "rbf_loss",
    "rbf_step",
    "rbf_terms",
]

_NEG_INF = float("-inf")


def _differences(x: Tensor, centres: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(diff, sq)``: the ``(B, k, d)`` block ``c_{index[b, j]} - x_b`` (one gather, turned into differences
    in place) and its squared norms ``(B, k)``."""
    diff = centres.index_select(0, index.reshape(-1)).view(*index.shape, -1).to(x.dtype)
    diff.sub_(x.unsqueeze(1))  # c - x, in place: the gathered copy is ours
    return diff, torch.linalg.vector_norm(diff, dim=2).square_()


class _SquaredDistances(torch.autograd.Function):
    """``||x_b - c_{index[b, j]}||^2`` for embeddings ``x (B, d)`` and constant centres ``c (N, d)``.

    The same maths as autograd on ``((x - c)^2).sum()``, with a single ``(B, k, d)``
    block: the gathered centres are turned into differences in place, a norm
    gives the forward, a batched matmul the backward
    (``dL/dx_b = 2 sum_j g_bj (x_b - c_j)``). No gradient for the centres.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, centres: Tensor, index: Tensor) -> Tensor:
        diff, sq = _differences(x, centres, index)
        ctx.save_for_backward(diff)
        return sq

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (diff,) = ctx.saved_tensors
        return -2.0 * torch.bmm(grad.unsqueeze(1), diff).squeeze(1), None, None


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a 1-D ``values`` and an index of any shape, through ``index_select`` (several times
    faster than advanced indexing on the CPU; its backward is an ``index_add``)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)


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
    sq = _SquaredDistances.apply(embeddings, centres.detach(), index)
    logits = _gather(log_weights, index).to(sq.dtype) - sq / (2.0 * sigma**2)
    return logits.masked_fill(padding, _NEG_INF), sq.detach().masked_fill(padding, float("inf"))


# Exponents below this are dropped as 0: such a term is under 2e-35 of the largest one, and the CPU's
# exp takes a slow path far below it (10x slower at -95; a small sigma puts most RBF terms there).
_EXP_FLOOR = -80.0


def _floored_exp(z: Tensor) -> Tensor:
    """``exp(z)`` for ``z <= 0``, exactly 0 below :data:`_EXP_FLOOR` (NaN stays NaN)."""
    return z.clamp(min=_EXP_FLOOR).exp() * (z >= _EXP_FLOOR)


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """``torch.logsumexp`` without its slow path: terms more than 80 below the row's largest are dropped.

    A row of ``-inf`` gives ``-inf``; a NaN anywhere in a row gives NaN (the trainer's guard sees it).
    """
    peak = x.detach().amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return _floored_exp(x - peak).sum(dim).log() + peak.squeeze(dim)


def _class_logsumexp(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``out[b, c] = logsumexp_{j: labels[b, j] = c} logits[b, j]``, ``-inf`` for empty classes.

    Vectorised with scatter: a per-class max (detached; it cancels in the
    gradient) keeps the exponentials in range, then a scatter-add of ``exp``.
    """
    shape = (logits.shape[0], num_classes)
    peak = logits.new_full(shape, _NEG_INF).scatter_reduce(1, labels, logits.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = logits.new_zeros(shape).scatter_add(1, labels, _floored_exp(logits - peak.gather(1, labels)))
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
    labels = _gather(centre_labels, neighbours.long().clamp(min=0)).long()
    return _class_logsumexp(logits, labels, num_classes) - _logsumexp(logits, 1).unsqueeze(1)


@torch.no_grad()
def rbf_nearest_class_centres(
    queries: Tensor, labels: Tensor, centres: Tensor, centre_labels: Tensor, exclude: Tensor | None = None,
    *, sync_free: bool = False,
) -> Tensor:
    """Index of the nearest centre with each query's label, or ``-1`` when there is none.

    Only centres of the queried classes are compared (``(Q, n_candidates)``
    distances, never ``N x N``). ``exclude`` (``(Q,)`` row indices) removes each
    query's own centre. ``sync_free`` compares against every centre instead of
    selecting the candidates first (a selection needs the host to learn their
    number): more arithmetic, no host synchronisation, the same answer; the
    centres are then taken in blocks of at most :data:`_BLOCK_ELEMENTS` distances
    (one block up to 262,144 centres for 128 queries), so a GPU step's memory
    stays bounded whatever the bank's size.
    """
    if sync_free:
        block = max(1, _BLOCK_ELEMENTS // max(1, queries.shape[0]))
        best = torch.full_like(labels, -1, dtype=torch.long)
        best_dist = torch.full(labels.shape, float("inf"), device=queries.device)
        for start in range(0, centres.shape[0], block):
            rows = torch.arange(start, min(start + block, centres.shape[0]), device=centres.device)
            points, point_labels = centres[start : start + block], centre_labels[start : start + block]
            dist, at = _class_distances(queries, labels, points, point_labels, rows, exclude).min(1)
            closer = dist < best_dist  # strictly: ties keep the earlier row, as one argmin over all rows does
            best_dist, best = torch.where(closer, dist, best_dist), torch.where(closer, at + start, best)
        return torch.where(torch.isfinite(best_dist), best, torch.full_like(best, -1))
    candidates = torch.isin(centre_labels, labels).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return torch.full_like(labels, -1, dtype=torch.long)
    # index_select, not advanced indexing: several times faster on the CPU for these row gathers
    points, point_labels = centres.index_select(0, candidates), centre_labels.index_select(0, candidates)
    dist = _class_distances(queries, labels, points, point_labels, candidates, exclude)
    best = dist.argmin(1)
    found = torch.isfinite(dist.gather(1, best.unsqueeze(1)).squeeze(1))
    return torch.where(found, candidates.index_select(0, best), torch.full_like(best, -1))


# Distances one sync-free hard-case block holds (float32: 128 MiB).
_BLOCK_ELEMENTS = 1 << 25


def _class_distances(queries: Tensor, labels: Tensor, points: Tensor, point_labels: Tensor, rows: Tensor,
                     exclude: Tensor | None) -> Tensor:
    """``(Q, P)`` squared distances (up to each query's constant ``|x|^2``) from the queries to the centres
    ``points``, the bank's ``rows``; ``inf`` at centres of another class and at each query's ``exclude`` row."""
    points = points.float()
    dist = (points * points).sum(1) - 2.0 * (queries.detach().float() @ points.T)
    dist.masked_fill_(point_labels.unsqueeze(0) != labels.unsqueeze(1), float("inf"))
    if exclude is not None:
        dist.masked_fill_(rows.unsqueeze(0) == exclude.unsqueeze(1), float("inf"))
    return dist


def _shifted_exp(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(e, s, lse)`` of each row: ``e = exp(logits - peak)`` (terms below :data:`_EXP_FLOOR` exactly 0),
    ``s = sum(e)`` and ``lse = log(s) + peak``, the row's log-sum-exp; a row of ``-inf`` gives ``-inf``
    and a NaN gives NaN, as in :func:`_logsumexp`."""
    peak = logits.amax(1, keepdim=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    e = logits - peak
    below = e < _EXP_FLOOR
    e = e.clamp_(min=_EXP_FLOOR).exp_().masked_fill_(below, 0.0)
    s = e.sum(1, keepdim=True)
    return e, s, (s.log() + peak).squeeze(1)


class _RBFNegLogLikelihood(torch.autograd.Function):
    """``nll_b = logsumexp_{j valid} a_bj - logsumexp_{j true} a_bj`` with
    ``a_bj = theta_{i_bj} - ||x_b - c_{i_bj}||^2 / (2 sigma^2)``, and its gradient in closed form.

    Inputs: embeddings ``x (B, d)``, constant centres ``(N, d)``, ``index (B, K)``
    (``>= 0``), ``valid`` and ``is_true`` ``(B, K)`` bool masks (padding slots
    invalid; true slots valid), log-weights ``theta (N,)``, a 0-d ``sigma``.
    Returns ``(nll, sq)``: ``(B,)``, ``+inf`` for a row with no true slot, and the
    ``(B, K)`` squared distances (not differentiable). The maths autograd would
    differentiate through the gathers and log-sum-exps, as one node whose backward
    forms ``p - q`` in five operators, then one batched matrix product for the
    embeddings and one ``index_add`` for the weights (the step is bound by operator
    count, on the CPU and on GPUs: benchmarks/README.md). With ``p`` the softmax of
    ``a`` over a row's valid slots and ``q`` over its true slots, ``dnll/da = p - q``, then
    ``da/dx = (c - x) / sigma^2``, ``da/dtheta = 1`` and ``da/dsigma = ||x - c||^2 / sigma^3``.
    A row with no true slot has ``q = 0`` (its ``nll`` is left out of the loss,
    so its gradient is multiplied by 0 and stays finite).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, centres: Tensor, index: Tensor, valid: Tensor, is_true: Tensor,
                log_weights: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        diff, sq = _differences(x, centres, index)
        scale = (0.5 / sigma.square()).to(x.dtype)
        logits = _gather(log_weights, index).to(x.dtype).sub_(sq * scale).masked_fill_(~valid, _NEG_INF)
        e_all, s_all, lse_all = _shifted_exp(logits)
        e_true, s_true, lse_true = _shifted_exp(logits.masked_fill_(~is_true, _NEG_INF))
        ctx.save_for_backward(diff, sq, index, e_all, s_all, e_true, s_true, scale, sigma)
        ctx.num_centres, ctx.weights_dtype = log_weights.shape[0], log_weights.dtype
        ctx.mark_non_differentiable(sq)
        return lse_all - lse_true, sq

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        diff, sq, index, e_all, s_all, e_true, s_true, scale, sigma = ctx.saved_tensors
        # dL/da; s_true >= 1 on a row with a true slot (its largest term is exp(0)), 0 on a row without.
        g = (e_all / s_all).sub_(e_true / s_true.clamp(min=1.0)).mul_(grad_nll.unsqueeze(1))
        grad_x = grad_w = grad_sigma = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g.unsqueeze(1), diff).squeeze(1).mul_(2.0 * scale)
        if ctx.needs_input_grad[5]:
            grad_w = torch.zeros(ctx.num_centres, dtype=ctx.weights_dtype, device=g.device)
            grad_w.index_add_(0, index.reshape(-1), g.reshape(-1).to(ctx.weights_dtype))
        if ctx.needs_input_grad[6]:
            grad_sigma = ((g * sq).sum() * (2.0 * scale / sigma)).to(sigma.dtype)
        return grad_x, None, None, None, None, grad_w, grad_sigma


class RBFTerms(NamedTuple):
    """Per-row pieces of the RBF loss (see :func:`rbf_terms`)."""

    nll: Tensor  # (B,) -log P(y|x); +inf where the row's class has no other centre in the bank
    sq_distances: Tensor  # (B, k) detached squared distances to the given neighbours N(x)
    true_absent: Tensor  # (B,) bool: no true-class centre among the given neighbours (the hard case)
    scorable: Tensor  # (B,) bool: the row's class has a centre in the (augmented) neighbourhood

    def loss(self) -> Tensor:
        """Mean ``nll`` over the scorable rows; 0, still differentiable, if there are none.

        Only rows that cannot be scored (no other centre of their class in the
        bank) are left out; a NaN or infinite ``nll`` of a scorable row (non-finite
        embeddings, an overflowing distance) propagates into the loss, so the
        trainer's non-finite guard sees it.
        """
        kept = torch.where(self.scorable, self.nll, torch.zeros_like(self.nll))
        return kept.sum() / self.scorable.sum().clamp(min=1)


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
    centre, skipped); the other rows then get a padding slot. Then
    ``nll = logsumexp_{N'} a_j - logsumexp_{y ∩ N'} a_j`` (a masked logsumexp
    over the true class only: the loss needs no per-class scatter), computed by
    :class:`_RBFNegLogLikelihood` with its closed-form gradient.
    """
    labels = labels.long()
    index = neighbours.long()
    valid = index >= 0
    index = index.clamp(min=0)
    is_true = (_gather(centre_labels, index).long() == labels.unsqueeze(1)) & valid
    true_absent = ~is_true.any(1)
    if avoid_host_sync(embeddings.device):
        # No host synchronisation on an accelerator: every row's nearest true-class centre is
        # found, and used where the class is absent (a padding slot elsewhere; the same loss).
        nearest = rbf_nearest_class_centres(
            embeddings, labels, centres, centre_labels, None if exclude is None else exclude.long(), sync_free=True
        )
        extra = torch.where(true_absent, nearest, torch.full_like(nearest, -1))
    elif bool(true_absent.any()):
        hard = true_absent.nonzero().squeeze(1)
        extra = torch.full_like(labels, -1)
        extra[hard] = rbf_nearest_class_centres(
            embeddings[hard], labels[hard], centres, centre_labels, None if exclude is None else exclude[hard].long()
        )
    else:
        extra = None
    if extra is not None:  # the extra centre is of the row's class by construction, where there is one
        found = (extra >= 0).unsqueeze(1)
        index = torch.cat([index, extra.clamp(min=0).unsqueeze(1)], dim=1)
        valid, is_true = torch.cat([valid, found], dim=1), torch.cat([is_true, found], dim=1)
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(float(sigma), dtype=embeddings.dtype, device=embeddings.device)
    nll, sq = _RBFNegLogLikelihood.apply(embeddings, centres.detach(), index, valid, is_true, log_weights, sigma)
    k = neighbours.shape[1]
    sq = sq[:, :k].masked_fill(~valid[:, :k], float("inf"))
    return RBFTerms(nll, sq, true_absent, is_true.any(1))


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
    return rbf_terms(embeddings, centres, centre_labels, neighbours, log_weights, sigma, labels, exclude=exclude).loss()


def rbf_step(
    embeddings: Tensor,
    centres: Tensor,
    centre_labels: Tensor,
    neighbours: Tensor,
    log_weights: Tensor,
    log_sigma: Tensor,
    labels: Tensor,
    exclude: Tensor | None = None,
    radius: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One training step of the RBF solver as a pure function: ``(loss, stats, own_distance)``.

    ``embeddings`` are the network's raw outputs, put on the sphere of ``radius``
    first when ``radius > 0``; ``sigma = exp(log_sigma)``. ``loss`` is
    :func:`rbf_terms`'s mean; ``stats`` (5,) holds the batch's sums of the
    diagnostics (mean neighbour distance, mean RBF value, hard case, unscorable
    rows, rows); ``own_distance`` (B,) is each row's distance to its own centre
    ``exclude`` (empty without ``exclude``). No host synchronisation on an
    accelerator and no Python branching on tensor values, so ``torch.compile``
    fuses it into a few kernels (the solver's ``compile_loss``).
    """
    if radius > 0:
        embeddings = radius * torch.nn.functional.normalize(embeddings, dim=1)
    sigma = log_sigma.exp()
    terms = rbf_terms(embeddings, centres, centre_labels, neighbours, log_weights, sigma, labels, exclude=exclude)
    with torch.no_grad():
        sq = terms.sq_distances
        stats = torch.stack([
            sq.sqrt().mean(1).sum(), _floored_exp(-sq / (2 * sigma**2)).mean(1).sum(), terms.true_absent.sum(),
            (~terms.scorable).sum(), sq.new_full((), float(labels.shape[0])),
        ]).float()
        own = (embeddings.detach() - centres.index_select(0, exclude).to(embeddings.dtype)).norm(dim=1) \
            if exclude is not None else embeddings.new_zeros(0)
    return terms.loss(), stats, own


@torch.no_grad()
def rbf_auto_sigma(centres: Tensor, max_points: int = 2048,
                   nearest: Callable[[Tensor], Tensor] | None = None) -> float:
    """``sigma`` = (lower) median distance from a centre to its nearest other centre.

    The typical spacing of the bank: a sample's nearest centre then has
    ``f ~ exp(-1/2)`` and farther ones fall off, whatever the embedding's overall
    scale. Estimated on at most ``max_points`` evenly spaced rows. ``nearest``
    maps those rows to each one's nearest other centre from what the caller
    already has (the RBF solver: its bank's neighbour lists, or a search of the
    bank's index, so a refresh builds no second index and an approximate bank
    gives its own, slightly larger, sigma); without it the exact backend's graph
    rows are taken (never ``N x N`` at once; on the CPU its numba kernel: 0.08 s
    at 54,000 centres, against 0.62 s for a blocked torch search;
    benchmarks/README.md). The distance is then taken as a difference. Falls
    back to 1 when the distances are all 0 or there is a single centre.
    """
    n = centres.shape[0]
    if n < 2:
        return 1.0
    rows = torch.linspace(0, n - 1, min(n, max_points), device=centres.device).round().long().unique()
    found = ExactSearch().build(centres).graph(1, rows=rows)[:, 0] if nearest is None else nearest(rows)
    other = found.long().to(centres.device)
    value = float((centres.index_select(0, rows).float() - centres.index_select(0, other).float()).norm(dim=1).median())
    return value if value > 0 else 1.0
