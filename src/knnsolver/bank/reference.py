"""The reference set: labelled embeddings plus the neighour-search index built from them.

One component for every store of reference embeddings in the library: the RBF
solver's bank, the kNN heads of HAL, centralized and the pytorch-metric-learning
baselines, CRC's dictionary and :class:`~knnsolver.classifiers.RBFClassifier`.
It follows faiss's index life-cycle: the index is built from the current
embeddings once (``search.build(points)``), on first use, and dropped whenever
the embeddings change, so searching a fixed set batch after batch builds it
once.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from knnsolver.errors import ConfigError
from knnsolver.interfaces import NeighbourIndex, NeighbourSearch
from knnsolver.search.common import drop_own_rows
from knnsolver.search.exact import ExactSearch

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ReferenceSet(nn.Module):
    """``(R, d)`` embeddings and ``(R,)`` labels in buffers, searched through an index built once per change.

    Args:
        dim: embedding size.
        search: the backend whose ``build`` makes the index (exact search by default).
        dtype: storage of the embeddings, ``float32`` or ``float16`` (the index computes in float32).
        persistent: whether ``state_dict`` saves the embeddings (a bank does; a kNN head
            refilled before every prediction does not).

    ``builds`` counts the indexes built, so callers and tests can check that an
    index is built once per change, not once per search.
    """

    embeddings: Tensor
    labels: Tensor

    def __init__(self, dim: int, search: NeighbourSearch | None = None, *, dtype: str = "float32",
                 persistent: bool = True) -> None:
        super().__init__()
        if dtype not in BANK_DTYPES:
            raise ConfigError(f"unknown bank dtype {dtype!r}; choose one of: {', '.join(BANK_DTYPES)}")
        self.dim = int(dim)
        self.search = search or ExactSearch()
        self.register_buffer("embeddings", torch.empty(0, dim, dtype=BANK_DTYPES[dtype]), persistent=persistent)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=persistent)
        self._index: NeighbourIndex | None = None
        self._index_rows = 0
        self.builds = 0

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def filled(self) -> bool:
        return len(self) > 0

    def _changed(self) -> None:
        self._index = None

    @torch.no_grad()
    def set(self, embeddings: Tensor, labels: Tensor) -> None:
        """Replace the whole set (a copy: later changes to the caller's tensors do not reach it)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or labels.shape != (embeddings.shape[0],):
            raise ConfigError(f"a reference set takes (n, {self.dim}) embeddings and (n,) labels, "
                              f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
        self.embeddings = embeddings.detach().to(self.embeddings.dtype, copy=True)
        self.labels = labels.detach().long().to(self.embeddings.device)
        self._changed()

    @torch.no_grad()
    def append(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add rows after the current ones."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim or labels.shape != (embeddings.shape[0],):
            raise ConfigError(f"appending to a reference set takes (n, {self.dim}) embeddings and (n,) labels, "
                              f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
        dev = self.embeddings.device
        self.embeddings = torch.cat([self.embeddings, embeddings.detach().to(dev, self.embeddings.dtype)])
        self.labels = torch.cat([self.labels, labels.detach().long().to(dev)])
        self._changed()

    @torch.no_grad()
    def write(self, rows: Tensor, embeddings: Tensor) -> None:
        """Overwrite ``rows`` in place; a row given more than once takes its last embedding.

        Indexed writes with repeats have no defined order (and every process must
        agree), so each repeat writes that same last embedding. Fixed shapes, no
        ``unique``: nothing here waits on the host when called at every step on a GPU.
        """
        dev = self.embeddings.device
        rows = rows.to(dev).long()
        position = torch.arange(len(rows), device=dev)
        last = torch.full((len(self),), -1, dtype=torch.long, device=dev).scatter_reduce_(0, rows, position, "amax")
        source = embeddings.detach().to(dev).index_select(0, last.index_select(0, rows))
        self.embeddings.index_copy_(0, rows, source.to(self.embeddings.dtype))
        self._changed()

    def index(self, rows: int | None = None) -> NeighbourIndex:
        """The index of the first ``rows`` embeddings (all by default), built now if the set changed since."""
        rows = len(self) if rows is None else int(rows)
        if not self.filled:
            raise RuntimeError("the reference set is empty: fill it (fit_reference, or a bank refresh) first")
        if self._index is None or self._index_rows != rows:
            self._index = self.search.build(self.embeddings[:rows])
            self._index_rows = rows
            self.builds += 1
        return self._index

    def search_knn(self, queries: Tensor, k: int, rows: int | None = None) -> tuple[Tensor, Tensor]:
        """Squared distances and int32 indices of each query's ``k`` nearest among the first ``rows`` embeddings."""
        return self.index(rows).search(queries.detach(), k)

    def nearest_other(self, own: Tensor, rows: int | None = None) -> Tensor:
        """Each of the embeddings ``own``'s nearest other one among the first ``rows`` (all by default): a
        2-neighbour search of the set's own index, the row itself dropped."""
        found = self.search_knn(self.embeddings.index_select(0, own), 2, rows)[1]
        return drop_own_rows(found.long(), own.to(found.device))[:, 0]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_index"] = None  # rebuilt on first use (a faiss index does not pickle)
        return state

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], *args: Any) -> None:
        if prefix + "centres" in state_dict and prefix + "embeddings" not in state_dict:
            state_dict[prefix + "embeddings"] = state_dict.pop(prefix + "centres")  # saved before 2026-11-29
        keys = [prefix + "embeddings", prefix + "labels"]
        unsaved = not any(k in state_dict for k in keys)
        # Resize the buffers to the saved shapes (an empty set, or one with appended rows).
        for name in ("embeddings", "labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                own = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        if unsaved:  # saved while the set was not kept (crc's bank before 2026-11-30): it loads empty, to be refilled
            missing_keys[:] = [k for k in missing_keys if k not in keys]
            self.set(self.embeddings[:0], self.labels[:0])
        self._changed()
