"""The embedding bank: one stored RBF centre per training row, plus its neighbour lists."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from knnsolver import distributed
from knnsolver.bank.reference import BANK_DTYPES, ReferenceSet
from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch, check_k

__all__ = ["BANK_DTYPES", "EmbeddingBank"]


class EmbeddingBank(ReferenceSet):
    """Stored centres ``(R, d)``, their labels ``(R,)`` and each training row's neighbours ``(T, k)`` int32.

    A :class:`~knnsolver.bank.reference.ReferenceSet` whose rows ``0 .. T-1``
    (``T = num_rows``) are the training rows, addressed by the dataset's row
    indices; rows ``T ..`` are centres added later with :meth:`append` (used for
    prediction only; no neighbour list). All state is in buffers, so
    ``state_dict`` / ``load_state_dict`` save and restore a filled bank (buffers
    are resized to the saved shapes, added rows included).

    The bank owns its search index (built once per change of the centres, by the
    injected :class:`~knnsolver.interfaces.NeighbourSearch`) and its collectives:
    :meth:`refresh` takes the full ``(T, d)`` table (under ``torch.distributed``
    the trainer embeds one shard of rows per process and all-gathers them,
    ``Run.embed_all``, the pass evaluation shares), the neighbour graph is sharded
    the same way (each process asks the index for the graph of its rows, then the
    shards are all-gathered), and :meth:`write_batch` gathers every process's
    online update, so every process holds the same bank.
    """

    neighbours: Tensor

    def __init__(
        self, num_rows: int, dim: int, k: int = 0, *, dtype: str = "float32", search: NeighbourSearch | None = None
    ) -> None:
        super().__init__(dim, search, dtype=dtype)
        if k:
            check_k(k, num_rows, excluding_self=True)
        self.num_rows, self.k = int(num_rows), int(k)
        self.register_buffer("neighbours", torch.empty(0, k, dtype=torch.int32))

    @property
    def centres(self) -> Tensor:
        """Every stored centre, ``(R, d)``: the training rows, then any added ones."""
        return self.embeddings

    @property
    def training_centres(self) -> Tensor:
        """The ``(T, d)`` centres of the training rows (added centres left out)."""
        return self.embeddings[: self.num_rows]

    @property
    def training_labels(self) -> Tensor:
        """The ``(T,)`` labels of the training rows."""
        return self.labels[: self.num_rows]

    def _check_table(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ConfigError(f"bank expects (rows, {self.dim}) embeddings, got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] != self.num_rows or labels.shape != (self.num_rows,):
            raise ConfigError(
                f"the bank has num_train={self.num_rows} rows but got {embeddings.shape[0]} embeddings and "
                f"{labels.numel()} labels; build the solver with num_train = the training-set size"
            )

    @torch.no_grad()
    def set_centres(self, embeddings: Tensor, labels: Tensor) -> None:
        """Replace the training rows' centres and labels (added rows are kept); neighbour lists unchanged."""
        self._check_table(embeddings, labels)
        labels = labels.detach().long().to(embeddings.device)
        if self.filled:
            extra = self.embeddings[self.num_rows :].to(embeddings.device, embeddings.dtype)
            embeddings = torch.cat([embeddings.detach(), extra])
            labels = torch.cat([labels, self.labels[self.num_rows :].to(labels.device)])
        self.set(embeddings, labels)

    @torch.no_grad()
    def refresh(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store fresh centres, then recompute each training row's ``k`` nearest other training rows."""
        self.set_centres(embeddings, labels)
        if self.k:
            self.neighbours = self._knn_graph()

    def _knn_graph(self) -> Tensor:
        """The index's graph of the training rows; under ``torch.distributed`` each process
        asks for its shard of rows and the shards are all-gathered (1 / world_size of the work each)."""
        index = self.index(self.num_rows)
        if not distributed.is_distributed():
            return index.graph(self.k).to(torch.int32)
        return distributed.all_gather_rows(index.graph(self.k, rows=distributed.shard(self.num_rows)).to(torch.int32))

    @torch.no_grad()
    def write_batch(self, rows: Tensor, embeddings: Tensor) -> None:
        """Overwrite the training ``rows`` of this step's batch with its ``embeddings`` (online update).

        Under ``torch.distributed`` a collective: every process's rows and embeddings are
        all-gathered and every process writes them all, so the banks stay equal. The
        gather reads the processes' row counts on the host (batches may differ in size),
        one read per step; a single process reads nothing.
        """
        self.write(distributed.all_gather_rows(rows), distributed.all_gather_rows(embeddings))

    def search_training(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Each query's ``k`` nearest training centres (added centres left out)."""
        return self.search_knn(queries, k, rows=self.num_rows)

    @torch.no_grad()
    def append(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add centres after the training rows; they take part in prediction only."""
        if not self.filled:
            raise RuntimeError("the bank is empty: fill it (train, or call fit_reference) before adding centres")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or labels.shape != (embeddings.shape[0],):
            raise ConfigError(
                f"add_centres expects (n, {self.dim}) embeddings and (n,) labels, "
                f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        super().append(embeddings, labels)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "neighbours")
        if saved is not None:
            self.neighbours = torch.empty(saved.shape, dtype=self.neighbours.dtype, device=self.neighbours.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
