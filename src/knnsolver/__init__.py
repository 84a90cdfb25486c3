"""knnsolver: solvers (loss + classifier) for deep nearest-neighbour classification and retrieval.

Solvers are built by name from :data:`knnsolver.registry.SOLVERS` or imported from
``knnsolver.solvers.<name>``; their maths lives in :mod:`knnsolver.functional`.
Training runs through :func:`knnsolver.training.train` or the ``knnsolver`` command;
:func:`load` turns a finished run into a model that predicts, searches and grows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knnsolver.registry import DATASETS, MODELS, SEARCHES, SOLVERS

if TYPE_CHECKING:
    from pathlib import Path

    from knnsolver.inference import KnnModel
    from knnsolver.interfaces import EpochContext, NeighbourSearch, Solver

__version__ = "0.1.0"
__all__ = ["EpochContext", "NeighbourSearch", "Solver", "DATASETS", "MODELS", "SEARCHES", "SOLVERS", "load",
           "__version__"]


def load(path: str | Path, device: str = "cpu") -> KnnModel:
    """The model of a finished run or a saved model folder (:func:`knnsolver.inference.load`)."""
    from knnsolver.inference import load as load_model

    return load_model(path, device)


def __getattr__(name: str) -> Any:
    """The interfaces, imported on first use: importing the package (the ``knnsolver`` command does) loads no torch."""
    if name in ("EpochContext", "NeighbourSearch", "Solver"):
        from knnsolver import interfaces

        return getattr(interfaces, name)
    raise AttributeError(f"module 'knnsolver' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
