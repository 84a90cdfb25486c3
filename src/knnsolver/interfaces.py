"""The interfaces every part of knnsolver plugs into, kept in one place.

* :class:`Solver` -- the label-aware top of a network (loss plus classifier).
* :class:`EpochContext` -- what the trainer hands a solver at epoch boundaries.
* :class:`NeighbourSearch` -- an injected nearest-neighbour backend.

Datasets are plain ``torch.utils.data.Dataset`` objects whose items are
``(input, label, row_index)``; ``row_index`` is the sample's position in the
training set, so stateful solvers (an embedding bank) can address their rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from knnsolver.constraints import check_type
from knnsolver.errors import ConfigError, NonFiniteInputError
from knnsolver.hostsync import avoid_host_sync


@dataclass
class EpochContext:
    """What a solver sees at an epoch boundary.

    Attributes:
        epoch: zero-based index of the epoch about to start (or just finished).
        embed_train: computes ``(embeddings, labels)`` for every training row, in
            row order, with the network in eval mode, without augmentation and
            without gradient. Costly: call it only when needed (a bank refresh).
        num_train: number of training rows.
        device: where the solver's tensors live.
        num_epochs: the run's epoch count, for schedules that adapt to it (``None``: unknown).
    """

    epoch: int
    embed_train: Callable[[], tuple[Tensor, Tensor]]
    num_train: int
    device: torch.device = torch.device("cpu")
    num_epochs: int | None = None


class Solver(nn.Module):
    """Base class of every solver: an ``nn.Module`` holding a loss and a classifier.

    Subclasses implement :meth:`forward` (the loss) and :meth:`predict` (class
    scores). Stateful solvers keep their state in buffers or parameters so it is
    saved by ``state_dict`` and restored on resume.

    Class attributes:
        needs_balanced_sampler: the loss needs several samples per class per batch
            (pair/triplet losses); the trainer then uses the class-balanced sampler.
        predicts_by_knn: :meth:`predict` needs :meth:`fit_reference` to have been
            called with the training embeddings first.

    Geometry: :attr:`embedding_space` names the space the solver trains in and
    :meth:`transform` maps raw network outputs into it. The same transform serves
    the solver's own kNN prediction, the retrieval metrics of an evaluation,
    ``knnsolver embed`` and the benchmarks, so every solver is scored in the
    geometry it was trained for (``"euclidean"``: raw embeddings;
    ``"l2-normalised"``: unit vectors, i.e. cosine ranking; ``"mahalanobis"``:
    CRC's learned metric, as ``L x``).
    """

    needs_balanced_sampler: bool = False
    predicts_by_knn: bool = False
    embedding_space: str = "euclidean"
    # What predict returns: "logits" (a softmax makes them probabilities), "log-probabilities",
    # or "votes" (non-negative kNN votes, normalised to sum to 1); read by predict_proba.
    score_kind: str = "logits"
    # The training maths as a pure function of tensors, where a solver has one (see compile_loss).
    _step: Callable[..., Any] | None = None

    def __init__(self, embedding_dim: int, num_classes: int, num_train: int = 0) -> None:
        super().__init__()
        embedding_dim, num_classes = (check_type("embedding_dim", embedding_dim, int),
                                      check_type("num_classes", num_classes, int))
        num_train = check_type("num_train", num_train, int)
        if embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.num_train = int(num_train)

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        """Return the scalar training loss for a batch."""
        raise NotImplementedError

    def predict(self, embeddings: Tensor) -> Tensor:
        """Return class scores of shape ``(B, num_classes)``; argmax is the prediction."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_proba(self, embeddings: Tensor) -> Tensor:
        """Class probabilities ``(B, C)`` from :meth:`predict`'s scores, each row summing to 1.

        How depends on :attr:`score_kind`: a softmax of logits, the exponential of
        log-probabilities, or each class's share of the kNN votes.
        """
        scores = self.predict(embeddings).float()
        if self.score_kind == "log-probabilities":
            return scores.exp()
        if self.score_kind == "votes":
            return scores / scores.sum(1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        return torch.softmax(scores, dim=1)

    def extra_repr(self) -> str:
        """Sizes first; subclasses append their key settings (shown by ``print(solver)``)."""
        sizes = f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}"
        return sizes + (f", num_train={self.num_train}" if self.num_train else "")

    @classmethod
    def protocol_defaults(cls, split: str, pretrained: bool = False) -> dict[str, object]:
        """Option values the trainer uses on ``split`` unless the user set them (the papers' protocols);
        ``pretrained``: the network starts from trained weights (``--pretrained``), not random ones."""
        return {}

    def transform(self, embeddings: Tensor) -> Tensor:
        """Map raw embeddings into :attr:`embedding_space` (identity for ``"euclidean"``)."""
        if self.embedding_space == "l2-normalised":
            return torch.nn.functional.normalize(embeddings, dim=1)
        return embeddings

    def compile_loss(self, **options: Any) -> bool:
        """Run the training maths through ``torch.compile`` (``options`` are passed on); return whether it did.

        On a GPU this fuses a loss's dozens of small kernels into a few launches.
        Only a solver whose maths is a pure function (softmax, HAL, RBF) is
        compiled; its stateful parts (a bank, the diagnostics) stay eager, and
        the results equal the eager ones within float tolerance.
        """
        if self._step is None:
            return False
        self._step = torch.compile(self._step, **options)
        return True

    def check_batch(self, embeddings: Tensor, labels: Tensor, what: str = "the loss") -> Tensor:
        """Check a training batch (shape, dtype, non-empty; the label range where reading it costs no
        device synchronisation, :func:`~knnsolver.hostsync.avoid_host_sync`); return the labels as int64.

        Non-finite embeddings are not refused here: the loss propagates them, and
        the trainer's guard stops the run naming the epoch, step and likely cause.
        """
        check_embeddings(embeddings, self.embedding_dim, f"{type(self).__name__} {what}", values=False)
        return check_labels(labels, embeddings.shape[0], f"{type(self).__name__} {what}", self.num_classes,
                            values=not avoid_host_sync(embeddings.device))

    def check_reference(self, embeddings: Tensor, labels: Tensor, what: str = "fit_reference",
                        num_classes: int | None = -1) -> Tensor:
        """Check reference embeddings and labels in full (not on the training path); return the labels as int64.

        ``num_classes`` bounds the labels (default: the solver's; ``None``: only >= 0).
        """
        bound = self.num_classes if num_classes == -1 else num_classes
        check_embeddings(embeddings, self.embedding_dim, f"{type(self).__name__} {what}")
        return check_labels(labels, embeddings.shape[0], f"{type(self).__name__} {what}", bound)

    def check_queries(self, embeddings: Tensor, what: str = "predict") -> None:
        """Check query embeddings in full; zero rows are allowed (they get zero rows of scores)."""
        check_embeddings(embeddings, self.embedding_dim, f"{type(self).__name__} {what}", allow_empty=True)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Hook called before each training epoch (e.g. refresh a bank)."""

    def schedule_note(self, num_epochs: int) -> str | None:
        """One line saying how the solver adapts its own schedule to a run of ``num_epochs`` epochs, if it does."""
        return None

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Hook called after each training epoch; returns diagnostics to log."""
        return {}

    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        """Give the solver the training embeddings before prediction.

        The trainer calls this with fresh embeddings of the whole training set
        before every evaluation. Solvers that predict by kNN store them; others
        ignore them.
        """


class NeighbourIndex:
    """Points indexed once by :meth:`NeighbourSearch.build`, then searched any number of times.

    The index keeps its own float32 copy of the points (:attr:`points`, ``ntotal``
    rows), so later in-place changes to the caller's tensor do not reach it.
    Search-time knobs (IVF ``nprobe``, HNSW ``ef_search``, FANNG ``budget``) are
    attributes that may be changed between searches. Distances are squared
    Euclidean float32 and indices int32, nearest first.
    """

    def __init__(self, points: Tensor, device: torch.device) -> None:
        self.points = points
        self.device = device

    @property
    def ntotal(self) -> int:
        """Number of indexed points."""
        return int(self.points.shape[0])

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return ``(distances, indices)`` of shape ``(Q, k)``: each query's k nearest
        points, on the queries' device."""
        raise NotImplementedError

    def graph(self, k: int, rows: range | Tensor | None = None) -> Tensor:
        """Return int32 ``(len(rows), k)`` indices of each listed point's k nearest *other*
        points (``rows=None``: every point) on the device the points were built from.

        A shard of ``rows`` gets the same rows as the full graph, so processes can
        split the graph (``torch.distributed``) and gather the shards.
        """
        raise NotImplementedError


class NeighbourSearch:
    """Nearest-neighbour backend (squared Euclidean distance), injected into solvers.

    :meth:`build` indexes points and returns a :class:`NeighbourIndex`; hold it to
    search the same points many times. :meth:`knn_graph` and :meth:`search` build
    a throwaway index per call. Implementations must never materialise an
    ``N x N`` distance matrix for the all-points graph.
    """

    name: str = "base"

    def build(self, points: Tensor) -> NeighbourIndex:
        """Index ``(N, d)`` points."""
        raise NotImplementedError

    def knn_graph(self, points: Tensor, k: int) -> Tensor:
        """Return ``(N, k)`` int32 indices of each point's k nearest *other* points."""
        return self.build(points).graph(k)

    def search(self, queries: Tensor, points: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return ``(distances, indices)`` of shape ``(Q, k)``: squared distances and
        int32 indices of each query's k nearest points, nearest first."""
        return self.build(points).search(queries, k)


def check_embeddings(embeddings: Any, dim: int | None, what: str, *, values: bool = True,
                     allow_empty: bool = False) -> None:
    """Raise one clear error for embeddings that are not an ``(n, dim)`` floating-point tensor,
    that hold no rows (unless ``allow_empty``), or, with ``values``, that hold NaN or inf."""
    if not isinstance(embeddings, Tensor):
        raise ConfigError(f"{what} takes embeddings as a torch tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2 or (dim is not None and embeddings.shape[1] != dim):
        raise ConfigError(f"{what} takes embeddings of shape (n, {dim if dim is not None else 'd'}), "
                          f"got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ConfigError(f"{what} takes floating-point embeddings, got dtype {embeddings.dtype}")
    if embeddings.shape[0] == 0 and not allow_empty:
        raise ConfigError(f"{what} got an empty batch (0 rows); give it at least one row")
    if values and not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings)).any(1).sum())
        raise NonFiniteInputError(f"{what} got {bad} embedding row(s) holding NaN or inf; check the network "
                                  "and its inputs for inf/NaN, or lower the learning rate")


def _check_per_row_integers(values: Any, n: int, what: str, name: str, one: str, kind: str, hint: str = "") -> None:
    """Refuse, in one line, ``values`` that are not an ``(n,)`` integer tensor, one ``one`` per embedding row."""
    if not isinstance(values, Tensor):
        raise ConfigError(f"{what} takes {name} as a torch tensor, got {type(values).__name__}")
    if values.shape != (n,):
        raise ConfigError(f"{what} takes one {one} per embedding row, shape ({n},), got {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ConfigError(f"{what} takes integer {kind}, got dtype {values.dtype}{hint}")


def check_row_indices(row_indices: Tensor | None, n: int, what: str) -> Tensor | None:
    """``row_indices`` as int64 after checking they are an ``(n,)`` integer tensor, one training-set row per
    embedding (``None`` passes); their range is the caller's to check, where a read costs nothing."""
    if row_indices is None:
        return None
    _check_per_row_integers(row_indices, n, what, "row indices", "training-set row index", "row indices")
    return row_indices.long()


def check_rows_in_bank(row_indices: Tensor, labels: Tensor, bank_labels: Tensor, what: str) -> None:
    """Refuse row indices outside the bank's ``len(bank_labels)`` rows, or whose stored labels differ from the
    batch's ``labels`` (a host read: call it where reading costs nothing, or once per bank)."""
    n = bank_labels.shape[0]
    if row_indices.numel() and (int(row_indices.min()) < 0 or int(row_indices.max()) >= n):
        raise ConfigError(f"{what} row indices must lie in [0, {n}) (the bank's training rows); "
                          f"got {int(row_indices.min())}..{int(row_indices.max())}")
    if not torch.equal(bank_labels.index_select(0, row_indices.to(bank_labels.device)), labels.to(bank_labels.device)):
        raise ConfigError(f"{what} row indices do not match the bank: the stored labels at these rows differ from the "
                          "batch's; the dataset must yield each sample's position in the training set as its row index")


def check_labels(labels: Any, n: int, what: str, num_classes: int | None = None, values: bool = True) -> Tensor:
    """``labels`` as int64 after checking they are an ``(n,)`` integer tensor and, with ``values``,
    lie in ``[0, num_classes)`` (``num_classes`` None: only >= 0). Float labels are refused, not truncated."""
    _check_per_row_integers(labels, n, what, "labels", "label", "class labels",
                            "; convert them with .long() only if they are whole numbers")
    if values and n:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            valid = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ConfigError(f"{what} takes class labels {valid}, got labels from {low} to {high}")
    return labels.long()


def check_k(k: int, n: int, *, excluding_self: bool) -> None:
    """Raise a clear error when ``k`` neighbours cannot be found among ``n`` points."""
    available = n - 1 if excluding_self else n
    if k < 1:
        raise ConfigError(f"number of neighbours k must be >= 1, got {k}")
    if k > available:
        other = "other " if excluding_self else ""
        advice = (f"use k <= {available}" if available >= 1 else
                  f"the bank needs at least {2 if excluding_self else 1} points (training rows) for any neighbour")
        raise ConfigError(f"k={k} neighbours requested but only {max(available, 0)} {other}points are in the bank; {advice}")
