"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint or summary.

Files are written to a hidden ``.NAME.*.tmp`` file in the same folder, synced, and
renamed over ``NAME``; the temporary file gets the usual permissions (0666 less
the umask), as a plain ``open`` would. A write that fails (a full disk, a
read-only folder) raises :class:`StorageError` with one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from knnsolver.errors import DataError, StorageError

TMP_SUFFIX = ".tmp"


def new_file_mode() -> int:
    """The permissions a new file gets under the process's umask (``0o666 & ~umask``, 0644 by default);
    ``tempfile.mkstemp`` makes 0600 files, which the atomic writes widen to this."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}; choose a writable folder") from None
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = _storage_reason(err)
        if reason is not None:
            raise StorageError(f"cannot write {path}: {reason}; the previous version of the file is unchanged; "
                               "free disk space or choose another folder") from None
        raise


def _storage_reason(err: BaseException) -> str | None:
    """The OS-level reason behind a failed write (torch.save wraps a full disk in a RuntimeError), else None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "unexpected pos" in str(err)):
        return f"the file system refused the write ({str(err).splitlines()[0]})"
    return None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a truncated or foreign file is a :class:`DataError`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} is missing") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"checkpoint {path} is truncated or not a knnsolver checkpoint ({reason}); "
                        "restore it from a backup or train again") from None
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} is not a knnsolver checkpoint (it holds a {type(state).__name__})")
    return state


def _finite_or_null(value: Any) -> Any:
    """NaN and infinities as JSON null (bare ``NaN`` is not JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _json(data: Any, **kw: Any) -> str:
    return json.dumps(_finite_or_null(data), sort_keys=True, allow_nan=False, **kw)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as strict JSON (non-finite numbers as null), atomically."""
    _atomic_write(Path(path), lambda fh: fh.write(_json(data, indent=2).encode()))


def write_npy(array: Any, path: str | Path) -> None:
    """Write a numpy array as an ``.npy`` file, atomically."""
    import numpy as np

    _atomic_write(Path(path), lambda fh: np.save(fh, array, allow_pickle=False))


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write one strict JSON object per line (non-finite numbers as null), atomically."""
    _atomic_write(Path(path), lambda fh: fh.write("".join(_json(r) + "\n" for r in rows).encode()))
