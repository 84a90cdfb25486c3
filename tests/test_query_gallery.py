"""Query/gallery retrieval (In-Shop's protocol) against an independent float64 brute-force computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from knnsolver.evaluation import retrieval_summary
from knnsolver.metrics import retrieval_metrics


def brute_force(q: np.ndarray, ql: np.ndarray, g: np.ndarray, gl: np.ndarray, ks) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision by sorting every query's float64 distances to the whole gallery."""
    recall = {k: [] for k in ks}
    ap, rp = [], []
    for x, y in zip(q, ql):
        order = np.argsort(((g - x) ** 2).sum(1), kind="stable")
        rel = gl[order] == y
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            recall[k].append(rel[:k].any())
        rp.append(rel[:r].mean())
        hits = np.cumsum(rel[:r])
        ap.append(np.sum(hits / np.arange(1, r + 1) * rel[:r]) / r)
    out = {f"recall_at_{k}": float(np.mean(v)) for k, v in recall.items()}
    out.update(map_at_r=float(np.mean(ap)), r_precision=float(np.mean(rp)))
    return out


def test_query_against_gallery_matches_brute_force():
    rng = np.random.default_rng(0)
    g_labels = rng.integers(0, 12, 300)
    q_labels = np.concatenate([rng.integers(0, 12, 80), [99]])  # one query whose item is not in the gallery
    centres = rng.normal(size=(100, 8))
    g = centres[g_labels] * 0.7 + rng.normal(size=(300, 8))
    q = centres[q_labels] * 0.7 + rng.normal(size=(81, 8))
    ks = (1, 10, 20, 30, 40, 50)
    ours = retrieval_metrics(q, q_labels, g, g_labels, ks=ks)
    expected = brute_force(q, q_labels, g, g_labels, ks)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0.2 < ours["recall_at_1"] < 0.9, "a test that can tell right from wrong"


def test_summary_splits_rows_into_queries_and_gallery():
    rng = np.random.default_rng(1)
    labels = torch.as_tensor(np.repeat(np.arange(10), 4))
    emb = torch.as_tensor(rng.normal(size=(40, 6)), dtype=torch.float32) + labels[:, None] * 0.3
    query = torch.zeros(40, dtype=torch.bool)
    query[::4] = True  # the first image of each item queries the other three
    out = retrieval_summary(emb, labels, with_nmi=False, query_mask=query, ks=(1, 10, 20, 30, 40, 50))
    q, g = emb[query].double().numpy(), emb[~query].double().numpy()
    expected = brute_force(q, labels[query].numpy(), g, labels[~query].numpy(), (1, 10, 20, 30))
    assert set(out) == {"precision_at_1", "map_at_r", "r_precision", *(f"recall_at_{k}" for k in (1, 10, 20, 30))}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    # all against all differs: each row also searches the other queries
    assert retrieval_summary(emb, labels, with_nmi=False)["map_at_r"] != pytest.approx(out["map_at_r"])
    with pytest.raises(ValueError, match="one flag per row"):
        retrieval_summary(emb, labels, query_mask=query[:5])
