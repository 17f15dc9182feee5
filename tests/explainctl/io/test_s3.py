"""The S3 retry rules as pure functions: which failures are repeated, under which deadline,
and what a caller sees when the deadline passes. No S3 here: operations are plain functions
that raise the errors botocore raises, and time is a fake clock."""

from __future__ import annotations

import hashlib

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from explainctl.config import Settings
from explainctl.io.s3 import S3Settings, multipart_etag, retry_kind, retry_s3
from explainctl.spec.errors import InvalidInput, ItemError


def answered(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


REFUSED = EndpointConnectionError(endpoint_url="http://s3")
CUT = ConnectionClosedError(endpoint_url="http://s3")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (answered(503, "SlowDown"), "throttled"),
        (answered(503, "ServiceUnavailable"), "throttled"),
        (answered(500, "InternalError"), "throttled"),
        (answered(502, "BadGateway"), "throttled"),
        (answered(504, "GatewayTimeout"), "throttled"),
        (answered(400, "RequestTimeout"), "throttled"),
        (answered(400, "Throttling"), "throttled"),
        (answered(429, "TooManyRequests"), "throttled"),
        (REFUSED, "unreachable"),
        (CUT, "unreachable"),
        (ReadTimeoutError(endpoint_url="http://s3"), "unreachable"),
        (ConnectTimeoutError(endpoint_url="http://s3"), "unreachable"),
        # A body cut off midway: the read is whole or repeated.
        (ResponseStreamingError(error="Connection broken"), "unreachable"),
        (IncompleteReadError(actual_bytes=10, expected_bytes=20), "unreachable"),
        (answered(403, "AccessDenied"), None),
        (answered(404, "NoSuchKey"), None),
        (answered(404, "NoSuchUpload"), None),
        (answered(400, "InvalidArgument"), None),
        (NoCredentialsError(), None),
        (ValueError("not S3's"), None),
    ],
)
def test_what_is_repeated_and_under_which_deadline(error, kind):
    assert retry_kind(error) == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (answered(503, "SlowDown"), "throttled"),
        (answered(429, "TooManyRequests"), "throttled"),
        (REFUSED, "unreachable"),
        (ConnectTimeoutError(endpoint_url="http://s3"), "unreachable"),
        # S3 may have done it: a repeat could start a second multipart upload.
        (answered(500, "InternalError"), None),
        (CUT, None),
        (ReadTimeoutError(endpoint_url="http://s3"), None),
    ],
)
def test_a_call_that_is_not_idempotent_is_repeated_only_when_it_surely_did_nothing(error, kind):
    assert retry_kind(error, idempotent=False) == kind


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


SETTINGS = S3Settings(retry_base_delay=1.0, retry_max_delay=4.0, retry_deadline=10.0,
                      throttle_deadline=60.0)  # fmt: skip


def run(failures, **kw):
    """retry_s3 over an operation that raises `failures` in turn, then answers "ok";
    returns (its answer or error, the time of each call, the clock)."""
    clock, calls = Clock(), []

    def operation():
        calls.append(clock.now)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "ok"

    try:
        result = retry_s3(operation, "s3://b/k", SETTINGS, clock.sleep, clock, **kw)
    except Exception as error:
        result = error
    return result, calls, clock


def test_throttling_is_waited_out_well_past_the_unreachable_deadline():
    result, calls, clock = run([answered(503, "SlowDown")] * 12)
    assert result == "ok" and len(calls) == 13
    assert clock.now > SETTINGS.retry_deadline


def test_throttling_ends_at_its_own_deadline_with_one_line():
    result, calls, clock = run([answered(503, "SlowDown")] * 1000)
    assert isinstance(result, ItemError) and result.code == "storage-error"
    assert clock.now == pytest.approx(SETTINGS.throttle_deadline)  # the last wait is cut
    assert result.message == (
        f"s3://b/k: S3 kept answering SlowDown after {len(calls)} attempts in 60 s"
    )


def test_an_unreachable_endpoint_ends_at_the_shorter_deadline():
    result, _, clock = run([REFUSED] * 1000)
    assert isinstance(result, ItemError) and result.code == "storage-error"
    assert clock.now == pytest.approx(SETTINGS.retry_deadline)
    assert "S3 endpoint unreachable (EndpointConnectionError)" in result.message
    assert "\n" not in result.message


def test_the_unreachable_deadline_counts_from_when_s3_last_answered():
    # Throttled for 20 s, then unreachable for 8: neither deadline has passed.
    failures = [answered(503, "SlowDown")] * 7 + [REFUSED] * 3
    result, calls, clock = run(failures)
    assert result == "ok"
    throttled_until = calls[7]
    assert throttled_until > SETTINGS.retry_deadline
    assert clock.now - throttled_until <= SETTINGS.retry_deadline


def test_an_outage_that_comes_and_goes_is_bounded_by_the_throttle_deadline():
    result, _, clock = run([answered(500, "InternalError"), REFUSED] * 1000)
    assert isinstance(result, ItemError)
    assert clock.now == pytest.approx(SETTINGS.throttle_deadline)


def test_other_errors_pass_through_at_once():
    denied = answered(403, "AccessDenied")
    result, calls, clock = run([denied])
    assert result is denied and len(calls) == 1 and clock.now == 0


def test_a_call_that_is_not_idempotent_stops_at_a_failure_that_may_have_done_it():
    result, calls, _ = run([answered(503, "SlowDown"), CUT], idempotent=False)
    assert len(calls) == 2 and isinstance(result, ConnectionClosedError)


def test_backoff_grows_with_jitter_and_is_capped():
    _, calls, _ = run([answered(503, "SlowDown")] * 8)
    waits = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    for attempt, wait in enumerate(waits, start=1):
        step = min(SETTINGS.retry_max_delay, SETTINGS.retry_base_delay * 2 ** (attempt - 1))
        assert step / 2 <= wait <= step


def test_multipart_etag_is_s3s():
    parts = [b"a" * 10, b"b" * 3]
    etags = [f'"{hashlib.md5(p).hexdigest()}"' for p in parts]
    whole = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert multipart_etag(etags) == f'"{whole}-2"'
    with pytest.raises(ValueError):
        multipart_etag(['"not-hex"'])


def test_the_deadlines_are_settings_with_the_same_defaults():
    assert S3Settings.of(Settings()) == S3Settings()
    loaded = S3Settings.of(
        Settings.load({"EXPLAINCTL_S3_DEADLINE": "5", "EXPLAINCTL_S3_THROTTLE_DEADLINE": "50"})
    )
    assert (loaded.retry_deadline, loaded.throttle_deadline) == (5, 50)
    with pytest.raises(InvalidInput, match="EXPLAINCTL_S3_THROTTLE_DEADLINE"):
        Settings.load({"EXPLAINCTL_S3_DEADLINE": "60", "EXPLAINCTL_S3_THROTTLE_DEADLINE": "30"})
