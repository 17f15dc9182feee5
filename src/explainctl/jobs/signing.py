"""Chunk messages signed with a key the clients and workers share: the queue's trust boundary.

Whoever can write to Redis can queue a message; only a holder of a key can sign one. A
worker that holds keys runs only the chunks one of them verifies, so a message naming
another input, output or weights file than its sender asked for is refused before the
worker reads anything it names.

The signature is HMAC-SHA256 over the message's canonical encoding (`canonical`): every
field but `signature` itself, as compact JSON with sorted keys, ASCII only. That is what
the JSON round trip through the broker gives back exactly (Python writes the shortest
float that reads back the same), and it covers fields this version does not know, so a
newer client's additions cannot be swapped either. Signing gives integrity and
authenticity among key holders, not confidentiality (Redis still holds the message in the
clear), and not freshness: a genuine message sent twice runs its settled items no more.

The same keys vouch for the job records a chunk message is later built from (`record_mac`,
`verify_record`): a job's JobInfo and each chunk's stored items carry a MAC, so a retry or
the reconciler, which sign what they send, cannot be made to sign a record someone edited
in Redis. A record's MAC covers its kind, its job, its place and its stored text as
written, so it cannot be moved to another job or chunk either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Literal

SIGNATURE = "signature"
SCHEME = "hmac-sha256:"

Verdict = Literal["verified", "unsigned", "bad-signature", "not-checked"]


def canonical(message: dict) -> bytes:
    """The bytes a signature covers: `message` without its signature, as compact JSON with
    sorted keys and ASCII escapes (NaN and infinities refused: JSON has none)."""
    body = {key: value for key, value in message.items() if key != SIGNATURE}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _mac(key: bytes, message: dict) -> str:
    return SCHEME + hmac.new(key, canonical(message), hashlib.sha256).hexdigest()


def _record(kind: str, job_id: str, at: str, data: str) -> dict:
    """What a record's MAC covers. No chunk message has these fields (a message needs a
    model, params, items), so a record's MAC never passes for a message's signature."""
    return {"record": kind, "job_id": job_id, "at": at, "data": data}


@dataclass(frozen=True)
class SigningKeys:
    """The keys of this process (Settings.signing_secrets): the first signs, all verify."""

    secrets: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.secrets)

    def sign(self, message: dict) -> dict:
        """`message` with its signature (unchanged without keys)."""
        if not self.secrets:
            return message
        return {**message, SIGNATURE: _mac(self.secrets[0], message)}

    def verify(self, message: object) -> Verdict:
        """Whether one of the keys signed `message` (`not-checked` without keys)."""
        if not self.secrets:
            return "not-checked"
        if not isinstance(message, dict) or not isinstance(message.get(SIGNATURE), str):
            return "unsigned"
        try:
            expected = [_mac(key, message) for key in self.secrets]
        except (TypeError, ValueError):  # not JSON as the broker delivers it
            return "bad-signature"
        given = message[SIGNATURE].encode("utf-8", "replace")
        # Every key compared, in constant time each, whichever matches.
        matched = [hmac.compare_digest(given, mac.encode()) for mac in expected]
        return "verified" if any(matched) else "bad-signature"

    def record_mac(self, kind: str, job_id: str, at: str, data: str) -> str | None:
        """The MAC of a stored record: `data`, the text stored as the `kind` record of the
        job at `at` (None without keys)."""
        if not self.secrets:
            return None
        return _mac(self.secrets[0], _record(kind, job_id, at, data))

    def verify_record(self, kind: str, job_id: str, at: str, data: str, mac: str | None) -> Verdict:
        """Whether `mac` is one of the keys' for the record (`unsigned` when it has none)."""
        record = _record(kind, job_id, at, data)
        return self.verify(record if mac is None else {**record, SIGNATURE: mac})


NO_KEYS = SigningKeys()
