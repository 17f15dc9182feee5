"""The reconciler against a real Redis and real Celery messages: queued items in no
message and under no lease go back to the queue, once, after two looks."""

import time

import pytest

from explainctl.config import Settings
from explainctl.jobs import leases
from explainctl.jobs.keys import suspects_key
from explainctl.jobs.queue import make_app, send_items, waiting_chunks
from explainctl.jobs.reconcile import reconcile
from explainctl.spec.contracts import ChunkItem, JobInfo, ModelSpec
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams


@pytest.fixture
def queued(job_store, redis_url):
    """A submitted job of 10 items in chunks of 4, none of them sent yet."""
    queue = f"reconcile-{new_job_id()}"
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output="/tmp/out", queue=queue, chunk_size=4)  # fmt: skip
    job_store.create(info)
    items = [ChunkItem(index=i, uri=f"/images/{i}.png") for i in range(10)]
    for start in range(0, 10, 4):
        job_store.add_chunk(job_id, items[start : start + 4])
    job_store.mark_submitted(job_id)
    app = make_app(Settings.load(env={}, broker_url=redis_url))
    yield job_store, app, info, items
    job_store.redis.delete(queue, suspects_key(job_id))


def _sent(store, queue: str, job_id: str) -> list[int]:
    return sorted(i["index"] for p in waiting_chunks(store.redis, queue)
                  if p["job_id"] == job_id for i in p["items"])  # fmt: skip


def test_lost_items_are_sent_again_after_two_looks(queued):
    store, app, info, items = queued
    send_items(app, info, items[:4], 0)  # chunk 0 waits in the queue: not lost
    store.begin(info.job_id, [4, 9])  # a worker runs 4 under its lease; 9's lease is gone
    running = {"job_id": info.job_id, "items": [{"index": 4, "uri": "/i/4.png"}]}
    leases.put_payload(store.redis, "t-running", info.queue, running)
    store.redis.zadd(leases.LEASES, {"t-running": 1e12})
    try:
        assert reconcile(store, app, info.job_id, grace=0.5) == 0  # first look: suspects only
        assert _sent(store, info.queue, info.job_id) == [0, 1, 2, 3]
        time.sleep(0.6)
        assert reconcile(store, app, info.job_id, grace=0.5) == 5  # items 5..9
        assert _sent(store, info.queue, info.job_id) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        # Sent in the job's chunk size, as new chunks; now in the queue, nothing more is sent.
        chunks = [p for p in waiting_chunks(store.redis, info.queue) if p["chunk"] > 2]
        assert sorted(len(p["items"]) for p in chunks) == [1, 4]
        time.sleep(0.6)
        assert reconcile(store, app, info.job_id, grace=0.5) == 0
        assert reconcile(store, app, info.job_id, grace=0.5) == 0
    finally:
        leases.release(store.redis, "t-running")


def test_an_item_that_comes_back_between_looks_is_not_sent(queued):
    store, app, info, items = queued
    assert reconcile(store, app, info.job_id, grace=0.5) == 0
    send_items(app, info, items[4:8], 1)  # a hand-back that was being sent at the first look
    reserved = {"job_id": info.job_id, "items": [{"index": 8, "uri": "/i/8.png"}]}
    leases.put_payload(store.redis, "reserved:t-reconcile", info.queue, reserved)
    store.redis.zadd(leases.LEASES, {"reserved:t-reconcile": 1e12})  # reserved by a worker
    try:
        time.sleep(0.6)
        assert reconcile(store, app, info.job_id, grace=0.5) == 5  # 0..3 and 9
        assert _sent(store, info.queue, info.job_id) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    finally:
        leases.release(store.redis, "reserved:t-reconcile")


def test_a_finished_or_unsubmitted_job_is_left_alone(queued, job_store):
    store, app, info, _ = queued
    store.settle(info.job_id, [(i, "cancelled", None) for i in range(10)], mode="queued-only")
    assert reconcile(store, app, info.job_id, grace=0) == 0
    assert _sent(store, info.queue, info.job_id) == []
    other = new_job_id()
    job_store.create(info.model_copy(update={"job_id": other}))
    job_store.add_chunk(other, [ChunkItem(index=0, uri="/a.png")])  # its submit still runs
    for _ in range(2):
        assert reconcile(store, app, other, grace=0) == 0


def test_items_a_retry_is_still_sending_are_not_lost(queued):
    store, app, info, _ = queued
    assert store.claim_submitter(info.job_id, "a-retry")  # a retry is queueing the items
    for _ in range(2):
        assert reconcile(store, app, info.job_id, grace=0) == 0
    store.release_submitter(info.job_id)
    assert reconcile(store, app, info.job_id, grace=0) == 0  # the first look
    assert reconcile(store, app, info.job_id, grace=0) == 10
