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
from knnsolver.search.auto import AutoSearch
from knnsolver.search.exact import ExactSearch
from knnsolver.search.faiss_backend import FaissFlatSearch, FaissHNSWSearch, FaissIVFSearch
from knnsolver.search.fanng import EVALS_PER_NEIGHBOUR, FANNGSearch

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
    cls, options, target = BACKENDS[request.param]
    search = cls(**options)
    return request.param, search, target, search.knn_graph(POINTS, K), search.search(QUERIES, POINTS, K)


def test_knn_graph_shape_dtype_self_exclusion_and_recall(backend):
    name, _, target, graph, _ = backend
    assert graph.shape == (len(POINTS), K) and graph.dtype == torch.int32
    assert not (graph.long() == torch.arange(len(POINTS))[:, None]).any(), f"{name} returned a point as its own neighbour"
    assert all(len(set(row.tolist())) == K for row in graph), "neighbours repeat"
    assert recall(graph, EXACT_GRAPH) >= target


def test_duplicates_find_each_other_not_themselves(backend):
    _, _, _, graph, _ = backend
    for p, twins in ((3, {7, 11}), (7, {3, 11}), (11, {3, 7})):
        assert set(graph[p, :2].tolist()) == twins


def test_search_shapes_recall_and_true_distances(backend):
    _, _, target, _, (dist, idx) = backend
    assert dist.shape == idx.shape == (len(QUERIES), K)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int32
    assert recall(idx, EXACT_IDX) >= target
    true = ((QUERIES[:, None, :] - POINTS[idx.long()]) ** 2).sum(-1)
    torch.testing.assert_close(dist, true, rtol=1e-4, atol=1e-3)
    assert (dist[:, 1:] >= dist[:, :-1] - 1e-4).all(), "not nearest first"


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
                                            ("knnsolver.search.fanng", "numba")])
def test_missing_optional_package_names_it(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` raise ImportError
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(MissingDependencyError, match=f"pip install {package}"):
        importlib.import_module(module)


def test_ivf_retrains_on_new_points_and_caches_a_fixed_bank():
    search = FaissIVFSearch(nlist=8, nprobe=8)
    _, first = search.search(QUERIES, POINTS, 3)
    cached = search._cache[2]
    search.search(QUERIES[:5], POINTS, 3)
    assert search._cache[2] is cached, "same bank, unchanged: index reused"
    moved = POINTS + 100.0
    _, idx = search.search(QUERIES + 100.0, moved, 3)
    assert search._cache[2] is not cached
    assert recall(idx, EXACT_IDX[:, :3]) >= 0.99, "index trained on the new points"
    bank = POINTS.clone()
    search.search(QUERIES, bank, 3)
    bank += 100.0  # modified in place: must not reuse the stale index
    _, idx = search.search(QUERIES + 100.0, bank, 3)
    assert recall(idx, EXACT_IDX[:, :3]) >= 0.99


def test_ivf_rows_it_cannot_fill_are_completed_exactly():
    # nprobe=1 over 30 cells: some cells hold fewer than k points, so faiss pads with -1.
    graph = FaissIVFSearch(nlist=30, nprobe=1).knn_graph(POINTS, 60)
    assert (graph >= 0).all() and graph.shape == (len(POINTS), 60)


def test_fanng_graph_obeys_the_occlusion_rule():
    search = FANNGSearch(max_degree=12)
    graph = search.build(POINTS.numpy())
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
    without = FANNGSearch(traverse_add=0.0).build(POINTS.numpy())
    with_ta = FANNGSearch(traverse_add=3.0).build(POINTS.numpy())
    assert with_ta.deg.sum() > without.deg.sum()
    low = recall(torch.from_numpy(with_ta.search(QUERIES.numpy(), K, 20)[1]), EXACT_IDX)
    high = recall(torch.from_numpy(with_ta.search(QUERIES.numpy(), K, 300)[1]), EXACT_IDX)
    assert low < high


def test_fanng_is_deterministic_with_a_seed():
    a = FANNGSearch(seed=3).build(POINTS.numpy())
    b = FANNGSearch(seed=3).build(POINTS.numpy())
    c = FANNGSearch(seed=4).build(POINTS.numpy())
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
    assert torch.equal(AutoSearch(threshold=10**6).knn_graph(POINTS, K), EXACT_GRAPH)
    assert recall(auto.knn_graph(POINTS, K), EXACT_GRAPH) >= 0.9
    with pytest.raises(ConfigError):
        AutoSearch(threshold=0)
    with pytest.raises(ConfigError):
        AutoSearch(approximate="auto")


def test_exact_accepts_float64_and_finds_the_queries_themselves():
    d, i = ExactSearch().search(POINTS[:5].double(), POINTS.double(), 1)
    assert i.dtype == torch.int32 and d.dtype == torch.float32
    assert i[:, 0].tolist()[:3] == [0, 1, 2] and i[4, 0] == 4 and int(i[3, 0]) in (3, 7, 11)
    assert (d[:, 0] <= 1e-4).all()


def test_fanng_budget_grows_with_k():
    search = FANNGSearch(budget=100)
    assert search.budget_for(5) == 100
    assert search.budget_for(50) == 50 * EVALS_PER_NEIGHBOUR


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
