"""Domain errors, each with its exit code, and the item error codes (declared once here)."""

from __future__ import annotations

from typing import Literal

# Every code an item can fail with: stable, machine-readable, in `results` and items.jsonl.
ERROR_CODES: dict[str, str] = {
    "bad-uri": "the input is not a URI or path explainctl can read",
    "unsupported-scheme": "a scheme other than a path, s3:// or http(s)://",
    "not-found": "no such file or object",
    "is-a-directory": "a directory or S3 prefix where an image was expected",
    "access-denied": "permission denied, or no usable credentials",
    "outside-allowed-roots": "a local path outside EXPLAINCTL_ALLOWED_ROOTS",
    "too-large": "larger than EXPLAINCTL_MAX_IMAGE_BYTES",
    "storage-error": "S3 or the file system failed (after retries)",
    "http-disabled": "an http(s) input while EXPLAINCTL_ALLOW_HTTP is off",
    "host-not-allowed": "an http(s) host outside EXPLAINCTL_HTTP_ALLOWED_HOSTS",
    "blocked-address": "an http(s) host that resolves to a non-public address",
    "fetch-error": "the http(s) fetch failed (DNS, connection, timeout)",
    "http-error": "the server answered with an error status",
    "too-many-redirects": "more redirects than a fetch follows",
    "empty": "the image has 0 bytes",
    "corrupt": "damaged or truncated image data",
    "unsupported-format": "not an image format explainctl decodes",
    "too-many-pixels": "more pixels than EXPLAINCTL_MAX_PIXELS",
    "bad-target": "the target class does not exist for this model",
    "model-not-allowed": "the worker does not accept this model (EXPLAINCTL_ALLOWED_MODELS)",
    "model-unavailable": "the worker cannot load the model or its weights",
    "bad-params": "the job's parameters do not fit the model (a mask larger than its input)",
    "weights-not-allowed": "a weights file outside the worker's EXPLAINCTL_ALLOWED_WEIGHTS",
    "output-not-allowed": "the job's output is outside the worker's EXPLAINCTL_ALLOWED_OUTPUTS",
    "render-error": "the artifacts could not be drawn or encoded",
    "not-queued": "recorded, but the broker refused its chunk (`retry` queues it again)",
    "worker-lost": "its worker was lost EXPLAINCTL_MAX_DELIVERIES times (a poison item)",
    "worker-incompatible": "sent with a newer protocol than its worker's (upgrade, then retry)",
    "device-error": "the worker's accelerator failed (a CUDA error); the worker left",
    "record-tampered": "its job record in Redis has no valid MAC (edited, or written without "
    "the signing key): never sent",
}
ErrorCode = Literal[tuple(ERROR_CODES)]  # type: ignore[valid-type]
# The codes of a worker's environment, not of the item: another worker may well succeed.
# A worker that meets one (or any failure writing artifacts) hands the items back to the
# queue without charging an attempt, and leaves after WORKER_STRIKES chunks in a row.
ENVIRONMENT_CODES: frozenset[str] = frozenset(
    {
        "model-not-allowed",
        "weights-not-allowed",
        "output-not-allowed",
        "model-unavailable",
        "storage-error",
        "device-error",
    }
)
# Environment codes after which the worker leaves at once: a CUDA error is sticky, every
# later kernel of the process fails too.
FATAL_CODES: frozenset[str] = frozenset({"device-error"})
# Every code whose cause is the worker, not the item: its environment, or its version
# (worker-incompatible fails the items at once: `retry` them once the workers are upgraded).
WORKER_CODES: frozenset[str] = ENVIRONMENT_CODES | {"worker-incompatible"}
# Chunks in a row a worker hands back before it leaves, so its supervisor starts a fresh
# one (EXPLAINCTL_MAX_HAND_BACKS bounds how often the same items go back).
WORKER_STRIKES = 3


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

    def __init__(self, code: ErrorCode, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"undeclared item error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


class JobNotFound(ExplainctlError):
    """No job with this ID in the job records (or its manifest)."""

    exit_code = 5


class ServiceUnavailable(ExplainctlError):
    """The broker or storage cannot be reached."""

    exit_code = 6


class RecordTampered(ExplainctlError):
    """A job record a chunk message would be built from has no valid MAC (jobs.signing):
    edited in Redis, or written by a client without the signing key."""

    exit_code = 7


def markdown_error_codes() -> str:
    """The README's table of item error codes."""
    rows = ["| error code | meaning | whose |", "|---|---|---|"]
    rows += [
        f"| `{code}` | {meaning} | {'worker' if code in WORKER_CODES else 'item'} |"
        for code, meaning in ERROR_CODES.items()
    ]
    return "\n".join(rows)
