"""faiss backends: exact flat, IVF-Flat and HNSW behind :class:`NeighbourSearch`.

All three share one pipeline: :meth:`build` copies the points to a contiguous
float32 array and builds (for IVF trains) a faiss index, wrapped in a
:class:`FaissIndex` that searches it any number of times and returns int32
indices on the input's device. The graph searches each listed point's
``k + 1`` neighbours and drops the point's own index wherever it appears
(with exact duplicates the point itself need not come first); rows where it
is absent lose their farthest neighbour instead. Rows the index could not
fill (faiss pads them with ``-1``, e.g. IVF with a small ``nprobe``) are
completed by exact search, so callers always get ``k`` valid indices.

The GPU build of faiss is used when it is installed, sees a GPU
(``faiss.get_num_gpus() > 0``) and the points are on CUDA; HNSW has no faiss
GPU implementation and always runs on the CPU. faiss runs with
``torch.get_num_threads()`` threads, like the other backends.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.interfaces import NeighbourSearch
from knnsolver.search.common import ArrayIndex, as_float32_array

try:
    import faiss
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
    raise MissingDependencyError(
        "the faiss search backends need faiss: pip install faiss-cpu (or faiss-gpu for CUDA)"
    ) from exc


@contextmanager
def torch_threads() -> Iterator[None]:
    """Run faiss with ``torch.get_num_threads()`` OpenMP threads (faiss has its own runtime)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class FaissIndex(ArrayIndex):
    """A built faiss index over a float32 copy of the points (:attr:`data`)."""

    def __init__(self, points: Tensor, data: np.ndarray, index) -> None:
        super().__init__(data, points.device)
        self.index = index

    def _set_search_params(self, k: int) -> None:
        """Apply the search-time knobs for a search of ``k`` neighbours."""

    def _search(self, queries: np.ndarray, k: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._set_search_params(k)
        with torch_threads():
            return self.index.search(queries, k)


class _FaissSearch(NeighbourSearch):
    """Shared build logic; subclasses describe their index."""

    supports_gpu = True

    def __init__(self, gpu: bool = True) -> None:
        self.gpu = bool(gpu)
        self._gpu_resources = None

    def _make_index(self, data: np.ndarray):
        """Return an untrained (or ready) CPU index for ``data``."""
        raise NotImplementedError

    def _prepare(self, index, data: np.ndarray) -> None:
        """Train and fill ``index`` with ``data``."""
        if not index.is_trained:
            index.train(data)
        index.add(data)

    def _use_gpu(self, points: Tensor) -> bool:
        return self.gpu and self.supports_gpu and points.is_cuda and faiss.get_num_gpus() > 0

    def _wrap(self, points: Tensor, data: np.ndarray, index) -> FaissIndex:
        """The :class:`FaissIndex` (with this backend's search-time knobs) around a built index."""
        return FaissIndex(points, data, index)

    @torch.no_grad()
    def build(self, points: Tensor) -> FaissIndex:
        data = as_float32_array(points, copy=True)
        index = self._make_index(data)
        if self._use_gpu(points):
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            device = points.device.index if points.device.index is not None else torch.cuda.current_device()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, device, index)
        with torch_threads():
            self._prepare(index, data)
        return self._wrap(points, data, index)


class FaissFlatSearch(_FaissSearch):
    """Exact search with ``IndexFlatL2``; faiss's reference and the benchmark baseline.

    Args:
        gpu: use faiss's GPU build when available and the points are on CUDA.
    """

    name = "faiss-flat"

    def __init__(self, gpu: bool = True) -> None:
        super().__init__(gpu)

    def _make_index(self, data: np.ndarray):
        return faiss.IndexFlatL2(data.shape[1])


class FaissIVFSearch(_FaissSearch):
    """IVF-Flat: k-means cells, search ``nprobe`` nearest cells exhaustively (approximate).

    Args:
        nlist: number of k-means cells; ``None`` picks ``round(4 * sqrt(N))``,
            capped so each cell gets at least 39 training points (faiss's minimum).
        nprobe: cells visited per query (higher: better recall, slower).
        train_size: k-means trains on a seeded random sample of this many points
            (or 39 per cell, if more).
        seed: seeds the training sample and k-means.
        gpu: use faiss's GPU build when available and the points are on CUDA.
    """

    name = "faiss-ivf"

    def __init__(
        self, nlist: int | None = None, nprobe: int = 16, train_size: int = 100_000, seed: int = 0, gpu: bool = True
    ) -> None:
        super().__init__(gpu)
        if nlist is not None and nlist < 1:
            raise ConfigError(f"nlist must be >= 1, got {nlist}")
        if nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {nprobe}")
        if train_size < 1:
            raise ConfigError(f"train_size must be >= 1, got {train_size}")
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.train_size = int(train_size)
        self.seed = int(seed)

    def cells_for(self, n: int) -> int:
        """Number of cells used for ``n`` points."""
        wanted = self.nlist if self.nlist is not None else round(4 * math.sqrt(n))
        return max(1, min(wanted, n // 39 if n >= 39 else 1))

    def _training_rows(self, n: int, nlist: int) -> int:
        """Training sample size: ``train_size``, or 39 per cell (faiss's minimum) if more, at most ``n``."""
        return min(n, max(self.train_size, 39 * nlist))

    def _make_index(self, data: np.ndarray):
        nlist = self.cells_for(data.shape[0])
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(data.shape[1]), data.shape[1], nlist, faiss.METRIC_L2)
        index.cp.seed = self.seed
        # The sample is drawn (seeded) in _prepare; stop faiss from subsampling it again.
        index.cp.max_points_per_centroid = -(-self._training_rows(data.shape[0], nlist) // nlist)
        return index

    def _prepare(self, index, data: np.ndarray) -> None:
        n = data.shape[0]
        rows = self._training_rows(n, index.nlist)
        if rows < n:
            index.train(data[np.sort(np.random.default_rng(self.seed).choice(n, rows, replace=False))])
        else:
            index.train(data)
        index.add(data)

    def _wrap(self, points: Tensor, data: np.ndarray, index) -> FaissIVFIndex:
        return FaissIVFIndex(points, data, index, self.nprobe)


class FaissIVFIndex(FaissIndex):
    """A built IVF index; :attr:`nprobe` (cells visited per query, at most ``nlist``) may
    be changed between searches."""

    def __init__(self, points: Tensor, data: np.ndarray, index, nprobe: int) -> None:
        super().__init__(points, data, index)
        self.nprobe = nprobe

    def _set_search_params(self, k: int) -> None:
        if self.nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {self.nprobe}")
        self.index.nprobe = min(self.nprobe, self.index.nlist)


class FaissHNSWSearch(_FaissSearch):
    """HNSW graph search (approximate, CPU only).

    Args:
        M: neighbours per vertex in the graph (layer 0 has ``2 M``).
        ef_construction: candidate list size while building.
        ef_search: candidate list size while searching; raised to ``k`` (``k + 1``
            for the graph) when smaller, since HNSW cannot return more than it holds.
    """

    name = "faiss-hnsw"
    supports_gpu = False

    def __init__(self, M: int = 32, ef_construction: int = 40, ef_search: int = 64) -> None:
        super().__init__(gpu=False)
        for label, value in (("M", M), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)

    def _make_index(self, data: np.ndarray):
        index = faiss.IndexHNSWFlat(data.shape[1], self.M)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _prepare(self, index, data: np.ndarray) -> None:
        index.add(data)

    def _wrap(self, points: Tensor, data: np.ndarray, index) -> FaissHNSWIndex:
        return FaissHNSWIndex(points, data, index, self.ef_search)


class FaissHNSWIndex(FaissIndex):
    """A built HNSW index; :attr:`ef_search` may be changed between searches (a search
    of ``k`` neighbours uses at least ``k``)."""

    def __init__(self, points: Tensor, data: np.ndarray, index, ef_search: int) -> None:
        super().__init__(points, data, index)
        self.ef_search = ef_search

    def _set_search_params(self, k: int) -> None:
        if self.ef_search < 1:
            raise ConfigError(f"ef_search must be >= 1, got {self.ef_search}")
        self.index.hnsw.efSearch = max(self.ef_search, k)
