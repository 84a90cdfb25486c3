"""Embedding extraction and evaluation of trained runs."""
from knnsolver.evaluation.embed import embed_dataset
from knnsolver.evaluation.evaluate import retrieval_summary, solver_accuracy

__all__ = ["embed_dataset", "retrieval_summary", "solver_accuracy"]
