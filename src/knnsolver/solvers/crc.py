"""The DML-CRC solver: a collaborative representation classifier with a learned Mahalanobis metric."""
from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnsolver.bank.reference import ReferenceSet
from knnsolver.errors import ConfigError
from knnsolver.functional.crc import SOLVE_METHODS, class_layout, crc_logits
from knnsolver.hostsync import avoid_host_sync
from knnsolver.interfaces import EpochContext, Solver, check_row_indices, check_rows_in_bank

CRC_DICTIONARIES = ("batch", "bank")


class CRCSolver(Solver):
    """DML-CRC (Chakraborti et al. 2019; METHODS.md section 3, a reading), trained end to end.

    ``M = L^T L`` with ``L`` of shape ``(metric_dim, d)`` initialised to the
    (rectangular) identity; ridge codes ``alpha = argmin ||L(x - D a)||^2 + lam ||a||^2``,
    class residuals ``r_c = ||L(x - D_c alpha_c)||^2`` and ``loss = CE(softmax(-r / T), y)``
    (formulas in :mod:`knnsolver.functional.crc`). With ``normalize`` (default, as in
    CRC) queries and atoms are L2-normalised first.

    Dictionary while training:

    * ``"batch"`` (default): the batch codes itself, each query leaving out its own
      column (an exact leave-one-out by a rank-one update of one shared
      factorisation). Gradients flow through queries, atoms and ``L``.
    * ``"bank"``: the embeddings of the whole training set, refreshed by
      ``ctx.embed_train()`` every ``bank_refresh_every`` epochs (and by
      :meth:`fit_reference`), held without gradient. A query whose ``row_indices``
      are given leaves out its own bank row; gradients flow to queries and ``L``.
      Coding uses the push-through ``p x p`` system, O(N p^2 + B N p) per step.

    Geometry: ``embedding_space = "mahalanobis"``; :meth:`transform` maps
    ``x`` to ``L x'`` (``x'`` normalised with ``normalize``), where Euclidean
    distance is the learned metric ``(x' - z')^T M (x' - z')``.

    :meth:`predict` codes over the training embeddings given to :meth:`fit_reference`
    and returns ``-r / T``. A class with no atom in the dictionary gets ``r_c = ||x'||^2``.
    ``solve`` picks the ridge system (``auto``: push-through when the dictionary is
    larger than ``metric_dim``).

    Options:
        dictionary: what training queries are coded over: the ``batch`` itself or a ``bank`` of the training set.
        metric_dim: rows of the learned metric ``L``; none = the embedding size.
        lam: ridge weight of the codes (larger: smoother, less exact codes).
        temperature: softmax temperature over the negative class residuals.
        normalize: L2-normalise queries and atoms before coding, as CRC does.
        bank_refresh_every: re-embed the training set into the bank every this many epochs (``bank`` only).
        solve: which ridge system codes the queries; ``auto`` picks the cheaper one.
    """

    predicts_by_knn = True  # predict needs the training dictionary from fit_reference
    embedding_space = "mahalanobis"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        dictionary: Annotated[str, CRC_DICTIONARIES] = "batch",
        metric_dim: int | None = None,
        lam: float = 0.1,
        temperature: float = 0.05,
        normalize: bool = True,
        bank_refresh_every: int = 1,
        solve: Annotated[str, SOLVE_METHODS] = "auto",
    ) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        if dictionary not in CRC_DICTIONARIES:
            raise ConfigError(f"unknown dictionary {dictionary!r} for crc; choose one of: {', '.join(CRC_DICTIONARIES)}")
        if solve not in SOLVE_METHODS:
            raise ConfigError(f"unknown solve {solve!r} for crc; choose one of: {', '.join(SOLVE_METHODS)}")
        if not lam > 0:
            raise ConfigError(f"crc ridge lam must be > 0, got {lam}; try lam=0.1")
        if not temperature > 0:
            raise ConfigError(f"crc temperature must be > 0, got {temperature}; try temperature=0.05")
        if bank_refresh_every < 1:
            raise ConfigError(f"bank_refresh_every must be >= 1 epoch, got {bank_refresh_every}")
        metric_dim = embedding_dim if metric_dim is None else metric_dim
        if metric_dim < 1:
            raise ConfigError(f"metric_dim must be >= 1, got {metric_dim}; leave it unset for metric_dim = embedding_dim")
        self.dictionary = dictionary
        self.lam, self.temperature = float(lam), float(temperature)
        self.normalize = normalize
        self.bank_refresh_every = int(bank_refresh_every)
        self.solve = solve
        self.metric = nn.Parameter(torch.eye(metric_dim, embedding_dim))
        # The coded-over embeddings. A bank is training state between its refreshes, so a checkpoint keeps it
        # (a resumed run codes over the saved bank); the batch dictionary's is refilled before every prediction.
        self.dictionary_set = ReferenceSet(embedding_dim, persistent=dictionary == "bank")
        self._layout: tuple[Tensor, Tensor] | None = None  # the dictionary's class table (functional.crc.class_layout)
        self._rows_checked = False  # on an accelerator, row indices are checked once per dictionary (a host read)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._layout, self._rows_checked = None, False  # a loaded dictionary is read afresh

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, dictionary={self.dictionary}, metric_dim={self.metric.shape[0]}, "
                f"lam={self.lam:g}, temperature={self.temperature:g}, normalize={self.normalize}, solve={self.solve}")

    @property
    def atoms(self) -> Tensor:
        """The dictionary's embeddings (prepared: normalised with ``normalize``)."""
        return self.dictionary_set.embeddings

    @property
    def atom_labels(self) -> Tensor:
        return self.dictionary_set.labels

    def _prepare(self, embeddings: Tensor) -> Tensor:
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings

    def transform(self, embeddings: Tensor) -> Tensor:
        """``L x'``: the space whose Euclidean distance is the learned Mahalanobis metric."""
        return self._prepare(embeddings) @ self.metric.T

    def _logits(self, queries: Tensor, atoms: Tensor, atom_labels: Tensor, exclude: Tensor | None,
                layout: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return crc_logits(queries, atoms, atom_labels, self.metric, self.lam, self.temperature, self.num_classes,
                          exclude=exclude, method=self.solve, layout=layout)

    def _require_atoms(self, what: str) -> None:
        if self.atoms.shape[0] == 0:
            raise RuntimeError(f"crc {what} needs the training embeddings: call fit_reference(embeddings, labels) first")

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        x = self._prepare(embeddings.to(self.metric.dtype))
        if self.dictionary == "batch":
            logits = self._logits(x, x, labels, torch.arange(x.shape[0], device=x.device))
        else:
            self._require_atoms("with dictionary='bank'")
            exclude = check_row_indices(row_indices, labels.shape[0], "CRCSolver")
            if exclude is not None and (not avoid_host_sync(exclude.device) or not self._rows_checked):
                check_rows_in_bank(exclude, labels, self.atom_labels, "CRCSolver")
                self._rows_checked = True
            logits = self._logits(x, self.atoms, self.atom_labels, exclude, self.class_table())
        return F.cross_entropy(logits, labels)

    def class_table(self) -> tuple[Tensor, Tensor]:
        """The dictionary's class table, made once per change of the dictionary (not at every step)."""
        if self._layout is None:
            self._layout = class_layout(self.atom_labels)
        return self._layout

    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        labels = self.check_reference(embeddings, labels)
        self.dictionary_set.set(self._prepare(embeddings.detach().to(self.metric.dtype)), labels)
        self._layout, self._rows_checked = None, False

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.dictionary == "bank" and (ctx.epoch % self.bank_refresh_every == 0 or self.atoms.shape[0] == 0):
            self.fit_reference(*ctx.embed_train())

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> Tensor:
        """``-r / T`` over the training dictionary, queries coded 256 at a time."""
        self.check_queries(embeddings)
        self._require_atoms("prediction")
        x = self._prepare(embeddings.to(self.metric.dtype))
        return torch.cat([self._logits(q, self.atoms, self.atom_labels, None, self.class_table()) for q in x.split(256)])
