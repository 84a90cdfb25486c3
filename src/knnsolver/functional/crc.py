"""DML-CRC: a collaborative representation classifier in a learned Mahalanobis metric.

Chakraborti, McCane, Mills, Pal (arXiv 1905.01168), on CRC (Zhang, Yang, Feng, ICCV
2011); METHODS.md section 3, a reading of the abstract. With ``M = L^T L`` (``L`` of
shape ``(p, d)``), ``x' = L x`` and ``D' = L D`` (dictionary atoms as columns):

    alpha  = argmin_a ||x' - D' a||^2 + lam ||a||^2
           = (D'^T D' + lam I_N)^{-1} D'^T x'          "direct":       N x N system
           = D'^T (D' D'^T + lam I_p)^{-1} x'          "push-through": p x p system
    r_c(x) = ||x' - D'_c alpha_c||^2                  (D'_c, alpha_c: class c's atoms)
    logits = -r(x) / T,   loss = cross-entropy(logits, y)

Both systems are symmetric positive definite for ``lam > 0`` and are solved by
Cholesky factorisation (no explicit inverse; ``cholesky_ex``, so a non-finite
embedding turns into a NaN loss for the trainer's guard instead of a linear-algebra
error); gradients flow through the solve to
``L``, the queries and the atoms.

Conventions: tensors hold atoms and queries as *rows* (``atoms`` is ``(N, d)``).
A class with no atom in the dictionary has an empty ``alpha_c``, so its
reconstruction is 0 and ``r_c = ||x'||^2`` (the largest residual any coding with
``alpha_c = 0`` gives); it can still win only if every present class reconstructs
worse than nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.hostsync import avoid_host_sync

__all__ = ["SOLVE_METHODS", "crc_code", "crc_residuals", "crc_logits", "crc_loss"]

SOLVE_METHODS = ("auto", "direct", "push-through")


def crc_code(
    queries: Tensor, atoms: Tensor, lam: float, *, exclude: Tensor | None = None, method: str = "auto"
) -> Tensor:
    """Ridge codes ``alpha`` of shape ``(B, N)`` of projected queries ``x'`` over projected atoms ``D'``.

    ``method``: ``"direct"`` solves the ``N x N`` system, ``"push-through"`` the
    ``p x p`` one (cheaper when the dictionary is larger than the metric dimension),
    ``"auto"`` picks push-through when ``N > p``.

    ``exclude`` (``(B,)`` atom indices) removes atom ``e_b`` from query ``b``'s
    dictionary (leave-one-out: a batch coded over itself, or a bank row over the
    bank). The reduced problem is solved exactly from the full factorisation by a
    rank-one update, and ``alpha[b, e_b] = 0``:

    * push-through, Sherman-Morrison with ``A = D'D'^T + lam I``, ``d = D'_{e}``:
      ``(A - d d^T)^{-1} x' = A^{-1} x' + A^{-1} d (d^T A^{-1} x') / (1 - d^T A^{-1} d)``;
    * direct, block inverse with ``H = (D'^T D' + lam I)^{-1}``:
      ``alpha_{-e} = alpha_{-e} - H_{-e, e} alpha_e / H_{e e}``.
    """
    n, p = atoms.shape
    if method not in SOLVE_METHODS:
        raise ConfigError(f"unknown solve method {method!r}; choose one of: {', '.join(SOLVE_METHODS)}")
    if not lam > 0:
        raise ConfigError(f"ridge lam must be > 0 (it keeps the system positive definite), got {lam}")
    push_through = method == "push-through" or (method == "auto" and n > p)
    if push_through:
        chol = torch.linalg.cholesky_ex(atoms.T @ atoms + lam * torch.eye(p, dtype=atoms.dtype, device=atoms.device)).L
        z = torch.cholesky_solve(queries.T, chol)  # (p, B): A^{-1} x'
        if exclude is not None:
            d = atoms[exclude].T  # (p, B)
            v = torch.cholesky_solve(d, chol)
            z = z + v * ((d * z).sum(0) / (1.0 - (d * v).sum(0)))
        alpha = (atoms @ z).T
    else:
        chol = torch.linalg.cholesky_ex(atoms @ atoms.T + lam * torch.eye(n, dtype=atoms.dtype, device=atoms.device)).L
        alpha = torch.cholesky_solve(atoms @ queries.T, chol).T  # (B, N)
        if exclude is not None:
            picks = (torch.arange(n, device=exclude.device).unsqueeze(1) == exclude).to(atoms.dtype)  # (N, B)
            h = torch.cholesky_solve(picks, chol).T  # (B, N): H[:, e_b] (not one_hot: it reads labels on the host)
            rows = torch.arange(len(exclude), device=exclude.device)
            alpha = alpha - h * (alpha[rows, exclude] / h[rows, exclude])[:, None]
    if exclude is not None:
        alpha = alpha.scatter(1, exclude[:, None], 0.0)
    return alpha


def class_layout(labels: Tensor, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """``(present, index)``: the classes that have atoms, and a ``(C', m)`` table of their
    atom indices padded with ``N`` (a zero atom appended by the caller).

    Without ``num_classes`` the table is as tight as the labels allow (``m`` = the
    largest class), which needs the host to read the class counts. With it the
    shapes are fixed in advance (every class listed, ``m = N``): no host
    synchronisation, for accelerators and for a batch dictionary that changes
    every step. A fixed dictionary (a bank) computes its tight layout once per
    refresh instead (``layout`` of :func:`crc_residuals`).
    """
    n = labels.shape[0]
    order = torch.argsort(labels, stable=True)
    if num_classes is None:
        present, counts = torch.unique(labels, return_counts=True)
        slot = torch.repeat_interleave(torch.arange(len(present), device=labels.device), counts)
        width = int(counts.max())
    else:
        present = torch.arange(num_classes, device=labels.device)
        counts = torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(
            0, labels, torch.ones_like(labels))  # not bincount: on a GPU it reads the labels' range on the host
        slot, width = labels[order], n
    rank = torch.arange(n, device=labels.device) - (torch.cumsum(counts, 0) - counts)[slot]
    index = torch.full((len(present), width), n, dtype=torch.long, device=labels.device)
    index[slot, rank] = order
    return present, index


def crc_residuals(queries: Tensor, atoms: Tensor, atom_labels: Tensor, alpha: Tensor, num_classes: int,
                  layout: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Class residuals ``r[b, c] = ||x'_b - D'_c alpha_{b,c}||^2`` of shape ``(B, C)``.

    Classes are laid out as a padded ``(C', m)`` table (:func:`class_layout`;
    ``layout`` when the caller keeps it for a fixed dictionary, else made here,
    with fixed shapes on accelerators so no step waits on the host).
    Small classes (``m^2 <= B p``) expand the square with class Gram blocks,
    ``||x'||^2 - 2 alpha_c . (D'_c^T x') + alpha_c^T D'_c^T D'_c alpha_c`` (memory
    ``C' m^2``); large ones form the reconstructions ``D'_c alpha_c`` (memory
    ``B C' p``). Absent classes get ``||x'||^2``.
    """
    b, p = queries.shape
    if layout is None:
        layout = class_layout(atom_labels, num_classes if avoid_host_sync(atom_labels.device) else None)
    present, index = layout
    m = index.shape[1]
    a = F.pad(alpha, (0, 1))[:, index]  # (B, C', m), zeros at the padding
    blocks = F.pad(atoms, (0, 0, 0, 1))[index]  # (C', m, p)
    sq_norm = (queries * queries).sum(1)
    if m * m <= b * p:
        cross = F.pad(queries @ atoms.T, (0, 1))[:, index]
        gram = blocks @ blocks.transpose(1, 2)
        quad = (torch.einsum("bcm,cmn->bcn", a, gram) * a).sum(-1)
        r = (sq_norm[:, None] - 2.0 * (a * cross).sum(-1) + quad).clamp_min(0.0)
    else:
        r = (queries[:, None, :] - torch.einsum("bcm,cmp->bcp", a, blocks)).pow(2).sum(-1)
    return sq_norm[:, None].repeat(1, num_classes).index_copy(1, present, r)


def crc_logits(
    queries: Tensor,
    atoms: Tensor,
    atom_labels: Tensor,
    metric: Tensor,
    lam: float,
    temperature: float,
    num_classes: int,
    *,
    exclude: Tensor | None = None,
    method: str = "auto",
    layout: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``-r(x) / T`` of shape ``(B, C)`` for raw queries ``(B, d)`` and atoms ``(N, d)``;
    ``metric`` is ``L`` of shape ``(p, d)``, ``M = L^T L``; ``layout`` as in :func:`crc_residuals`."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    q, d = queries @ metric.T, atoms @ metric.T
    alpha = crc_code(q, d, lam, exclude=exclude, method=method)
    return -crc_residuals(q, d, atom_labels, alpha, num_classes, layout) / temperature


def crc_loss(
    queries: Tensor,
    labels: Tensor,
    atoms: Tensor,
    atom_labels: Tensor,
    metric: Tensor,
    lam: float,
    temperature: float,
    num_classes: int,
    *,
    exclude: Tensor | None = None,
    method: str = "auto",
) -> Tensor:
    """Mean cross-entropy of ``softmax(-r(x) / T)`` against the query labels."""
    logits = crc_logits(queries, atoms, atom_labels, metric, lam, temperature, num_classes, exclude=exclude, method=method)
    return F.cross_entropy(logits, labels)
