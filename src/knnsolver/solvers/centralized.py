"""Normalize-Scale layer with the decorrelated global centralized ranking loss."""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError
from knnsolver.functional.centralized import (
    RANKING_FORMS,
    centralized_ranking_loss,
    centre_sq_distances,
    gram_schmidt,
    normalize_scale,
)
from knnsolver.interfaces import Solver
from knnsolver.solvers.knn import KNNHead

CENTRALIZED_PREDICT = ("centre", "knn")


class CentralizedSolver(Solver):
    """Zheng, Ji et al. (AAAI 2019; METHODS.md section 4, a reading).

    * Normalize-Scale: ``x̂ = s x / ||x||``; ``s = scale``, learnable (as ``log s``)
      with ``learn_scale``.
    * Centres: one learnable parameter row ``c_k`` per class (the weight rows of the
      classifier the method starts from), trained by the optimiser with the network
      and used through the same layer, ``ĉ_k = s c_k / ||c_k||``, so samples and
      centres share the radius-``s`` sphere and ``||x̂ - ĉ||^2 = 2 s^2 - 2 x̂.ĉ``.
    * Loss: ``sum_{k != y} g(margin + ||x̂ - ĉ_y||^2 - ||x̂ - ĉ_k||^2)``, batch mean,
      ``g`` = hinge (``form="hinge"``, default) or softplus.
    * Decorrelation: the centres are orthonormalised by Gram-Schmidt (in class order)
      at construction and then every ``decorrelate_every`` training steps (forward
      calls in training mode; 0 = only at construction), in place, before the step's
      loss is computed. The loss reads a copy of the centres, so gradients accumulated
      over several forwards before one backward stay those of the centres each forward used.
    * ``d < C``: exact orthogonality is impossible, so construction raises
      :class:`ConfigError` unless ``allow_correlated=True``; then only the first ``d``
      centres are orthonormalised and the other ``C - d`` stay as they are (learnt,
      correlated).

    Geometry: ``embedding_space = "l2-normalised"``; :meth:`transform` is the
    Normalize-Scale layer (unit vectors times ``s``, the same ranking).

    ``predict_by="centre"`` (default) scores ``-||x̂ - ĉ_k||^2`` (nearest centre);
    ``predict_by="knn"`` votes among the ``knn_k`` nearest training ``x̂``.

    Options:
        scale: radius ``s`` of the sphere samples and centres are put on.
        learn_scale: learn the radius with the network.
        margin: ranking margin between the true centre's distance and each other centre's.
        form: penalty of a margin violation, ``hinge`` or ``softplus``.
        decorrelate_every: orthonormalise the class centres every this many training steps; 0 = only at construction.
        allow_correlated: allow more classes than embedding dimensions (only the first ``d`` centres are decorrelated).
        predict_by: ``centre`` picks the nearest class centre, ``knn`` votes among the nearest training embeddings.
        knn_k: neighbours that vote with ``predict_by=knn``.
    """

    embedding_space = "l2-normalised"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        scale: float = 4.0,
        learn_scale: bool = False,
        margin: float = 4.0,
        form: Annotated[str, RANKING_FORMS] = "hinge",
        decorrelate_every: int = 10,
        allow_correlated: bool = False,
        predict_by: Annotated[str, CENTRALIZED_PREDICT] = "centre",
        knn_k: int = 5,
    ) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        if not scale > 0:
            raise ConfigError(f"centralized scale must be > 0, got {scale}; try scale=4")
        if not margin > 0:
            raise ConfigError(f"centralized margin must be > 0, got {margin}; try margin=4 (about scale**2 / 4)")
        if form not in RANKING_FORMS:
            raise ConfigError(f"unknown form {form!r} for centralized; choose one of: {', '.join(RANKING_FORMS)}")
        if decorrelate_every < 0:
            raise ConfigError(f"decorrelate_every must be >= 0 steps (0: only at construction), got {decorrelate_every}")
        if predict_by not in CENTRALIZED_PREDICT:
            raise ConfigError(
                f"unknown predict_by {predict_by!r} for centralized; choose one of: {', '.join(CENTRALIZED_PREDICT)}"
            )
        if num_classes > embedding_dim and not allow_correlated:
            raise ConfigError(
                f"{num_classes} class centres cannot be orthogonal in {embedding_dim} dimensions; "
                f"use embedding_dim >= {num_classes}, or allow_correlated=True to decorrelate only the first {embedding_dim}"
            )
        self.margin, self.form = float(margin), form
        self.decorrelate_every = int(decorrelate_every)
        self.predict_by = predict_by
        self.predicts_by_knn = predict_by == "knn"
        self.score_kind = "votes" if self.predicts_by_knn else "logits"
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)
        self.centres = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._steps = 0
        self.knn = KNNHead(num_classes, embedding_dim, knn_k)
        self.decorrelate()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = int(self.steps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scale={self.scale.item():.4g}, margin={self.margin:g}, form={self.form}, "
                f"decorrelate_every={self.decorrelate_every}, predict_by={self.predict_by}, knn_k={self.knn.k}")

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def decorrelate(self) -> None:
        """Gram-Schmidt on the first ``min(C, d)`` centres, in place."""
        first = min(self.num_classes, self.embedding_dim)
        self.centres[:first] = gram_schmidt(self.centres[:first])

    def transform(self, embeddings: Tensor) -> Tensor:
        """The Normalize-Scale layer, ``x̂ = s x / ||x||``."""
        return normalize_scale(embeddings, self.scale)

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        embeddings = embeddings.to(self.centres.dtype)  # the solver's precision (gradients flow back)
        if self.training:
            self._steps += 1  # counted on the host (no device read per step), mirrored in the saved buffer
            self.steps.fill_(self._steps)
            if self.decorrelate_every and self._steps % self.decorrelate_every == 0:
                self.decorrelate()
        # Through a copy of the centres, so a later forward's decorrelation (in place) leaves this step's graph
        # intact: gradient accumulation over several forwards before one backward.
        centres = self.transform(self.centres.clone())
        return centralized_ranking_loss(self.transform(embeddings), labels, centres, self.margin, self.form)

    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        if self.predicts_by_knn:
            labels = self.check_reference(embeddings, labels)
            self.knn.fit(self.transform(embeddings.detach().to(self.centres.dtype)), labels)

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> Tensor:
        self.check_queries(embeddings)
        x = self.transform(embeddings.to(self.centres.dtype))
        if self.predicts_by_knn:
            return self.knn.scores(x)
        return -centre_sq_distances(x, self.transform(self.centres))
