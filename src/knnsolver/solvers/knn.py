"""kNN prediction over stored training embeddings, shared by every solver that predicts by kNN."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from knnsolver.bank.reference import ReferenceSet
from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch
from knnsolver.search.exact import ExactSearch


def knn_vote_scores(neighbour_labels: Tensor, num_classes: int) -> Tensor:
    """Class scores (float64) from the labels of each query's neighbours, nearest first.

    ``score_c = (#neighbours of class c) + sum_{j in c} (k - rank_j) / 2^e``, with ``2^e`` the power of two
    at or above ``500 k (k + 1)`` so the bonus stays below 1e-3: a majority vote; a tie of votes goes to
    the class whose neighbours have the smaller sum of ranks, and a tie of that too (ranks {0, 3} against
    {1, 2}) to the lower class id, as scikit-learn's ``KNeighborsClassifier`` breaks every tie. Every score
    is a multiple of ``2^-e`` below ``k + 1``, exact in float64 for k up to about 20,000, so a tie is a tie
    whatever order the votes are summed in (float32 rounding broke them either way before).
    """
    b, k = neighbour_labels.shape
    scale = 2.0 ** math.ceil(math.log2(500 * k * (k + 1)))
    ranks = torch.arange(k, dtype=torch.float64, device=neighbour_labels.device)
    weights = (1.0 + (k - ranks) / scale).expand(b, k)
    scores = torch.zeros(b, num_classes, dtype=torch.float64, device=neighbour_labels.device)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


class KNNHead(nn.Module):
    """Votes over the ``k`` nearest of a :class:`~knnsolver.bank.reference.ReferenceSet` of training embeddings.

    The reference set is refilled by :meth:`fit` before every evaluation (so
    it is not saved in ``state_dict``); its search index is built once per fill.
    Labels of classes beyond ``num_classes`` (added after training) widen the scores.
    """

    def __init__(self, num_classes: int, dim: int, k: int = 5, search: NeighbourSearch | None = None) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {k}")
        self.num_classes = num_classes
        self.k = int(k)
        self.reference = ReferenceSet(dim, search or ExactSearch(), persistent=False)

    def extra_repr(self) -> str:
        return f"k={self.k}"

    def fit(self, embeddings: Tensor, labels: Tensor) -> None:
        self.reference.set(embeddings.detach().float(), labels)
        if len(labels):
            self.num_classes = max(self.num_classes, int(labels.max()) + 1)

    @torch.no_grad()
    def scores(self, embeddings: Tensor) -> Tensor:
        if not self.reference.filled:
            raise RuntimeError("kNN prediction needs reference embeddings: call fit_reference(embeddings, labels) first")
        k = min(self.k, len(self.reference))
        _, idx = self.reference.search_knn(embeddings.float(), k)
        return knn_vote_scores(self.reference.labels[idx.long()], self.num_classes)
