"""Chunk message signatures: the canonical encoding, keys and rotation, and a signature
that survives the broker's round trip."""

import json
import math

import pytest
import redis

from explainctl.config import Settings
from explainctl.jobs.queue import make_app, send_chunk, waiting_chunks
from explainctl.jobs.signing import SIGNATURE, SigningKeys, canonical
from explainctl.spec.contracts import ChunkItem, ChunkPayload, ModelSpec
from explainctl.spec.errors import InvalidInput
from explainctl.spec.methods import ExplainParams

OLD, NEW = b"old-key-0123456789abcdef", b"new-key-0123456789abcdef"


def _message() -> dict:
    return {"job_id": "01m9675xa1q0cp03k7", "chunk": 3, "output": "s3://out/x",
            "items": [{"index": 0, "uri": "/data/café.png"}],
            "sent_at": 1765432100.123456}  # fmt: skip


def test_the_canonical_encoding_is_compact_sorted_ascii_and_leaves_the_signature_out():
    message = {"b": 1, "a": [1.5, "é"], SIGNATURE: "hmac-sha256:00"}
    assert canonical(message) == b'{"a":[1.5,"\\u00e9"],"b":1}'
    # The order a message's fields arrive in changes nothing.
    assert canonical(dict(reversed(message.items()))) == canonical(message)


def test_the_canonical_encoding_refuses_what_json_cannot_carry():
    with pytest.raises(ValueError):
        canonical({"x": math.nan})


def test_a_signed_message_verifies_and_any_change_to_it_does_not():
    keys = SigningKeys((NEW,))
    signed = keys.sign(_message())
    assert keys.verify(signed) == "verified"
    assert keys.verify({**signed, "output": "s3://elsewhere"}) == "bad-signature"
    assert keys.verify({**signed, "added": 1}) == "bad-signature"
    assert keys.verify(_message()) == "unsigned"
    assert keys.verify({**signed, SIGNATURE: 7}) == "unsigned"
    assert SigningKeys((b"another-key-0123456789",)).verify(signed) == "bad-signature"


def test_rotation_the_first_key_signs_and_every_key_verifies():
    by_old = SigningKeys((OLD,)).sign(_message())
    rotated = SigningKeys((NEW, OLD))
    assert rotated.verify(by_old) == "verified"
    assert rotated.sign(_message()) == SigningKeys((NEW,)).sign(_message())
    # Once the old key is dropped, what it signed is refused.
    assert SigningKeys((NEW,)).verify(by_old) == "bad-signature"


def test_without_keys_nothing_is_signed_or_checked():
    assert SigningKeys().sign(_message()) == _message()
    assert SigningKeys().verify({"anything": 1}) == "not-checked"


def test_keys_come_from_the_variable_then_the_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"\n{OLD.decode()}\n")
    env = {"EXPLAINCTL_SIGNING_KEYS": NEW.decode(), "EXPLAINCTL_SIGNING_KEY_FILE": str(key_file)}
    assert Settings.load(env=env).signing_secrets() == (NEW, OLD)


def test_a_short_key_or_an_unreadable_key_file_is_refused_at_load(tmp_path):
    with pytest.raises(InvalidInput, match="at least 16"):
        Settings.load(env={"EXPLAINCTL_SIGNING_KEYS": "short"})
    with pytest.raises(InvalidInput, match="EXPLAINCTL_SIGNING_KEY_FILE"):
        Settings.load(env={"EXPLAINCTL_SIGNING_KEY_FILE": str(tmp_path / "missing")})


def test_a_queued_chunk_is_signed_and_a_re_sent_one_keeps_its_signature(redis_url):
    """Through kombu and Redis and back, the signature still verifies; a message re-sent
    as received (the reaper's) is not signed again, so nothing planted gets signed."""
    client = redis.Redis.from_url(redis_url)
    queue = "test-queue-signed"
    client.delete(queue)
    app = make_app(Settings.load(env={}, broker_url=redis_url, signing_keys=(NEW.decode(),)))
    payload = ChunkPayload(job_id="01m9675xa1q0cp03k8", chunk=0, model=ModelSpec(),
                           params=ExplainParams(), output="s3://out", sent_at=1765432100.5,
                           items=[ChunkItem(index=0, uri="s3://in/ünï.png")])  # fmt: skip
    try:
        send_chunk(app, payload, queue)
        send_chunk(app, {"job_id": "01m9675xa1q0cp03k8", "planted": True}, queue)
        found = [p for p in waiting_chunks(client, queue) if p["job_id"] == payload.job_id]
        signed, planted = sorted(found, key=lambda p: "planted" in p)
        assert SigningKeys((NEW,)).verify(signed) == "verified"
        assert ChunkPayload.model_validate(signed) == payload
        assert SigningKeys((NEW,)).verify(planted) == "unsigned"
        assert json.loads(json.dumps(signed)) == signed
    finally:
        client.delete(queue)


def test_a_record_mac_binds_its_kind_job_place_and_text():
    keys = SigningKeys((NEW,))
    mac = keys.record_mac("items", "01m9675xa1q0cp03k7", "16", "eJzL")
    assert keys.verify_record("items", "01m9675xa1q0cp03k7", "16", "eJzL", mac) == "verified"
    # Another text, place, job or kind: the MAC cannot be moved with the record.
    assert keys.verify_record("items", "01m9675xa1q0cp03k7", "16", "eJzM", mac) == "bad-signature"
    assert keys.verify_record("items", "01m9675xa1q0cp03k7", "32", "eJzL", mac) == "bad-signature"
    assert keys.verify_record("items", "01m9675xa1q0cp03k8", "16", "eJzL", mac) == "bad-signature"
    assert keys.verify_record("info", "01m9675xa1q0cp03k7", "16", "eJzL", mac) == "bad-signature"
    assert keys.verify_record("items", "01m9675xa1q0cp03k7", "16", "eJzL", None) == "unsigned"
    # Rotation as for messages: a record of the old key verifies while it is listed.
    by_old = SigningKeys((OLD,)).record_mac("info", "j", "info", "{}")
    assert SigningKeys((NEW, OLD)).verify_record("info", "j", "info", "{}", by_old) == "verified"
    assert SigningKeys((NEW,)).verify_record("info", "j", "info", "{}", by_old) == "bad-signature"
    assert SigningKeys().record_mac("info", "j", "info", "{}") is None


def test_a_record_mac_never_passes_for_a_message_signature():
    keys = SigningKeys((NEW,))
    mac = keys.record_mac("items", "j", "0", "x")
    assert keys.verify({"record": "items", "job_id": "j", "at": "0", "data": "x"}) == "unsigned"
    assert keys.verify({**_message(), SIGNATURE: mac}) == "bad-signature"
