"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""


class KnnSolverError(Exception):
    """Base of every error knnsolver raises on purpose."""


class ConfigError(KnnSolverError, ValueError):
    """An invalid name, value or combination of settings."""


class DataError(KnnSolverError):
    """Data that is missing, unreadable or malformed."""


class MissingDependencyError(KnnSolverError, ImportError):
    """An optional package needed for the requested feature is not installed."""
