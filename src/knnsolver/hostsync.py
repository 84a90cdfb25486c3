"""When the training path may read device values on the host, and the accelerator paths on any device.

A read of a device value on the host (``.item()``, ``bool(t)``, ``int(t)``, a
boolean-mask selection, ``torch.unique``, ``bincount``, ``nonzero``) waits for
the device to finish its queue, which stalls a GPU training loop. On the CPU it
costs nothing, and the code paths there may use such reads to do less
arithmetic. :func:`avoid_host_sync` is the one rule every solver and the
trainer follow; :func:`accelerator_paths` makes the CPU take the accelerator's
paths, so tests (``tests/test_host_sync.py``) can check on any machine that
those paths read nothing per step and give the CPU paths' results.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["accelerator_paths", "avoid_host_sync"]

_forced = False


def avoid_host_sync(device: torch.device) -> bool:
    """Whether a training step on ``device`` must not read device values on the host: on accelerators,
    inside ``torch.compile`` (a read would break the graph) and inside :func:`accelerator_paths`."""
    return device.type != "cpu" or torch.compiler.is_compiling() or _forced


@contextmanager
def accelerator_paths() -> Iterator[None]:
    """Take the accelerator's host-read-free code paths on every device (the CPU included) while inside."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous
