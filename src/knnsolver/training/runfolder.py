"""Ownership of a run folder for the lifetime of one training.

* **Lock**: an exclusive ``flock`` on ``OUT/.lock`` (which records the holder's
  pid, host and start time), so a second training into the same folder is
  refused with one line naming the holder instead of mixing two runs' files.
  The lock dies with its process, so a killed run never leaves it stuck.
* **Overwrite by swap**: ``--overwrite`` trains into a fresh hidden sibling
  folder ``.OUT.overwrite-PID``; once that run has written its first checkpoint
  it is swapped in (the old run removed). A failed or interrupted overwrite
  before then leaves the old run untouched.
* **Clean start**: leftover hidden temporary files of interrupted atomic writes
  (``.NAME.*.tmp``) and folders of interrupted overwrites are removed once the
  lock is held (no other process can own them then).
"""
from __future__ import annotations

import datetime
import fcntl
import glob
import os
import re
import shutil
import socket
from pathlib import Path

from knnsolver.errors import RunFolderBusyError, StorageError
from knnsolver.training.checkpoint import TMP_SUFFIX

LOCK = ".lock"
# The temporary files of checkpoint.write_* (mkstemp: ".NAME.XXXXXXXX.tmp" for a run file NAME).
_OUR_TMP = re.compile(r"^\.[^/]+\.(pt|json|jsonl|npy|png)\.[a-z0-9_]+" + re.escape(TMP_SUFFIX) + "$")
_OVERWRITE_TAG = ".overwrite-"
_REPLACED_TAG = ".replaced-"


def _storage_error(path: Path, err: OSError, what: str) -> StorageError:
    return StorageError(f"cannot {what} {path}: {err.strerror or err}; choose another --out")


def prepare_folder(path: Path) -> None:
    """Create ``path`` (and its parents) as a writable folder, or raise one line saying why not."""
    if path.exists() and not path.is_dir():
        raise StorageError(f"--out {path} is an existing file, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _storage_error(path, err, "create the run folder") from None


def training_holder(folder: Path) -> str | None:
    """Who holds ``folder``'s run lock (a training in progress: its pid, host and start), or ``None``.

    It asks by taking a shared lock for an instant, so a ``train`` starting into the folder at that very
    instant would be refused as busy (and can be started again)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 500, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock``."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _storage_error(folder, err, "write into the run folder") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 500, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise RunFolderBusyError(
                f"{folder} is in use by another training ({holder}); wait for it to finish, or choose another --out"
            ) from None
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if os.fstat(self.fd).st_ino != current:  # the folder was swapped while we opened the lock
            self.release()
            raise RunFolderBusyError(f"{folder} was just replaced by another training; choose another --out")
        try:
            os.ftruncate(self.fd, 0)
            started = datetime.datetime.now().isoformat(timespec="seconds")
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode(), 0)
        except OSError as err:
            self.release()
            raise _storage_error(folder, err, "write into the run folder") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _remove_leftovers(folder: Path) -> None:
    """Delete temporary files of interrupted atomic writes in ``folder`` and interrupted overwrites beside it."""
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        if _OUR_TMP.match(tmp.name):  # only knnsolver's own (--out may be a folder holding other files)
            tmp.unlink(missing_ok=True)
    name = glob.escape(folder.name)  # a name with [, * or ? must not match another run's folders
    for stale in [*folder.parent.glob(f".{name}{_OVERWRITE_TAG}*"),
                  *folder.parent.glob(f".{name}{_REPLACED_TAG}*")]:
        shutil.rmtree(stale, ignore_errors=True)


class RunFolder:
    """The run folder ``out`` held by this process: :meth:`open` locks it, :attr:`path` is where files go.

    With ``replace`` (an overwrite of an existing run) :attr:`path` is a fresh
    hidden sibling until :meth:`commit` swaps it in; :meth:`close` releases
    the locks and removes an uncommitted replacement.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out
        self._locks: list[_Lock] = []
        self._created = False
        self.replaced = False  # whether commit() swapped this run in for an earlier one

    @property
    def pending(self) -> bool:
        """Whether files go to a replacement folder not yet swapped in."""
        return self.path != self.out

    def open(self) -> None:
        """Create and lock ``out``, then remove leftovers of interrupted writes.

        A crash between the two renames of :meth:`commit` leaves no ``out`` but the
        old run as ``.OUT.replaced-PID``: it is put back first.
        """
        if not self.out.exists():
            for replaced in self.out.parent.glob(f".{glob.escape(self.out.name)}{_REPLACED_TAG}*"):
                os.rename(replaced, self.out)
                break
        created = not self.out.exists()
        prepare_folder(self.out)
        self._created = created
        self._locks.append(_Lock(self.out))
        _remove_leftovers(self.out)

    def start_replacement(self) -> None:
        """Send the files to a fresh, locked sibling folder; ``out`` keeps the old run until :meth:`commit`."""
        self.path = self.out.parent / f".{self.out.name}{_OVERWRITE_TAG}{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        prepare_folder(self.path)
        self._locks.append(_Lock(self.path))

    def commit(self) -> None:
        """Swap the replacement folder in for the old run (no-op without one)."""
        if not self.pending:
            return
        replaced = self.out.parent / f".{self.out.name}{_REPLACED_TAG}{os.getpid()}"
        try:
            os.rename(self.out, replaced)
        except OSError as err:
            raise _storage_error(self.out, err, "replace the run in") from None
        try:
            os.rename(self.path, self.out)
        except BaseException as err:  # Ctrl-C or a failure between the renames: the old run goes back at once
            os.rename(replaced, self.out)
            if isinstance(err, OSError):
                raise _storage_error(self.out, err, "replace the run in") from None
            raise
        self.path = self.out
        self.replaced = True
        old = self._locks.pop(0)
        old.release()
        shutil.rmtree(replaced, ignore_errors=True)

    def close(self) -> None:
        """Release the locks; an overwrite that never reached :meth:`commit` is discarded, the old run kept,
        and a folder this run created but wrote nothing into (it failed first) is removed."""
        if self.pending:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = self.out
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        if self._created and [p.name for p in self.out.iterdir()] == [LOCK]:
            (self.out / LOCK).unlink()
            self.out.rmdir()
