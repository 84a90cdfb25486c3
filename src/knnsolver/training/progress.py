"""What a run prints as it goes: its choices, a line before and after each long phase, one line per epoch.

Lines go to stderr (stdout keeps the final summary) through ``tqdm.write``, so
they stay on screen above a progress bar; ``--progress false`` drops only the
bars, never these lines. Under ``torchrun`` only rank 0 prints. The time of each
phase is kept for ``summary.json`` (``timing``).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


class Progress:
    """Prints a run's lines (when ``enabled``) and adds up the seconds spent in each named phase."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def say(self, text: str) -> None:
        """Print one line that stays on screen."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def add(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` towards ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextmanager
    def phase(self, phase: str, text: str) -> Iterator[None]:
        """A line before and after a long step (``text ...``, ``text: 3.2 s``); its time counts towards ``phase``."""
        self.say(f"{text} ...")
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.add(phase, elapsed)
        self.say(f"{text}: {elapsed:.1f} s")

    def timing(self) -> dict[str, object]:
        """Wall time since this object was made and the seconds per phase, rounded to 0.1 s."""
        return {"wall_seconds": round(time.perf_counter() - self.started, 1),
                "phase_seconds": {k: round(v, 1) for k, v in self.seconds.items()}}
