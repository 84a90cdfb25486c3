"""knnsolver: solvers (loss + classifier) for deep nearest-neighbour classification and retrieval.

Solvers are built by name from :data:`knnsolver.registry.SOLVERS` or imported from
``knnsolver.solvers.<name>``; their maths lives in :mod:`knnsolver.functional`.
Training runs through :func:`knnsolver.training.train` or the ``knnsolver`` command.
"""
from knnsolver.interfaces import EpochContext, NeighbourSearch, Solver
from knnsolver.registry import DATASETS, MODELS, SEARCHES, SOLVERS

__version__ = "0.1.0"
__all__ = ["EpochContext", "NeighbourSearch", "Solver", "DATASETS", "MODELS", "SEARCHES", "SOLVERS", "__version__"]
