"""Chunk leases as Redis holds them, and their reaper: what a lost chunk needs to run again.

A running or reserved chunk holds a lease: a member of `explainctl:leases` scored by its
expiry, its payload (the chunk and the queue it came from) at `explainctl:lease:<member>`,
and its member in `explainctl:busy`, a list whose length is how many chunks are held (the
queue-length autoscaler reads it, so a job's tail keeps a worker while leases live).
Workers take and renew leases (explainctl_worker.service.lease); anyone may reap them:
every worker's reaper thread, and `wait`, so a job whose last worker died is sent again
for the next worker even when none is left to notice.

`reap` claims an expired lease atomically (lua/claim.lua pushes its expiry out by
CLAIM_SECONDS, so no other reaper takes it), sends the chunk again to the queue it was
delivered on (queue.send_chunk, the one way a chunk is queued), and only then removes the
lease. A reaper that dies between claim and send leaves a lease that expires again and is
claimed by another: a re-send is never lost, at worst made twice, and items are idempotent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import redis

from explainctl.jobs import keys
from explainctl.jobs.queue import send_chunk

LEASES = keys.LEASES_KEY
BUSY = keys.BUSY_KEY
CLAIM_SECONDS = 30.0  # how long a claimed lease is left to its reaper before another may
log = logging.getLogger("explainctl.leases")
_CLAIM = keys.Script("claim")


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, not this host's: every worker compares expiries on the same clock,
    so clock skew between machines cannot make a healthy chunk look lost."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def put_payload(client, member: str, queue: str, payload: dict) -> None:
    """Keep the chunk a lease holds (on `client`, or a pipeline) before the lease exists,
    so a reaper never finds a lease without its chunk."""
    client.set(keys.lease_key(member), json.dumps({"queue": queue, "payload": payload}))


def release(client: redis.Redis, member: str) -> None:
    """Remove a lease, its payload and its place in the busy list."""
    pipe = client.pipeline()
    pipe.zrem(LEASES, member)
    pipe.delete(keys.lease_key(member))
    pipe.lrem(BUSY, 1, member)
    pipe.execute()


def held(client: redis.Redis) -> Iterator[dict]:
    """The chunk payloads under a lease now (running or reserved)."""
    members = [m.decode() if isinstance(m, bytes) else m for m in client.zrange(LEASES, 0, -1)]
    bodies = client.mget([keys.lease_key(m) for m in members]) if members else []
    for body in bodies:
        if body:
            yield json.loads(body)["payload"]


def reap(client: redis.Redis, app, now: float | None = None, limit: int = 20) -> int:
    """Send again the chunks whose leases expired; returns how many."""
    now = now or redis_now(client)
    claim = _CLAIM.on(client)
    expired = client.zrangebyscore(LEASES, "-inf", now, start=0, num=limit)
    sent = 0
    for raw in expired:
        member = raw.decode() if isinstance(raw, bytes) else raw
        args = {"lease": member, "now": now, "expiry": now + CLAIM_SECONDS}
        if not claim(keys={"leases": LEASES}, args=args):
            continue  # another reaper claimed it first
        body = client.get(keys.lease_key(member))
        if body is not None:
            lease = json.loads(body)
            send_chunk(app, lease["payload"], lease["queue"])
            log.warning("chunk %s lost its worker; sent it again", member)
            sent += 1
        release(client, member)
    return sent
