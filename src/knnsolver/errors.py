"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""


class KnnSolverError(Exception):
    """Base of every error knnsolver raises on purpose."""


class ConfigError(KnnSolverError, ValueError):
    """An invalid name, value or combination of settings."""


class DataError(KnnSolverError):
    """Data that is missing, unreadable or malformed."""


class MissingDependencyError(KnnSolverError, ImportError):
    """An optional package needed for the requested feature is not installed."""


class TrainingWarning(UserWarning):
    """Something about a run the user should know (divergence, degenerate data); the run goes on."""


class DivergenceError(KnnSolverError, FloatingPointError):
    """Training produced a non-finite loss, embedding or gradient; the last finished epoch stays saved."""


class StorageError(KnnSolverError, OSError):
    """A file or folder that cannot be created, written or read back (permissions, full disk, truncation)."""


class RunFolderBusyError(KnnSolverError):
    """The run folder is held by another training (its lock is taken)."""


class NonFiniteInputError(DataError, FloatingPointError, ValueError):
    """Embeddings or data holding NaN or infinite values where finite numbers are needed (a ``ValueError`` too,
    as scikit-learn and numpy raise for such input)."""
