"""The embedding bank: refresh and neighbour lists against brute force, dtypes, state, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from knnsolver.bank import EmbeddingBank
from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch
from knnsolver.search.exact import ExactSearch


def brute_force_graph(points: np.ndarray, k: int) -> np.ndarray:
    d = ((points[:, None, :].astype(np.float64) - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def table(n=60, d=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


class CountingSearch(NeighbourSearch):
    """An injected backend that records the indexes it builds (the seam faiss / FANNG plug into)."""

    def __init__(self):
        self.calls = []
        self.inner = ExactSearch(block_elements=64)  # tiny blocks: never an N x N matrix

    def build(self, points):
        self.calls.append(points.shape[0])
        return self.inner.build(points)


def test_refresh_stores_centres_and_brute_force_neighbours():
    emb, labels = table()
    bank = EmbeddingBank(60, 6, k=7)
    assert not bank.filled
    bank.refresh(emb, labels)
    assert bank.filled and torch.equal(bank.centres, emb) and torch.equal(bank.labels, labels)
    assert bank.neighbours.dtype == torch.int32 and bank.neighbours.shape == (60, 7)
    assert not (bank.neighbours.long() == torch.arange(60)[:, None]).any()  # self excluded
    np.testing.assert_array_equal(bank.neighbours.numpy(), brute_force_graph(emb.numpy(), 7))


def test_refresh_uses_the_injected_search():
    emb, labels = table()
    search = CountingSearch()
    bank = EmbeddingBank(60, 6, k=4, search=search)
    bank.refresh(emb, labels)
    bank.refresh(emb * 2, labels)
    assert search.calls == [60, 60]  # one index per refresh
    np.testing.assert_array_equal(bank.neighbours.numpy(), brute_force_graph(emb.numpy(), 4))


def test_float16_bank_stores_half_and_searches_the_stored_values():
    emb, labels = table(seed=1)
    bank = EmbeddingBank(60, 6, k=5, dtype="float16")
    bank.refresh(emb, labels)
    assert bank.centres.dtype == torch.float16 and bank.neighbours.dtype == torch.int32
    assert torch.equal(bank.centres, emb.half())
    np.testing.assert_array_equal(bank.neighbours.numpy(), brute_force_graph(emb.half().float().numpy(), 5))


def test_set_centres_write_and_append():
    emb, labels = table()
    bank = EmbeddingBank(60, 6, k=3)
    bank.refresh(emb, labels)
    graph = bank.neighbours.clone()
    bank.append(torch.ones(2, 6), torch.tensor([9, 9]))
    assert bank.centres.shape == (62, 6) and bank.training_centres.shape == (60, 6)
    assert torch.equal(bank.training_labels, labels) and bank.labels[-2:].tolist() == [9, 9]
    bank.set_centres(emb + 1, labels)  # training rows replaced, added rows kept, graph unchanged
    assert torch.equal(bank.training_centres, emb + 1) and torch.equal(bank.centres[60:], torch.ones(2, 6))
    assert torch.equal(bank.neighbours, graph)
    bank.write(torch.tensor([0, 5]), torch.zeros(2, 6, requires_grad=True))
    assert torch.equal(bank.centres[[0, 5]], torch.zeros(2, 6)) and not bank.centres.requires_grad
    bank.refresh(emb, labels)
    assert bank.centres.shape == (62, 6) and torch.equal(bank.neighbours, graph)  # graph over training rows only


def test_write_of_a_repeated_row_keeps_its_last_embedding():
    emb, labels = table()
    bank = EmbeddingBank(60, 6)
    bank.refresh(emb, labels)
    rows = torch.tensor([3, 7, 3, 3, 7, 1])
    new = torch.arange(6.0).unsqueeze(1).expand(6, 6)  # row i of the batch holds the value i
    bank.write(rows, new)
    assert bank.centres[[1, 3, 7], 0].tolist() == [5.0, 3.0, 4.0]
    assert torch.equal(bank.centres[0], emb[0])


def test_state_dict_round_trip_resizes_buffers():
    emb, labels = table()
    bank = EmbeddingBank(60, 6, k=5, dtype="float16")
    bank.refresh(emb, labels)
    bank.append(torch.full((3, 6), 2.0), torch.tensor([1, 2, 3]))
    fresh = EmbeddingBank(60, 6, k=5, dtype="float16")
    assert set(bank.state_dict()) == {"embeddings", "labels", "neighbours"}
    fresh.load_state_dict(bank.state_dict())
    for name in ("centres", "labels", "neighbours"):
        assert torch.equal(getattr(fresh, name), getattr(bank, name))
        assert getattr(fresh, name).dtype == getattr(bank, name).dtype
    empty = EmbeddingBank(60, 6, k=5)
    bank.load_state_dict(empty.state_dict())  # back to unfilled
    assert not bank.filled


def test_errors_name_the_problem():
    emb, labels = table()
    with pytest.raises(ConfigError, match="num_train=60 rows but got 59 embeddings"):
        EmbeddingBank(60, 6, k=3).refresh(emb[:59], labels[:59])
    with pytest.raises(ConfigError, match=r"expects \(rows, 6\)"):
        EmbeddingBank(60, 6).refresh(emb[:, :5], labels)
    with pytest.raises(ConfigError, match="unknown bank dtype 'bfloat8'; choose one of: float32, float16"):
        EmbeddingBank(60, 6, dtype="bfloat8")
    with pytest.raises(ConfigError, match="k=60 neighbours requested but only 59 other points.*use k <= 59"):
        EmbeddingBank(60, 6, k=60)
    with pytest.raises(RuntimeError, match="bank is empty"):
        EmbeddingBank(60, 6).append(emb[:2], labels[:2])
    bank = EmbeddingBank(60, 6)
    bank.refresh(emb, labels)
    with pytest.raises(ConfigError, match="add_centres expects"):
        bank.append(emb[:2], labels[:3])


@pytest.mark.parametrize("mode", ["stored", "fresh"])
def test_a_refresh_builds_one_index_the_automatic_sigma_included(monkeypatch, mode):
    """The automatic sigma built a second, exact index of the centres at every refresh, whatever the bank's
    backend; it now asks the bank's own index. Every index any backend builds is counted."""
    from knnsolver.solvers.rbf import RBFSolver

    built = []
    plain = ExactSearch.build
    monkeypatch.setattr(ExactSearch, "build", lambda self, points: built.append(len(points)) or plain(self, points))
    emb, labels = table()
    solver = RBFSolver(6, 5, 60, k=5, neighbour_mode=mode, search="exact")
    for scale in (1.0, 2.0):
        solver.refresh(emb * scale, labels)
        solver(emb[:20] * scale, labels[:20], torch.arange(20))
    assert built == [60, 60]
    centres = solver.bank.training_centres.double()  # on the unit sphere (normalize=True)
    nearest = torch.cdist(centres, centres).fill_diagonal_(float("inf")).min(1).values
    torch.testing.assert_close(solver.sigma.double(), nearest.median(), rtol=1e-5, atol=0)


def test_with_auto_search_the_sigma_uses_the_backend_the_bank_chose():
    """Review: asking the bank's auto index for a k=1 graph made it pick (and build) its approximate backend at
    every refresh, where the k=10 lists had stayed exact. The sigma now reads the lists."""
    from knnsolver.search.auto import AutoSearch
    from knnsolver.solvers.rbf import RBFSolver

    emb, labels = table(n=300)
    solver = RBFSolver(6, 5, 300, k=10)
    solver.bank.search = AutoSearch(threshold=100, large_k=5, large_k_threshold=1000)  # k >= 5 stays exact
    solver.refresh(emb, labels)
    solver(emb[:20], labels[:20], torch.arange(20))
    assert list(solver.bank.index(300)._built) == ["exact"]
    centres = solver.bank.training_centres.double()
    nearest = torch.cdist(centres, centres).fill_diagonal_(float("inf")).min(1).values
    torch.testing.assert_close(solver.sigma.double(), nearest.median(), rtol=1e-5, atol=0)


def test_rbf_classifier_builds_one_index_for_its_sigma_and_predictions(monkeypatch):
    from knnsolver.classifiers import RBFClassifier

    built = []
    plain = ExactSearch.build
    monkeypatch.setattr(ExactSearch, "build", lambda self, points: built.append(len(points)) or plain(self, points))
    emb, labels = table()
    model = RBFClassifier(k=5).fit(emb, labels.numpy())
    model.predict(emb[:7])
    model.predict(emb[7:9])
    assert built == [60]


def test_fresh_neighbours_build_one_index_per_refresh():
    """Issue 12: the identity-keyed caches rebuilt the index on every batch in neighbour_mode='fresh'."""
    from knnsolver.solvers.rbf import RBFSolver

    emb, labels = table()
    search = CountingSearch()
    solver = RBFSolver(6, 5, 60, k=5, neighbour_mode="fresh")
    solver.bank.search = search
    solver.refresh(emb, labels)
    for start in (0, 20, 40):
        rows = torch.arange(start, start + 20)
        solver(emb[rows] + 0.01, labels[rows], rows)
    assert search.calls == [60]
    solver.refresh(emb * 2, labels)
    solver(emb[:20], labels[:20], torch.arange(20))
    assert search.calls == [60, 60]
    solver.add_centres(torch.randn(4, 6), torch.tensor([0, 1, 5, 6]))
    solver.predict(emb[:5])  # prediction searches every centre: a second index over 64 rows
    solver.predict(emb[5:9])
    assert search.calls == [60, 60, 64]
