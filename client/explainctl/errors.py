"""Domain errors. The CLI maps each to an exit code and a one-line message."""

from __future__ import annotations


class ExplainctlError(Exception):
    """Base of every error a user may see; `str(error)` is the one-line message."""

    exit_code = 1


class InvalidInput(ExplainctlError):
    """Bad arguments or parameters, caught before any work starts."""

    exit_code = 2


class ModelUnavailable(ExplainctlError):
    """The model or its weights cannot be loaded."""

    exit_code = 3


class MissingDependency(ExplainctlError):
    """An optional part of the package (the worker extra) is not installed."""

    exit_code = 4


class ItemError(ExplainctlError):
    """One item failed; the others go on. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class JobNotFound(ExplainctlError):
    """No job with this ID in the job records (or its manifest)."""

    exit_code = 5


class ServiceUnavailable(ExplainctlError):
    """The broker or storage cannot be reached."""

    exit_code = 6
