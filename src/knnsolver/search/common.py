"""Helpers shared by the search backends (most work on numpy copies of the points) and their users."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.search.exact import blocked_knn


def as_float32_array(x: Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy copy (or view) of a 2-D tensor on any device."""
    if x.dim() != 2:
        raise ConfigError(f"expected a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def check_dims(queries: Tensor, points: Tensor) -> None:
    """Raise a clear error when queries and points do not share a dimension."""
    if queries.dim() != 2 or points.dim() != 2:
        raise ConfigError(f"queries and points must be 2-D, got {tuple(queries.shape)} and {tuple(points.shape)}")
    if queries.shape[1] != points.shape[1]:
        raise ConfigError(f"queries have dimension {queries.shape[1]} but points have {points.shape[1]}")


def drop_self(indices: np.ndarray, k: int) -> np.ndarray:
    """From ``(N, k+1)`` neighbour lists of the points themselves keep ``k`` others.

    Each row's own index is removed wherever it appears; a row without it loses
    its last (farthest) entry.
    """
    n = indices.shape[0]
    own = indices == np.arange(n, dtype=indices.dtype)[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    return indices[~own].reshape(n, k)


def drop_own_rows(found: Tensor, own: Tensor) -> Tensor:
    """From ``(Q, k+1)`` neighbours of queries that are bank rows ``own`` keep ``k`` others.

    The torch twin of :func:`drop_self` for a subset of the rows: each query's own
    row is removed; a query whose own row was not found (exact duplicates, or an
    approximate search) loses its farthest entry instead.
    """
    keep = found != own.to(found.dtype).unsqueeze(1)
    keep[:, -1] &= ~keep.all(1)
    return found[keep].view(found.shape[0], found.shape[1] - 1)


def complete_rows(
    distances: np.ndarray, indices: np.ndarray, queries: np.ndarray, points: np.ndarray
) -> None:
    """Replace, in place, every row holding a ``-1`` by the exact answer for that query."""
    bad = np.flatnonzero((indices < 0).any(axis=1))
    if bad.size == 0:
        return
    d, i = blocked_knn(torch.from_numpy(queries[bad]), torch.from_numpy(points), indices.shape[1])
    distances[bad] = d.numpy()
    indices[bad] = i.numpy()
