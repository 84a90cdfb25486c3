"""kNN prediction over stored training embeddings, shared by every solver that predicts by kNN."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch
from knnsolver.search.exact import ExactSearch


def knn_vote_scores(neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """Class scores from the labels of each query's neighbours, nearest first.

    ``score_c = (#neighbours of class c) + 1e-3 * sum_{j in c} (k - rank_j) / k^2``:
    a majority vote whose ties go to the class with the nearer neighbours.
    """
    b, k = neighbour_labels.shape
    rank_bonus = 1e-3 * (k - torch.arange(k, dtype=torch.float32, device=neighbour_labels.device)) / (k * k)
    weights = (1.0 + rank_bonus).expand(b, k)
    scores = torch.zeros(b, num_classes, device=neighbour_labels.device)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


class KNNHead(nn.Module):
    """Holds reference embeddings and labels; ``scores`` votes over the k nearest."""

    def __init__(self, num_classes: int, k: int = 5, search: NeighbourSearch | None = None) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {k}")
        self.num_classes = num_classes
        self.k = int(k)
        self.search = search or ExactSearch()
        self.register_buffer("reference", torch.empty(0), persistent=False)
        self.register_buffer("reference_labels", torch.empty(0, dtype=torch.long), persistent=False)

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        self.reference = embeddings.detach().float()
        self.reference_labels = labels.detach().long()

    @torch.no_grad()
    def scores(self, embeddings: Tensor) -> Tensor:
        if self.reference.numel() == 0:
            raise RuntimeError("kNN prediction needs reference embeddings: call fit_reference(embeddings, labels) first")
        k = min(self.k, self.reference.shape[0])
        _, idx = self.search.search(embeddings.detach().float(), self.reference, k)
        return knn_vote_scores(self.reference_labels[idx.long()], self.num_classes)
