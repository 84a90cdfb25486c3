"""Helpers shared by the search backends (most work on numpy copies of the points) and their users."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.search import cpu_exact


def as_float32_array(x: Tensor, *, copy: bool = False) -> np.ndarray:
    """A C-contiguous float32 numpy view of a 2-D tensor on any device, or a copy
    (always one with ``copy``: an index's own points)."""
    if x.dim() != 2:
        raise ConfigError(f"expected a 2-D (rows, dim) tensor, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32, copy=copy).numpy())


def row_indices(rows: range | Tensor | None, n: int) -> Tensor:
    """The rows of a graph of ``n`` points as a CPU int64 tensor (``None``: all of them)."""
    if rows is None:
        return torch.arange(n)
    index = torch.arange(rows.start, rows.stop, rows.step) if isinstance(rows, range) else rows.detach().long().cpu()
    if index.dim() != 1 or (len(index) and (int(index.min()) < 0 or int(index.max()) >= n)):
        raise ConfigError(f"graph rows must be a 1-D range or tensor of indices in [0, {n})")
    return index


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


def graph_rows(
    distances: np.ndarray, indices: np.ndarray, queries: np.ndarray, points: np.ndarray, rows: Tensor, device: torch.device
) -> Tensor:
    """Turn a ``k + 1`` search of the points ``rows`` (``queries``) into their graph rows:
    rows padded with ``-1`` completed exactly, own rows dropped, int32 on ``device``."""
    complete_rows(distances, indices, queries, points)
    return drop_own_rows(torch.from_numpy(indices), rows).to(torch.int32).to(device)


def complete_rows(
    distances: np.ndarray, indices: np.ndarray, queries: np.ndarray, points: np.ndarray
) -> None:
    """Replace, in place, every row holding a ``-1`` by the exact answer for that query."""
    bad = np.flatnonzero((indices < 0).any(axis=1))
    if bad.size == 0:
        return
    distances[bad], indices[bad] = cpu_exact.knn(np.ascontiguousarray(queries[bad]), points, indices.shape[1])
