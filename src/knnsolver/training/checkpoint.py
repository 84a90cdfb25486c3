"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint or summary."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(data: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    _atomic_write(Path(path), lambda fh: fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()))
