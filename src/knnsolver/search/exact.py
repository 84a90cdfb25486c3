"""Exact k-nearest-neighbour search: torch on accelerators; on the CPU, the fastest of our
kernel and faiss.

Points on an accelerator (CUDA) stay there: :func:`blocked_knn`, a blocked
matrix multiply plus ``torch.topk``, with no host copy. On the CPU the graph
(and any shard of its rows) comes from :mod:`knnsolver.search.cpu_exact`,
which computes each pair once: on 54,000 points it takes about half to nine
tenths of faiss ``IndexFlatL2``'s time (``benchmarks/bench_exact_search.py``).
A query search has no pair to share, and there faiss's ``IndexFlatL2`` search
(its BLAS is faster than torch's on our AMD host) is as fast or faster than
the kernel, so the index searches queries with ``faiss.knn``, the same search
without a copy of the points. All are exact; they may order neighbours at equal float32 distance differently (the
CPU kernel puts the lower index first).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knnsolver.hostsync import avoid_host_sync
from knnsolver.interfaces import NeighbourIndex, NeighbourSearch, check_k
from knnsolver.search import cpu_exact
from knnsolver.search.common import check_dims, row_indices
from knnsolver.search.faiss_backend import faiss, torch_threads

# Largest distance block held at once (elements): 2**25 floats = 128 MiB.
_BLOCK_ELEMENTS = 2**25


def blocked_knn(
    queries: Tensor, points: Tensor, k: int, *, own: Tensor | None = None, block_elements: int = _BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Exact k nearest ``points`` of each query by squared Euclidean distance.

    ``||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2`` is evaluated for a block of
    queries at a time (``block_elements`` distances at most), so memory is
    O(block x N), never O(Q x N). ``own[i]``, when given, is query ``i``'s own
    row among the points, excluded from its result. Computation is in float32
    whatever the storage dtype. Returns ``(sq_distances, int32 indices)``,
    nearest first.
    """
    if own is not None and own.shape != queries.shape[:1]:
        raise ValueError("own needs one row index per query")
    check_k(k, points.shape[0], excluding_self=own is not None)
    pts = points.float()
    p_norm = (pts * pts).sum(1)
    rows = max(1, block_elements // max(1, pts.shape[0]))
    out_d, out_i = [], []
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows].float()
        d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ pts.T) + p_norm
        d.clamp_(min=0.0)
        if own is not None:
            d[torch.arange(q.shape[0], device=d.device), own[start : start + rows].to(d.device)] = float("inf")
        dist, ind = torch.topk(d, k, dim=1, largest=False, sorted=True)
        out_d.append(dist)
        out_i.append(ind.to(torch.int32))
    return torch.cat(out_d), torch.cat(out_i)


class ExactIndex(NeighbourIndex):
    """Exact search over fixed points (module docstring); building copies the points
    and, on the CPU, computes their squared norms."""

    def __init__(self, points: Tensor, block_elements: int) -> None:
        super().__init__(points.detach().to(torch.float32, copy=True).contiguous(), points.device)
        self.block_elements = int(block_elements)
        self._on_cpu = not avoid_host_sync(self.device)  # numba and faiss on the CPU; torch, on the device, elsewhere
        if self._on_cpu:
            self._norms = cpu_exact.squared_norms(self.points.numpy())

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        check_dims(queries, self.points)
        check_k(k, self.ntotal, excluding_self=False)
        if not self._on_cpu:
            found = blocked_knn(queries.to(self.device), self.points, k, block_elements=self.block_elements)
            return found[0].to(queries.device), found[1].to(queries.device)
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        with torch_threads():
            d, i = faiss.knn(q, self.points.numpy(), k)  # IndexFlatL2's search, without its copy
        device = queries.device
        return torch.from_numpy(np.maximum(d, 0.0)).to(device), torch.from_numpy(i.astype(np.int32)).to(device)

    @torch.no_grad()
    def graph(self, k: int, rows: range | Tensor | None = None) -> Tensor:
        check_k(k, self.ntotal, excluding_self=True)
        tile = cpu_exact.tile_for(self.block_elements)
        if not self._on_cpu:
            own = row_indices(rows, self.ntotal).to(self.device)
            queries = self.points if rows is None else self.points[own]
            return blocked_knn(queries, self.points, k, own=own, block_elements=self.block_elements)[1]
        x = self.points.numpy()
        if rows is None:
            return torch.from_numpy(cpu_exact.knn_graph(x, k, norms=self._norms, tile=tile)[1])
        own = row_indices(rows, self.ntotal).numpy()
        found = cpu_exact.knn(x[own], x, k, own=own, query_norms=self._norms[own], point_norms=self._norms, tile=tile)
        return torch.from_numpy(found[1])


class ExactSearch(NeighbourSearch):
    """Exact search; the reference backend every approximate one is measured against.

    Args:
        block_elements: most pairwise distances held at once by the torch path (a
            block of queries by all points) and by a CPU graph tile (at most
            2,048 x 2,048 anyway).
    """

    name = "exact"

    def __init__(self, block_elements: int = _BLOCK_ELEMENTS) -> None:
        self.block_elements = int(block_elements)

    def build(self, points: Tensor) -> ExactIndex:
        return ExactIndex(points, self.block_elements)
