"""The softmax solver: a linear layer plus cross-entropy, the baseline every method is compared with."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from knnsolver.constraints import check_type
from knnsolver.errors import ConfigError
from knnsolver.interfaces import Solver


def softmax_loss(embeddings: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``CE(W x + b, y)``, mean over the batch."""
    return F.cross_entropy(F.linear(embeddings, weight, bias), labels, label_smoothing=label_smoothing)


class SoftmaxSolver(Solver):
    """``loss = CE(W x + b, y)``; ``predict`` returns the logits ``W x + b``.

    Options:
        label_smoothing: share of each target's probability spread evenly over all classes, in [0, 1) (0: none;
            1 would make every target uniform, so nothing would be learned).
    """

    def __init__(self, embedding_dim: int, num_classes: int, num_train: int = 0, *, label_smoothing: float = 0.0) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        smoothing = check_type("label_smoothing", label_smoothing, float)
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"softmax label_smoothing must be in [0, 1), got {label_smoothing}; try label_smoothing=0.1")
        self.label_smoothing = float(smoothing)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self._step = softmax_loss

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        embeddings = embeddings.to(self.classifier.weight.dtype)  # the solver's precision (gradients flow back)
        return self._step(embeddings, self.classifier.weight, self.classifier.bias, labels, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing:g}"

    def predict(self, embeddings: Tensor) -> Tensor:
        self.check_queries(embeddings)
        return self.classifier(embeddings.to(self.classifier.weight.dtype))
