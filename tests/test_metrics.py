"""knnsolver.metrics against a naive full-matrix numpy version, pytorch-metric-learning and hand-computed values.

Embeddings are random points with integer coordinates, so every squared distance
is an exactly representable float32 and all implementations rank identically:
few coordinate values give many ties and duplicates (to test the tie rule),
many values give none (so a comparison with faiss, whose tie order is unknown,
is exact).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from knnsolver.errors import ConfigError
from knnsolver.metrics import nmi, retrieval_metrics

KS = (1, 2, 4, 8, 16)


def _lattice(seed: int, n: int, dim: int, values: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points with coordinates in ``0..values-1`` and labels in ``0..classes-1``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, values, (n, dim)).astype(np.float32), rng.integers(0, classes, n)


def _naive(q, q_lab, ref=None, ref_lab=None, ks=KS, require_no_ties=False) -> dict[str, float]:
    """The metrics from the full Q x N distance matrix, one query at a time, ties ranked by index."""
    self_ref = ref is None
    if self_ref:
        ref, ref_lab = q, q_lab
    d = ((q[:, None, :].astype(np.float64) - ref[None, :, :]) ** 2).sum(-1)
    if self_ref:
        np.fill_diagonal(d, np.inf)  # own row ranks last, then is dropped
    order = np.argsort(d, axis=1, kind="stable")
    p1, recall, r_prec, ap = [], {k: [] for k in ks}, [], []
    for i in range(len(q)):
        ranked = order[i, : len(ref) - self_ref]
        if require_no_ties:
            assert np.all(np.diff(d[i, ranked]) > 0), "test data must have no tied distances"
        rel = ref_lab[ranked] == q_lab[i]
        r = int(rel.sum())
        if r == 0:
            continue
        p1.append(rel[0])
        for k in ks:
            recall[k].append(rel[:k].any())
        r_prec.append(rel[:r].sum() / r)
        ap.append(sum(rel[: j + 1].sum() / (j + 1) for j in range(r) if rel[j]) / r)
    out = {"precision_at_1": np.mean(p1)}
    out.update({f"recall_at_{k}": np.mean(recall[k]) for k in ks})
    out.update(map_at_r=np.mean(ap), r_precision=np.mean(r_prec))
    return out


def _pml(q, q_lab, ref=None, ref_lab=None) -> dict[str, float]:
    """pytorch-metric-learning's AccuracyCalculator under our key names.

    Its definitions match ours: precision_at_1, r_precision and
    mean_average_precision_at_r (with k='max_bin_count', i.e. enough neighbours
    for the largest R) leave out queries with R = 0 and, with no reference,
    drop each query's own index. It has no Recall@K (its precision_at_k is a
    different quantity), so recall is checked against the naive version only.
    """
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    got = calc.get_accuracy(q, q_lab, ref, ref_lab)
    return {
        "precision_at_1": got["precision_at_1"],
        "r_precision": got["r_precision"],
        "map_at_r": got["mean_average_precision_at_r"],
    }


def _tied_sets(separate: bool):
    """Query/reference data with many tied distances and exact duplicates."""
    q, q_lab = _lattice(0, 150, 3, 3, 5)
    if not separate:
        return (q, q_lab)
    ref, ref_lab = _lattice(1, 110, 3, 3, 5)
    q_lab[:4] = 7  # labels absent from the reference: R = 0, left out
    return (q, q_lab, ref, ref_lab)


def _tie_free_sets(separate: bool):
    """Query/reference data with no tied distances (seeds picked for that; _naive checks it).

    Coordinates below 1400 in 4 dimensions keep every term of
    ||q||^2 - 2 q.p + ||p||^2 below 2^24, so float32 distances are exact.
    """
    q, q_lab = _lattice(4, 150, 4, 1400, 5)
    if not separate:
        return (q, q_lab)
    ref, ref_lab = _lattice(5, 110, 4, 1400, 5)
    q_lab[:4] = 7
    return (q, q_lab, ref, ref_lab)


def _assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("separate", [False, True], ids=["self", "separate"])
def test_matches_naive_with_ties_and_duplicates(separate):
    data = _tied_sets(separate)
    got = retrieval_metrics(*data, ks=KS, block_size=16)
    want = _naive(*data)
    assert set(got) == set(want)
    _assert_close(got, want)


@pytest.mark.parametrize("separate", [False, True], ids=["self", "separate"])
def test_matches_naive_and_pytorch_metric_learning(separate):
    data = _tie_free_sets(separate)
    got = retrieval_metrics(*data, ks=KS, block_size=16)
    _assert_close(got, _naive(*data, require_no_ties=True))
    _assert_close(got, _pml(*data))


@pytest.mark.parametrize("separate", [False, True], ids=["self", "separate"])
def test_block_size_does_not_change_results(separate):
    data = _tied_sets(separate)
    one_block = retrieval_metrics(*data, ks=KS, block_size=len(data[0]))
    for block_size in (1, 7, None):
        assert retrieval_metrics(*data, ks=KS, block_size=block_size) == one_block


def test_hand_computed_self_reference():
    # Points on a line; query -> references nearest first, rel, R:
    # 0a: 1a 3b 4a 9b 20c  rel 1 0 1 0  R=2  P@1=1 RP=1/2 AP=(1/2)(1)=1/2
    # 1a: 0a 3b 4a 9b      rel 1 0 1 0  R=2  P@1=1 RP=1/2 AP=1/2
    # 3b: 4a 1a 0a 9b      rel 0 0 0 1  R=1  P@1=0 RP=0   AP=0
    # 4a: 3b 1a 0a 9b      rel 0 1 1 0  R=2  P@1=0 RP=1/2 AP=(1/2)(1/2)=1/4
    # 9b: 4a 3b 1a 0a      rel 0 1 0 0  R=1  P@1=0 RP=0   AP=0
    # 20c has R=0 and is left out.
    x = np.array([[0.0], [1.0], [3.0], [4.0], [9.0], [20.0]])
    y = np.array(["a", "a", "b", "a", "b", "c"])
    got = retrieval_metrics(x, y, ks=(1, 2, 4))
    assert got == pytest.approx(
        {
            "precision_at_1": 2 / 5,
            "recall_at_1": 2 / 5,
            "recall_at_2": 4 / 5,
            "recall_at_4": 1.0,
            "r_precision": 1.5 / 5,
            "map_at_r": 1.25 / 5,
        }
    )


def test_hand_computed_separate_reference():
    # Query 0a against 1a 2b 3a 4a 5b: rel 1 0 1 1 0, R=3, RP = 2/3,
    # MAP@R = (1/3)(P(1)*1 + P(2)*0 + P(3)*1) = (1/3)(1 + 2/3) = 5/9 (rank 4 is past R).
    got = retrieval_metrics([[0.0]], [0], [[1.0], [2.0], [3.0], [4.0], [5.0]], [0, 1, 0, 0, 1], ks=(1, 2))
    assert got == pytest.approx(
        {"precision_at_1": 1.0, "recall_at_1": 1.0, "recall_at_2": 1.0, "r_precision": 2 / 3, "map_at_r": 5 / 9}
    )


def test_duplicates_of_the_query_count():
    # Self reference: row 1 duplicates row 0; only the query's own index is left out.
    got = retrieval_metrics([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [6.0, 5.0]], [0, 0, 1, 2], ks=(1,))
    assert got["precision_at_1"] == 1.0 and got["map_at_r"] == 1.0
    # Separate reference holding the query itself: it is an ordinary neighbour at distance 0.
    got = retrieval_metrics([[1.0, 2.0]], [3], [[9.0, 9.0], [1.0, 2.0], [1.0, 2.5]], [5, 3, 4], ks=(1,))
    assert got["precision_at_1"] == 1.0 and got["map_at_r"] == 1.0


def test_equal_distances_rank_by_reference_index():
    # Query 0; references at equal distance 1: the lower index ranks first.
    assert retrieval_metrics([[0.0]], [0], [[1.0], [-1.0]], [1, 0], ks=(1,))["precision_at_1"] == 0.0
    assert retrieval_metrics([[0.0]], [0], [[1.0], [-1.0]], [0, 1], ks=(1,))["precision_at_1"] == 1.0
    # Ten references tied at the cut-off, only one relevant: whichever index topk happens to keep,
    # the rule decides. MAP@R with R = 1 only looks at rank 1.
    ref = np.ones((10, 1))
    for relevant, expected in ((0, 1.0), (9, 0.0), (4, 0.0)):
        labels = np.ones(10, dtype=int)
        labels[relevant] = 0
        got = retrieval_metrics([[0.0]], [0], ref, labels, ks=(1, 4, 5))
        assert got["precision_at_1"] == got["map_at_r"] == expected
        assert got["recall_at_4"] == float(relevant < 4) and got["recall_at_5"] == float(relevant < 5)


def test_tensor_and_array_inputs_agree():
    q, q_lab = _lattice(6, 60, 4, 5, 3)
    want = retrieval_metrics(q, q_lab)
    emb = torch.from_numpy(q).double().requires_grad_()
    assert retrieval_metrics(emb, torch.from_numpy(q_lab)) == want
    assert retrieval_metrics(q.tolist(), q_lab.tolist()) == want


def test_precision_at_1_reported_without_k_1():
    q, q_lab = _tie_free_sets(False)
    got = retrieval_metrics(q, q_lab, ks=(4, 2, 4))
    assert set(got) == {"precision_at_1", "recall_at_2", "recall_at_4", "map_at_r", "r_precision"}
    assert got["precision_at_1"] == retrieval_metrics(q, q_lab, ks=(1,))["recall_at_1"]


def test_nmi_is_one_on_separated_clusters():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 30)
    centres = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float32)
    x = centres[labels] + rng.normal(size=(120, 2)).astype(np.float32)
    assert nmi(x, labels) == pytest.approx(1.0)
    assert nmi(torch.from_numpy(x), torch.from_numpy(labels)) == pytest.approx(1.0)


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    labels = rng.integers(0, 4, 200)
    x[labels == 0] += 2.0
    clusters = KMeans(n_clusters=4, n_init=10, random_state=3).fit_predict(x)
    assert nmi(x, labels, seed=3) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)


_X = np.zeros((4, 2), dtype=np.float32)
_Y = np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(query=np.zeros(4), query_labels=_Y), r"query must be a 2-D \(n, dim\) array, got shape \(4,\)"),
        (dict(query=np.zeros((0, 2)), query_labels=[]), r"query is empty: shape \(0, 2\)"),
        (dict(query=np.zeros((4, 0)), query_labels=_Y), r"query is empty: shape \(4, 0\)"),
        (dict(query=np.full((4, 2), np.nan), query_labels=_Y), "query contains NaN or infinite"),
        (dict(query=[["a", "b"]], query_labels=[0]), "query must be a numeric"),
        (dict(query=_X, query_labels=_Y[:3]), "query_labels has 3 entries but there are 4 embeddings"),
        (dict(query=_X, query_labels=_Y[:, None]), "query_labels must be a 1-D array"),
        (dict(query=_X, query_labels=_Y, reference=_X), "reference given without reference_labels"),
        (dict(query=_X, query_labels=_Y, reference_labels=_Y), "reference_labels given without reference"),
        (dict(query=_X, query_labels=_Y, reference=np.zeros((3, 2)), reference_labels=_Y), "reference_labels has 4"),
        (dict(query=_X, query_labels=_Y, reference=np.zeros((4, 3)), reference_labels=_Y), "dimension 2 but .* has 3"),
        (dict(query=_X, query_labels=_Y, ks=(0,)), "every K in ks must be an integer >= 1, got 0"),
        (dict(query=_X, query_labels=_Y, ks=(1.5,)), "every K in ks must be an integer >= 1"),
        (dict(query=_X, query_labels=_Y, ks=()), "ks must name at least one cut-off"),
        (dict(query=_X, query_labels=_Y, ks=2), "ks must be a sequence"),
        (dict(query=_X, query_labels=_Y, ks=(4,)), "recall@4 needs 4 references per query but only 3"),
        (dict(query=_X, query_labels=_Y, block_size=0), "block_size must be an integer >= 1 or None, got 0"),
        (dict(query=_X, query_labels=[0, 1, 2, 3], ks=(1,)), "no query has a reference with its label"),
    ],
)
def test_retrieval_metrics_rejects_bad_input(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        retrieval_metrics(**kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(4), _Y), "embeddings must be a 2-D"),
        ((np.zeros((0, 2)), []), "embeddings is empty"),
        ((_X, _Y[:2]), "labels has 2 entries but there are 4 embeddings"),
    ],
)
def test_nmi_rejects_bad_input(args, message):
    with pytest.raises(ConfigError, match=message):
        nmi(*args)
