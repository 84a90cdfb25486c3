"""Helpers shared by the search backends (most work on numpy copies of the points) and their users."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourIndex, check_k
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

    Each query's own row is removed where it first appears; a query whose own row
    was not found (exact duplicates, or an approximate search) loses its farthest
    entry instead. With ``own = arange(N)`` this turns an all-points search into
    the kNN graph. Fixed shapes throughout (a gather, no boolean selection), so
    a training step on a GPU does not wait on the host here.
    """
    k = found.shape[1] - 1
    hit = found == own.to(found.dtype).unsqueeze(1)
    dropped = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), k)  # the first hit, else the last column
    slots = torch.arange(k, device=found.device)
    return found.gather(1, slots + (slots >= dropped.unsqueeze(1)))


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


class ArrayIndex(NeighbourIndex):
    """An index whose backend searches a float32 numpy copy of the points (:attr:`data`): faiss and FANNG.

    Subclasses give :meth:`_search`; this class adds what they share: the
    argument checks, exact completion of rows the backend left short (``-1``),
    own-row dropping for the graph, and float32 / int32 tensors on the right device.
    """

    def __init__(self, data: np.ndarray, device: torch.device) -> None:
        super().__init__(torch.from_numpy(data), device)
        self.data = data

    def _search(self, queries: np.ndarray, k: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The backend's ``(distances, indices)``; ``own``: the queries' own rows when they are points (a graph)."""
        raise NotImplementedError

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        check_dims(queries, self.points)
        check_k(k, self.ntotal, excluding_self=False)
        q = as_float32_array(queries)
        distances, indices = self._search(q, k)
        complete_rows(distances, indices, q, self.data)
        device = queries.device
        return (
            torch.from_numpy(np.maximum(distances, 0.0).astype(np.float32)).to(device),
            torch.from_numpy(indices.astype(np.int32)).to(device),
        )

    @torch.no_grad()
    def graph(self, k: int, rows: range | Tensor | None = None) -> Tensor:
        check_k(k, self.ntotal, excluding_self=True)
        own = row_indices(rows, self.ntotal)
        q = self.data if rows is None else self.data[own.numpy()]
        distances, indices = self._search(q, k + 1, own=own.numpy())
        return graph_rows(distances, indices, q, self.data, own, self.device)
