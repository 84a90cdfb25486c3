"""Exact k-nearest-neighbour search on the CPU: BLAS tiles plus a numba selection.

Squared distances are ``(|q|^2 + |p|^2) - 2 q.p`` in float32, clamped at 0:
``q.p`` comes from a ``torch.mm`` over a tile of at most ``tile x tile``
pairs (so memory is O(tile^2), never O(Q N)), and numba kernels merge each
tile into a pool of candidates per query. A candidate is a single uint64, the
distance's float32 bits above the point's index, so keys order by distance
then index (non-negative floats order like their bits). A pool holds ``2 k``
keys; a candidate enters when its distance is at most the pool's threshold, and
a full pool is cut to its ``k`` smallest keys by quickselect, the ``k``-th
becoming the threshold (faiss's reservoir, cheaper than a heap at k = 200).
A candidate at exactly the threshold's distance enters too, and the cuts
compare keys, so a distance tie goes to the lower index whatever the order in
which candidates arrive: the result is the ``k`` smallest ``(distance, index)``
pairs, nearest first, whatever the tiling, the thread count or the order of
the tiles. A scan first counts, vectorised, the entries of a short segment at
or below the threshold and looks at them one by one only when there are any.

The all-points graph computes each unordered pair once: a tile of rows ``I``
against columns ``J > I`` feeds the pools of ``I`` row-wise and the pools of
``J`` column-wise, so the graph costs half the multiply-adds of a query search
with ``Q = N`` (which is how faiss ``IndexFlatL2`` builds it). A pair's distance
is symmetric and does not depend on where it falls in a tile, so a graph row
equals the same row searched on its own (:func:`knn` with ``own``). torch runs
the products with ``torch.get_num_threads()`` threads, and the kernels run
with as many numba threads.

**Locality order.** A pool admits a candidate only at or below its threshold, so the
sooner a point meets its near neighbours the fewer candidates it handles (at
k = 200 that handling, not the products, was most of the graph's time). From
:data:`_ORDER_MIN_TILES` row tiles on, the graph therefore first sorts the
points by their faiss k-means cluster (about :data:`_ORDER_CLUSTER_SIZE` points
each; not when a point is NaN, infinite or overflowing, which k-means cannot take), then runs the
diagonal tiles (each block against itself) before the others. Keys carry the
points' original indices, so the result is the same as in index order (bit for
bit, as long as BLAS gives a pair the same product wherever it falls in a tile,
which the tiling already assumes). On the untrained conv28 embeddings of the
54,000 Fashion-MNIST training rows at k = 200 the graph took 2.6 s instead of
3.5 s; on points with no clusters (uniform on a sphere) it is level, 3.6 s
against 3.7 s, and at k = 10 level too (benchmarks/README.md). Admitting
distance ties costs where many points share a distance: 20,000 points with 81
distinct values took 0.68 s instead of 0.38 s at k = 200.

A pool's threshold starts at the largest float32, so a distance that is
infinite or NaN (an overflowing or non-finite point) never enters, and a row
with fewer than ``k`` finite distances is padded with ``-1`` at distance inf.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from knnsolver.errors import MissingDependencyError

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
    raise MissingDependencyError("exact search on the CPU needs numba: pip install numba") from exc

_JIT = dict(cache=True, nogil=True)
# Entries scanned per vectorised threshold test (the best of 8 to 256 measured at k = 10 and 200).
_SEGMENT = 32
# Columns whose pools a thread updates together in a column scan (they stay in cache).
_COLUMN_GROUP = 64
# The graph sorts its points by k-means cluster from this many row tiles on, in clusters of about this many points.
_ORDER_MIN_TILES = 4
_ORDER_CLUSTER_SIZE = 500
# An unfilled result: infinite distance, index -1 once cast to int32.
_EMPTY = np.uint64((int(np.float32(np.inf).view(np.uint32)) << 32) | 0xFFFFFFFF)


@njit(inline="always", **_JIT)
def _key(d, i):
    """Key of distance ``d`` (clamped at 0) and index ``i``: orders by distance, then index."""
    if d < 0:
        d = np.float32(0.0)
    return (np.uint64(np.float32(d).view(np.uint32)) << np.uint64(32)) | np.uint64(i)


@njit(inline="always", **_JIT)
def _distance(key):
    return np.uint32(key >> np.uint64(32)).view(np.float32)


@njit(**_JIT)
def _select(keys, m, k):
    """Reorder the distinct ``keys[:m]`` so that their ``k`` smallest come first, the
    ``k``-th smallest at ``k - 1`` (quickselect, median-of-three pivots)."""
    lo = 0
    hi = m - 1
    while hi > lo:
        a = keys[lo]
        b = keys[(lo + hi) >> 1]
        c = keys[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i = lo
        j = hi
        while i <= j:
            while keys[i] < pivot:
                i += 1
            while keys[j] > pivot:
                j -= 1
            if i <= j:
                t = keys[i]
                keys[i] = keys[j]
                keys[j] = t
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            return


@njit(inline="always", **_JIT)
def _add(pool, count, k, th, key):
    """Append ``key`` to a query's pool of ``count`` keys, first shrinking a full pool to
    its ``k`` smallest (then ``key`` enters only below the ``k``-th of them); returns the new count
    and threshold."""
    if count == pool.shape[0]:
        _select(pool, count, k)
        count = k
        th = _distance(pool[k - 1])
        if not key < pool[k - 1]:
            return count, th
    pool[count] = key
    return count + 1, th


@njit(**_JIT)
def _scan_row(ip, q, pn, ids, skip, k, pool, count, th):
    """Merge one query's tile row (``ip`` its inner products, ``q`` its squared norm,
    ``pn`` the columns' squared norms, ``ids`` their indices in the keys) into its pool;
    column ``skip`` is its own row. Returns the new count and threshold."""
    for b0 in range(0, ip.shape[0], _SEGMENT):
        n = min(_SEGMENT, ip.shape[0] - b0)
        seg = ip[b0 : b0 + n]
        p = pn[b0 : b0 + n]
        hits = 0
        for b in range(n):
            hits += ((q + p[b]) - np.float32(2.0) * seg[b]) <= th
        if hits:
            for b in range(n):
                d = (q + p[b]) - np.float32(2.0) * seg[b]
                if d <= th and b0 + b != skip:
                    count, th = _add(pool, count, k, th, _key(d, ids[b0 + b]))
    return count, th


@njit(parallel=True, **_JIT)
def _merge_rows(ip, qn, pn, i0, j0, ids, own, k, pools, counts, thresholds):
    """Merge the tile ``ip`` (queries ``i0 + a``, points ``j0 + b``, keyed as ``ids[b]``) into the queries' pools."""
    for a in prange(ip.shape[0]):
        r = i0 + a
        counts[r], thresholds[r] = _scan_row(ip[a], qn[a], pn, ids, own[r] - j0, k, pools[r], counts[r], thresholds[r])


@njit(parallel=True, **_JIT)
def _merge_columns(ip, qn, pn, ids, j0, n_chunks, k, pools, counts, thresholds):
    """Merge the tile ``ip`` (its rows are points keyed as ``ids[a]``; its columns points ``j0 + b``, disjoint
    from the rows) into the pools of the columns: each thread owns a chunk of columns, taken in cache-sized
    groups."""
    nj = ip.shape[1]
    chunk = (nj + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        for g0 in range(c * chunk, min(nj, (c + 1) * chunk), _COLUMN_GROUP):
            g1 = min(nj, (c + 1) * chunk, g0 + _COLUMN_GROUP)
            th = thresholds[j0 + g0 : j0 + g1]
            cnt = counts[j0 + g0 : j0 + g1]
            p = pn[g0:g1]
            for a in range(ip.shape[0]):
                q = qn[a]
                seg = ip[a, g0:g1]
                hits = 0
                for b in range(g1 - g0):
                    hits += ((q + p[b]) - np.float32(2.0) * seg[b]) <= th[b]
                if hits:
                    for b in range(g1 - g0):
                        d = (q + p[b]) - np.float32(2.0) * seg[b]
                        if d <= th[b]:
                            cnt[b], th[b] = _add(pools[j0 + g0 + b], cnt[b], k, th[b], _key(d, ids[a]))


@njit(parallel=True, **_JIT)
def _sorted_results(pools, counts, k, out_d, out_i):
    """The ``k`` smallest keys of every pool, sorted: distances and int32 indices, nearest first."""
    for r in prange(pools.shape[0]):
        m = counts[r]
        if m > k:
            _select(pools[r], m, k)
            m = k
        best = np.sort(pools[r, :m])
        for j in range(k):
            key = best[j] if j < m else _EMPTY
            out_d[r, j] = _distance(key)
            out_i[r, j] = np.uint32(key & np.uint64(0xFFFFFFFF)).view(np.int32)


@contextmanager
def numba_threads() -> Iterator[None]:
    """Run numba kernels with ``torch.get_num_threads()`` threads (at most numba's pool), and leave torch's
    count as it was: numba's OpenMP layer shares the OpenMP runtime with torch, so setting numba's count sets
    torch's too (restoring numba's default, one thread per core, raised a 1-thread run to every core)."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Row-wise squared norms of a float32 array, in float32."""
    return np.einsum("ij,ij->i", x, x)


def tile_for(block_elements: int) -> int:
    """Side of the square tiles: 2,048 (the fastest of 1,024 to 8,192 measured), or less
    to hold at most ``block_elements`` inner products, but at least 64."""
    return max(64, min(2048, math.isqrt(block_elements)))


def _pools(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty pools of ``2 k`` keys (16 k bytes) for ``n`` queries, their counts and thresholds."""
    return np.empty((n, 2 * k), np.uint64), np.zeros(n, np.int64), np.full(n, np.finfo(np.float32).max, np.float32)


def _results(pools: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_d = np.empty((len(pools), k), np.float32)
    out_i = np.empty((len(pools), k), np.int32)
    _sorted_results(pools, counts, k, out_d, out_i)
    return out_d, out_i


def knn(
    queries: np.ndarray,
    points: np.ndarray,
    k: int,
    *,
    own: np.ndarray | None = None,
    query_norms: np.ndarray | None = None,
    point_norms: np.ndarray | None = None,
    tile: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest ``points`` of each query (C-contiguous float32 arrays).

    ``own[i]``, when given, is the index of query ``i`` among the points, excluded
    from its result (-1: none). Norms may be passed when already known. Returns
    ``(sq_distances float32, int32 indices)`` of shape ``(Q, k)``, nearest first.
    """
    nq, n = queries.shape[0], points.shape[0]
    qn = squared_norms(queries) if query_norms is None else query_norms
    pn = squared_norms(points) if point_norms is None else point_norms
    own = np.full(nq, -1, np.int64) if own is None else own.astype(np.int64)
    pools, counts, thresholds = _pools(nq, k)
    q_t, p_t = torch.from_numpy(queries), torch.from_numpy(points)
    ids = np.arange(n, dtype=np.int64)
    buffer = torch.empty(min(tile, nq) * min(tile, n))
    with numba_threads():
        for i0 in range(0, nq, tile):
            i1 = min(nq, i0 + tile)
            for j0 in range(0, n, tile):
                j1 = min(n, j0 + tile)
                ip = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                torch.mm(q_t[i0:i1], p_t[j0:j1].T, out=ip)
                _merge_rows(ip.numpy(), qn[i0:i1], pn[j0:j1], i0, j0, ids[j0:j1], own, k, pools, counts, thresholds)
        return _results(pools, counts, k)


def _orderable(norms: np.ndarray) -> bool:
    """Whether faiss k-means can take the points: every squared norm finite, and small enough that sums of two
    of them stay finite (faiss raised on a NaN or infinite point and aborted the process on an overflowing one)."""
    return bool(np.isfinite(norms).all()) and float(norms.max(initial=0.0)) <= float(np.finfo(np.float32).max) / 4


def locality_order(points: np.ndarray, clusters: int) -> np.ndarray:
    """A permutation of the (finite) points that groups them by their faiss k-means cluster (``clusters``
    centroids, at most one per 40 points, as faiss asks; 10 iterations, seed 0), points of a cluster in
    index order."""
    from knnsolver.search.faiss_backend import faiss, torch_threads  # faiss_backend imports this module's users

    kmeans = faiss.Kmeans(points.shape[1], max(1, min(clusters, len(points) // 40)), niter=10, seed=0, verbose=False)
    with torch_threads():
        kmeans.train(points)
        assignment = kmeans.index.search(points, 1)[1][:, 0]
    return np.argsort(assignment, kind="stable")


def knn_graph(
    points: np.ndarray, k: int, *, norms: np.ndarray | None = None, tile: int = 2048, clusters: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``k`` nearest *other* points (C-contiguous float32 array), each pair
    computed once (module docstring). Returns ``(sq_distances, int32 indices)``, ``(N, k)``.

    ``clusters``: k-means clusters of the locality order (module docstring); ``None`` chooses
    ``N // 500`` from 4 row tiles and 1,000 points on, else none; ``0`` or ``1`` keeps index order, as do
    non-finite points. The result is the same.
    """
    n = points.shape[0]
    norms = squared_norms(points) if norms is None else norms
    side = min(tile, n)
    if clusters is None:
        clusters = n // _ORDER_CLUSTER_SIZE if n >= _ORDER_MIN_TILES * side else 0
    order = locality_order(points, clusters) if clusters >= 2 and _orderable(norms) else None
    if order is not None:
        points, norms = np.ascontiguousarray(points[order]), np.ascontiguousarray(norms[order])
    ids = np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64)
    own = np.arange(n, dtype=np.int64)  # each row's own position, skipped
    pools, counts, thresholds = _pools(n, k)
    x = torch.from_numpy(points)
    buffer = torch.empty(side * side)
    starts = range(0, n, side)
    # The diagonal tiles first: each point meets its own block (its cluster, once ordered) before the rest.
    schedule = [(i0, i0) for i0 in starts] + [(i0, j0) for i0 in starts for j0 in starts if j0 > i0]
    with numba_threads():
        chunks = 4 * numba.get_num_threads()
        for i0, j0 in schedule:
            i1, j1 = min(n, i0 + side), min(n, j0 + side)
            ip = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.mm(x[i0:i1], x[j0:j1].T, out=ip)
            tile_ip = ip.numpy()
            _merge_rows(tile_ip, norms[i0:i1], norms[j0:j1], i0, j0, ids[j0:j1], own, k, pools, counts, thresholds)
            if j0 > i0:
                _merge_columns(tile_ip, norms[i0:i1], norms[j0:j1], ids[i0:i1], j0, chunks, k, pools, counts,
                               thresholds)
        distances, indices = _results(pools, counts, k)
    if order is None:
        return distances, indices
    out_d, out_i = np.empty_like(distances), np.empty_like(indices)
    out_d[order], out_i[order] = distances, indices  # row r of the ordered points is point order[r]
    return out_d, out_i
