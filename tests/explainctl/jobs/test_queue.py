"""The queue's messages against a real Redis: small, and readable by waiting_chunks."""

import redis

from explainctl.config import Settings
from explainctl.jobs.queue import make_app, send_chunk, waiting_chunks
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
