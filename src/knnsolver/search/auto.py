"""Exact search for small banks, an approximate backend for large ones.

Exact search costs O(Q N d) and needs no index; an approximate backend pays
an index build (roughly linear in N) and then O(Q log N)-ish per query. The
all-points graph (Q = N) is where the build pays off first, so the threshold
is on the number of points N, set from the crossover measured below. A
query search switches only when its exact work ``Q * N`` also reaches
``threshold ** 2`` (the work of an all-points graph at the threshold), so
small query batches against a large bank stay exact.

Measured on 2026-11-22 on a shared 2-core CPU (AMD EPYC, 2 threads, other
jobs running; ``python -m knnsolver.bench.search --datasets synthetic --sizes
5000 10000 20000 50000 100000 200000 --backends exact,faiss-flat,faiss-hnsw,fanng
--skip-queries --exact-max 50000``, results in
``benchmarks/results/search/crossover``): ``knn_graph`` at k = 10, d = 64,
clustered synthetic banks, seconds (recall@10 of the cheapest setting with
recall >= 0.95; exact above 50k timed on 2,000 rows and scaled)::

    N         exact     faiss-hnsw (M=32)      fanng
    5,000      0.62     1.13 (0.990)           0.57 (0.9998)
    10,000     3.30     2.14 (0.999)           1.06 (0.982)
    20,000     9.32     3.22 (0.986)           2.56 (0.980)
    50,000    57.9      7.72 (0.983)           8.82 (0.980)
    100,000  199       14.3  (0.986)          12.5  (0.980)
    200,000  544       19.3  (0.951)          28.4  (0.979)

Both approximate backends overtake exact search between 5,000 and 10,000
points (FANNG ties at 5,000), so the threshold is 10,000. The default
approximate backend is faiss HNSW: about as fast as FANNG on the clustered
banks (where FANNG's recall is higher and HNSW's falls as clusters grow
apart), faster at higher recall on the Fashion-MNIST stand-in
(``benchmarks/results/search``), and it keeps high recall at the large k
(100 to 200) of the RBF solver with no tuning. On CUDA exact search is far cheaper; raise the
threshold there.

At the RBF solver's k = 100 the crossover comes earlier (same command with ``--k 100
--backends exact,faiss-hnsw,fanng --sizes 5000 10000 20000 50000``, machine otherwise
idle, ``benchmarks/results/search/crossover-k100``)::

    N         exact     faiss-hnsw (recall@100)    fanng (recall@100)
    5,000      0.73     0.20 (0.991)               0.36 (1.000)
    10,000     1.80     0.38 (0.9995)              0.68 (1.000)
    20,000     3.47     0.97 (0.984)               1.77 (1.000)
    50,000    17.7      4.23 (0.989)               7.55 (1.000)

The threshold stays at 10,000: below it an exact graph costs under 2 s a refresh, and
exact neighbours are worth that; ``AutoSearch(threshold=...)`` lowers it.

"""
from __future__ import annotations

from torch import Tensor

from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch
from knnsolver.registry import SEARCHES
from knnsolver.search.exact import ExactSearch


class AutoSearch(NeighbourSearch):
    """Exact below ``threshold`` points, ``approximate`` (a registered backend name) above.

    Args:
        threshold: number of points from which the approximate backend is used.
        approximate: registered name of the approximate backend, built with its defaults.
    """

    name = "auto"

    def __init__(self, threshold: int = 10_000, approximate: str = "faiss-hnsw") -> None:
        if threshold < 1:
            raise ConfigError(f"threshold must be >= 1, got {threshold}")
        if approximate in ("auto", "exact"):
            raise ConfigError(f"approximate must name an approximate backend, got {approximate!r}")
        self.threshold = int(threshold)
        self.approximate = approximate
        self._exact = ExactSearch()
        self._approx: NeighbourSearch | None = None

    def _approximate(self) -> NeighbourSearch:
        if self._approx is None:
            self._approx = SEARCHES.build(self.approximate)
        return self._approx

    def backend_for(self, n_points: int, n_queries: int | None = None) -> NeighbourSearch:
        """The backend used for ``n_points`` points (and ``n_queries`` queries; None: the graph)."""
        queries = n_points if n_queries is None else n_queries
        if n_points >= self.threshold and queries * n_points >= self.threshold**2:
            return self._approximate()
        return self._exact

    def knn_graph(self, points: Tensor, k: int) -> Tensor:
        return self.backend_for(points.shape[0]).knn_graph(points, k)

    def search(self, queries: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.backend_for(points.shape[0], queries.shape[0]).search(queries, points, k)
