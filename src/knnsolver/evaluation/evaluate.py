"""Evaluate a trained network + solver: classification accuracy or retrieval on unseen classes."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from knnsolver.interfaces import Solver
from knnsolver.metrics import nmi, retrieval_metrics


@torch.no_grad()
def solver_accuracy(
    solver: Solver, train_emb: Tensor | None, train_labels: Tensor | None, emb: Tensor, labels: Tensor,
    batch_size: int = 1024,
) -> float:
    """Accuracy of ``solver.predict`` on ``emb`` after ``fit_reference`` on the training embeddings.

    The solver is copied first so evaluation never changes the training state
    (an RBF bank refreshed here must not alter the run's update interval). The
    training embeddings may be ``None`` for a solver that does not predict by kNN.
    """
    evaluator = copy.deepcopy(solver).eval()
    if train_emb is not None:
        evaluator.fit_reference(train_emb, train_labels)
    elif solver.predicts_by_knn:
        raise ValueError(f"{type(solver).__name__} predicts by kNN: pass the training embeddings")
    correct = 0
    for start in range(0, emb.shape[0], batch_size):
        scores = evaluator.predict(emb[start : start + batch_size])
        correct += (scores.argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / max(1, emb.shape[0])


def retrieval_summary(
    emb: Tensor, labels: Tensor, with_nmi: bool = True, seed: int = 0, query_mask: Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@K, Precision@1, MAP@R, R-precision and NMI of one set of embeddings.

    Without ``query_mask`` every row queries all the others (own row excluded). With
    it (In-Shop's protocol) the rows it marks query a gallery of the rows it does not.
    Cut-offs ``ks`` beyond the references a query can retrieve are left out (so a small
    test set is not refused for SOP's Recall@1000). NMI clusters every row.
    """
    if query_mask is None:
        query, query_labels, gallery, gallery_labels, available = emb, labels, None, None, emb.shape[0] - 1
    else:
        mask = torch.as_tensor(query_mask, dtype=torch.bool, device=emb.device)
        if mask.shape != (emb.shape[0],):
            raise ValueError(f"query_mask must hold one flag per row ({emb.shape[0]}), got shape {tuple(mask.shape)}")
        query, query_labels = emb[mask], labels[mask.to(labels.device)]
        gallery, gallery_labels = emb[~mask], labels[~mask.to(labels.device)]
        available = gallery.shape[0]
    out = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=[k for k in ks if k <= available] or [1])
    if with_nmi:
        out["nmi"] = nmi(emb, labels, seed=seed)
    return out
