"""Nearest-neighbour backends behind the :class:`~knnsolver.interfaces.NeighbourSearch` interface."""
from knnsolver.registry import SEARCHES


def build_search(name: str = "exact", **options):
    """Construct a registered neighbour-search backend by name."""
    return SEARCHES.build(name, **options)


__all__ = ["build_search", "SEARCHES"]
