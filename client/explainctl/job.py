"""Job records in Redis, owned by explainctl (not Celery results or chords).

Keys, all under `explainctl:job:<id>:`
  meta      hash: info (JobInfo JSON), total, chunks, submitted, cancelled, finished_at
  items     hash: index -> {"uri", "target", "item"}            (fixed at submission)
  state     hash: index -> queued | running | done | failed | cancelled
  result    hash: index -> ItemRecord fields set by the worker (result or error)
  attempts  hash: index -> how many times a worker started the item
  counts    hash: state -> number of items in it
and `explainctl:jobs`, a sorted set of job IDs by creation time.

Every state change goes through one Lua script that moves the item and its counters
together, and refuses to leave a final state: a chunk delivered twice cannot count an item
twice. The same script notices the change that finishes the job, exactly once.

This is the Redis boundary: every JobStore method turns a redis error into
ServiceUnavailable (`_redis_errors`), so no caller handles redis's own exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from explainctl.contracts import (
    ITEM_STATES,
    TERMINAL_STATES,
    ChunkItem,
    JobInfo,
    JobState,
    item_name,
)
from explainctl.errors import JobNotFound, ServiceUnavailable
from explainctl.ids import check_job_id
from explainctl.item import ItemRecord

JOBS_KEY = "explainctl:jobs"
_BATCH = 1000

_TRANSITION = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return {-1, 0} end
local final = {done = true, failed = true, cancelled = true}
local new = ARGV[2]
if ARGV[4] == 'retry' then
  if old ~= 'failed' and old ~= 'cancelled' then return {0, 0} end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  redis.call('HDEL', KEYS[4], 'finished_at')
elseif ARGV[4] == 'queued-only' then
  if old ~= 'queued' then return {0, 0} end
elseif final[old] then
  return {0, 0}
end
local attempts = 0
if new == 'running' then attempts = redis.call('HINCRBY', KEYS[5], ARGV[1], 1) end
if old ~= new then
  redis.call('HSET', KEYS[1], ARGV[1], new)
  redis.call('HINCRBY', KEYS[2], old, -1)
  redis.call('HINCRBY', KEYS[2], new, 1)
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
local finished = 0
if final[new] then
  local c = redis.call('HMGET', KEYS[2], 'done', 'failed', 'cancelled')
  local settled = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
  local m = redis.call('HMGET', KEYS[4], 'total', 'submitted')
  if m[2] == '1' and settled == tonumber(m[1]) then
    finished = redis.call('HSETNX', KEYS[4], 'finished_at', ARGV[5])
  end
end
return {1, finished, attempts}
"""

_SUBMITTED = """
redis.call('HSET', KEYS[1], 'submitted', '1')
local c = redis.call('HMGET', KEYS[2], 'done', 'failed', 'cancelled')
local settled = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
if settled == tonumber(redis.call('HGET', KEYS[1], 'total') or '0') then
  return redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    total: int
    counts: dict[str, int]
    submitted: bool
    cancelled: bool
    finished_at: float | None
    info: JobInfo

    def as_json(self) -> dict:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "total": self.total,
            "counts": self.counts,
            "submitted": self.submitted,
            "cancelled": self.cancelled,
            "created": self.info.created,
            "finished_at": self.finished_at,
            "model": self.info.model.name,
            "output": self.info.output,
            "queue": self.info.queue,
        }


def job_state(
    counts: dict[str, int], total: int, submitted: bool, cancelled: bool, finished: bool
) -> JobState:
    if cancelled and counts.get("running", 0) == 0:
        return "cancelled"
    if not submitted:
        return "submitting"
    if finished:
        return "completed_with_failures" if counts.get("failed", 0) else "completed"
    if counts.get("queued", 0) == total:
        return "queued"
    return "running"


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """The one place a redis error becomes a domain error (after the client's own retries)."""
    try:
        yield
    except redis.RedisError as error:
        raise ServiceUnavailable(f"lost Redis: {type(error).__name__}") from None


def _translated(method: Callable) -> Callable:
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(*args, **kwargs):
            with redis_errors():
                yield from method(*args, **kwargs)

        return generator

    @functools.wraps(method)
    def call(*args, **kwargs):
        with redis_errors():
            return method(*args, **kwargs)

    return call


def _redis_boundary(cls: type) -> type:
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, _translated(value))
    return cls


@_redis_boundary
class JobStore:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._transition = client.register_script(_TRANSITION)
        self._submitted = client.register_script(_SUBMITTED)

    @classmethod
    def connect(cls, url: str) -> JobStore:
        # Ride out a Redis restart of several seconds instead of failing the chunk.
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=12)
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=25,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client)

    def ping(self) -> None:
        self.redis.ping()

    @staticmethod
    def _key(job_id: str, part: str) -> str:
        return f"explainctl:job:{job_id}:{part}"

    def _keys(self, job_id: str) -> list[str]:
        return [self._key(job_id, p) for p in ("state", "counts", "result", "meta", "attempts")]

    # --- submission -------------------------------------------------------------------

    def create(self, info: JobInfo) -> None:
        meta = self._key(info.job_id, "meta")
        pipe = self.redis.pipeline()
        pipe.hset(meta, mapping={"info": info.model_dump_json(), "total": 0, "chunks": 0})
        pipe.hset(self._key(info.job_id, "counts"), mapping={s: 0 for s in ITEM_STATES})
        pipe.zadd(JOBS_KEY, {info.job_id: info.created})
        pipe.execute()

    def add_chunk(self, job_id: str, items: Sequence[ChunkItem]) -> int:
        """Record items as queued in one round trip; returns the new chunk's number."""
        pipe = self.redis.pipeline()
        pipe.hset(
            self._key(job_id, "items"),
            mapping={
                str(i.index): json.dumps(
                    {"uri": i.uri, "target": i.target, "item": item_name(i.index, i.uri)}
                )
                for i in items
            },
        )
        pipe.hset(self._key(job_id, "state"), mapping={str(i.index): "queued" for i in items})
        pipe.hincrby(self._key(job_id, "counts"), "queued", len(items))
        pipe.hincrby(self._key(job_id, "meta"), "total", len(items))
        pipe.hincrby(self._key(job_id, "meta"), "chunks", 1)
        return int(pipe.execute()[-1]) - 1

    def new_chunk_number(self, job_id: str) -> int:
        return int(self.redis.hincrby(self._key(job_id, "meta"), "chunks", 1)) - 1

    def mark_submitted(self, job_id: str) -> bool:
        """Submission finished; True when this also finished the job (all items settled)."""
        keys = [self._key(job_id, "meta"), self._key(job_id, "counts")]
        return bool(self._submitted(keys=keys, args=[time.time()]))

    # --- worker side ------------------------------------------------------------------

    def states(self, job_id: str, indices: Sequence[int]) -> list[str | None]:
        if not indices:
            return []
        return self.redis.hmget(self._key(job_id, "state"), [str(i) for i in indices])

    def begin(self, job_id: str, indices: Sequence[int]) -> list[int | None]:
        """Mark items running and count an attempt for each; returns the attempt numbers,
        None for an item already settled (another copy of its chunk finished it)."""
        keys = self._keys(job_id)
        pipe = self.redis.pipeline(transaction=False)
        for index in indices:
            self._transition(keys=keys, args=[index, "running", "", "normal", 0], client=pipe)
        return [int(reply[2]) if reply[0] == 1 else None for reply in pipe.execute()]

    def settle(
        self, job_id: str, changes: Iterable[tuple[int, str, dict]], mode: str = "normal"
    ) -> bool:
        """Move items to final states; True if that finished the job. `queued-only` moves
        only items still queued (a cancel must not discard work a worker started)."""
        keys = self._keys(job_id)
        now = time.time()
        finished = False
        changes = list(changes)
        for start in range(0, len(changes), _BATCH):
            pipe = self.redis.pipeline()
            for index, state, fields in changes[start : start + _BATCH]:
                assert state in TERMINAL_STATES
                payload = json.dumps(fields) if fields else ""
                args = [index, state, payload, mode, now]
                self._transition(keys=keys, args=args, client=pipe)
            finished |= any(reply[0] == 1 and reply[1] for reply in pipe.execute())
        return finished

    def record_delivery(self, job_id: str, chunk: int) -> int:
        return int(self.redis.hincrby(self._key(job_id, "deliveries"), str(chunk), 1))

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id, "meta"), "cancelled") == "1"

    # --- client side ------------------------------------------------------------------

    def info(self, job_id: str) -> JobInfo:
        raw = self.redis.hget(self._key(check_job_id(job_id), "meta"), "info")
        if raw is None:
            raise JobNotFound(f"no job {job_id} in {self._where()}")
        return JobInfo.model_validate_json(raw)

    def _where(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"redis {kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"

    def status(self, job_id: str) -> JobStatus:
        info = self.info(job_id)
        pipe = self.redis.pipeline()
        pipe.hgetall(self._key(job_id, "meta"))
        pipe.hgetall(self._key(job_id, "counts"))
        meta, raw_counts = pipe.execute()
        counts = {state: int(raw_counts.get(state, 0)) for state in ITEM_STATES}
        total = int(meta.get("total", 0))
        submitted = meta.get("submitted") == "1"
        cancelled = meta.get("cancelled") == "1"
        finished_at = float(meta["finished_at"]) if "finished_at" in meta else None
        state = job_state(counts, total, submitted, cancelled, finished_at is not None)
        return JobStatus(job_id, state, total, counts, submitted, cancelled, finished_at, info)

    def items(self, job_id: str, states: set[str] | None = None) -> Iterator[ItemRecord]:
        """Every item in index order, fetched a thousand at a time."""
        total = int(self.redis.hget(self._key(job_id, "meta"), "total") or 0)
        for start in range(0, total, _BATCH):
            indices = [str(i) for i in range(start, min(total, start + _BATCH))]
            pipe = self.redis.pipeline()
            for part in ("items", "state", "result", "attempts"):
                pipe.hmget(self._key(job_id, part), indices)
            items, item_states, results, attempts = pipe.execute()
            for index, raw, state, result, tries in zip(
                indices, items, item_states, results, attempts, strict=True
            ):
                if raw is None or (states and state not in states):
                    continue
                base = json.loads(raw)
                yield ItemRecord(
                    index=int(index),
                    uri=base["uri"],
                    target=base.get("target"),
                    item=base["item"],
                    state=state,
                    attempts=int(tries or 0),
                    **(json.loads(result) if result else {}),
                )

    def cancel(self, job_id: str) -> int:
        """Stop the job: queued items become cancelled; returns how many."""
        self.info(job_id)
        self.redis.hset(self._key(job_id, "meta"), "cancelled", "1")
        queued = [record.index for record in self.items(job_id, {"queued"})]
        self.settle(job_id, [(index, "cancelled", {}) for index in queued], mode="queued-only")
        return len(queued)

    def reopen(self, job_id: str, states: set[str]) -> list[ChunkItem]:
        """Put failed/cancelled items back to queued for a retry; returns them."""
        self.info(job_id)
        self.redis.hdel(self._key(job_id, "meta"), "cancelled")
        records = list(self.items(job_id, states))
        keys = self._keys(job_id)
        for start in range(0, len(records), _BATCH):
            pipe = self.redis.pipeline()
            for record in records[start : start + _BATCH]:
                self._transition(
                    keys=keys, args=[record.index, "queued", "", "retry", 0], client=pipe
                )
            pipe.execute()
        return [ChunkItem(index=r.index, uri=r.uri, target=r.target) for r in records]

    def recent(self, limit: int = 20) -> list[str]:
        return list(self.redis.zrevrange(JOBS_KEY, 0, limit - 1))
