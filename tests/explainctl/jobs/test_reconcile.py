"""The reconciler against a real Redis and real Celery messages: queued items in no
message and under no lease go back to the queue, once, after two looks."""

import base64
import json
import time
import zlib

import pytest

from explainctl.config import Settings
from explainctl.jobs import leases
from explainctl.jobs.keys import job_key, suspects_key
from explainctl.jobs.queue import make_app, send_items, waiting_chunks
from explainctl.jobs.reconcile import reconcile
from explainctl.jobs.signing import SigningKeys
from explainctl.jobs.store import JobStore
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


KEY = "reconcile-key-0123456789abcdef"


def test_lost_items_whose_records_were_edited_in_redis_are_failed_not_signed(queued, redis_url):
    """The reconciler signs what it sends: it sends only records whose MAC verifies."""
    _, _, info, items = queued
    store = JobStore(queued[0].redis, keys=SigningKeys((KEY.encode(),)))
    app = make_app(Settings.load(env={}, broker_url=redis_url, signing_keys=(KEY,)))
    job_id = new_job_id()
    store.create(info.model_copy(update={"job_id": job_id}))
    for start in range(0, 10, 4):
        store.add_chunk(job_id, items[start : start + 4])
    store.mark_submitted(job_id)
    store.redis.hset(job_key(job_id, "items"), "4", _forged(4))  # items 4..7
    assert reconcile(store, app, job_id, grace=0) == 0  # the first look
    assert reconcile(store, app, job_id, grace=0) == 6
    sent = [p for p in waiting_chunks(store.redis, info.queue) if p["job_id"] == job_id]
    assert sorted(i["index"] for p in sent for i in p["items"]) == [0, 1, 2, 3, 8, 9]
    assert all(SigningKeys((KEY.encode(),)).verify(p) == "verified" for p in sent)
    assert "/etc/passwd" not in json.dumps(sent)
    codes = {e.index: e.error_code for e in store.entries(job_id, {"failed"})}
    assert codes == {4: "record-tampered", 5: "record-tampered", 6: "record-tampered",
                     7: "record-tampered"}  # fmt: skip

    # A job whose JobInfo was edited sends nothing: every lost item fails, and it ends.
    other = new_job_id()
    store.create(info.model_copy(update={"job_id": other}))
    store.add_chunk(other, items[:4])
    store.mark_submitted(other)
    meta = job_key(other, "meta")
    store.redis.hset(meta, "info", store.redis.hget(meta, "info").replace("/tmp/out", "/etc"))
    assert reconcile(store, app, other, grace=0) == 0
    assert reconcile(store, app, other, grace=0) == 0
    assert not [p for p in waiting_chunks(store.redis, info.queue) if p["job_id"] == other]
    status = store.status(other)
    assert status.state == "completed_with_failures" and status.counts["failed"] == 4
    assert {e.error_code for e in store.entries(other)} == {"record-tampered"}


def _forged(n: int) -> str:
    plain = json.dumps([["/etc/passwd"]] * n).encode()
    return base64.b64encode(zlib.compress(plain)).decode()
