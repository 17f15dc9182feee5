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

What it sends it reads back from the records, verified (JobStore.verified_info,
items_at): items whose records fail their MAC are failed with `record-tampered`, never
sent, since the message would carry this process's signature over someone's edit.

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
from explainctl.spec.contracts import OLDEST_READABLE, PROTOCOL
from explainctl.spec.errors import ExplainctlError, RecordTampered

log = logging.getLogger("explainctl.reconcile")

# Past this many waiting messages (about 1.8 kB each) a look costs too much for a reaper.
MAX_WAITING = 5000


def in_flight(store: JobStore, queues: set[str]) -> dict[str, set[int]]:
    """By job, the indices of items in a message waiting in `queues` or reserved by a
    worker, or under a lease."""
    payloads = [*leases.held(store.redis)]
    for queue in queues:
        payloads += waiting_chunks(store.redis, queue)
    found: dict[str, set[int]] = {}
    for payload in payloads:
        indices = found.setdefault(str(payload.get("job_id")), set())
        indices.update(item["index"] for item in payload.get("items", ()))
    return found


def reconcile(store: JobStore, app: Celery, job_id: str, grace: float) -> int:
    """Send again the job's items that looked lost on this look and on one at least
    `grace` seconds before; returns how many were sent."""
    with redis_errors():
        return _reconcile(store, app, job_id, grace, None)


def _reconcile(store: JobStore, app: Celery, job_id: str, grace: float, flying) -> int:
    """`flying`: in_flight's answer when the caller read it for several jobs, else None."""
    suspects = keys.suspects_key(job_id)
    status = store.status(job_id)
    readable = OLDEST_READABLE <= store.protocol(job_id) <= PROTOCOL
    if status.state not in ("queued", "running") or not readable or store.sending(job_id):
        # Finished, of a layout this code does not read, or a retry still sending it.
        store.redis.delete(suspects)
        return 0
    queue = status.info.queue
    if store.redis.llen(queue) > MAX_WAITING:
        return 0
    waiting = set(store.indices(job_id, "queued", "running"))
    if flying is None:
        flying = in_flight(store, {queue})
    lost = waiting - flying.get(job_id, set())
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
    if store.redis.getdel(suspects) != earlier:
        return 0  # another reaper took this look first: it sends them
    if not still:
        return 0
    try:
        info = store.verified_info(job_id)
    except RecordTampered as error:
        store.fail_tampered(job_id, sorted(still))
        log.error("%s: its %d lost items failed as record-tampered", error, len(still))
        return 0
    recorded = store.items_at(job_id, still)
    if recorded.tampered:
        store.fail_tampered(job_id, recorded.tampered)
        log.error("job %s: %d lost items have records that do not verify against the signing "
                  "keys: failed as record-tampered, not sent", job_id,
                  len(recorded.tampered))  # fmt: skip
    items, size = recorded.items, info.chunk_size
    for start in range(0, len(items), size):
        send_items(app, info, items[start : start + size], store.new_chunk_number(job_id))
    if items:
        log.warning("job %s: %d queued items were in no message and under no lease; sent "
                    "again", job_id, len(items))  # fmt: skip
    return len(items)


def _suspect(store: JobStore, key: str, at: float, indices: set[int], grace: float) -> None:
    if indices:
        body = json.dumps({"at": at, "indices": sorted(indices)})
        store.redis.set(key, body, ex=max(60, int(grace * 10)))  # outlives a few looks
    else:
        store.redis.delete(key)


def reconcile_recent(store: JobStore, app: Celery, grace: float, limit: int = 50) -> int:
    """`reconcile` over the newest jobs, reading the queues and leases once; returns how
    many items were sent again. A job that cannot be looked at does not stop the others."""
    sent = 0
    with redis_errors():
        jobs = store.recent(limit)
        queues = {store.status(job_id).info.queue for job_id in jobs}
        flying = in_flight(store, {q for q in queues if store.redis.llen(q) <= MAX_WAITING})
    for job_id in jobs:
        try:
            with redis_errors():
                sent += _reconcile(store, app, job_id, grace, flying)
        except ExplainctlError as error:
            log.warning("job %s: could not look for lost items: %s", job_id, error)
    return sent
