"""Leases a worker holds: a lost chunk runs again within seconds, not after the
visibility timeout.

While a worker runs a chunk it holds a lease (explainctl.jobs.leases: what Redis keeps of
it, and the reaper) and renews it from a heartbeat thread. When the whole worker vanishes
(SIGKILL, a lost node or spot instance) the renewals stop, and a reaper (every worker's
reaper thread, or a client's `wait`) sends the chunk again.

A chunk a worker has received but not yet started (reserved: waiting for its pool
process) holds a reservation lease, taken by the worker's main process on receipt and
renewed by it (`Reservations`), released when the chunk starts; a worker that dies with
a reserved chunk therefore loses it for seconds too, not for the visibility timeout.

The original message is still redelivered by Redis after the visibility timeout; by then
its items are settled and the second run does nothing (explainctl.jobs.store keeps items final).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from explainctl.jobs import keys, leases, reconcile
from explainctl.jobs.leases import LEASES, redis_now, release
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ChunkPayload

log = logging.getLogger("explainctl.worker")
_RUN = keys.Script("run")


def _key(payload: ChunkPayload) -> str:
    # One lease per run, not per chunk: two copies of a chunk (a requeue and a re-send)
    # must not release or renew each other's lease.
    return keys.lease_member(payload.job_id, payload.chunk, uuid.uuid4().hex[:8])


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
def hold(
    client: redis.Redis,
    payload: ChunkPayload,
    queue: str,
    seconds: float,
    message: dict | None = None,
) -> Iterator[bool]:
    """Hold the chunk's lease while the block runs; yields False, holding nothing, when
    another copy of the chunk is running under a live lease (after a Redis restart kombu
    hands back the message of a chunk still running): that copy's lease covers it, and
    if its worker dies the reaper sends the chunk again. The lease is released only when
    the block finishes normally: after an exception it expires and the chunk is sent again,
    to `queue`: the one it was delivered on (`delivered_queue`). The attempt counts of
    explainctl.jobs.store bound how often. `message` is the chunk as it was received: the
    reaper sends it again as it is, signature included (`payload` lost it in validation)."""
    key = _key(payload)
    leases.put_payload(client, key, queue, payload.wire() if message is None else message)
    claim = _RUN.on(client)
    now = redis_now(client)
    runner = _runner_key(payload)
    dead = _dead_holder(client, runner)
    mine = claim(
        keys={"runner": runner, "leases": LEASES},
        args={"lease": key, "expiry": now + seconds, "now": now, "seconds": seconds,
              "dead": dead, "me": _me()},
    )  # fmt: skip
    if not mine:
        client.delete(keys.lease_key(key))
        yield False
        return
    client.rpush(leases.BUSY, key)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 4):
            with contextlib.suppress(redis.RedisError):  # a blip: the next beat retries
                pipe = client.pipeline()
                pipe.zadd(LEASES, {key: redis_now(client) + seconds}, xx=True)
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
        pipe = self.client.pipeline()
        leases.put_payload(pipe, key, queue, payload)
        pipe.zadd(LEASES, {key: redis_now(self.client) + self.seconds})
        pipe.rpush(leases.BUSY, key)
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
                expiry = redis_now(self.client) + self.seconds
                pipe = self.client.pipeline()
                for key in held:
                    pipe.zadd(LEASES, {key: expiry}, xx=True, ch=True)
                kept = pipe.execute()
                with self._lock:  # released (the chunk started) or reaped: stop renewing
                    self._held -= {k for k, alive in zip(held, kept, strict=True) if not alive}


def start_reaper(store: JobStore, app, seconds: float, grace: float) -> threading.Thread:
    """Reap expired leases every seconds/2; look for lost items every grace/2."""

    def loop() -> None:
        looked = time.monotonic()
        while True:
            time.sleep(seconds / 2)
            try:
                leases.reap(store.redis, app)
                if time.monotonic() - looked >= grace / 2:
                    looked = time.monotonic()
                    reconcile.reconcile_recent(store, app, grace)
            except Exception as error:  # the reaper must outlive any blip
                log.warning("lease reaper: %s", error)

    thread = threading.Thread(target=loop, name="lease-reaper", daemon=True)
    thread.start()
    return thread
