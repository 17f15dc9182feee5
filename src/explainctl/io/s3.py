"""The S3 boundary: clients, and the one place botocore's errors become ItemErrors.

Every failure tied to one object is an `ItemError` with a stable code (`not-found`,
`access-denied`, `storage-error`) and a one-line message that never carries the
service's text or credentials. Everything explainctl does with S3 goes through here.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from explainctl.io.uri import one_line
from explainctl.spec.errors import ItemError

# Only failures to reach the endpoint are retried by our own loop: the request never
# completed, so repeating an idempotent PUT is safe. HTTP-level errors (5xx, throttling)
# are already retried by botocore's "standard" mode.
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)

T = TypeVar("T")


@dataclass(frozen=True)
class S3Settings:
    """Timeouts and retries for S3. `put_retry_*` drive our own loop around uploads."""

    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    put_retry_attempts: int = 8
    put_retry_base_delay: float = 0.5
    put_retry_max_delay: float = 8.0
    put_retry_deadline: float = 30.0


def make_s3_client(settings: S3Settings | None = None) -> Any:
    """A fresh S3 client; credentials and AWS_ENDPOINT_URL come from boto3's usual chain."""
    settings = settings or S3Settings()
    config = Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    # A private Session per client: sessions are not thread-safe, clients are.
    return boto3.session.Session().client("s3", config=config)


_default_client_lock = threading.Lock()
_default_client: tuple[tuple[Any, ...], Any] | None = None


def _default_s3_client() -> Any:
    # Building a client costs tens of milliseconds, too much per image, so read_uri shares
    # one. It is rebuilt after a fork (clients must not cross processes) or when the
    # environment that selects the endpoint or profile changes.
    global _default_client
    env_key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_PROFILE"),
    )
    with _default_client_lock:
        if _default_client is None or _default_client[0] != env_key:
            _default_client = (env_key, make_s3_client())
        return _default_client[1]


def _s3_error(err: Exception, what: str) -> ItemError:
    """Map a boto3/botocore failure to an ItemError without echoing the service's text."""
    what = one_line(what)
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES or status == 404:
            return ItemError("not-found", f"{what}: not found ({code or status})")
        if code in _DENIED_CODES or status == 403:
            return ItemError("access-denied", f"{what}: access denied ({code or status})")
        return ItemError("storage-error", f"{what}: S3 error {code or status}")
    if isinstance(err, _CREDENTIAL_ERRORS):
        return ItemError("access-denied", f"{what}: no usable AWS credentials")
    if isinstance(err, BotoCoreError):
        # botocore's own messages name the endpoint or the problem, never a secret.
        return ItemError("storage-error", f"{what}: {type(err).__name__}: {one_line(str(err))}")
    return ItemError("storage-error", f"{what}: {type(err).__name__}")


def s3_keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    """Keys under a prefix in key order, one page (<= 1000 keys) fetched at a time."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield obj["Key"]


def default_s3_client() -> Any:
    return _default_s3_client()


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Translate any boto3/botocore failure inside the block into an ItemError about `what`."""
    try:
        yield
    except (ClientError, BotoCoreError) as err:
        raise _s3_error(err, what) from err


def is_not_found(err: ClientError) -> bool:
    return _s3_error(err, "").code == "not-found"


def retry_connection(
    operation: Callable[[], T], what: str, settings: S3Settings, sleep=time.sleep
) -> T:
    """Run `operation`, retrying while the endpoint cannot be reached at all."""
    s = settings
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except _CONNECTION_ERRORS as err:
            remaining = s.put_retry_deadline - (time.monotonic() - started)
            if attempt >= s.put_retry_attempts or remaining <= 0:
                raise ItemError(
                    "storage-error",
                    f"{one_line(what)}: S3 endpoint unreachable after {attempt} attempts "
                    f"({type(err).__name__})",
                ) from err
            # Exponential backoff with "equal jitter": never shorter than half the step,
            # so a few attempts still span an outage of several seconds.
            step = min(s.put_retry_max_delay, s.put_retry_base_delay * 2 ** (attempt - 1))
            sleep(min(remaining, random.uniform(step / 2, step)))
