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


def drop_own_rows(found: Tensor, own: Tensor) -> Tensor:
    """From ``(Q, k+1)`` neighbours of queries that are bank rows ``own`` keep ``k`` others.

    Each query's own row is removed wherever it appears; a query whose own row
    was not found (exact duplicates, or an approximate search) loses its farthest
    entry instead. With ``own = arange(N)`` this turns an all-points search into
    the kNN graph.
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
