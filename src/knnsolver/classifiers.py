"""Scikit-learn style classifiers over fixed embeddings, built on the solvers' functional cores."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from knnsolver.bank.reference import ReferenceSet
from knnsolver.constraints import check_choice, check_type
from knnsolver.errors import ConfigError, NonFiniteInputError
from knnsolver.functional.rbf import rbf_auto_sigma, rbf_log_probs
from knnsolver.interfaces import check_k
from knnsolver.registry import SEARCHES

__all__ = ["RBFClassifier"]


def _as_tensor(x: Any, what: str) -> Tensor:
    """``x`` as a float32 CPU tensor; non-numeric or complex input and values that are not finite in float32 are
    refused."""
    if (x.is_complex() if isinstance(x, Tensor) else np.iscomplexobj(x)):
        raise ConfigError(f"{what} takes real-valued X, got complex numbers; pass the real part (or the magnitudes)")
    try:
        if isinstance(x, Tensor):
            points = x.detach().float().cpu()
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are reported below
                points = torch.from_numpy(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} takes a numeric array, got {type(x).__name__} ({err})") from None
    if points.dim() == 2 and points.shape[1] == 0:
        raise ConfigError(f"{what} takes X with at least one feature, got shape {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        bad = int((~torch.isfinite(points)).reshape(len(points), -1).any(1).sum()) if points.dim() else 1
        raise NonFiniteInputError(f"{what} got {bad} row(s) of X holding NaN or inf (after the cast to float32); "
                                  "remove or impute them")
    return points


class RBFClassifier(ClassifierMixin, BaseEstimator):
    """Nearest-neighbour RBF classifier (Eq. 4 with unit weights) on fixed embeddings.

    ``P(c|x) = sum_{i in c ∩ N(x)} f(x, c_i) / sum_{j in N(x)} f(x, c_j)`` with
    ``f = exp(-||x - c||^2 / (2 sigma^2))`` over the ``k`` nearest training
    points ``N(x)``. ``sigma=0`` sets it at ``fit`` to the median distance from a
    training point to its nearest other one (as the RBF solver does).
    Accepts numpy arrays or torch tensors; labels may be any sortable values.

    Attributes after ``fit``: ``classes_`` (sorted labels), ``sigma_`` (the width
    used), ``n_features_in_``, ``reference_`` (the training points as a
    :class:`~knnsolver.bank.reference.ReferenceSet`: its search index is built
    once, at ``fit`` when sigma is automatic, else at the first prediction).
    """

    def __init__(self, k: int = 20, sigma: float = 0.0, search: str = "exact") -> None:
        self.k = k
        self.sigma = sigma
        self.search = search

    def fit(self, X: Any, y: Any) -> "RBFClassifier":
        """Store the training points and their labels; set ``sigma_``."""
        k = check_type("k", self.k, int)
        sigma = check_type("sigma", self.sigma, float)
        if sigma < 0:
            raise ConfigError(f"sigma must be >= 0 (0 = set automatically), got {self.sigma}")
        check_choice("search", self.search, SEARCHES.names())
        points = _as_tensor(X, "RBFClassifier.fit")
        labels = np.asarray(y.cpu() if isinstance(y, Tensor) else y)
        if points.dim() != 2 or labels.shape != (points.shape[0],):
            raise ConfigError(f"fit expects X of shape (n, d) and y of shape (n,), got {tuple(points.shape)} and {labels.shape}")
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise ConfigError("RBFClassifier.fit got NaN or infinite labels in y")
        check_classification_targets(labels)  # continuous y is refused, not made one class per value
        check_k(k, points.shape[0], excluding_self=False)
        self.classes_, codes = np.unique(labels, return_inverse=True)
        self.reference_ = ReferenceSet(points.shape[1], SEARCHES.build(self.search))
        self.reference_.set(points, torch.from_numpy(codes.astype(np.int64)))
        self.n_features_in_ = points.shape[1]
        self.sigma_ = sigma or rbf_auto_sigma(points, nearest=self.reference_.nearest_other)
        return self

    @torch.no_grad()
    def _log_proba(self, X: Any) -> Tensor:
        check_is_fitted(self, "classes_", msg="this %(name)s is not fitted yet: call fit(X, y) first")
        queries = _as_tensor(X, "RBFClassifier.predict")
        if queries.dim() != 2 or queries.shape[1] != self.n_features_in_:
            raise ConfigError(f"X must have shape (n, {self.n_features_in_}), got {tuple(queries.shape)}")
        if queries.shape[0] == 0:
            return torch.zeros(0, len(self.classes_))
        ref = self.reference_
        _, neighbours = ref.search_knn(queries, int(self.k))  # checked in fit; numpy ints become ints
        unit = torch.zeros(len(ref))
        return rbf_log_probs(queries, ref.embeddings, ref.labels, neighbours, unit, self.sigma_, len(self.classes_))

    def predict_proba(self, X: Any) -> np.ndarray:
        """``(n, n_classes)`` class probabilities, columns in ``classes_`` order."""
        return self._log_proba(X).exp().numpy()

    def predict(self, X: Any) -> np.ndarray:
        codes = self._log_proba(X).argmax(1).numpy()
        return self.classes_[codes]
