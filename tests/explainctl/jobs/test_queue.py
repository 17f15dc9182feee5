"""The queue's messages against a real Redis: small, and readable by waiting_chunks."""

import pytest
import redis

from explainctl.config import Settings
from explainctl.jobs.queue import (
    broker_exposure,
    make_app,
    send_chunk,
    waiting_chunks,
    warn_exposure,
)
from explainctl.spec.contracts import ChunkItem, ChunkPayload, ModelSpec
from explainctl.spec.methods import ExplainParams


def test_a_queued_chunk_is_compressed_and_still_found(redis_url):
    client = redis.Redis.from_url(redis_url)
    queue = "test-queue-size"
    client.delete(queue)
    items = [ChunkItem(index=i, uri=f"s3://photos/2026-11/{i:07d}.jpg") for i in range(16)]
    payload = ChunkPayload(job_id="01m9675xa1q0cp03k7", chunk=5, model=ModelSpec(),
                           params=ExplainParams(), output="s3://out", items=items)  # fmt: skip
    try:
        send_chunk(make_app(Settings.load(env={}, broker_url=redis_url)), payload, queue)
        (message,) = client.lrange(queue, 0, -1)
        # The uncompressed message with Celery's argument repr was 4.8 kB.
        assert len(message) < 2500
        # Only this queue's list, but every reserved message of the database: pick ours.
        (found,) = [p for p in waiting_chunks(client, queue) if p["job_id"] == payload.job_id]
        assert ChunkPayload.model_validate(found) == payload
    finally:
        client.delete(queue)


@pytest.mark.parametrize(
    ("url", "heard"),
    [
        ("redis://127.0.0.1:6379/0", []),
        ("redis://localhost:6379/0", []),
        ("redis://[::1]:6379/0", []),
        ("unix:///run/redis.sock", []),
        ("rediss://:secret@redis.example:6380/0", []),
        ("redis://:secret@redis.example:6379/0", ["without TLS"]),
        ("rediss://redis.example:6380/0", ["no password"]),
        ("redis://10.0.0.5:6379/0", ["no password", "without TLS"]),
    ],
)
def test_a_broker_on_another_machine_without_a_password_or_tls_is_heard_of(url, heard):
    found = broker_exposure(url)
    assert len(found) == len(heard)
    assert all(words in line for words, line in zip(heard, found, strict=True))


def test_each_broker_is_warned_of_once_per_process():
    lines: list[str] = []
    for _ in range(3):
        warn_exposure("redis://10.9.8.7:6379/0", lines.append)
    assert len(lines) == 2
