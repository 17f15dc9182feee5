"""Job records in Redis, owned by explainctl (not Celery results or chords).

Redis holds what a live job needs and no more: per item its state, its attempts, its
input and, once failed, its error. The scores of done items go to storage as they settle,
one part per chunk attempt (jobs/records.py), so a settled million-item job keeps tens of
bytes per item here (benchmarks/scale.py measures it).

Keys (explainctl.jobs.keys builds them), all under `explainctl:job:<id>:`
  meta      hash: info (JobInfo JSON), total, chunks, sent, submitted, cancelled,
            finished_at, resolved (ResolvedModel JSON: what the first worker made of the
            model)
  items     hash: first index of a run of items -> their [uri, target, label, staged]
            (trailing nulls left out), in order, compressed (one field per chunk recorded
            at submission)
  macs      hash: "info" -> the MAC of meta's info, and an `items` field's first index -> the
            MAC of that field (jobs.signing.record_mac), written where a signing key is set:
            what a chunk message is built from again (`retry`, `submit --resume`, the
            reconciler, a worker's labels) is read only through them (`verified_info`,
            `Recorded`)
  state     string: byte i is item i's state code (contracts.STATE_CODES)
  attempts  string: byte i is how many times a worker started item i
  errors    hash: index -> a failed item's error_code and error
  counts    hash: state -> number of items in it
  deliveries hash: chunk -> how many times a worker received it
  submitter string: the submit that holds the job while it queues (expires unless renewed)
and `explainctl:jobs`, a sorted set of job IDs by creation time. Once a finished job's
manifest is written (`seal`), its keys expire after the job TTL and a small `index` key
(job.json's content: what was asked and the final status) stays for INDEX_TTL_FACTOR
times longer, so `jobs` and `status` still answer and `results` finds the manifest in
storage.

Every state change goes through one Lua script (lua/transition.lua) that moves the item
and its counters together, and refuses to leave a final state: a chunk delivered twice
cannot count an item twice. The same script notices the change that finishes the job,
exactly once. The scripts are given the states' codes and the terminal states from
contracts.STATE_CODES and contracts.TERMINAL_STATES.

This is the Redis boundary: every JobStore method turns a redis error into
ServiceUnavailable (`redis_errors`), so no caller handles redis's own exceptions.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import functools
import inspect
import json
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from explainctl.config import INDEX_TTL_FACTOR
from explainctl.io.uri import redacted
from explainctl.jobs.keys import JOB_PARTS, JOBS_KEY, JobPart, Script, job_key
from explainctl.jobs.signing import NO_KEYS, SigningKeys
from explainctl.spec.contracts import (
    ITEM_STATES,
    PROTOCOL,
    STATE_CODES,
    TERMINAL_STATES,
    ChunkItem,
    JobInfo,
    JobState,
    ResolvedModel,
)
from explainctl.spec.errors import JobNotFound, RecordTampered, ServiceUnavailable
from explainctl.spec.ids import check_job_id

_BATCH = 1000

# The scripts (lua/*.lua) and the item states they are given, from their declaration.
_TRANSITION = Script("transition")
_SUBMITTED = Script("submitted")
_SEAL = Script("seal")
_DELIVERED = Script("delivered")
_TERMINAL_NAMES = ",".join(sorted(TERMINAL_STATES))  # submitted.lua counts by name
_STATE_OF = {code: state for state, code in STATE_CODES.items()}
_CODES = {
    "states": ",".join(ITEM_STATES),
    "codes": "".join(STATE_CODES[s] for s in ITEM_STATES),
    "terminal": "".join(sorted(STATE_CODES[s] for s in TERMINAL_STATES)),
    # a retry never runs a done item again
    "reopenable": "".join(sorted(STATE_CODES[s] for s in TERMINAL_STATES - {"done"})),
}


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
    resolved: ResolvedModel | None = None  # the model as the job's first worker loaded it

    def document(self) -> dict:
        """job.json's content, and a sealed job's index entry: what was asked, and how it went."""
        return {"info": self.info.model_dump(mode="json"), "status": self.as_json()}

    @classmethod
    def from_document(cls, document: dict) -> JobStatus:
        status, info = document["status"], JobInfo.model_validate(document["info"])
        resolved = status.get("resolved_model")  # absent from jobs sealed before it existed
        return cls(
            job_id=status["job_id"], state=status["state"], total=status["total"],
            counts=status["counts"], submitted=status["submitted"],
            cancelled=status["cancelled"], finished_at=status["finished_at"], info=info,
            resolved=ResolvedModel.model_validate(resolved) if resolved else None,
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
            "resolved_model": self.resolved.model_dump(mode="json") if self.resolved else None,
        }


@dataclass(frozen=True)
class Entry:
    """What Redis holds of one item: its input, state, attempts and, if failed, its error."""

    index: int
    uri: str
    target: str | None
    state: str
    attempts: int
    error_code: str | None = None
    error: str | None = None
    label: str | None = None
    staged: str | None = None  # where a dataset row's image was staged (ChunkItem.staged)
    # Read with verification, its run's MAC failed: its fields above are not its record's.
    tampered: bool = False

    @property
    def item(self) -> ChunkItem:
        return ChunkItem(index=self.index, uri=self.uri, target=self.target, label=self.label,
                         staged=self.staged)  # fmt: skip


@dataclass(frozen=True)
class Recorded:
    """Items read back from the records to be sent again: those whose run's MAC verified,
    and the indices of those whose did not, which must never be sent (`fail_tampered`)."""

    items: list[ChunkItem]
    tampered: list[int]


_TRUSTED = ("verified", "not-checked")


def _why(verdict: str) -> str:
    if verdict == "unsigned":
        return "carries no MAC (written by a client without the signing key)"
    return "does not verify against the signing keys (edited in Redis)"


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


def _error(fields: dict | None) -> str:
    """A failed item's error as stored ('' when the change carries none)."""
    if not fields or "error_code" not in fields:
        return ""
    return json.dumps({k: fields[k] for k in ("error_code", "error") if k in fields})


# What the `items` field holds of each item, in this order; a list stops at its last value
# that is set, so records written before a field existed read it as None.
_ITEM_FIELDS = ("uri", "target", "label", "staged")


def _stored_items(items: Sequence[ChunkItem]) -> str:
    """An `items` field: [[uri], [uri, target], [uri, null, label], ...] as JSON,
    zlib-compressed (the URIs of a chunk share their prefix: 100-character URIs take about
    a third), in base64. The URIs are redacted (io.uri.redacted): a presigned URL's
    signature is not written down, so a chunk sent again from the records (a retry, a
    lost message) fetches without it."""
    plain = []
    for item in items:
        values = [getattr(item, name) for name in _ITEM_FIELDS]
        values[0] = redacted(values[0])
        while values[-1] is None:
            values.pop()
        plain.append(values)
    return base64.b64encode(zlib.compress(json.dumps(plain).encode(), 9)).decode()


def _entry_items(raw: str) -> list[dict[str, str | None]]:
    """The fields (_ITEM_FIELDS) of each item of an `items` field (_stored_items)."""
    stored = json.loads(zlib.decompress(base64.b64decode(raw)))
    return [
        {name: item[at] if at < len(item) else None for at, name in enumerate(_ITEM_FIELDS)}
        for item in stored
    ]


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

    def __init__(
        self,
        client: redis.Redis,
        job_ttl: int = 0,
        index_ttl: int | None = None,
        keys: SigningKeys = NO_KEYS,
    ):
        self.redis = client
        # Vouch for the records a chunk message is built from (jobs.signing): MACs written
        # with them, and required by every read that sends (none without keys).
        self.keys = keys
        self.job_ttl = job_ttl
        self.index_ttl = index_ttl or job_ttl * INDEX_TTL_FACTOR
        self._transition = _TRANSITION.on(client)
        self._submitted = _SUBMITTED.on(client)
        self._seal = _SEAL.on(client)
        self._delivered = _DELIVERED.on(client)

    @classmethod
    def connect(cls, url: str, job_ttl: int = 0, keys: SigningKeys = NO_KEYS) -> JobStore:
        # Ride out a Redis restart of several seconds instead of failing the chunk.
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=12)
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            health_check_interval=25,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, job_ttl=job_ttl, keys=keys)

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

    def memory(self) -> dict[str, int]:
        """Redis's memory in bytes: used, peak, and maxmemory (its cap; 0: none)."""
        info = self.redis.info("memory")
        return {
            "used": int(info.get("used_memory", 0)),
            "peak": int(info.get("used_memory_peak", 0)),
            "maxmemory": int(info.get("maxmemory", 0)),
        }

    @staticmethod
    def _key(job_id: str, part: JobPart) -> str:
        return job_key(job_id, part)

    def _transition_keys(self, job_id: str) -> dict[str, str]:
        """lua/transition.lua's KEYS, by name."""
        return {
            "state": self._key(job_id, "state"),
            "counts": self._key(job_id, "counts"),
            "errors": self._key(job_id, "errors"),
            "meta": self._key(job_id, "meta"),
            "attempts": self._key(job_id, "attempts"),
        }

    def _move(self, pipe, keys: dict[str, str], index: int, new: str, mode: str,
              error: str = "", now: float = 0) -> None:  # fmt: skip
        """Queue on `pipe` one run of lua/transition.lua (see its header for the replies)."""
        args = {"index": index, "new": STATE_CODES[new], "error": error, "mode": mode,
                "now": now, **_CODES}  # fmt: skip
        self._transition(keys=keys, args=args, client=pipe)

    # --- submission -------------------------------------------------------------------

    def create(self, info: JobInfo, submitter: str = "") -> None:
        """Record a new job, held by the submit identified by `submitter`."""
        meta, raw = self._key(info.job_id, "meta"), info.model_dump_json()
        pipe = self.redis.pipeline()
        pipe.set(self._key(info.job_id, "submitter"), submitter, ex=self.SUBMITTER_SECONDS)
        pipe.hset(meta, mapping={"info": raw, "total": 0, "chunks": 0, "protocol": PROTOCOL})
        if (mac := self.keys.record_mac("info", info.job_id, "info", raw)) is not None:
            pipe.hset(self._key(info.job_id, "macs"), "info", mac)
        pipe.hset(self._key(info.job_id, "counts"), mapping={s: 0 for s in ITEM_STATES})
        pipe.zadd(JOBS_KEY, {info.job_id: info.created})
        pipe.execute()

    def add_chunk(self, job_id: str, items: Sequence[ChunkItem]) -> int:
        """Record items, numbered in a run from the first, as queued in one round trip;
        returns the new chunk's number."""
        first = items[0].index
        if [i.index for i in items] != list(range(first, first + len(items))):
            raise ValueError("a chunk records a run of consecutive indices")
        stored = _stored_items(items)
        pipe = self.redis.pipeline()
        pipe.hset(self._key(job_id, "items"), str(first), stored)
        if (mac := self.keys.record_mac("items", job_id, str(first), stored)) is not None:
            pipe.hset(self._key(job_id, "macs"), str(first), mac)  # one MAC a chunk
        pipe.setrange(self._key(job_id, "state"), first, STATE_CODES["queued"] * len(items))
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

    def sending(self, job_id: str) -> bool:
        """Whether a submit or a retry is queueing the job's items now (it holds the claim)."""
        return bool(self.redis.exists(self._key(job_id, "submitter")))

    def release_submitter(self, job_id: str) -> None:
        self.redis.delete(self._key(job_id, "submitter"))

    def mark_sent(self, job_id: str, chunks: int) -> None:
        """The first `chunks` chunks are on the queue (they are sent in order)."""
        self.redis.hset(self._key(job_id, "meta"), "sent", chunks)

    def progress(self, job_id: str) -> tuple[int, int, int]:
        """(items recorded, chunks recorded, chunks known to be sent) of a submission."""
        total, chunks, sent = self.redis.hmget(self._key(job_id, "meta"), "total", "chunks", "sent")
        return int(total or 0), int(chunks or 0), int(sent or 0)

    def chunk_items(self, job_id: str, start: int, stop: int) -> Recorded:
        """The recorded items with indices in [start, stop), verified."""
        runs = _Runs(self.redis, job_id, self.keys)
        return _recorded(runs.between(start, stop))

    def new_chunk_number(self, job_id: str) -> int:
        return int(self.redis.hincrby(self._key(job_id, "meta"), "chunks", 1)) - 1

    def mark_submitted(self, job_id: str) -> bool:
        """Submission finished; True when this also finished the job (all items settled)."""
        keys = {"meta": self._key(job_id, "meta"), "counts": self._key(job_id, "counts")}
        args = {"now": time.time(), "terminal": _TERMINAL_NAMES}
        finished = bool(self._submitted(keys=keys, args=args))
        self.release_submitter(job_id)
        return finished

    # --- worker side ------------------------------------------------------------------

    def states(self, job_id: str, indices: Sequence[int]) -> list[str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for index in indices:
            pipe.getrange(self._key(job_id, "state"), index, index)
        return [_STATE_OF.get(code) for code in pipe.execute()] if indices else []

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
        self, job_id: str, changes: Iterable[tuple[int, str, dict | None]], mode: str = "normal"
    ) -> bool:
        """Move items to final states, keeping a failed item's `error_code` and `error`;
        True if that finished the job. A done item's scores are not kept here: settle it
        through jobs.records, which stores them first. `queued-only` moves only items
        still queued (a cancel must not discard work a worker started)."""
        keys = self._transition_keys(job_id)
        now = time.time()
        finished = False
        changes = list(changes)
        for start in range(0, len(changes), _BATCH):
            pipe = self.redis.pipeline()
            for index, state, fields in changes[start : start + _BATCH]:
                if state not in TERMINAL_STATES:
                    raise ValueError(f"settle moves items to a final state, not {state!r}")
                if state == "done" and fields:
                    raise ValueError("a done item's record goes to storage: jobs.records.settle")
                error = _error(fields) if state == "failed" else ""
                self._move(pipe, keys, index, state, mode=mode, error=error, now=now)
            replies = pipe.execute()
            finished |= any(reply[0] == 1 and reply[1] for reply in replies)
        return finished

    def record_delivery(self, job_id: str, chunk: int) -> int:
        """Count a delivery of the chunk; the count expires with the job's records."""
        keys = {"deliveries": self._key(job_id, "deliveries"), "meta": self._key(job_id, "meta")}
        return int(self._delivered(keys=keys, args={"chunk": chunk}))

    def protocol(self, job_id: str) -> int:
        """The protocol the job's records were written with (1: before records said)."""
        return int(self.redis.hget(self._key(job_id, "meta"), "protocol") or 1)

    def is_cancelled(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id, "meta"), "cancelled") == "1"

    # --- client side ------------------------------------------------------------------

    def info(self, job_id: str) -> JobInfo:
        """What the job asked for, from its live records only (JobNotFound once expired), as
        Redis holds it: to show, not to send (`verified_info`)."""
        raw = self.redis.hget(self._key(check_job_id(job_id), "meta"), "info")
        if raw is None:
            raise JobNotFound(f"no job {job_id} in {self._where()}")
        return JobInfo.model_validate_json(raw)

    def verified_info(self, job_id: str) -> JobInfo:
        """`info`, vouched for by its MAC where this store holds keys: what a chunk message
        is built from. RecordTampered when it has no MAC or a wrong one: a record written
        without a key is refused too, or deleting a MAC would pass any edit."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self._key(check_job_id(job_id), "meta"), "info")
        pipe.hget(self._key(job_id, "macs"), "info")
        raw, mac = pipe.execute()
        if raw is None:
            raise JobNotFound(f"no job {job_id} in {self._where()}")
        verdict = self.keys.verify_record("info", job_id, "info", raw, mac)
        if verdict not in _TRUSTED:
            raise RecordTampered(f"job {job_id}: its record {_why(verdict)}; nothing of it "
                                 "is sent")  # fmt: skip
        return JobInfo.model_validate_json(raw)

    def fail_tampered(self, job_id: str, indices: Sequence[int]) -> bool:
        """Fail items whose records did not verify, never to be sent from them; True if
        that finished the job."""
        failure = {"error_code": "record-tampered",
                   "error": "its record in Redis has no valid MAC: not sent"}  # fmt: skip
        return self.settle(job_id, [(index, "failed", failure) for index in indices])

    def record_resolved(self, job_id: str, resolved: ResolvedModel) -> bool:
        """Keep what a worker made of the job's model (source, revision, preprocessing) in
        its record, unless one is there: the first worker's stays, and a job whose records
        are gone is not brought back. True if this call wrote it."""
        meta = self._key(check_job_id(job_id), "meta")

        def write(pipe) -> bool:
            if not pipe.exists(meta) or pipe.hexists(meta, "resolved"):
                return False
            pipe.multi()
            pipe.hset(meta, "resolved", resolved.model_dump_json())
            return True

        return self.redis.transaction(write, meta, value_from_callable=True)

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
        resolved = meta.get("resolved")
        resolved = ResolvedModel.model_validate_json(resolved) if resolved else None
        return JobStatus(
            job_id, state, total, counts, submitted, cancelled, finished_at, info, resolved
        )

    def indices(self, job_id: str, *states: str) -> list[int]:
        """The indices of the items in any of `states`, from the state string alone (a few
        round trips for a million items)."""
        codes, found, block = {STATE_CODES[s] for s in states}, [], 1 << 18
        total = int(self.redis.hget(self._key(job_id, "meta"), "total") or 0)
        for start in range(0, total, block):
            held = self.redis.getrange(self._key(job_id, "state"), start, start + block - 1)
            found += [start + i for i, c in enumerate(held) if c in codes]
        return found

    def items_at(self, job_id: str, indices: Iterable[int]) -> Recorded:
        """The recorded inputs of the items at `indices`, in index order, verified."""
        wanted = sorted(set(indices))
        runs = _Runs(self.redis, job_id, self.keys)
        found = Recorded([], [])
        for start in range(0, len(wanted), _BATCH):
            window = wanted[start : start + _BATCH]
            chosen = set(window)
            read = _recorded(
                (index, fields)
                for index, fields in runs.between(window[0], window[-1] + 1)
                if index in chosen
            )
            found.items.extend(read.items)
            found.tampered.extend(read.tampered)
        return found

    def entries(
        self, job_id: str, states: set[str] | None = None, verify: bool = False
    ) -> Iterator[Entry]:
        """Every item Redis holds, in index order, read a thousand at a time (only those
        in `states` when given). `verify`: each run's MAC checked, and the items of a run
        that fails come as `tampered` entries, without its fields."""
        total = int(self.redis.hget(self._key(job_id, "meta"), "total") or 0)
        runs = _Runs(self.redis, job_id, self.keys if verify else None)
        for start in range(0, total, _BATCH):
            stop = min(total, start + _BATCH)
            pipe = self.redis.pipeline()
            pipe.getrange(self._key(job_id, "state"), start, stop - 1)
            attempts = pipe.bitfield(self._key(job_id, "attempts"))
            for index in range(start, stop):
                attempts.get("u8", f"#{index}")
            attempts.execute()
            codes, tries = pipe.execute()
            wanted = {
                index: _STATE_OF[code]
                for index, code in enumerate(codes, start=start)
                if code in _STATE_OF and (not states or _STATE_OF[code] in states)
            }
            if not wanted:
                continue
            failed = [i for i, state in wanted.items() if state == "failed"]
            errors = self.redis.hmget(self._key(job_id, "errors"), failed) if failed else []
            error_of = {i: json.loads(e) for i, e in zip(failed, errors, strict=True) if e}
            for index, fields in runs.between(start, stop):
                if index in wanted and fields is None:
                    yield Entry(index, "", None, wanted[index], tries[index - start],
                                tampered=True, **error_of.get(index, {}))  # fmt: skip
                elif index in wanted:
                    yield Entry(
                        index, fields["uri"], fields["target"], wanted[index],
                        tries[index - start], label=fields["label"], staged=fields["staged"],
                        **error_of.get(index, {}),
                    )  # fmt: skip

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
        queued = self.indices(job_id, "queued")
        self.settle(job_id, [(index, "cancelled", None) for index in queued], mode="queued-only")
        return len(queued)

    def reopen(self, job_id: str, states: set[str]) -> Recorded:
        """Put failed/cancelled items back to queued for a retry; returns them, verified
        (those whose records fail are queued too, for `fail_tampered` to fail again with
        their own code)."""
        self.info(job_id)
        pipe = self.redis.pipeline()
        for part in JOB_PARTS:  # live again: its retention clock stops until it finishes
            pipe.persist(self._key(job_id, part))
        pipe.delete(self._key(job_id, "index"))
        pipe.hdel(self._key(job_id, "meta"), "cancelled")
        pipe.execute()
        entries = list(self.entries(job_id, states, verify=True))
        keys = self._transition_keys(job_id)
        for start in range(0, len(entries), _BATCH):
            pipe = self.redis.pipeline()
            for entry in entries[start : start + _BATCH]:
                self._move(pipe, keys, entry.index, "queued", mode="retry")
            pipe.execute()
        return Recorded([entry.item for entry in entries if not entry.tampered],
                        [entry.index for entry in entries if entry.tampered])  # fmt: skip

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


def _recorded(read: Iterable[tuple[int, dict[str, str | None] | None]]) -> Recorded:
    found = Recorded([], [])
    for index, fields in read:
        if fields is None:
            found.tampered.append(index)
        else:
            found.items.append(ChunkItem(index=index, **fields))
    return found


class _Runs:
    """The `items` hash of a job read by index: its fields are the first indices of runs
    of consecutive items, so a run is found by bisecting the sorted fields. With `keys`,
    each run read is checked against its MAC (one HMAC a run, in the same round trip)."""

    def __init__(self, client: redis.Redis, job_id: str, keys: SigningKeys | None = None):
        self.redis, self.job_id, self.keys = client, job_id, keys
        self.key = job_key(job_id, "items")
        self.firsts = sorted(int(field) for field in client.hkeys(self.key))
        # A run's items' fields; None: its MAC failed.
        self._read: dict[int, list[dict[str, str | None]] | None] = {}

    def between(self, start: int, stop: int) -> Iterator[tuple[int, dict[str, str | None] | None]]:
        """(index, fields) of the recorded items in [start, stop), in order (fields:
        _ITEM_FIELDS by name); the runs they lie in are read in one round trip. A run whose
        MAC fails gives None for each index up to the next run: its own length is as
        untrusted as the rest of it."""
        position = max(0, bisect.bisect_right(self.firsts, start) - 1)
        end = bisect.bisect_left(self.firsts, stop)
        firsts = self.firsts[position:end]
        # A run reaching past `stop` is kept for the next window, the rest let go.
        self._read = {first: self._read[first] for first in firsts if first in self._read}
        missing = [first for first in firsts if first not in self._read]
        if missing:
            self._fetch(missing)
        for at, first in enumerate(firsts, start=position):
            run = self._read[first]
            if run is None:
                bound = self.firsts[at + 1] if at + 1 < len(self.firsts) else stop
                for index in range(max(first, start), min(bound, stop)):
                    yield index, None
                continue
            for index, item in enumerate(run, start=first):
                if start <= index < stop:
                    yield index, item

    def _fetch(self, firsts: list[int]) -> None:
        fields = [str(first) for first in firsts]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.key, fields)
        if self.keys is not None:
            pipe.hmget(job_key(self.job_id, "macs"), fields)
        raw, *macs = pipe.execute()
        for at, (first, value) in enumerate(zip(firsts, raw, strict=True)):
            if self.keys is not None:
                verdict = self.keys.verify_record(
                    "items", self.job_id, str(first), value or "", macs[0][at]
                )
                if verdict not in _TRUSTED:
                    self._read[first] = None
                    continue
            self._read[first] = _entry_items(value) if value else []
