"""Chunk leases: a lost chunk runs again within seconds, not after the visibility timeout.

While a worker runs a chunk it holds a lease in Redis (`explainctl:leases`, a sorted set
scored by expiry time; explainctl.jobs.keys names every key) and renews it from a heartbeat
thread. When the whole worker vanishes (SIGKILL, a lost node or spot instance) the
renewals stop; every worker's reaper thread looks for expired leases and claims one
atomically (lua/claim.lua pushes its expiry out by CLAIM_SECONDS, so no other reaper takes
it), sends the chunk again to the queue it was delivered on (queue.send_chunk, the one
way a chunk is queued), and only then removes the lease and its payload. A reaper that
dies between claim and send leaves a lease that expires again and is claimed by another:
a re-send is never lost, at worst made twice, and items are idempotent.

A chunk a worker has received but not yet started (reserved: waiting for its pool
process) holds a reservation lease, taken by the worker's main process on receipt and
renewed by it (`Reservations`), released when the chunk starts; a worker that dies with
a reserved chunk therefore loses it for seconds too, not for the visibility timeout.

The original message is still redelivered by Redis after the visibility timeout; by then
its items are settled and the second run does nothing (explainctl.jobs.store keeps items final).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from explainctl.jobs import keys
from explainctl.jobs.queue import send_chunk
from explainctl.spec.contracts import ChunkPayload

LEASES = keys.LEASES_KEY
CLAIM_SECONDS = 30.0  # how long a claimed lease is left to its reaper before another may
log = logging.getLogger("explainctl.worker")
_RUN = keys.Script("run")
_CLAIM = keys.Script("claim")


def _key(payload: ChunkPayload) -> str:
    # One lease per run, not per chunk: two copies of a chunk (a requeue and a re-send)
    # must not release or renew each other's lease.
    return keys.lease_member(payload.job_id, payload.chunk, uuid.uuid4().hex[:8])


def _now(client: redis.Redis) -> float:
    """Redis's clock, not this host's: every worker compares expiries on the same clock,
    so clock skew between machines cannot make a healthy chunk look lost."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _payload_key(key: str) -> str:
    return keys.lease_key(key)


def _runner_key(payload: ChunkPayload) -> str:
    return keys.runner_key(payload.job_id, payload.chunk)


def delivered_queue(request: Any, configured: str) -> str:
    """The queue a task's message came from: its delivery's routing key (with Celery's
    default direct exchange, the queue's name), else the worker's configured queue. A
    worker may consume several queues (`-Q explain,other`): a lost chunk goes back to its
    own, where the workers meant for it look."""
    return (getattr(request, "delivery_info", None) or {}).get("routing_key") or configured


def _me() -> str:
    return f"{socket.gethostname()}|{os.getpid()}"


def _dead_holder(client: redis.Redis, runner: str) -> str:
    """The runner value of a holder that was a process of this host and is gone (a pool
    process killed mid-chunk: its lease would look alive until it expired), else ""."""
    value = client.get(runner)
    if not value:
        return ""
    value = value.decode() if isinstance(value, bytes) else value
    parts = value.rsplit("|", 2)
    if len(parts) != 3 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return ""
    pid = parts[2]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return value
    except PermissionError:
        pass  # alive, someone else's
    return ""


@contextlib.contextmanager
def hold(client: redis.Redis, payload: ChunkPayload, queue: str, seconds: float) -> Iterator[bool]:
    """Hold the chunk's lease while the block runs; yields False, holding nothing, when
    another copy of the chunk is running under a live lease (after a Redis restart kombu
    hands back the message of a chunk still running): that copy's lease covers it, and
    if its worker dies the reaper sends the chunk again. The lease is released only when
    the block finishes normally: after an exception it expires and the chunk is sent again,
    to `queue`: the one it was delivered on (`delivered_queue`). The attempt counts of
    explainctl.jobs.store bound how often."""
    key = _key(payload)
    body = json.dumps({"queue": queue, "payload": payload.wire()})
    client.set(_payload_key(key), body)
    claim = _RUN.on(client)
    now = _now(client)
    runner = _runner_key(payload)
    dead = _dead_holder(client, runner)
    mine = claim(
        keys={"runner": runner, "leases": LEASES},
        args={"lease": key, "expiry": now + seconds, "now": now, "seconds": seconds,
              "dead": dead, "me": _me()},
    )  # fmt: skip
    if not mine:
        client.delete(_payload_key(key))
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 4):
            with contextlib.suppress(redis.RedisError):  # a blip: the next beat retries
                pipe = client.pipeline()
                pipe.zadd(LEASES, {key: _now(client) + seconds}, xx=True)
                pipe.expire(_runner_key(payload), max(1, int(seconds)))
                pipe.execute()

    beat = threading.Thread(target=renew, name=f"lease-{key}", daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
    release(client, key)


def reap(client: redis.Redis, app, now: float | None = None, limit: int = 20) -> int:
    """Send again the chunks whose leases expired; returns how many."""
    now = now or _now(client)
    claim = _CLAIM.on(client)
    expired = client.zrangebyscore(LEASES, "-inf", now, start=0, num=limit)
    sent = 0
    for member in expired:
        key = member.decode() if isinstance(member, bytes) else member
        args = {"lease": key, "now": now, "expiry": now + CLAIM_SECONDS}
        if not claim(keys={"leases": LEASES}, args=args):
            continue  # another worker's reaper claimed it first
        body = client.get(_payload_key(key))
        if body is not None:
            lease = json.loads(body)
            send_chunk(app, lease["payload"], lease["queue"])
            log.warning("chunk %s lost its worker; sent it again", key)
            sent += 1
        release(client, key)
    return sent


def reservation_key(task_id: str) -> str:
    return keys.reservation_member(task_id)


class Reservations:
    """The reservation leases of one worker's main process, renewed from one thread."""

    def __init__(self, client: redis.Redis, seconds: float):
        self.client = client
        self.seconds = seconds
        self._held: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._renew, name="reservations", daemon=True).start()

    def take(self, task_id: str, payload: dict, queue: str) -> None:
        key = reservation_key(task_id)
        body = json.dumps({"queue": queue, "payload": payload})
        pipe = self.client.pipeline()
        pipe.set(_payload_key(key), body)
        pipe.zadd(LEASES, {key: _now(self.client) + self.seconds})
        pipe.execute()
        with self._lock:
            self._held.add(key)

    def _renew(self) -> None:
        while True:
            time.sleep(self.seconds / 4)
            with self._lock:
                held = sorted(self._held)
            if not held:
                continue
            with contextlib.suppress(redis.RedisError):  # a blip: the next beat retries
                expiry = _now(self.client) + self.seconds
                pipe = self.client.pipeline()
                for key in held:
                    pipe.zadd(LEASES, {key: expiry}, xx=True, ch=True)
                kept = pipe.execute()
                with self._lock:  # released (the chunk started) or reaped: stop renewing
                    self._held -= {k for k, alive in zip(held, kept, strict=True) if not alive}


def release(client: redis.Redis, key: str) -> None:
    """Remove a lease and its payload."""
    pipe = client.pipeline()
    pipe.zrem(LEASES, key)
    pipe.delete(_payload_key(key))
    pipe.execute()


def start_reaper(client: redis.Redis, app, seconds: float) -> threading.Thread:
    def loop() -> None:
        while True:
            time.sleep(seconds / 2)
            try:
                reap(client, app)
            except Exception as error:  # the reaper must outlive any blip
                log.warning("lease reaper: %s", error)

    thread = threading.Thread(target=loop, name="lease-reaper", daemon=True)
    thread.start()
    return thread
