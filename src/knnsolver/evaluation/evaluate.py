"""Evaluate a trained network + solver: classification accuracy or retrieval on unseen classes."""
from __future__ import annotations

import copy

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


def retrieval_summary(emb: Tensor, labels: Tensor, with_nmi: bool = True, seed: int = 0) -> dict[str, float]:
    """Recall@K, Precision@1, MAP@R, R-precision (queries = references, self excluded) and NMI."""
    out = retrieval_metrics(emb, labels)
    if with_nmi:
        out["nmi"] = nmi(emb, labels, seed=seed)
    return out
