"""Retention of job records against a real Redis of the test's own: finished jobs expire,
stay listed for a while from a small index entry, and Redis memory stays flat."""

import time

import pytest
import redis

from explainctl.io.storage import open_storage
from explainctl.jobs import records
from explainctl.jobs.keys import job_key
from explainctl.jobs.manifest import read_manifest, write_manifest
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ChunkItem, JobInfo, ModelSpec
from explainctl.spec.errors import JobNotFound
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams
from tests.support.services import RedisServer


@pytest.fixture
def server(tmp_path):
    running = RedisServer(tmp_path / "redis").start()
    yield running
    running.stop()


def _finished_job(store: JobStore, output: str, n: int = 3, failed: int | None = None) -> str:
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(),
                   params=ExplainParams(), output=output, queue="q", chunk_size=n)  # fmt: skip
    store.create(info)
    store.add_chunk(job_id, [ChunkItem(index=i, uri=f"/images/{i}.png") for i in range(n)])
    store.mark_submitted(job_id)
    store.begin(job_id, list(range(n)))
    records.settle(store, open_storage(output), job_id, 0, [
        (i, "failed", {"error_code": "corrupt", "error": "x"}) if i == failed
        else (i, "done", {"mask_area": 0.1 * i, "target_index": i}) for i in range(n)
    ])  # fmt: skip
    write_manifest(store, open_storage(output), job_id)
    return job_id


def _memory(client: redis.Redis) -> int:
    return client.info("memory")["used_memory"]


def test_finished_jobs_expire_and_redis_memory_stays_flat(server, tmp_path):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    # Long enough that the first of 100 jobs is still there when the 100th is made, on a
    # busy 2-core machine too.
    store = JobStore(client, job_ttl=3, index_ttl=4)
    output = str(tmp_path / "out")
    _finished_job(store, output)  # warm: scripts loaded, first allocations made
    time.sleep(4.5)
    store.prune()
    baseline, keys = _memory(client), client.dbsize()
    after = []
    for _round in range(3):
        ids = []
        for _ in range(100):
            ids.append(_finished_job(store, output))
            assert store.live(ids[-1])  # its records are there (a loaded machine may take
            # longer than their TTL to make all 100, so the count is not taken at the end)
        time.sleep(4.5)
        assert store.prune()["forgotten"] == 100
        after.append(_memory(client))
        assert client.dbsize() == keys
        # Gone from Redis, the jobs still answer from their manifests.
        _, records = read_manifest(open_storage(output), ids[-1])
        assert [r.target_index for r in records] == [0, 1, 2]
    # Flat: what 300 finished jobs leave behind is what one left (allocator noise aside).
    assert max(after) - baseline < 64 * 1024, (baseline, after)


def test_a_sealed_job_answers_from_its_index_until_that_expires(server, tmp_path):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store = JobStore(client, job_ttl=1, index_ttl=3)
    job_id = _finished_job(store, str(tmp_path / "out"))
    assert client.ttl(job_key(job_id, "meta")) == 1
    time.sleep(1.5)
    assert not store.live(job_id)
    status = store.status(job_id)  # from the index entry
    assert (status.state, status.total, status.counts["done"]) == ("completed", 3, 3)
    assert store.recent() == [job_id]
    with pytest.raises(JobNotFound):
        store.info(job_id)
    time.sleep(2)
    assert store.recent() == []
    with pytest.raises(JobNotFound):
        store.status(job_id)


def test_a_retried_job_stops_its_clock_and_an_unsealed_one_is_sealed_by_prune(server, tmp_path):
    client = redis.Redis.from_url(server.url, decode_responses=True)
    store = JobStore(client, job_ttl=100)
    job_id = _finished_job(store, str(tmp_path / "out"), failed=2)
    assert client.ttl(job_key(job_id, "state")) > 0
    assert [i.index for i in store.reopen(job_id, {"failed"}).items] == [2]  # as `retry` does
    assert client.ttl(job_key(job_id, "state")) == -1
    assert not client.exists(job_key(job_id, "index"))
    assert store.seal(job_id) is False  # not finished: nothing may expire
    store.settle(job_id, [(2, "done", None)])  # finished again, but never sealed
    assert store.prune() == {"forgotten": 0, "sealed": 1}
    assert client.ttl(job_key(job_id, "meta")) > 0
