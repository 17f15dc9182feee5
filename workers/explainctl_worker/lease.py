"""Chunk leases: a lost chunk runs again within seconds, not after the visibility timeout.

While a worker runs a chunk it holds a lease in Redis (`explainctl:leases`, a sorted set
scored by expiry time) and renews it from a heartbeat thread. When the whole worker
vanishes (SIGKILL, a lost node or spot instance) the renewals stop; every worker's reaper
thread looks for expired leases and claims one atomically (a Lua script pushes its expiry
out by CLAIM_SECONDS, so no other reaper takes it), sends the chunk again, and only then
removes the lease and its payload. A reaper that dies between claim and send leaves a
lease that expires again and is claimed by another: a re-send is never lost, at worst
made twice, and items are idempotent.

A chunk a worker has received but not yet started (reserved: waiting for its pool
process) holds a reservation lease, taken by the worker's main process on receipt and
renewed by it (`Reservations`), released when the chunk starts; a worker that dies with
a reserved chunk therefore loses it for seconds too, not for the visibility timeout.

The original message is still redelivered by Redis after the visibility timeout; by then
its items are settled and the second run does nothing (explainctl.job keeps items final).
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

import redis

from explainctl.contracts import TASK_EXPLAIN_CHUNK, ChunkPayload

LEASES = "explainctl:leases"
CLAIM_SECONDS = 30.0  # how long a claimed lease is left to its reaper before another may
log = logging.getLogger("explainctl.worker")

# KEYS: the chunk's runner key, the leases; ARGV: my lease, its expiry, now, seconds, a
# holder known to be dead, me (host|pid). The chunk is mine unless the runner key names
# another lease that is still alive; the lease is taken in the same step, so a runner key
# always names a lease that can expire.
_RUN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[5] then
  local score = redis.call('ZSCORE', KEYS[2], string.match(holder, '^[^|]*'))
  if score and tonumber(score) > tonumber(ARGV[3]) then return 0 end
end
local ttl = math.max(1, math.floor(tonumber(ARGV[4])))
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[6], 'EX', ttl)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS[1] the leases; ARGV: member, now, claimed expiry. 1 if this caller claimed it.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def _key(payload: ChunkPayload) -> str:
    # One lease per run, not per chunk: two copies of a chunk (a requeue and a re-send)
    # must not release or renew each other's lease.
    return f"{payload.job_id}:{payload.chunk}:{uuid.uuid4().hex[:8]}"


def _now(client: redis.Redis) -> float:
    """Redis's clock, not this host's: every worker compares expiries on the same clock,
    so clock skew between machines cannot make a healthy chunk look lost."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _payload_key(key: str) -> str:
    return f"explainctl:lease:{key}"


def _runner_key(payload: ChunkPayload) -> str:
    return f"explainctl:runner:{payload.job_id}:{payload.chunk}"


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
    the block finishes normally: after an exception it expires and the chunk is sent again
    (the attempt counts of explainctl.job bound how often)."""
    key = _key(payload)
    body = json.dumps({"queue": queue, "payload": payload.model_dump(mode="json")})
    client.set(_payload_key(key), body)
    claim = client.register_script(_RUN)
    now = _now(client)
    runner = _runner_key(payload)
    dead = _dead_holder(client, runner)
    if not claim(keys=[runner, LEASES], args=[key, now + seconds, now, seconds, dead, _me()]):
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
    claim = client.register_script(_CLAIM)
    expired = client.zrangebyscore(LEASES, "-inf", now, start=0, num=limit)
    sent = 0
    for member in expired:
        key = member.decode() if isinstance(member, bytes) else member
        if not claim(keys=[LEASES], args=[key, now, now + CLAIM_SECONDS]):
            continue  # another worker's reaper claimed it first
        body = client.get(_payload_key(key))
        if body is not None:
            lease = json.loads(body)
            app.send_task(TASK_EXPLAIN_CHUNK, args=[lease["payload"]], queue=lease["queue"])
            log.warning("chunk %s lost its worker; sent it again", key)
            sent += 1
        release(client, key)
    return sent


def reservation_key(task_id: str) -> str:
    return f"reserved:{task_id}"


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
