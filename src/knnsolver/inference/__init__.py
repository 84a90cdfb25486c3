"""Using a trained model: :func:`load` a run or saved model, then predict, search, add classes, save and export."""
from knnsolver.inference.model import KnnModel, SearchResult, load
from knnsolver.inference.openset import UNKNOWN, RejectThreshold, reject_threshold

__all__ = ["UNKNOWN", "KnnModel", "RejectThreshold", "SearchResult", "load", "reject_threshold"]
