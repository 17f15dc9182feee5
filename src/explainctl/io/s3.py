"""The S3 boundary: clients, and the one place botocore's errors become ItemErrors.

Every failure tied to one object is an `ItemError` with a stable code (`not-found`,
`access-denied`, `storage-error`) and a one-line message that never carries the
service's text or credentials. Everything explainctl does with S3 goes through here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from explainctl.io.uri import one_line, s3_uri
from explainctl.spec.errors import ItemError

# Our own loop (`retry_s3`) repeats a call that is safe to repeat, on top of botocore's few
# quick attempts, through two kinds of trouble:
# - "unreachable": no answer at all. It may be this worker's own network, so it waits
#   S3Settings.retry_deadline in a row, then the work goes back to the queue for another.
# - "throttled": S3 answered 503 SlowDown, a throttling code, a 5xx or RequestTimeout. S3 is
#   there and asks every worker alike for patience, so waiting longer
#   (S3Settings.throttle_deadline, in all) costs less than redoing the GPU work elsewhere.
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
    # A body cut off midway: the connection failed, not S3's answer.
    ResponseStreamingError,
    IncompleteReadError,
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# What surely never took effect, so that even a call that is not idempotent may be repeated:
# a connection never made, and S3's "slow down" answers (a 500 may have done the work).
_NEVER_SENT = (EndpointConnectionError, ConnectTimeoutError)
_REFUSED_STATUSES = frozenset({429, 503})
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
    """Timeouts and retries for S3: `max_attempts` are botocore's own, per call; `retry_*`
    and `throttle_deadline` drive our loop around it (`retry_s3`). The deadlines default
    to EXPLAINCTL_S3_DEADLINE and EXPLAINCTL_S3_THROTTLE_DEADLINE's defaults."""

    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retry_base_delay: float = 0.5
    retry_max_delay: float = 8.0
    retry_deadline: float = 30.0
    throttle_deadline: float = 180.0

    @classmethod
    def of(cls, settings: Any) -> S3Settings:
        """The S3 part of explainctl.config.Settings."""
        return cls(retry_deadline=settings.s3_deadline,
                   throttle_deadline=settings.s3_throttle_deadline)  # fmt: skip


def make_s3_client(settings: S3Settings | None = None) -> Any:
    """A fresh S3 client; credentials and AWS_ENDPOINT_URL come from boto3's usual chain."""
    settings = settings or S3Settings()
    config = Config(
        # "adaptive": besides retrying, a client that was throttled sends fewer requests per
        # second for a while, which is what a 503 SlowDown asks of it.
        retries={"max_attempts": settings.max_attempts, "mode": "adaptive"},
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


def s3_keys(
    client: Any, bucket: str, prefix: str, settings: S3Settings | None = None
) -> Iterator[str]:
    """Keys under a prefix in key order, one page (<= 1000 keys) fetched at a time."""
    settings = settings or S3Settings()
    where = s3_uri(bucket, prefix)
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = retry_s3(lambda: client.list_objects_v2(**request), where, settings)
        for obj in page.get("Contents", ()):
            yield obj["Key"]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


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


RetryKind = Literal["unreachable", "throttled"]


def retry_kind(err: BaseException, idempotent: bool = True) -> RetryKind | None:
    """Whether repeating the call that raised `err` may help, and which deadline applies;
    for a call that is not idempotent, only when the failed attempt surely did nothing."""
    if isinstance(err, _CONNECTION_ERRORS):
        return "unreachable" if idempotent or isinstance(err, _NEVER_SENT) else None
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not idempotent:
            return "throttled" if status in _REFUSED_STATUSES else None
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES:
            return "throttled"
    return None


def retry_s3(
    operation: Callable[[], T],
    what: str,
    settings: S3Settings,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    *,
    idempotent: bool = True,
) -> T:
    """Run `operation`, an S3 call, repeating it while `retry_kind` says so: until the
    endpoint has been unreachable `retry_deadline` seconds in a row, or anything retryable
    has gone on `throttle_deadline` seconds in all; then a `storage-error`. Other errors
    pass through untouched, for `s3_errors` to translate."""
    s = settings
    started = clock()
    unreachable_since: float | None = None  # since S3 last answered, if it has not since
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except (ClientError, BotoCoreError) as err:
            kind = retry_kind(err, idempotent)
            if kind is None:
                raise
            now = clock()
            if kind == "unreachable":
                unreachable_since = now if unreachable_since is None else unreachable_since
                left = s.retry_deadline - (now - unreachable_since)
            else:
                unreachable_since = None
                left = float("inf")
            left = min(left, max(s.throttle_deadline, s.retry_deadline) - (now - started))
            if left <= 0:
                raise _gave_up(err, kind, what, attempt, now - started) from err
            # Exponential backoff with "equal jitter": never shorter than half the step,
            # so a few attempts still span an outage of several seconds.
            step = min(s.retry_max_delay, s.retry_base_delay * 2 ** min(attempt - 1, 30))
            sleep(min(left, random.uniform(step / 2, step)))


def _gave_up(err: Exception, kind: RetryKind, what: str, attempts: int, seconds: float):
    if kind == "unreachable":
        why = f"S3 endpoint unreachable ({type(err).__name__})"
    else:
        assert isinstance(err, ClientError)
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        why = f"S3 kept answering {one_line(str(error.get('Code') or status), 60)}"
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    return ItemError("storage-error", f"{one_line(what)}: {why} after {tries} in {seconds:.0f} s")


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives the object a multipart upload of these parts makes: the MD5 of
    the parts' binary MD5s, then "-" and their count; ValueError for ETags that are not
    hex. Under SSE-KMS part ETags are not MD5s and the object's will not match this."""
    digests = b"".join(bytes.fromhex(etag.strip('"')) for etag in part_etags)
    composite = hashlib.md5(digests, usedforsecurity=False).hexdigest()
    return f'"{composite}-{len(part_etags)}"'
