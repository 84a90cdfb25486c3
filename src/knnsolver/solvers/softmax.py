"""The softmax solver: a linear layer plus cross-entropy, the baseline every method is compared with."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from knnsolver.interfaces import Solver


class SoftmaxSolver(Solver):
    """``loss = CE(W x + b, y)``; ``predict`` returns the logits ``W x + b``."""

    def __init__(self, embedding_dim: int, num_classes: int, num_train: int = 0, *, label_smoothing: float = 0.0) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        self.label_smoothing = float(label_smoothing)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        return F.cross_entropy(self.classifier(embeddings), labels, label_smoothing=self.label_smoothing)

    def predict(self, embeddings: Tensor) -> Tensor:
        self.check_queries(embeddings)
        return self.classifier(embeddings)
