"""Chunk leases against a real Redis and a real Celery app (messages land in Redis)."""

import json
import socket
import uuid

import pytest

from explainctl.config import Settings
from explainctl.jobs import keys, leases
from explainctl.jobs.keys import lease_key
from explainctl.jobs.queue import make_app
from explainctl.spec.contracts import ChunkItem, ChunkPayload, ModelSpec
from explainctl.spec.ids import new_job_id
from explainctl_worker.service import lease


def _payload() -> ChunkPayload:
    return ChunkPayload(job_id=new_job_id(), chunk=3, model=ModelSpec(), params={},
                        output="/tmp/out", items=[ChunkItem(index=0, uri="/a.png")])  # fmt: skip


@pytest.fixture
def setup(job_store, redis_url):
    queue = f"lease-{uuid.uuid4().hex[:8]}"
    client = job_store.redis
    client.delete(lease.LEASES, leases.BUSY)
    yield client, make_app(Settings.load(broker_url=redis_url)), queue
    client.delete(lease.LEASES, leases.BUSY, queue)


def test_a_held_lease_is_not_reaped_and_is_released_after(setup):
    client, app, queue = setup
    with lease.hold(client, _payload(), queue, seconds=30):
        assert client.zcard(lease.LEASES) == 1
        assert client.llen(leases.BUSY) == 1  # what the autoscaler counts besides the queue
        assert leases.reap(client, app) == 0
    assert client.zcard(lease.LEASES) == 0 and client.llen(leases.BUSY) == 0


def test_an_expired_lease_is_sent_again_once(setup):
    client, app, queue = setup
    payload = _payload()
    with pytest.raises(RuntimeError), lease.hold(client, payload, queue, seconds=30):
        raise RuntimeError("the worker died")  # the lease stays behind
    assert client.zcard(lease.LEASES) == 1
    later = leases.redis_now(client) + 60
    assert client.llen(leases.BUSY) == 1  # a dead worker's lease keeps a worker wanted
    assert leases.reap(client, app, now=later) == 1
    assert leases.reap(client, app, now=later) == 0  # claimed once only
    assert client.llen(leases.BUSY) == 0  # its chunk is in the queue now
    (message,) = client.lrange(queue, 0, -1)
    assert json.loads(message)["headers"]["task"] == "explainctl.explain_chunk"


def test_a_reaper_that_fails_to_send_loses_nothing_and_no_payload_outlives_its_lease(setup):
    client, app, queue = setup
    with pytest.raises(RuntimeError), lease.hold(client, _payload(), queue, seconds=30):
        raise RuntimeError("the worker died")
    (key,) = client.zrange(lease.LEASES, 0, -1)
    later = leases.redis_now(client) + 60

    class Broken:
        def send_task(self, *args, **kwargs):
            raise ConnectionError("the broker went away mid-reap")

    with pytest.raises(ConnectionError):
        leases.reap(client, Broken(), now=later)
    # Claimed but not sent: it stays, and no reaper takes it again before the claim ends.
    assert client.zcard(lease.LEASES) == 1
    assert leases.reap(client, app, now=later + 1) == 0
    assert leases.reap(client, app, now=later + leases.CLAIM_SECONDS + 1) == 1
    assert client.lrange(queue, 0, -1)
    assert client.zcard(lease.LEASES) == 0
    assert not client.exists(keys.lease_key(key.decode() if isinstance(key, bytes) else key))


def test_a_second_copy_of_a_running_chunk_stands_aside_while_the_first_lease_lives(setup):
    client, _, queue = setup
    payload = _payload()
    with lease.hold(client, payload, queue, seconds=30) as first:
        assert first is True
        with lease.hold(client, payload, queue, seconds=30) as second:
            assert second is False  # the first copy runs it, under its live lease
        assert client.zcard(lease.LEASES) == 1
        # The stand-aside left nothing (other tests' leftovers in this database aside).
        assert len(client.keys(lease_key(f"{payload.job_id}:*"))) == 1
        # The first copy's worker is gone: its lease expired (the reaper re-sends it) and
        # the copy that arrives then runs.
        (key,) = client.zrange(lease.LEASES, 0, -1)
        client.zadd(lease.LEASES, {key: leases.redis_now(client) - 1})
        with lease.hold(client, payload, queue, seconds=30) as third:
            assert third is True
    with lease.hold(client, payload, queue, seconds=30) as later:
        assert later is True  # a finished run leaves no claim behind


def test_a_copy_takes_over_from_a_dead_pool_process_of_its_own_host_at_once(setup):
    import subprocess
    import sys

    client, _, queue = setup
    payload = _payload()
    # A holder that was a process of this host and died (OOM, segfault): its lease still
    # looks alive for its whole term, but the requeued copy need not wait for it.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    runner = lease._runner_key(payload)
    with lease.hold(client, payload, queue, seconds=30) as first:
        assert first is True
        value = client.get(runner)
        value = value.decode() if isinstance(value, bytes) else value
        key = value.split("|")[0]
        client.set(runner, f"{key}|{socket.gethostname()}|{gone.pid}")
        with lease.hold(client, payload, queue, seconds=30) as second:
            assert second is True  # the holder's pid is gone from this host


def test_a_running_chunk_from_another_queue_is_sent_again_to_that_queue(
    setup, monkeypatch, redis_url, tmp_path
):
    """A worker may consume queues besides its configured one (`-Q explain,other`): the
    chunk it was running when it died goes back to the queue it came from."""
    client, _, delivered_on = setup
    monkeypatch.setenv("EXPLAINCTL_BROKER_URL", redis_url)  # for the module's own settings
    monkeypatch.setenv("EXPLAINCTL_OUTPUT", str(tmp_path))
    from explainctl_worker import app as worker

    configured = f"configured-{uuid.uuid4().hex[:8]}"
    settings = Settings.load(broker_url=redis_url, output=str(tmp_path), queue=configured)
    monkeypatch.setattr(worker, "settings", settings)
    monkeypatch.setattr(worker, "_context", None)

    def dies(payload, context):
        raise RuntimeError("the worker died mid-chunk")  # its lease stays behind

    monkeypatch.setattr(worker, "run_chunk", dies)
    message = _payload().model_dump(mode="json")
    try:
        with pytest.raises(RuntimeError):
            worker.explain_chunk_task.apply(args=[message], routing_key=delivered_on, throw=True)
        assert leases.reap(client, worker.app, now=leases.redis_now(client) + 60) == 1
        assert client.llen(configured) == 0
        (sent,) = client.lrange(delivered_on, 0, -1)
        assert json.loads(sent)["headers"]["task"] == "explainctl.explain_chunk"
    finally:
        client.delete(configured)


def test_a_lost_chunk_goes_back_signed_as_it_came(setup):
    """The lease keeps the message as received, signature included: a validated payload
    has dropped it, and workers that hold keys refuse an unsigned chunk."""
    from explainctl.jobs.queue import waiting_chunks
    from explainctl.jobs.signing import SigningKeys

    client, app, queue = setup
    keys = SigningKeys((b"lease-test-key-" + b"k" * 20,))
    payload = _payload()
    received = keys.sign(payload.wire())
    with pytest.raises(RuntimeError), lease.hold(client, payload, queue, 30, received):
        raise RuntimeError("the worker died")
    assert leases.reap(client, app, now=leases.redis_now(client) + 60) == 1
    # waiting_chunks reads kombu's `unacked` hash too, where other tests' workers leave
    # their reserved messages: this chunk is the one of this job.
    (sent,) = [c for c in waiting_chunks(client, queue) if c.get("job_id") == payload.job_id]
    assert sent == received and keys.verify(sent) == "verified"
