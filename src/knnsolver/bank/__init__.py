"""Stored reference embeddings with their search index: the RBF bank and every solver's kNN reference set."""
from knnsolver.bank.embedding_bank import BANK_DTYPES, EmbeddingBank
from knnsolver.bank.reference import ReferenceSet

__all__ = ["BANK_DTYPES", "EmbeddingBank", "ReferenceSet"]
