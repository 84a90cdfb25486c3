"""Neighbour-search backends: exact, faiss (flat, IVF, HNSW), FANNG and auto."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import numpy as np
import pytest
import torch

from knnsolver.errors import ConfigError, MissingDependencyError
from knnsolver.registry import SEARCHES
from knnsolver.search import cpu_exact
from knnsolver.search.auto import AutoSearch
from knnsolver.search.exact import ExactSearch, blocked_knn
from knnsolver.search.faiss_backend import FaissFlatSearch, FaissHNSWSearch, FaissIVFSearch
from knnsolver.search.fanng import EVALS_PER_NEIGHBOUR, FANNGIndex, FANNGSearch

K = 8


def clustered(n: int = 1200, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Points on a few low-dimensional clusters, like embeddings, with two exact duplicates."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(6, d)) * 3
    bases = g.normal(size=(6, 4, d))
    label = g.integers(0, 6, n)
    x = centres[label] + np.einsum("nm,nmd->nd", g.normal(size=(n, 4)), bases[label]) + 0.05 * g.normal(size=(n, d))
    x[7] = x[3]
    x[11] = x[3]
    return torch.from_numpy(x.astype(np.float32))


POINTS = clustered()
QUERIES = clustered(200, seed=1)
EXACT_GRAPH = ExactSearch().knn_graph(POINTS, K)
EXACT_DIST, EXACT_IDX = ExactSearch().search(QUERIES, POINTS, K)

# Backends at sensible settings for 1,200 points, and the recall each must reach.
BACKENDS = {
    "exact": (ExactSearch, {}, 1.0),
    "faiss-flat": (FaissFlatSearch, {}, 1.0),
    "faiss-ivf": (FaissIVFSearch, {"nlist": 16, "nprobe": 8}, 0.9),
    "faiss-hnsw": (FaissHNSWSearch, {"M": 16, "ef_search": 32}, 0.9),
    "fanng": (FANNGSearch, {"budget": 150}, 0.9),
}


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / truth.numel()


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request):
    """(name, search, recall target, knn_graph, search result, an index built once)."""
    cls, options, target = BACKENDS[request.param]
    search = cls(**options)
    graph, found = search.knn_graph(POINTS, K), search.search(QUERIES, POINTS, K)
    return request.param, search, target, graph, found, search.build(POINTS)


def test_knn_graph_shape_dtype_self_exclusion_and_recall(backend):
    name, _, target, graph, _, _ = backend
    assert graph.shape == (len(POINTS), K) and graph.dtype == torch.int32
    assert not (graph.long() == torch.arange(len(POINTS))[:, None]).any(), f"{name} returned a point as its own neighbour"
    assert all(len(set(row.tolist())) == K for row in graph), "neighbours repeat"
    assert recall(graph, EXACT_GRAPH) >= target


def test_duplicates_find_each_other_not_themselves(backend):
    _, _, _, graph, _, _ = backend
    for p, twins in ((3, {7, 11}), (7, {3, 11}), (11, {3, 7})):
        assert set(graph[p, :2].tolist()) == twins


def test_search_shapes_recall_and_true_distances(backend):
    _, _, target, _, (dist, idx), _ = backend
    assert dist.shape == idx.shape == (len(QUERIES), K)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int32
    assert recall(idx, EXACT_IDX) >= target
    true = ((QUERIES[:, None, :] - POINTS[idx.long()]) ** 2).sum(-1)
    torch.testing.assert_close(dist, true, rtol=1e-4, atol=1e-3)
    assert (dist[:, 1:] >= dist[:, :-1] - 1e-4).all(), "not nearest first"


def test_a_built_index_answers_like_the_one_shot_api(backend):
    _, _, _, graph, (dist, idx), index = backend
    assert index.ntotal == len(POINTS) and torch.equal(index.points, POINTS)
    assert torch.equal(index.graph(K), graph)
    found = index.search(QUERIES, K)
    assert torch.equal(found[0], dist) and torch.equal(found[1], idx)


def test_graph_rows_equal_the_same_rows_of_the_full_graph(backend):
    name, _, _, graph, _, index = backend
    for rows in (range(0, 400), range(400, len(POINTS)), torch.tensor([11, 3, 7, 500, 0, 1199] * 5)):
        expected = graph[torch.as_tensor(list(rows))]
        assert torch.equal(index.graph(K, rows=rows), expected), f"{name}: shard {rows} differs from the full graph"


# The step doing a backend's real work, counted by the build-once test.
BUILD_STEPS = {
    "exact": (cpu_exact, "squared_norms"),  # of the points; the searches are handed them
    "faiss-flat": (FaissFlatSearch, "_prepare"),
    "faiss-ivf": (FaissIVFSearch, "_prepare"),
    "faiss-hnsw": (FaissHNSWSearch, "_prepare"),
    "fanng": (FANNGSearch, "build_graph"),
}


def count_calls(monkeypatch, owner, name: str) -> list:
    """Spy on the method or function ``owner.name``: the returned list grows by one per call."""
    calls = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize("name", list(BACKENDS))
def test_an_index_is_built_once_and_searched_many_times(monkeypatch, name):
    cls, options, _ = BACKENDS[name]
    builds = count_calls(monkeypatch, *BUILD_STEPS[name])
    search = cls(**options)
    index = search.build(POINTS)
    for _ in range(3):
        index.search(QUERIES[:50], K)
        index.graph(K, rows=range(100, 200))
    index.graph(K)
    assert len(builds) == 1
    search.search(QUERIES[:50], POINTS, K)
    search.knn_graph(POINTS, K)
    assert len(builds) == 3, "the one-shot methods build a throwaway index per call"


def test_auto_index_builds_each_backend_it_uses_once(monkeypatch):
    exact_builds = count_calls(monkeypatch, ExactSearch, "build")
    fanng_builds = count_calls(monkeypatch, FANNGSearch, "build_graph")
    index = AutoSearch(threshold=1000, approximate="fanng").build(POINTS)
    assert not exact_builds and not fanng_builds, "nothing is built before a search needs it"
    for _ in range(3):
        graph = index.graph(K)  # 1,200 points: above the threshold, FANNG
        _, idx = index.search(QUERIES[:10], K)  # 10 x 1,200 < 1000 ** 2: exact
    assert len(exact_builds) == 1 and len(fanng_builds) == 1
    assert torch.equal(idx, EXACT_IDX[:10]) and recall(graph, EXACT_GRAPH) >= 0.9
    assert index.index_for(10) is index.index_for(10)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_an_index_keeps_its_own_copy_of_the_points(name):
    cls, options, _ = BACKENDS[name]
    bank = POINTS.clone()
    index = cls(**options).build(bank)
    before = index.search(QUERIES, K)
    bank += 100.0  # the caller's tensor changes in place; the index does not
    after = index.search(QUERIES, K)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(index.points, POINTS)


def test_search_time_knobs_are_attributes_of_the_built_index():
    ivf = FaissIVFSearch(nlist=16, nprobe=16).build(POINTS)
    assert recall(ivf.search(QUERIES, K)[1], EXACT_IDX) == 1.0, "all cells probed: exact"
    ivf.nprobe = 1
    assert recall(ivf.search(QUERIES, K)[1], EXACT_IDX) < 1.0
    hnsw = FaissHNSWSearch(M=16, ef_search=16).build(POINTS)
    hnsw.ef_search = 100
    hnsw.search(QUERIES, K)
    assert hnsw.index.hnsw.efSearch == 100
    hnsw.ef_search = 2
    hnsw.graph(K)
    assert hnsw.index.hnsw.efSearch == K + 1, "raised to the k + 1 searched for the graph"
    fanng = FANNGSearch(traverse_add=0.0).build(POINTS)
    fanng.budget = 1  # raised to EVALS_PER_NEIGHBOUR * k
    low = recall(fanng.search(QUERIES, K)[1], EXACT_IDX)
    fanng.budget = 600
    assert low < recall(fanng.search(QUERIES, K)[1], EXACT_IDX)
    ivf.nprobe = 0
    with pytest.raises(ConfigError, match="nprobe"):
        ivf.search(QUERIES, K)


def test_graph_rows_out_of_range_are_a_config_error():
    with pytest.raises(ConfigError, match="rows"):
        ExactSearch().build(POINTS).graph(K, rows=range(1190, 1210))


def brute_force(queries: torch.Tensor, points: torch.Tensor, k: int, own: torch.Tensor | None = None):
    """Float64 distances of each query to all points, sorted (ties by index), own rows last."""
    d = ((queries.double()[:, None, :] - points.double()[None, :, :]) ** 2).sum(-1)
    if own is not None:
        d[torch.arange(len(own)), own] = float("inf")
    return torch.sort(d, dim=1, stable=True)


def assert_exact(found: torch.Tensor, queries: torch.Tensor, points: torch.Tensor, own=None, tol: float = 1e-4):
    """``found`` holds the k nearest points: their float64 distances are the k smallest, and
    each index is brute force's wherever no other point lies within ``tol`` of its distance."""
    k = found.shape[1]
    ref_d, ref_i = brute_force(queries, points, k, own)
    got = ((queries.double()[:, None, :] - points.double()[found.long()]) ** 2).sum(-1)
    torch.testing.assert_close(got, ref_d[:, :k], rtol=1e-5, atol=tol)
    gap = ref_d.diff(dim=1) > tol  # gap[:, j]: distance j + 1 clearly above distance j (needs k < N)
    clear = gap[:, :k].clone()
    clear[:, 1:] &= gap[:, : k - 1]
    assert torch.equal(found.long()[clear], ref_i[:, :k][clear])


@pytest.mark.parametrize("block_elements", [2**25, 64 * 64])  # one tile, or tiles of 64 x 64
@pytest.mark.parametrize("k", [1, K, 150])
def test_exact_equals_brute_force_in_float64(block_elements, k):
    index = ExactSearch(block_elements=block_elements).build(POINTS)
    own = torch.arange(len(POINTS))
    assert_exact(index.graph(k), POINTS, POINTS, own)
    assert_exact(index.graph(k, rows=range(500, 700)), POINTS[500:700], POINTS, own[500:700])
    dist, idx = index.search(QUERIES, k)
    assert_exact(idx, QUERIES, POINTS)
    torch.testing.assert_close(dist.double(), brute_force(QUERIES, POINTS, k)[0][:, :k], rtol=1e-4, atol=1e-3)


def test_exact_cpu_breaks_ties_by_index():
    graph = ExactSearch(block_elements=64 * 64).build(POINTS).graph(K)
    assert graph[3, :2].tolist() == [7, 11] and graph[7, :2].tolist() == [3, 11] and graph[11, :2].tolist() == [3, 7]


def integer_points(n: int = 300, seed: int = 0) -> np.ndarray:
    """Small integer coordinates: every float32 distance is exact, and many are equal (ties, duplicates)."""
    return np.random.default_rng(seed).integers(-3, 4, size=(n, 4)).astype(np.float32)


def brute_force_int(queries: np.ndarray, points: np.ndarray, k: int, own: bool) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest (distance, index) pairs of each query, in int64 (exact), its own row left out when ``own``."""
    q, p = queries.astype(np.int64), points.astype(np.int64)
    sq = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    if own:
        np.fill_diagonal(sq, 10**6)
    order = np.argsort(sq * len(p) + np.arange(len(p)), axis=1)[:, :k]  # by distance, then index
    return np.take_along_axis(sq, order, axis=1).astype(np.float32), order.astype(np.int32)


@pytest.mark.parametrize("clusters", [0, 2, 7])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_cpu_graph_is_brute_force_with_ties_by_index_in_any_order(clusters, k):
    """Ties at a pool's threshold once went to whichever candidate came first; in index order that was the
    lower index, but the locality order (``clusters``) brings candidates in another order. Keys are now
    compared, so the graph is the k smallest (distance, index) pairs whatever the order and tiling."""
    x = integer_points()
    want_d, want_i = brute_force_int(x, x, k, own=True)
    for tile in (32, 2048):
        got_d, got_i = cpu_exact.knn_graph(x, k, tile=tile, clusters=clusters)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_d, want_d)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_cpu_query_search_is_brute_force_with_ties_by_index(k):
    x, q = integer_points(), integer_points(50, seed=1)
    got_d, got_i = cpu_exact.knn(q, x, k, tile=32)
    want_d, want_i = brute_force_int(q, x, k, own=False)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e20])
def test_cpu_graph_keeps_index_order_for_points_kmeans_cannot_take(bad):
    """A NaN, infinite or overflowing point (its squared norm is inf) made faiss k-means raise or abort the
    process; the graph now keeps index order for such points, and such a point, as before, has no
    neighbours (-1 at distance inf) and is nobody's neighbour."""
    x = integer_points()
    x[5] = bad
    want_d, want_i = cpu_exact.knn_graph(x, 5, tile=32, clusters=0)
    got_d, got_i = cpu_exact.knn_graph(x, 5, tile=32, clusters=7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    assert (got_i[5] == -1).all() and np.isinf(got_d[5]).all() and not (got_i == 5).any()


def test_cpu_graph_orders_by_cluster_from_four_row_tiles(monkeypatch):
    """The automatic locality order: N / 500 clusters from 4 row tiles and 1,000 points on, none below."""
    calls = []
    original = cpu_exact.locality_order
    monkeypatch.setattr(cpu_exact, "locality_order", lambda x, c: calls.append((len(x), c)) or original(x, c))
    x = POINTS.numpy()
    reference = cpu_exact.knn_graph(x, K, tile=64, clusters=0)
    ordered = cpu_exact.knn_graph(x, K, tile=64)  # 1,200 points in tiles of 64: 19 row tiles, 2 clusters
    cpu_exact.knn_graph(x, K, tile=512)  # 3 row tiles: index order
    cpu_exact.knn_graph(x[:900], K, tile=64)  # under 1,000 points: fewer than 2 clusters of 500
    assert calls == [(1200, 2)]
    np.testing.assert_array_equal(ordered[0], reference[0])
    np.testing.assert_array_equal(ordered[1], reference[1])


@pytest.mark.parametrize("k", [1, K, 150])
def test_cpu_kernel_matches_the_torch_path(k):
    """The CPU kernel and the torch path (CUDA's) agree up to the order of float32 ties."""
    index = ExactSearch(block_elements=64 * 64).build(POINTS)
    own = torch.arange(len(POINTS))
    for (cpu_d, cpu_i), (torch_d, torch_i) in (
        (index.search(QUERIES, k), blocked_knn(QUERIES, POINTS, k)),
        ((None, index.graph(k)), blocked_knn(POINTS, POINTS, k, own=own)),
    ):
        if cpu_d is not None:
            torch.testing.assert_close(cpu_d, torch_d, rtol=1e-5, atol=1e-4)
        differ = cpu_i != torch_i
        assert differ.float().mean() < 0.01, "only ties may be ordered differently"
        rows = differ.any(1)
        queries = QUERIES[rows] if cpu_d is not None else POINTS[rows]
        for found in (cpu_i[rows], torch_i[rows]):
            assert_exact(found, queries, POINTS, None if cpu_d is not None else own[rows])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_on_cuda_stays_on_the_gpu():
    index = ExactSearch().build(POINTS.cuda())
    assert index.points.is_cuda
    graph = index.graph(K)
    dist, idx = index.search(QUERIES.cuda(), K)
    assert graph.is_cuda and idx.is_cuda and dist.is_cuda
    assert recall(graph.cpu(), EXACT_GRAPH) > 0.99 and recall(idx.cpu(), EXACT_IDX) > 0.99
    assert torch.equal(index.graph(K, rows=range(100, 300)), graph[100:300])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_k_larger_than_bank_is_a_config_error(name):
    cls, options, _ = BACKENDS[name]
    small = POINTS[:20]
    with pytest.raises(ConfigError, match="k=20"):
        cls(**options).knn_graph(small, 20)
    with pytest.raises(ConfigError, match="k=21"):
        cls(**options).search(QUERIES[:3], small, 21)


@pytest.mark.parametrize("name", ["faiss-flat", "faiss-ivf", "faiss-hnsw", "fanng"])
def test_dimension_mismatch_is_a_config_error(name):
    cls, options, _ = BACKENDS[name]
    with pytest.raises(ConfigError, match="dimension"):
        cls(**options).search(QUERIES[:, :5], POINTS, 3)


def test_registry_builds_every_backend_with_options():
    assert isinstance(SEARCHES.build("faiss-ivf", nprobe=4), FaissIVFSearch)
    assert isinstance(SEARCHES.build("fanng", budget=50, max_degree=16), FANNGSearch)
    with pytest.raises(ConfigError, match="no option"):
        SEARCHES.build("faiss-hnsw", nprobe=4)


@pytest.mark.parametrize("name,options", [("faiss-ivf", {"nprobe": 0}), ("faiss-hnsw", {"M": 0}),
                                          ("fanng", {"budget": 0}), ("fanng", {"traverse_add": -1.0})])
def test_bad_options_are_config_errors(name, options):
    with pytest.raises(ConfigError):
        SEARCHES.build(name, **options)


@pytest.mark.parametrize("module,package", [("knnsolver.search.faiss_backend", "faiss"),
                                            ("knnsolver.search.fanng", "numba"),
                                            ("knnsolver.search.cpu_exact", "numba")])
def test_missing_optional_package_names_it(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(MissingDependencyError, match=f"pip install {package}"):
        importlib.import_module(module)


def test_ivf_rows_it_cannot_fill_are_completed_exactly():
    # nprobe=1 over 30 cells: some cells hold fewer than k points, so faiss pads with -1.
    graph = FaissIVFSearch(nlist=30, nprobe=1).knn_graph(POINTS, 60)
    assert (graph >= 0).all() and graph.shape == (len(POINTS), 60)


def test_fanng_graph_obeys_the_occlusion_rule():
    search = FANNGSearch(max_degree=12)
    graph = search.build_graph(POINTS.numpy())
    x = POINTS.double()
    tol = 1e-4
    for p in range(len(x)):
        nbrs = graph.neighbours(p).tolist()
        assert 1 <= len(nbrs) <= 12 and p not in nbrs and len(set(nbrs)) == len(nbrs)
        d_p = ((x[nbrs] - x[p]) ** 2).sum(1)
        assert (d_p[1:] >= d_p[:-1] - tol).all(), "edges sorted by length"
        for j, q in enumerate(nbrs):
            d_r_q = ((x[nbrs[:j]] - x[q]) ** 2).sum(1)
            occluded = (d_p[:j] < d_p[j] - tol) & (d_r_q < d_p[j] - tol)
            assert not occluded.any(), f"edge {p}->{q} is occluded by {nbrs[int(occluded.nonzero()[0])]}"


def test_fanng_traverse_add_adds_edges_and_budget_trades_recall():
    without = FANNGSearch(traverse_add=0.0).build_graph(POINTS.numpy())
    with_ta = FANNGSearch(traverse_add=3.0).build_graph(POINTS.numpy())
    assert with_ta.deg.sum() > without.deg.sum()
    low = recall(torch.from_numpy(with_ta.search(QUERIES.numpy(), K, 20)[1]), EXACT_IDX)
    high = recall(torch.from_numpy(with_ta.search(QUERIES.numpy(), K, 300)[1]), EXACT_IDX)
    assert low < high


def test_fanng_is_deterministic_with_a_seed():
    a = FANNGSearch(seed=3).build_graph(POINTS.numpy())
    b = FANNGSearch(seed=3).build_graph(POINTS.numpy())
    c = FANNGSearch(seed=4).build_graph(POINTS.numpy())
    assert np.array_equal(a.adj, b.adj) and np.array_equal(a.deg, b.deg)
    assert not (np.array_equal(a.adj, c.adj) and np.array_equal(a.deg, c.deg))
    assert torch.equal(FANNGSearch(seed=3).knn_graph(POINTS, K), FANNGSearch(seed=3).knn_graph(POINTS, K))


def test_fanng_tiny_bank():
    pts = POINTS[:3]
    graph = FANNGSearch().knn_graph(pts, 2)
    assert sorted(graph[0].tolist()) == [1, 2]
    with pytest.raises(ConfigError, match="at least 2 points"):
        FANNGSearch().search(QUERIES[:2], POINTS[:1], 1)


def test_auto_switches_at_the_threshold():
    auto = AutoSearch(threshold=1000, approximate="fanng")
    assert isinstance(auto.backend_for(999), ExactSearch)
    assert isinstance(auto.backend_for(1000), FANNGSearch)
    assert isinstance(auto.backend_for(5000, n_queries=10), ExactSearch), "small query batch stays exact"
    assert isinstance(auto.backend_for(5000, device="cuda"), ExactSearch), "exact up to cuda_threshold on CUDA"
    assert isinstance(AutoSearch(cuda_threshold=1000, approximate="fanng").backend_for(1000, device="cuda"), FANNGSearch)
    assert torch.equal(AutoSearch(threshold=10**6).knn_graph(POINTS, K), EXACT_GRAPH)
    assert recall(auto.knn_graph(POINTS, K), EXACT_GRAPH) >= 0.9
    with pytest.raises(ConfigError):
        AutoSearch(threshold=0)
    with pytest.raises(ConfigError, match="large_k"):
        AutoSearch(large_k=0)
    with pytest.raises(ConfigError):
        AutoSearch(approximate="auto")


def test_auto_keeps_large_k_exact_up_to_its_own_threshold():
    """At large k the exact CPU graph beat HNSW up to 100,000 points (auto.py's measurements), so from
    ``large_k`` neighbours on the CPU threshold is ``large_k_threshold``; an unknown k takes the small one."""
    auto = AutoSearch(threshold=1000, large_k=50, large_k_threshold=3000, approximate="fanng")
    assert isinstance(auto.backend_for(2000, k=49), FANNGSearch)
    assert isinstance(auto.backend_for(2000, k=50), ExactSearch)
    assert isinstance(auto.backend_for(3000, k=200), FANNGSearch)
    assert isinstance(auto.backend_for(2000), FANNGSearch)
    assert isinstance(auto.backend_for(2000, device="cuda", k=10), ExactSearch), "CUDA keeps cuda_threshold"
    index = AutoSearch(threshold=1000, large_k=K, large_k_threshold=10**6, approximate="fanng").build(POINTS)
    assert torch.equal(index.graph(K), EXACT_GRAPH)
    assert isinstance(index.index_for(k=K - 1), FANNGIndex)


def test_exact_accepts_float64_and_finds_the_queries_themselves():
    d, i = ExactSearch().search(POINTS[:5].double(), POINTS.double(), 1)
    assert i.dtype == torch.int32 and d.dtype == torch.float32
    assert i[:, 0].tolist()[:3] == [0, 1, 2] and i[4, 0] == 4 and int(i[3, 0]) in (3, 7, 11)
    assert (d[:, 0] <= 1e-4).all()


def test_fanng_budget_grows_with_k():
    index = FANNGSearch(budget=100).build(POINTS[:50])
    assert index.budget_for(5) == 100
    assert index.budget_for(50) == 50 * EVALS_PER_NEIGHBOUR


def test_benchmark_writes_cases_plot_and_resumes(tmp_path, capsys):
    from knnsolver.bench import search as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--datasets", "synthetic", "--sizes", "1500", "--backends", "faiss-flat,fanng", "--no-sweep",
            "--queries", "100", "--recall-sample", "200", "--out", str(tmp_path)]
    assert bench.run(parser.parse_args(argv)) == 0
    cases = sorted(p.name for p in tmp_path.glob("*.json"))
    assert cases == ["synthetic-n1500-d64__faiss-flat__default.json", "synthetic-n1500-d64__fanng__default.json"]
    record = json.loads((tmp_path / cases[1]).read_text())
    assert record["graph_recall"] >= 0.9 and record["query_recall"] >= 0.9 and record["build_s"] >= 0
    assert (tmp_path / "recall_vs_time.png").stat().st_size > 0
    capsys.readouterr()
    assert bench.run(parser.parse_args(argv)) == 0
    assert "clustered synthetic bank), 100 queries" not in capsys.readouterr().out, "finished cases are not rerun"


def test_drop_own_rows_removes_the_own_row_or_else_the_farthest():
    from knnsolver.search.common import drop_own_rows

    found = torch.tensor([[4, 7, 2], [9, 1, 5], [3, 8, 6]])
    kept = drop_own_rows(found, torch.tensor([7, 0, 3]))  # row 0: own in the middle; 1: absent; 2: first
    assert kept.tolist() == [[4, 2], [9, 1], [8, 6]]


def test_the_exact_cpu_graph_leaves_torchs_thread_count_as_set():
    """numba's OpenMP layer shares the runtime with torch: the exact graph once left a 1-thread process
    (a benchmark worker, 2 of them on 2 cores) running torch on every core after its first refresh.
    10,000 points: the graph also sorts them by faiss k-means cluster first (faiss's own threads)."""
    import subprocess

    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from knnsolver.registry import SEARCHES\n"
        "index = SEARCHES.build('exact').build(torch.randn(10000, 16))\n"
        "index.graph(10)\n"
        "index.graph(10)\n"
        "print(torch.get_num_threads())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "2"  # a pool of 2 whatever the machine, so the old leak shows on 1 core too
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"
