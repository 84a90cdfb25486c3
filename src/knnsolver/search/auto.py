"""Exact search for small banks, an approximate backend for large ones.

Exact search costs O(Q N d) and needs no index; an approximate backend pays
an index build (roughly linear in N) and then O(Q log N)-ish per query. The
all-points graph (Q = N) is where the build pays off first, so the threshold
is on the number of points N, set from the crossover measured below. A
query search switches only when its exact work ``Q * N`` also reaches
``threshold ** 2`` (the work of an all-points graph at the threshold), so
small query batches against a large bank stay exact.

On the CPU, exact search runs :mod:`knnsolver.search.cpu_exact` (each pair of
the graph computed once, faster than faiss ``IndexFlatL2``). Measured on
2026-11-29 on a shared 2-core CPU (AMD EPYC, 2 threads, other jobs running):
``python -m knnsolver.bench.search --datasets synthetic --sizes 5000 10000 20000
50000 100000 --backends exact,faiss-hnsw --skip-queries --exact-max 100000``,
and the same with ``--k 100`` from 10,000 points; ``knn_graph`` seconds on
clustered synthetic banks, d = 64, build included (faiss HNSW, M = 32: the
cheapest ``ef_search`` with recall >= 0.95, its recall in brackets)::

    N          k = 10: exact   faiss-hnsw       k = 100: exact   faiss-hnsw
    5,000          0.16        0.70 (0.990)
    10,000         0.47        0.75 (0.9995)         0.22        0.30 (0.9995)
    20,000         0.82        1.75 (0.986)          0.54        0.67 (0.984)
    50,000         3.92        3.43 (0.983)          2.40        2.32 (0.989)
    100,000       13.9         4.05 (0.984)          8.35        5.63 (0.985)

(The two runs met different loads from the other jobs; compare within a run.)
Exact search is faster up to 20,000 points and level with HNSW at 50,000,
at k = 10 and k = 100 alike, so the CPU threshold is 50,000 whatever k
(before this kernel, torch's matmul plus top-k took 57.9 s at 50,000 points
and the threshold was 10,000; ``benchmarks/results/search/crossover``).

Re-measured on 2026-11-30 after the exact graph learnt its locality order
(:mod:`knnsolver.search.cpu_exact`), on the same clustered banks and 2-core
machine, quiet, with ``--sizes 50000 100000 200000`` and the same flags::

    N          k = 10: exact   faiss-hnsw       k = 100: exact   faiss-hnsw
    50,000                                           1.83        2.20 (0.989)
    100,000        4.54        2.78 (0.979)          5.58        6.32 (0.985)
    200,000       21.5         7.51 (0.951)         19.9        15.0 (0.946)

and ``--k 200`` at 100,000 and 150,000 points: exact 8.86 and 15.2 s, HNSW
10.1 and 18.0 s (recall 0.986, 0.967); ``--k 10`` at 50,000: exact 1.22 s,
HNSW 0.94 s (0.983).

At k = 10, HNSW is faster from 50,000 points; at k = 100 and 200 the exact
graph is faster up to 100,000 and 150,000 points (at 200,000, k = 100, HNSW's
recall falls below 0.95). So the CPU threshold follows ``k``: 50,000 points
below ``large_k`` = 100 neighbours, 100,000 from there on (the largest size
measured faster for both). An :class:`AutoIndex` chooses at each graph or
search, where ``k`` is known, and builds each backend's index once.

The default approximate backend is faiss HNSW: about as fast as FANNG on the
clustered banks (where FANNG's recall is higher and HNSW's falls as clusters
grow apart), faster at higher recall on the Fashion-MNIST stand-in
(``benchmarks/results/search``), and it keeps high recall at the large k
(100 to 200) of the RBF solver with no tuning.

On CUDA the exact backend stays on the GPU (torch, no host copy) and is far
cheaper: on an H200 it built the 54,000-point k = 200 graph in 0.11 s, where
faiss-flat took 3.9 s on the host's 16 CPU cores. Its cost grows as N**2
(about 1.5 s at 200,000 points), an HNSW graph's roughly as N: the 2-core
HNSW timings above (19.3 s at 200,000 points in the older crossover run)
divided by 8 cores give about 2.4 s at 200,000 points, so ``cuda_threshold``
is 200,000 (an estimate, not a measured crossover).

"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourIndex, NeighbourSearch
from knnsolver.registry import SEARCHES
from knnsolver.search.exact import ExactSearch


class AutoSearch(NeighbourSearch):
    """Exact below a number of points, ``approximate`` (a registered backend name) above.

    Args:
        threshold: number of points from which the approximate backend is used on the CPU.
        cuda_threshold: number of points from which the approximate backend is used on CUDA.
            Higher than ``threshold``: exact search is far cheaper on a GPU.
        approximate: the approximate backend (not ``auto`` or ``exact``), built with its defaults.
        large_k: from this many neighbours on, ``large_k_threshold`` replaces ``threshold`` on the CPU.
        large_k_threshold: number of points from which the approximate backend is used on the CPU
            for ``k >= large_k``. The exact graph gains most at large k (module docstring: at k = 100
            and 200 it beat HNSW up to 100,000 and 150,000 points).
    """

    name = "auto"

    def __init__(self, threshold: int = 50_000, cuda_threshold: int = 200_000,
                 approximate: Annotated[str, SEARCHES] = "faiss-hnsw", large_k: int = 100,
                 large_k_threshold: int = 100_000) -> None:
        if min(threshold, large_k, large_k_threshold, cuda_threshold) < 1:
            raise ConfigError(
                f"threshold, large_k, large_k_threshold and cuda_threshold must be >= 1, got {threshold}, "
                f"{large_k}, {large_k_threshold} and {cuda_threshold}"
            )
        if approximate in ("auto", "exact"):
            raise ConfigError(f"approximate must name an approximate backend, got {approximate!r}")
        self.threshold = int(threshold)
        self.large_k, self.large_k_threshold = int(large_k), int(large_k_threshold)
        self.cuda_threshold = int(cuda_threshold)
        self.approximate = approximate
        self._exact = ExactSearch()
        self._approx: NeighbourSearch | None = None

    def _approximate(self) -> NeighbourSearch:
        if self._approx is None:
            self._approx = SEARCHES.build(self.approximate)
        return self._approx

    def backend_for(
        self, n_points: int, n_queries: int | None = None, device: torch.device | str = "cpu", k: int | None = None
    ) -> NeighbourSearch:
        """The backend used for ``n_points`` points on ``device`` (and ``n_queries``
        queries; None: the graph), for ``k`` neighbours (None: unknown, the small-k threshold)."""
        if torch.device(device).type == "cuda":
            limit = self.cuda_threshold
        else:
            limit = self.large_k_threshold if k is not None and k >= self.large_k else self.threshold
        queries = n_points if n_queries is None else n_queries
        if n_points >= limit and queries * n_points >= limit**2:
            return self._approximate()
        return self._exact

    def build(self, points: Tensor) -> AutoIndex:
        return AutoIndex(self, points)


class AutoIndex(NeighbourIndex):
    """Delegates every search to the index of the backend :meth:`AutoSearch.backend_for`
    picks; each backend's index is built once, on first use."""

    def __init__(self, auto: AutoSearch, points: Tensor) -> None:
        super().__init__(points.detach().to(torch.float32, copy=True), points.device)
        self._auto = auto
        self._built: dict[str, NeighbourIndex] = {}

    def index_for(self, n_queries: int | None = None, k: int | None = None) -> NeighbourIndex:
        """The index answering ``n_queries`` queries (None: the graph) for ``k`` neighbours; set its knobs here."""
        backend = self._auto.backend_for(self.ntotal, n_queries, self.device, k)
        if backend.name not in self._built:
            self._built[backend.name] = backend.build(self.points)
        return self._built[backend.name]

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.index_for(queries.shape[0], k).search(queries, k)

    def graph(self, k: int, rows: range | Tensor | None = None) -> Tensor:
        return self.index_for(k=k).graph(k, rows)
