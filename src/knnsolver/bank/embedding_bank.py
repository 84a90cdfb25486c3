"""The embedding bank: one stored RBF centre per training row, plus its neighbour lists."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from knnsolver import distributed
from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourSearch, check_k
from knnsolver.search.common import drop_own_rows
from knnsolver.search.exact import ExactSearch

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class EmbeddingBank(nn.Module):
    """Stored centres ``(R, d)``, their labels ``(R,)`` and each training row's neighbours ``(T, k)`` int32.

    Rows ``0 .. T-1`` (``T = num_rows``) are the training rows, addressed by the
    dataset's row indices; rows ``T ..`` are centres added later with
    :meth:`append` (used for prediction only; no neighbour list). All state is in
    buffers, so ``state_dict`` / ``load_state_dict`` save and restore a filled
    bank (buffers are resized to the saved shapes, added rows included).

    Seams for later backends: the neighbour graph comes from the injected
    :class:`~knnsolver.interfaces.NeighbourSearch` (``knn_graph``), so faiss or
    FANNG plug in through ``search=``; :meth:`refresh` takes the full ``(T, d)``
    table: under ``torch.distributed`` the trainer embeds one shard of rows per
    process and all-gathers them into that table (``Run.embed_all``), and the
    neighbour graph is sharded the same way, so every process holds the same bank.
    """

    centres: Tensor
    labels: Tensor
    neighbours: Tensor

    def __init__(
        self, num_rows: int, dim: int, k: int = 0, *, dtype: str = "float32", search: NeighbourSearch | None = None
    ) -> None:
        super().__init__()
        if dtype not in BANK_DTYPES:
            raise ConfigError(f"unknown bank dtype {dtype!r}; choose one of: {', '.join(BANK_DTYPES)}")
        if k:
            check_k(k, num_rows, excluding_self=True)
        self.num_rows, self.dim, self.k = int(num_rows), int(dim), int(k)
        self.search = search or ExactSearch()
        store = BANK_DTYPES[dtype]
        self.register_buffer("centres", torch.empty(0, dim, dtype=store))
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))
        self.register_buffer("neighbours", torch.empty(0, k, dtype=torch.int32))

    @property
    def filled(self) -> bool:
        return self.labels.numel() > 0

    @property
    def training_centres(self) -> Tensor:
        """The ``(T, d)`` centres of the training rows (added centres left out)."""
        return self.centres[: self.num_rows]

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
        new = embeddings.detach().to(self.centres.dtype, copy=True)  # never alias the caller's tensor
        labels = labels.detach().long().to(new.device)
        if self.filled:
            new = torch.cat([new, self.centres[self.num_rows :].to(new.device)])
            labels = torch.cat([labels, self.labels[self.num_rows :].to(new.device)])
        self.centres, self.labels = new, labels

    @torch.no_grad()
    def refresh(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store fresh centres, then recompute each training row's ``k`` nearest other training rows."""
        self.set_centres(embeddings, labels)
        if self.k:
            self.neighbours = self._knn_graph(self.training_centres)

    def _knn_graph(self, centres: Tensor) -> Tensor:
        """The backend's ``knn_graph``; under ``torch.distributed`` each process searches
        its shard of rows (``k + 1`` neighbours, own row dropped) and the shards are
        all-gathered, so the graph costs each process 1 / world_size of it."""
        if not distributed.is_distributed():
            return self.search.knn_graph(centres, self.k).to(torch.int32)
        mine = distributed.shard(centres.shape[0])
        own = torch.arange(mine.start, mine.stop, device=centres.device)
        found = self.search.search(centres[mine.start : mine.stop], centres, self.k + 1)[1].long()
        return distributed.all_gather_rows(drop_own_rows(found, own).to(torch.int32))

    @torch.no_grad()
    def write(self, rows: Tensor, embeddings: Tensor) -> None:
        """Overwrite the centres of training ``rows`` in place (the online update).

        A row given more than once (a class-balanced batch repeats rows) takes its
        last embedding: indexed assignment with repeated indices has no defined
        order, and every process must write the same bank.
        """
        rows = rows.long()
        unique, inverse = torch.unique(rows, return_inverse=True)
        position = torch.arange(len(rows), device=rows.device)
        last = torch.full_like(unique, -1).scatter_reduce(0, inverse, position, "amax")
        self.centres[unique] = embeddings.detach()[last].to(self.centres.dtype)

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
        dev = self.centres.device
        self.centres = torch.cat([self.centres, embeddings.detach().to(dev, self.centres.dtype)])
        self.labels = torch.cat([self.labels, labels.detach().long().to(dev)])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Resize the buffers to the saved shapes (an empty bank, or one with added rows).
        for name in ("centres", "labels", "neighbours"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                own = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
