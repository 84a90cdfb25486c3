"""The HAL solver: hypersphere anchor loss, predicting by kNN or by nearest anchor."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError
from knnsolver.functional.hal import hal_logits, hal_loss
from knnsolver.interfaces import Solver
from knnsolver.solvers.knn import KNNHead

HAL_PREDICT = ("knn", "anchor")


class HALSolver(Solver):
    """Hypersphere anchor loss (Ye et al. 2023; METHODS.md section 2, a reading).

    One learnable anchor ``a_c`` per class (initialised from a standard normal, used
    only through ``â_c = a_c / ||a_c||``) inside an NCA softmax over sample-to-anchor
    distances on the unit sphere::

        loss(x) = -log softmax_c(-||x̂ - â_c||^2 / tau)[y],   ||x̂ - â||^2 = 2 - 2 cos(x, a)

    Under this reading HAL coincides with pytorch-metric-learning's ``ProxyNCALoss``
    with ``softmax_scale = 1 / tau`` (normalised proxies, true class in the
    denominator); the two differ only in initialisation and defaults.

    ``predict_by="knn"`` (default; HAL is a loss for kNN classifiers) votes among the
    ``knn_k`` nearest L2-normalised training embeddings given to :meth:`fit_reference`;
    ``predict_by="anchor"`` returns the logits above (nearest anchor wins, no reference needed).

    Options:
        tau: temperature of the softmax over sample-to-anchor distances (smaller: sharper).
        predict_by: ``knn`` votes among the nearest training embeddings, ``anchor`` picks the nearest class anchor.
        knn_k: neighbours that vote in kNN prediction.
    """

    predicts_by_knn = True
    embedding_space = "l2-normalised"
    score_kind = "votes"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        tau: float = 0.1,
        predict_by: Annotated[str, HAL_PREDICT] = "knn",
        knn_k: int = 5,
    ) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        if not tau > 0:
            raise ConfigError(f"HAL temperature tau must be > 0, got {tau}; try tau=0.1")
        if predict_by not in HAL_PREDICT:
            raise ConfigError(f"unknown predict_by {predict_by!r} for hal; choose one of: {', '.join(HAL_PREDICT)}")
        self.tau = float(tau)
        self.predict_by = predict_by
        self.predicts_by_knn = predict_by == "knn"
        self.score_kind = "votes" if self.predicts_by_knn else "logits"
        self.anchors = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.knn = KNNHead(num_classes, embedding_dim, knn_k)
        self._step = hal_loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau:g}, predict_by={self.predict_by}, knn_k={self.knn.k}"

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        return self._step(embeddings, labels, self.anchors, self.tau)  # hal_loss computes in the anchors' dtype

    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        if self.predicts_by_knn:
            labels = self.check_reference(embeddings, labels)
            self.knn.fit(self.transform(embeddings.detach().to(self.anchors.dtype)), labels)

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> Tensor:
        self.check_queries(embeddings)
        embeddings = embeddings.to(self.anchors.dtype)
        if self.predict_by == "knn":
            return self.knn.scores(self.transform(embeddings))
        return hal_logits(embeddings, self.anchors, self.tau)
