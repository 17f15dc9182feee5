"""Items nothing will run: queued or running in the job's records, yet in no waiting or
reserved message and under no lease.

A chunk can fall between Redis's records and the queue: a worker dies between handing
items back and sending them, a Redis crash keeps the records but loses the message, a
Redis that lost its last second of writes forgets a lease whose items it still shows
running. Such items stay where they are and the job never ends. The reconciler looks
for them in submitted, unfinished jobs and sends them again once they looked lost on two
looks at least `grace` seconds apart (EXPLAINCTL_RECONCILE_SECONDS): a hand-back being
sent, or a message kombu is moving from the queue to `unacked`, is in neither place for a
moment. The first look is kept in Redis (`explainctl:suspects:<id>`), so whichever
reaper looks next continues it: every worker's reaper thread, and `wait`.

It looks only where the job's queue is short, since it reads every waiting message: while
thousands wait, work flows, and orphans are found once the queue has drained, at the tail
of the job, where they would otherwise hang it.
"""

from __future__ import annotations

import json
import logging

from celery import Celery

from explainctl.jobs import keys, leases
from explainctl.jobs.queue import send_items, waiting_chunks
from explainctl.jobs.store import JobStore, redis_errors

log = logging.getLogger("explainctl.reconcile")

# Past this many waiting messages (about 1.8 kB each) a look costs too much for a reaper.
MAX_WAITING = 5000


def in_flight(store: JobStore, job_id: str, queue: str) -> set[int]:
    """Indices of the job's items in a waiting or reserved message, or under a lease."""
    payloads = [*waiting_chunks(store.redis, queue), *leases.held(store.redis)]
    return {
        item["index"]
        for payload in payloads
        if payload.get("job_id") == job_id
        for item in payload.get("items", ())
    }


def reconcile(store: JobStore, app: Celery, job_id: str, grace: float) -> int:
    """Send again the job's items that looked lost on this look and on one at least
    `grace` seconds before; returns how many were sent."""
    with redis_errors():
        return _reconcile(store, app, job_id, grace)


def _reconcile(store: JobStore, app: Celery, job_id: str, grace: float) -> int:
    suspects = keys.suspects_key(job_id)
    status = store.status(job_id)
    if status.state not in ("queued", "running"):
        store.redis.delete(suspects)
        return 0
    queue = status.info.queue
    if store.redis.llen(queue) > MAX_WAITING:
        return 0
    waiting = {*store.indices(job_id, "queued"), *store.indices(job_id, "running")}
    lost = waiting - in_flight(store, job_id, queue) if waiting else set()
    now = leases.redis_now(store.redis)
    earlier = store.redis.get(suspects)
    if not lost:
        store.redis.delete(suspects)
        return 0
    if earlier is None:
        _suspect(store, suspects, now, lost, grace)
        return 0
    first = json.loads(earlier)
    still = lost & set(first["indices"])
    if now - first["at"] < grace:
        _suspect(store, suspects, first["at"], still, grace)
        return 0
    store.redis.delete(suspects)
    if not still:
        return 0
    items = store.items_at(job_id, still)
    size = status.info.chunk_size
    for start in range(0, len(items), size):
        send_items(app, status.info, items[start : start + size], store.new_chunk_number(job_id))
    log.warning("job %s: %d queued items were in no message and under no lease; sent again",
                job_id, len(items))  # fmt: skip
    return len(items)


def _suspect(store: JobStore, key: str, at: float, indices: set[int], grace: float) -> None:
    if indices:
        body = json.dumps({"at": at, "indices": sorted(indices)})
        store.redis.set(key, body, ex=int(grace * 10))
    else:
        store.redis.delete(key)


def reconcile_recent(store: JobStore, app: Celery, grace: float, limit: int = 50) -> int:
    """`reconcile` over the newest jobs; returns how many items were sent again."""
    return sum(reconcile(store, app, job_id, grace) for job_id in store.recent(limit))
