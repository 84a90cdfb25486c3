"""Compute embeddings of a whole dataset: eval mode, no gradient, large batches."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def embed_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Return ``(embeddings, labels)`` for every item of ``dataset`` in order.

    The model is put in eval mode (no dropout, BatchNorm running statistics) and
    restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    embs, labels = [], []
    try:
        for x, y, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            embs.append(model(x.to(device)).float())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(embs), torch.cat(labels).long().to(device)
