"""Solvers: the label-aware top of a network. Construct by name with ``knnsolver.registry.SOLVERS``."""
from knnsolver.interfaces import EpochContext, Solver

__all__ = ["EpochContext", "Solver"]
