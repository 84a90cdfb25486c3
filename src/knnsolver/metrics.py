"""Embedding-quality metrics: retrieval (Recall@K, Precision@1, R-precision, MAP@R) and clustering (NMI).

Retrieval metrics rank references by Euclidean distance to each query, one block
of queries at a time, and reduce every query to a few scalars before the next
block, so memory is O(block x N) and never O(Q x N), even when MAP@R needs the
top R = thousands of neighbours of every query.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from knnsolver.errors import ConfigError

ArrayLike = Tensor | np.ndarray

# Memory budget of one query block (distance rows plus per-neighbour work), bytes.
_BLOCK_BYTES = 256 * 2**20


def _as_embeddings(x: ArrayLike, name: str) -> Tensor:
    """``x`` as a floating ``(n, dim)`` tensor on its own device (float64 kept, any other dtype as float32);
    raises ConfigError if malformed."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
            t = torch.as_tensor(arr if arr.dtype == np.float64 else arr.astype(np.float32))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be a numeric (n, dim) array: {exc}") from exc
    if t.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D (n, dim) array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ConfigError(f"{name} is empty: shape {tuple(t.shape)}")
    t = t if t.dtype == torch.float64 else t.float()
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} contains NaN or infinite values")
    return t


def _as_labels(y: ArrayLike, name: str, n: int) -> np.ndarray:
    """``y`` as a 1-D numpy array of ``n`` labels; raises ConfigError otherwise."""
    a = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if a.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array of labels, got shape {a.shape}")
    if len(a) != n:
        raise ConfigError(f"{name} has {len(a)} entries but there are {n} embeddings")
    return a


def _check_ks(ks: Iterable[int], available: int) -> list[int]:
    """Sorted distinct cut-offs, each in ``1..available``."""
    try:
        ks = list(ks)
    except TypeError as exc:
        raise ConfigError(f"ks must be a sequence of integer cut-offs, got {ks!r}") from exc
    if not ks:
        raise ConfigError("ks must name at least one cut-off K for recall@K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"every K in ks must be an integer >= 1, got {k!r}")
        if k > available:
            raise ConfigError(f"recall@{k} needs {k} references per query but only {available} are available")
    return sorted({int(k) for k in ks})


def _nearest(qb: Tensor, ref: Tensor, ref_norm: Tensor, depth: int, self_start: int | None) -> Tensor:
    """Indices of the ``depth`` nearest references of each query in ``qb``, ranked by (distance, index).

    Squared distances ``||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2`` are formed for
    the whole block; with ``self_start`` row i is query ``self_start + i`` of
    ``ref`` and its own column is set to infinity. Each distance then becomes
    one int64 key, (float32 bits of max(d, 0)) * 2^32 + column index: the bits
    of a non-negative float32 order like its value (and a negative distance,
    -0.0 included, has negative bits, which clamp to those of 0.0), so keys
    order by distance, then by index, and are unique. One ``topk`` over keys
    thus gives a deterministic ranking; over raw distances it would keep an
    arbitrary subset, in arbitrary order, of equal distances.
    """
    d = torch.addmm(ref_norm, qb, ref.T, alpha=-2.0).add_((qb * qb).sum(1, keepdim=True))
    if self_start is not None:
        rows = torch.arange(qb.shape[0], device=d.device)
        d[rows, self_start + rows] = float("inf")
    keys = d.view(torch.int32).to(torch.int64)
    del d
    keys.clamp_(min=0).bitwise_left_shift_(32).bitwise_or_(torch.arange(ref.shape[0], device=keys.device))
    return torch.topk(keys, depth, dim=1, largest=False, sorted=True).values.bitwise_and_(0xFFFFFFFF)


# Points whose mean lies further from the origin than this many times their root-mean-square distance from it are
# ranked from their mean (the float32 expansion's error grows with ||x||^2 over the distances it separates).
_FAR_FROM_ORIGIN = 2.0


def _near_origin(q: Tensor, ref: Tensor, same: bool) -> tuple[Tensor, Tensor]:
    """``q`` and ``ref`` in float32, both less the references' mean (taken in float64) when that mean lies over
    :data:`_FAR_FROM_ORIGIN` times the references' spread from the origin; as they are otherwise.

    A common shift changes no distance, but ||q||^2 - 2 q.p + ||p||^2 in float32 loses the distances of points
    far from the origin (300 points at 20 +- 0.1 per coordinate: recall@1 0.130 against float64's 0.127). The
    mean is rounded to a multiple of the power of two at or below the spread per coordinate, so points on a
    grid (integers) stay on it and their distances exact: equal ones still tie.
    """
    ref64 = ref.double()
    centre = ref64.mean(0)
    spread = (ref64 - centre).square().sum(1).mean().sqrt()
    if centre.norm() <= _FAR_FROM_ORIGIN * spread or spread == 0:
        return q.float(), ref.float()
    step = 2.0 ** math.floor(math.log2(float(spread) / math.sqrt(ref.shape[1])))
    centre = (centre / step).round() * step
    shifted_ref = (ref64 - centre).float()
    return (shifted_ref, shifted_ref) if same else ((q.double() - centre).float(), shifted_ref)


@torch.no_grad()
def retrieval_metrics(
    query: ArrayLike,
    query_labels: ArrayLike,
    reference: ArrayLike | None = None,
    reference_labels: ArrayLike | None = None,
    ks: Iterable[int] = (1, 2, 4, 8),
    block_size: int | None = None,
) -> dict[str, float]:
    """Retrieval quality of ``query`` embeddings against ``reference`` embeddings.

    Each query ranks the references by Euclidean distance (squared, which ranks
    the same, computed in float32 as ||q||^2 - 2 q.p + ||p||^2, from the
    references' mean when they lie far from the origin for their spread:
    :func:`_near_origin`); equal computed distances rank by lower reference index. Without
    ``reference`` the queries are their own reference and each query's own row
    is left out by index, so an exact duplicate of a query still counts as a
    neighbour. A separate ``reference`` is taken as disjoint from the queries.

    For a query with label y, ranked references 1, 2, ... and rel(i) = 1 when
    reference i has label y, else 0, let R = number of references labelled y
    (excluding the query itself) and P(i) = (1/i) sum_{j<=i} rel(j). Then:

    * ``recall_at_{K}`` (the metric-learning papers' Recall@K, not IR recall):
      1 if rel(i) = 1 for some i <= K, else 0.
    * ``precision_at_1``: rel(1) (so it always equals ``recall_at_1``).
    * ``r_precision``: (sum_{i<=R} rel(i)) / R.
    * ``map_at_r`` (Musgrave et al. 2020, "A Metric Learning Reality Check"):
      (1/R) sum_{i=1..R} P(i) rel(i).

    Each is averaged over queries. Queries with R = 0 cannot retrieve anything
    relevant and are left out of every average, as pytorch-metric-learning's
    AccuracyCalculator leaves out such "lone" queries; ConfigError if no query
    has R > 0.

    ``block_size`` queries are ranked at a time; by default it is chosen so one
    block needs about 256 MiB. Results do not depend on it. Runs on the device
    of ``query`` when it is a tensor.
    """
    q = _as_embeddings(query, "query")
    q_lab = _as_labels(query_labels, "query_labels", q.shape[0])
    if reference is None:
        if reference_labels is not None:
            raise ConfigError("reference_labels given without reference")
        ref, ref_lab, exclude_self = q, q_lab, True
    else:
        if reference_labels is None:
            raise ConfigError("reference given without reference_labels")
        ref = _as_embeddings(reference, "reference").to(q.device)
        if ref.shape[1] != q.shape[1]:
            raise ConfigError(f"query has dimension {q.shape[1]} but reference has {ref.shape[1]}")
        ref_lab = _as_labels(reference_labels, "reference_labels", ref.shape[0])
        exclude_self = False
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ConfigError(f"block_size must be an integer >= 1 or None, got {block_size!r}")
    q, ref = _near_origin(q, ref, exclude_self)
    n_ref = ref.shape[0]
    n_cand = n_ref - int(exclude_self)  # references a query can retrieve
    ks = _check_ks(ks, n_cand)
    cuts = sorted({1, *ks})  # Precision@1 is the hit rate at cut-off 1.

    codes = torch.as_tensor(np.unique(np.concatenate([q_lab, ref_lab]), return_inverse=True)[1].reshape(-1))
    q_codes, ref_codes = codes[: len(q_lab)].to(q.device), codes[len(q_lab) :].to(q.device)
    r_count = torch.bincount(ref_codes, minlength=int(codes.max()) + 1)[q_codes] - int(exclude_self)
    valid = r_count > 0
    if not valid.any():
        raise ConfigError("no query has a reference with its label, so no retrieval metric is defined")

    # Neighbours to rank: enough for the largest K and the largest R (MAP@R, R-precision).
    depth = min(n_cand, max(cuts[-1], int(r_count.max())))
    # Per query row: 12N bytes of distances and int64 keys; per neighbour ~48 bytes of ranking work.
    rows = block_size or max(1, _BLOCK_BYTES // (12 * n_ref + 48 * depth))

    n_q = q.shape[0]
    ref_norm = (ref * ref).sum(1)
    hit_at = torch.zeros(len(cuts), n_q, dtype=torch.bool, device=q.device)
    r_prec = torch.zeros(n_q, dtype=torch.float64, device=q.device)
    avg_prec = torch.zeros(n_q, dtype=torch.float64, device=q.device)
    for start in range(0, n_q, rows):
        stop = min(start + rows, n_q)
        r = r_count[start:stop]
        block_depth = min(n_cand, max(cuts[-1], int(r.max())))
        idx = _nearest(q[start:stop], ref, ref_norm, block_depth, start if exclude_self else None)
        rel = ref_codes[idx] == q_codes[start:stop, None]
        hits = rel.cumsum(1, dtype=torch.int32)
        for j, k in enumerate(cuts):
            hit_at[j, start:stop] = hits[:, k - 1] > 0
        r_safe = r.clamp(min=1)
        r_prec[start:stop] = hits.gather(1, (r_safe - 1)[:, None]).squeeze(1).double() / r_safe
        pos = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=torch.float64)
        precision = hits.double().div_(pos).mul_(rel & (pos <= r[:, None]))  # P(i) rel(i), i <= R
        avg_prec[start:stop] = precision.sum(1) / r_safe

    hit_rate = dict(zip(cuts, hit_at[:, valid].double().mean(1).tolist()))
    out = {"precision_at_1": hit_rate[1]}
    out.update({f"recall_at_{k}": hit_rate[k] for k in ks})
    out["map_at_r"] = avg_prec[valid].mean().item()
    out["r_precision"] = r_prec[valid].mean().item()
    return out


def nmi(embeddings: ArrayLike, labels: ArrayLike, seed: int = 0) -> float:
    """Normalized mutual information between the labels and a k-means clustering of the embeddings.

    k-means (scikit-learn, ``n_init=10`` restarts, ``random_state=seed``) makes
    as many clusters C as there are distinct labels Y; the score is
    NMI = I(Y; C) / mean(H(Y), H(C)) (arithmetic mean, scikit-learn's default),
    1 for a clustering that reproduces the classes and about 0 for an unrelated one.
    """
    x = _as_embeddings(embeddings, "embeddings").float().cpu().numpy()
    y = _as_labels(labels, "labels", x.shape[0])
    clusters = KMeans(n_clusters=len(np.unique(y)), n_init=10, random_state=seed).fit_predict(x)
    return float(normalized_mutual_info_score(y, clusters))
