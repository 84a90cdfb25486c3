"""Exact k-nearest-neighbour search: blocked matrix multiply plus top-k in torch."""
from __future__ import annotations

import torch
from torch import Tensor

from knnsolver.interfaces import NeighbourSearch, check_k

# Largest distance block held at once (elements): 2**25 floats = 128 MiB.
_BLOCK_ELEMENTS = 2**25


def blocked_knn(
    queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False, block_elements: int = _BLOCK_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Exact k nearest ``points`` of each query by squared Euclidean distance.

    ``||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2`` is evaluated for a block of
    queries at a time (``block_elements`` distances at most), so memory is
    O(block x N), never O(Q x N). With ``exclude_self`` the queries are the
    points themselves and each row's own index is excluded. Computation is in
    float32 whatever the storage dtype. Returns ``(sq_distances, int32 indices)``,
    nearest first.
    """
    if exclude_self and queries.shape[0] != points.shape[0]:
        raise ValueError("exclude_self needs queries to be the points themselves")
    check_k(k, points.shape[0], excluding_self=exclude_self)
    pts = points.float()
    p_norm = (pts * pts).sum(1)
    rows = max(1, block_elements // max(1, pts.shape[0]))
    out_d, out_i = [], []
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows].float()
        d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ pts.T) + p_norm
        d.clamp_(min=0.0)
        if exclude_self:
            idx = torch.arange(start, start + q.shape[0], device=d.device)
            d[torch.arange(q.shape[0], device=d.device), idx] = float("inf")
        dist, ind = torch.topk(d, k, dim=1, largest=False, sorted=True)
        out_d.append(dist)
        out_i.append(ind.to(torch.int32))
    return torch.cat(out_d), torch.cat(out_i)


class ExactSearch(NeighbourSearch):
    """Exact search; the reference backend every approximate one is measured against."""

    name = "exact"

    def __init__(self, block_elements: int = _BLOCK_ELEMENTS) -> None:
        self.block_elements = int(block_elements)

    @torch.no_grad()
    def knn_graph(self, points: Tensor, k: int) -> Tensor:
        return blocked_knn(points, points, k, exclude_self=True, block_elements=self.block_elements)[1]

    @torch.no_grad()
    def search(self, queries: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return blocked_knn(queries, points, k, block_elements=self.block_elements)
