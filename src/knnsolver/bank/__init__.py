"""Stored embeddings (RBF centres) and their neighbour lists, refreshed during training."""
from knnsolver.bank.embedding_bank import BANK_DTYPES, EmbeddingBank

__all__ = ["BANK_DTYPES", "EmbeddingBank"]
