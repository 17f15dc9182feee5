"""Job records in Redis, owned by explainctl (not Celery results or chords).

Keys (explainctl.jobs.keys builds them), all under `explainctl:job:<id>:`
  meta      hash: info (JobInfo JSON), total, chunks, sent, submitted, cancelled,
            finished_at, layout:<id> (the score names of a result layout)
  items     hash: index -> [uri] or [uri, target]                 (fixed at submission)
  state     hash: index -> queued | running | done | failed | cancelled
  result    hash: index -> the scores as a list in a named layout, or the error
  attempts  hash: index -> how many times a worker started the item
  counts    hash: state -> number of items in it
  deliveries hash: chunk -> how many times a worker received it
  submitter string: the submit that holds the job while it queues (expires unless renewed)
and `explainctl:jobs`, a sorted set of job IDs by creation time. Once a finished job's
manifest is written (`seal`), its keys expire after the job TTL and a small `index` key
(job.json's content: what was asked and the final status) stays for INDEX_TTL_FACTOR
times longer, so `jobs` and `status` still answer and `results` finds the manifest in
storage. Only what cannot be derived is stored: an item's name comes from its index and
URI (contracts.item_name), its artifacts' URIs from the job's output (uri.key_uri), so a
million-item job stays small.

Every state change goes through one Lua script (lua/transition.lua) that moves the item
and its counters together, and refuses to leave a final state: a chunk delivered twice
cannot count an item twice. The same script notices the change that finishes the job,
exactly once. The scripts are given the terminal states from contracts.TERMINAL_STATES.

This is the Redis boundary: every JobStore method turns a redis error into
ServiceUnavailable (`redis_errors`), so no caller handles redis's own exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from explainctl.config import INDEX_TTL_FACTOR
from explainctl.io.uri import key_uri
from explainctl.jobs.keys import JOB_PARTS, JOBS_KEY, JobPart, Script, argv_set, job_key
from explainctl.spec.contracts import (
    ARTIFACT_FILES,
    ITEM_STATES,
    TERMINAL_STATES,
    ChunkItem,
    JobInfo,
    JobState,
    artifact_key,
    item_name,
)
from explainctl.spec.errors import JobNotFound, ServiceUnavailable
from explainctl.spec.ids import check_job_id
from explainctl.spec.results import SCORE_FIELDS, ItemRecord

_BATCH = 1000

# The scripts (lua/*.lua) and the item states they are given, from their declaration.
_TRANSITION = Script("transition")
_SUBMITTED = Script("submitted")
_SEAL = Script("seal")
_DELIVERED = Script("delivered")
_TERMINAL = argv_set(TERMINAL_STATES)
_REOPENABLE = argv_set(TERMINAL_STATES - {"done"})  # a retry never runs a done item again


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

    def document(self) -> dict:
        """job.json's content, and a sealed job's index entry: what was asked, and how it went."""
        return {"info": self.info.model_dump(mode="json"), "status": self.as_json()}

    @classmethod
    def from_document(cls, document: dict) -> JobStatus:
        status, info = document["status"], JobInfo.model_validate(document["info"])
        return cls(
            job_id=status["job_id"], state=status["state"], total=status["total"],
            counts=status["counts"], submitted=status["submitted"],
            cancelled=status["cancelled"], finished_at=status["finished_at"], info=info,
        )  # fmt: skip

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
    counts: dict[str, int],
    total: int,
    submitted: bool,
    cancelled: bool,
    finished: bool,
    submitter_alive: bool = True,
) -> JobState:
    if cancelled and counts.get("running", 0) == 0:
        return "cancelled"
    if not submitted:
        return "submitting" if submitter_alive else "interrupted"
    if finished:
        return "completed_with_failures" if counts.get("failed", 0) else "completed"
    if counts.get("queued", 0) == total:
        return "queued"
    return "running"


# The scores of a done item are stored as a list in SCORE_FIELDS order; the layout's
# names are kept once per job (meta layout:<id>), so workers of another version, with
# other fields, still write records this code reads.
_LAYOUT = ",".join(SCORE_FIELDS)
_LAYOUT_ID = hashlib.sha1(_LAYOUT.encode()).hexdigest()[:8]


def _encode(fields: dict) -> str:
    """A settled item's record fields as stored: scores as a list, artifact names only
    when they are not the usual set, errors as they are."""
    fields = dict(fields)
    stored: dict = {}
    if "artifacts" in fields:
        names = list(fields.pop("artifacts") or ())
        if names != list(ARTIFACT_FILES):
            stored["f"] = names
    if "attempt" in fields:
        stored["a"] = fields.pop("attempt")
    if any(name in fields for name in SCORE_FIELDS):
        stored["l"] = _LAYOUT_ID
        stored["s"] = [fields.pop(name, None) for name in SCORE_FIELDS]
    stored.update(fields)
    return json.dumps(stored, separators=(",", ":"))


def _decode(raw: str | None, layouts: dict[str, list[str]], uri_of) -> dict:
    """ItemRecord fields from a stored record (as _encode wrote it)."""
    if not raw:
        return {}
    stored = json.loads(raw)
    if "s" not in stored and "f" not in stored:
        return stored  # an error: its fields as they are
    fields = {}
    attempt = stored.pop("a", None)
    if "s" in stored:
        names = layouts[stored.pop("l")]
        known = set(ItemRecord.model_fields)
        fields = {n: v for n, v in zip(names, stored.pop("s"), strict=False) if n in known}
        names_of_files = stored.pop("f", ARTIFACT_FILES)
        fields["artifacts"] = {f: uri_of(f, attempt) for f in names_of_files}
        fields["attempt"] = attempt
    fields.update(stored)
    return fields


def _item(stored: list) -> tuple[str, str | None]:
    """(uri, target) of an items entry: [uri] or [uri, target]."""
    return stored[0], (stored[1] if len(stored) > 1 else None)


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
    """The job records of one Redis. `job_ttl`: seconds a finished job's records are kept
    after its manifest is written (0: forever)."""

    def __init__(self, client: redis.Redis, job_ttl: int = 0, index_ttl: int | None = None):
        self.redis = client
        self.job_ttl = job_ttl
        self.index_ttl = index_ttl or job_ttl * INDEX_TTL_FACTOR
        self._transition = _TRANSITION.on(client)
        self._submitted = _SUBMITTED.on(client)
        self._seal = _SEAL.on(client)
        self._delivered = _DELIVERED.on(client)

    @classmethod
    def connect(cls, url: str, job_ttl: int = 0) -> JobStore:
        # Ride out a Redis restart of several seconds instead of failing the chunk.
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=12)
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=25,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, job_ttl=job_ttl)

    def ping(self) -> None:
        self.redis.ping()

    def check_server(self) -> list[str]:
        """Refuse a Redis that may evict keys; return what an operator should hear about.

        Under memory pressure any policy but `noeviction` drops keys (the `volatile-*` ones
        too: claims and finished jobs carry a TTL), and a missing record reads as settled
        or lost; `noeviction` refuses writes instead, loudly. Read through INFO, which
        managed services allow where they disable CONFIG."""
        policy = self.redis.info("memory").get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            raise ServiceUnavailable(
                f"Redis evicts keys under memory pressure (maxmemory-policy {policy}), so "
                "queued chunks and job records could vanish: set maxmemory-policy noeviction"
            )
        if self.redis.info("persistence").get("aof_enabled"):
            return []
        try:
            snapshots = self.redis.config_get("save").get("save", "")
        except redis.ResponseError:  # CONFIG renamed or disabled: cannot tell
            return []
        if snapshots:
            return []
        return ["Redis persists nothing (no AOF, no snapshots): a restart loses every queued "
                "chunk and job record"]  # fmt: skip

    @staticmethod
    def _key(job_id: str, part: JobPart) -> str:
        return job_key(job_id, part)

    def _transition_keys(self, job_id: str) -> dict[str, str]:
        """lua/transition.lua's KEYS, by name."""
        return {
            "state": self._key(job_id, "state"),
            "counts": self._key(job_id, "counts"),
            "result": self._key(job_id, "result"),
            "meta": self._key(job_id, "meta"),
            "attempts": self._key(job_id, "attempts"),
        }

    def _move(self, pipe, keys: dict[str, str], index: int, new: str, mode: str,
              record: str = "", now: float = 0) -> None:  # fmt: skip
        """Queue on `pipe` one run of lua/transition.lua (see its header for the replies)."""
        args = {"index": index, "new": new, "record": record, "mode": mode, "now": now,
                "terminal": _TERMINAL, "reopenable": _REOPENABLE}  # fmt: skip
        self._transition(keys=keys, args=args, client=pipe)

    # --- submission -------------------------------------------------------------------

    def create(self, info: JobInfo, submitter: str = "") -> None:
        """Record a new job, held by the submit identified by `submitter`."""
        meta = self._key(info.job_id, "meta")
        pipe = self.redis.pipeline()
        pipe.set(self._key(info.job_id, "submitter"), submitter, ex=self.SUBMITTER_SECONDS)
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
                str(i.index): json.dumps([i.uri] if i.target is None else [i.uri, i.target])
                for i in items
            },
        )
        pipe.hset(self._key(job_id, "state"), mapping={str(i.index): "queued" for i in items})
        pipe.hincrby(self._key(job_id, "counts"), "queued", len(items))
        pipe.hincrby(self._key(job_id, "meta"), "total", len(items))
        pipe.hincrby(self._key(job_id, "meta"), "chunks", 1)
        return int(pipe.execute()[-1]) - 1

    # A submit holds the `submitter` key while it queues, renewing it; a job not yet
    # submitted whose key expired was interrupted, and `submit --resume` may take it over.
    SUBMITTER_SECONDS = 15

    def claim_submitter(self, job_id: str, token: str) -> bool:
        key = self._key(job_id, "submitter")
        return bool(self.redis.set(key, token, nx=True, ex=self.SUBMITTER_SECONDS))

    def renew_submitter(self, job_id: str, token: str) -> None:
        self.redis.set(self._key(job_id, "submitter"), token, xx=True, ex=self.SUBMITTER_SECONDS)

    def release_submitter(self, job_id: str) -> None:
        self.redis.delete(self._key(job_id, "submitter"))

    def mark_sent(self, job_id: str, chunks: int) -> None:
        """The first `chunks` chunks are on the queue (they are sent in order)."""
        self.redis.hset(self._key(job_id, "meta"), "sent", chunks)

    def progress(self, job_id: str) -> tuple[int, int, int]:
        """(items recorded, chunks recorded, chunks known to be sent) of a submission."""
        total, chunks, sent = self.redis.hmget(self._key(job_id, "meta"), "total", "chunks", "sent")
        return int(total or 0), int(chunks or 0), int(sent or 0)

    def chunk_items(self, job_id: str, start: int, stop: int) -> list[ChunkItem]:
        """The recorded items with indices in [start, stop)."""
        indices = [str(i) for i in range(start, stop)]
        raw = self.redis.hmget(self._key(job_id, "items"), indices) if indices else []
        found = []
        for index, value in zip(indices, raw, strict=True):
            if value is not None:
                uri, target = _item(json.loads(value))
                found.append(ChunkItem(index=int(index), uri=uri, target=target))
        return found

    def new_chunk_number(self, job_id: str) -> int:
        return int(self.redis.hincrby(self._key(job_id, "meta"), "chunks", 1)) - 1

    def mark_submitted(self, job_id: str) -> bool:
        """Submission finished; True when this also finished the job (all items settled)."""
        keys = {"meta": self._key(job_id, "meta"), "counts": self._key(job_id, "counts")}
        args = {"now": time.time(), "terminal": _TERMINAL}
        finished = bool(self._submitted(keys=keys, args=args))
        self.release_submitter(job_id)
        return finished

    # --- worker side ------------------------------------------------------------------

    def states(self, job_id: str, indices: Sequence[int]) -> list[str | None]:
        if not indices:
            return []
        return self.redis.hmget(self._key(job_id, "state"), [str(i) for i in indices])

    def begin(self, job_id: str, indices: Sequence[int]) -> list[int | None]:
        """Mark items running and count an attempt for each; returns the attempt numbers,
        None for an item already settled (another copy of its chunk finished it)."""
        keys = self._transition_keys(job_id)
        pipe = self.redis.pipeline(transaction=False)
        for index in indices:
            self._move(pipe, keys, index, "running", mode="normal")
        return [int(reply[2]) if reply[0] == 1 else None for reply in pipe.execute()]

    def release(self, job_id: str, indices: Sequence[int]) -> list[int]:
        """Put running items back to queued without the attempt their start counted: their
        worker's environment failed, not they. Returns the indices released (an item
        another copy of its chunk settled meanwhile stays as it is)."""
        keys = self._transition_keys(job_id)
        pipe = self.redis.pipeline(transaction=False)
        for index in indices:
            self._move(pipe, keys, index, "queued", mode="release")
        replies = pipe.execute()
        return [index for index, reply in zip(indices, replies, strict=True) if reply[0] == 1]

    def settle(
        self, job_id: str, changes: Iterable[tuple[int, str, dict]], mode: str = "normal"
    ) -> bool:
        """Move items to final states; True if that finished the job. `queued-only` moves
        only items still queued (a cancel must not discard work a worker started)."""
        keys = self._transition_keys(job_id)
        now = time.time()
        finished = False
        changes = list(changes)
        for start in range(0, len(changes), _BATCH):
            pipe = self.redis.pipeline()
            pipe.hsetnx(keys["meta"], f"layout:{_LAYOUT_ID}", _LAYOUT)
            for index, state, fields in changes[start : start + _BATCH]:
                assert state in TERMINAL_STATES
                record = _encode(fields) if fields else ""
                self._move(pipe, keys, index, state, mode=mode, record=record, now=now)
            replies = pipe.execute()[1:]
            finished |= any(reply[0] == 1 and reply[1] for reply in replies)
        return finished

    def record_delivery(self, job_id: str, chunk: int) -> int:
        """Count a delivery of the chunk; the count expires with the job's records."""
        keys = {"deliveries": self._key(job_id, "deliveries"), "meta": self._key(job_id, "meta")}
        return int(self._delivered(keys=keys, args={"chunk": chunk}))

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id, "meta"), "cancelled") == "1"

    # --- client side ------------------------------------------------------------------

    def info(self, job_id: str) -> JobInfo:
        """What the job asked for, from its live records only (JobNotFound once expired)."""
        raw = self.redis.hget(self._key(check_job_id(job_id), "meta"), "info")
        if raw is None:
            raise JobNotFound(f"no job {job_id} in {self._where()}")
        return JobInfo.model_validate_json(raw)

    def live(self, job_id: str) -> bool:
        """Whether the job still has its records (not expired, not unknown)."""
        return bool(self.redis.exists(self._key(check_job_id(job_id), "meta")))

    def sealed(self, job_id: str) -> JobStatus | None:
        """The final status of a job whose records expired, while its index entry lasts."""
        raw = self.redis.get(self._key(check_job_id(job_id), "index"))
        return JobStatus.from_document(json.loads(raw)) if raw else None

    def seal(self, job_id: str) -> bool:
        """Start the retention clock of a finished job whose manifest is written: its
        records expire after job_ttl, its index entry after index_ttl. False if the job
        is not finished (a retry reopened it)."""
        document = json.dumps(self.status(job_id).document())
        keys = {
            "meta": self._key(job_id, "meta"),
            "index": self._key(job_id, "index"),
            "records": [self._key(job_id, part) for part in JOB_PARTS if part != "meta"],
        }
        args = {"ttl": self.job_ttl, "index_ttl": self.index_ttl, "document": document}
        return bool(self._seal(keys=keys, args=args))

    def prune(self) -> dict[str, int]:
        """Forget jobs whose records and index entry have both expired, and seal finished
        jobs that never were (their writer died between the manifest and the seal)."""
        forgotten = sealed = 0
        for job_id in list(self.redis.zrange(JOBS_KEY, 0, -1)):
            meta = self._key(job_id, "meta")
            if not self.redis.exists(meta, self._key(job_id, "index")):
                self.redis.zrem(JOBS_KEY, job_id)
                forgotten += 1
            elif (
                self.job_ttl > 0
                and self.redis.ttl(meta) == -1
                and self.redis.hexists(meta, "finished_at")
                and self.seal(job_id)
            ):
                sealed += 1
        return {"forgotten": forgotten, "sealed": sealed}

    def _where(self) -> str:
        kwargs = self.redis.connection_pool.connection_kwargs
        return f"redis {kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"

    def status(self, job_id: str) -> JobStatus:
        """The job's live status, or its sealed one once its records expired."""
        try:
            info = self.info(job_id)
        except JobNotFound:
            if (sealed := self.sealed(job_id)) is not None:
                return sealed
            raise
        pipe = self.redis.pipeline()
        pipe.hgetall(self._key(job_id, "meta"))
        pipe.hgetall(self._key(job_id, "counts"))
        pipe.exists(self._key(job_id, "submitter"))
        meta, raw_counts, submitter = pipe.execute()
        counts = {state: int(raw_counts.get(state, 0)) for state in ITEM_STATES}
        total = int(meta.get("total", 0))
        submitted = meta.get("submitted") == "1"
        cancelled = meta.get("cancelled") == "1"
        finished_at = float(meta["finished_at"]) if "finished_at" in meta else None
        state = job_state(
            counts, total, submitted, cancelled, finished_at is not None, bool(submitter)
        )
        return JobStatus(job_id, state, total, counts, submitted, cancelled, finished_at, info)

    def items(self, job_id: str, states: set[str] | None = None) -> Iterator[ItemRecord]:
        """Every item in index order, fetched a thousand at a time."""
        meta = self.redis.hgetall(self._key(job_id, "meta"))
        total = int(meta.get("total") or 0)
        output = JobInfo.model_validate_json(meta["info"]).output if "info" in meta else ""
        layouts = {k.removeprefix("layout:"): v.split(",") for k, v in meta.items()
                   if k.startswith("layout:")}  # fmt: skip
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
                uri, target = _item(json.loads(raw))
                name = item_name(int(index), uri)

                def uri_of(filename: str, attempt: int | None, name: str = name) -> str:
                    return key_uri(output, artifact_key(job_id, name, filename, attempt))

                yield ItemRecord(
                    index=int(index),
                    uri=uri,
                    target=target,
                    item=name,
                    state=state,
                    attempts=int(tries or 0),
                    **_decode(result, layouts, uri_of),
                )

    def cancel(self, job_id: str) -> int | None:
        """Stop the job: queued items become cancelled; returns how many. A job that has
        already finished is left as it is (None): a cancel must not relabel its outcome."""
        self.info(job_id)
        meta = self._key(job_id, "meta")

        def flag(pipe) -> bool:
            # Under WATCH: a job that finishes between the check and the flag is retried,
            # and then left alone.
            if pipe.hexists(meta, "finished_at"):
                return False
            pipe.multi()
            pipe.hset(meta, "cancelled", "1")
            return True

        if not self.redis.transaction(flag, meta, value_from_callable=True):
            return None
        queued = [record.index for record in self.items(job_id, {"queued"})]
        self.settle(job_id, [(index, "cancelled", {}) for index in queued], mode="queued-only")
        return len(queued)

    def reopen(self, job_id: str, states: set[str]) -> list[ChunkItem]:
        """Put failed/cancelled items back to queued for a retry; returns them."""
        self.info(job_id)
        pipe = self.redis.pipeline()
        for part in JOB_PARTS:  # live again: its retention clock stops until it finishes
            pipe.persist(self._key(job_id, part))
        pipe.delete(self._key(job_id, "index"))
        pipe.hdel(self._key(job_id, "meta"), "cancelled")
        pipe.execute()
        records = list(self.items(job_id, states))
        keys = self._transition_keys(job_id)
        for start in range(0, len(records), _BATCH):
            pipe = self.redis.pipeline()
            for record in records[start : start + _BATCH]:
                self._move(pipe, keys, record.index, "queued", mode="retry")
            pipe.execute()
        return [ChunkItem(index=r.index, uri=r.uri, target=r.target) for r in records]

    def recent(self, limit: int = 20) -> list[str]:
        """The newest jobs that still have records or an index entry."""
        found: list[str] = []
        start = 0
        while len(found) < limit:
            ids = self.redis.zrevrange(JOBS_KEY, start, start + limit - 1)
            if not ids:
                break
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.exists(self._key(job_id, "meta"), self._key(job_id, "index"))
            found += [j for j, alive in zip(ids, pipe.execute(), strict=True) if alive]
            start += limit
        return found[:limit]
