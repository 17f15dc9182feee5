"""Job IDs: short, URL-safe, and sortable by creation time.

48 bits of milliseconds since the epoch then 40 random bits, in Crockford's base32
(lower case): 18 characters whose string order is their creation order.
"""

from __future__ import annotations

import re
import secrets
import time

from explainctl.spec.errors import InvalidInput

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_TIME_CHARS = 10  # 50 bits hold the 48-bit millisecond clock
_RANDOM_CHARS = 8  # 40 bits
JOB_ID_PATTERN = re.compile(rf"[{_ALPHABET}]{{{_TIME_CHARS + _RANDOM_CHARS}}}")


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_job_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    return _encode(millis, _TIME_CHARS) + _encode(secrets.randbits(40), _RANDOM_CHARS)


def check_job_id(text: str) -> str:
    """The job ID itself, or InvalidInput: IDs become storage prefixes, so nothing else passes."""
    if not JOB_ID_PATTERN.fullmatch(text or ""):
        raise InvalidInput(f"not a job ID: {text!r}")
    return text


def created_at(job_id: str) -> float:
    """Creation time (seconds since the epoch) encoded in a job ID."""
    millis = 0
    for char in check_job_id(job_id)[:_TIME_CHARS]:
        millis = millis * 32 + _ALPHABET.index(char)
    return millis / 1000
