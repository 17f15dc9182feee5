"""Running one chunk of a job on a worker: read inputs, explain in slots, store, record.

Safe to run twice for the same chunk (a redelivery after a lost worker): items already
settled are skipped, and the job store refuses to count an item twice. An item is marked
done only after all its artifacts are stored.

A failure of the worker's environment (errors.ENVIRONMENT_CODES: its model, its allow-list,
its storage; or any failure writing artifacts) is not the item's: the items it touched go
back to queued with their attempt taken back, and `run_chunk` raises HandBack with them so
the task sends them to another worker. After EXPLAINCTL_MAX_HAND_BACKS, they fail.

A chunk never outgrows its time limit: past ADMIT_SHARE of EXPLAINCTL_CHUNK_TIME_LIMIT it
starts no further item, and those left go back the same way, with no strike against the
worker (it is healthy, the chunk was long).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from explainctl.config import Settings
from explainctl.io.fetch import HttpPolicy
from explainctl.io.s3 import S3Settings
from explainctl.io.sources import SourcePolicy, read_source
from explainctl.io.storage import Storage, open_storage
from explainctl.io.uri import one_line, redacted, within_roots
from explainctl.jobs import records
from explainctl.jobs.manifest import write_manifest
from explainctl.jobs.masks import load_mask
from explainctl.jobs.signing import SigningKeys
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import (
    ITEMS_JSONL,
    MASK_NPY,
    OLDEST_READABLE,
    PROTOCOL,
    RESULT_JSON,
    TERMINAL_STATES,
    ChunkItem,
    ChunkPayload,
    ModelSpec,
    ResolvedModel,
    Target,
    artifact_key,
    is_source_id,
    item_name,
    job_key,
)
from explainctl.spec.errors import (
    ERROR_CODES,
    FATAL_CODES,
    ErrorCode,
    ExplainctlError,
    InvalidInput,
    ItemError,
    RecordTampered,
)
from explainctl.spec.ids import JOB_ID_PATTERN
from explainctl.spec.models import model_matches
from explainctl_worker.artifact import result_json
from explainctl_worker.decode import DecodeLimits
from explainctl_worker.explain import ItemInput, ItemOutcome, Timings, explain_items
from explainctl_worker.model import ModelCache, pick_device
from explainctl_worker.service import metrics

log = logging.getLogger("explainctl.worker")
# Share of the chunk's time limit within which items may start: what starts by then has
# the rest of the limit to finish.
ADMIT_SHARE = 0.5


@dataclass
class WorkerContext:
    """What a worker process keeps between chunks: connections, loaded models, limits."""

    settings: Settings
    store: JobStore
    models: ModelCache = field(default_factory=ModelCache)
    device: torch.device | None = None
    _storages: dict[str, Storage] = field(default_factory=dict)
    _labels: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    _resolved: dict[str, ResolvedModel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        store = JobStore.connect(settings.broker_url, job_ttl=settings.job_ttl,
                                 keys=SigningKeys(settings.signing_secrets()))  # fmt: skip
        return cls(settings=settings, store=store)

    def torch_device(self) -> torch.device:
        # Chosen on first use, inside the pool process: CUDA must not start before fork.
        if self.device is None:
            self.device = pick_device(self.settings.device)
        return self.device

    def storage(self, root: str) -> Storage:
        # Every write of a chunk's goes through here: nothing reaches past the outputs.
        if not self.output_allowed(root):
            message = f"this worker does not write to {one_line(root)!r}"
            raise ItemError("output-not-allowed", message)
        with self._lock:
            if root not in self._storages:
                self._storages[root] = open_storage(root, s3_settings=S3Settings.of(self.settings))
            return self._storages[root]

    def slots(self) -> int | None:
        """Items in flight on the device: EXPLAINCTL_SLOTS; None (0) lets the engine choose
        (slot.choose_slots: 4 on a CPU, from free memory on CUDA, at most the chunk)."""
        return self.settings.slots or None

    def limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_pixels
        )

    def source_policy(self) -> SourcePolicy:
        """What this worker may read, from its settings."""
        return SourcePolicy(
            max_bytes=self.settings.max_image_bytes,
            allowed_roots=self.settings.allowed_roots or None,
            http=HttpPolicy(
                enabled=self.settings.allow_http,
                allowed_hosts=self.settings.http_allowed_hosts,
                deadline=self.settings.http_deadline,
            ),
        )

    def read(self, uri: str) -> bytes:
        return read_source(uri, self.source_policy())

    def record_resolved(self, job_id: str, resolved: ResolvedModel) -> None:
        """Write what this worker made of the job's model into its record, once per
        process; the record keeps the first worker's (JobStore.record_resolved)."""
        with self._lock:
            if job_id in self._resolved:
                return
            if len(self._resolved) >= 64:
                self._resolved.pop(next(iter(self._resolved)))
            self._resolved[job_id] = resolved
        self.store.record_resolved(job_id, resolved)

    def labels(self, job_id: str) -> tuple[str, ...] | None:
        """The job's class names (--labels), read from its record once per process. Not in
        the signed message (a thousand names a chunk), so the record is verified instead
        (JobStore.verified_info: RecordTampered when its MAC fails): names someone wrote
        into Redis would relabel every target and record."""
        with self._lock:
            if job_id not in self._labels:
                if len(self._labels) >= 64:
                    self._labels.pop(next(iter(self._labels)))
                self._labels[job_id] = self.store.verified_info(job_id).labels
            return self._labels[job_id]

    def unverified(self, job_id: str) -> str | None:
        """Why the job's record does not verify, or None when it does (`labels`)."""
        try:
            self.labels(job_id)
        except RecordTampered as error:
            return str(error)
        return None

    def output_allowed(self, output: str) -> bool:
        """EXPLAINCTL_ALLOWED_OUTPUTS, when set, holds every place this worker writes to."""
        roots = self.settings.allowed_outputs
        if not roots:
            return True
        try:
            return within_roots(output, roots)
        except ItemError:
            return False

    def weights_allowed(self, spec: ModelSpec) -> bool:
        """A weights file reaches torch.load only where EXPLAINCTL_ALLOWED_WEIGHTS names it
        (patterns over its real path: a link in an allowed folder leads nowhere else)."""
        if spec.weights is None:
            return True
        real = os.path.realpath(spec.weights)
        return any(fnmatch.fnmatchcase(real, pattern) for pattern in self.settings.allowed_weights)

    def model_allowed(self, spec: ModelSpec) -> bool:
        """EXPLAINCTL_ALLOWED_MODELS, when set, holds every model the worker may run, as
        names or fnmatch patterns (`*`: any, `timm:*`, `hf:myorg/*`); unset, a worker runs
        torchvision's own models with their published weights only."""
        allowed = self.settings.allowed_models
        if allowed:
            return model_matches(spec.name, allowed)
        from torchvision import models

        return spec.name in models.list_models(module=models) and spec.weights is None


class HandBack(Exception):
    """`items` are queued again, uncharged, for another worker to take: this worker's
    environment failed (`code`, a strike against it), or the chunk ran out of time to
    start them (no code, no strike)."""

    def __init__(self, items: list[ChunkItem], code: ErrorCode | None = None, message: str = ""):
        super().__init__(
            f"{code}: {message}" if code else "the chunk's time to start items ran out"
        )
        self.items, self.code, self.message = items, code, message

    @property
    def strike(self) -> bool:
        return self.code is not None

    @property
    def fatal(self) -> bool:
        """The worker must leave now, not after WORKER_STRIKES."""
        return self.code in FATAL_CODES


def _failure(code: ErrorCode, message: str) -> dict:
    if code not in ERROR_CODES:
        raise ValueError(f"undeclared item error code {code!r}")
    return {"error_code": code, "error": message}


def _read_input(context: WorkerContext, payload: ChunkPayload, item: ChunkItem) -> bytes:
    """The item's image: a dataset row's from where its client staged it, in the job's own
    storage (what the worker may write, it may read); anything else from its URI."""
    if item.staged is not None:
        return context.storage(payload.output).get(job_key(payload.job_id, item.staged))
    if is_source_id(item.uri):
        # Its submit failed it before staging (too large, no image); a retry cannot run it.
        raise ItemError("not-found", "this dataset row's image was never staged (see its submit)")
    return context.read(item.uri)


def _store_artifacts(
    context: WorkerContext, payload: ChunkPayload, outcome: ItemOutcome, attempt: int
) -> None:
    """Upload the item's files under this attempt (in a render thread, beside the
    optimisation of the others). A failure here is the worker's storage, whatever its
    code: the outcome says so (`environment`)."""
    storage = context.storage(payload.output)
    outcome.result = outcome.result.model_copy(update={"attempt": attempt})
    outcome.files[RESULT_JSON] = result_json(outcome.result)
    artifacts = {}
    try:
        for filename, data in outcome.files.items():
            key = artifact_key(payload.job_id, outcome.name, filename, attempt)
            content_type = {"png": "image/png", "json": "application/json"}.get(
                filename.rsplit(".", 1)[-1], "application/octet-stream"
            )
            artifacts[filename] = storage.put(key, data, content_type)
    except ItemError as error:
        outcome.result, outcome.error_code, outcome.error = None, error.code, error.message
        outcome.environment = True
        return
    outcome.artifacts = artifacts


def _record(outcome: ItemOutcome) -> dict:
    """The job record's fields of a stored item: the attempt that wrote its artifacts,
    the artifacts, and every score."""
    return {
        "attempt": outcome.result.attempt,
        "artifacts": outcome.artifacts,
        **outcome.result.scores(),
    }


@dataclass
class _Run:
    """What running a chunk's groups came to: whether the job finished, and the items
    handed back (with the first environment failure's code and message)."""

    admit_until: float | None = None  # time.monotonic() after which no item starts
    finished: bool = False
    handed: list[ChunkItem] = field(default_factory=list)
    code: ErrorCode | None = None
    message: str = ""

    def hand_back(
        self, items: Sequence[ChunkItem], code: ErrorCode | None = None, message: str = ""
    ) -> None:
        self.handed += items
        if self.code is None and code is not None:
            self.code, self.message = code, message

    def out_of_time(self) -> bool:
        return self.admit_until is not None and time.monotonic() >= self.admit_until


def _explain_group(
    context: WorkerContext, payload: ChunkPayload, group: Sequence[ChunkItem], loaded, run: _Run
) -> None:
    store, job = context.store, payload.job_id
    settled: list[tuple[int, str, dict]] = []
    runnable: list[tuple[ChunkItem, Target]] = []
    for item in group:
        try:
            runnable.append((item, Target.parse(item.target)))
        except ValueError:
            message = f"invalid target {item.target!r}: a class index >= 0, a name, or top1"
            settled.append((item.index, "failed", _failure("bad-target", message)))
    # Filled as items begin, in the read-ahead threads: an attempt is counted only for an
    # item this worker reached, so a worker that dies is charged for those alone.
    attempt_of: dict[str, int] = {}

    def start(item: ChunkItem) -> bool:
        (attempt,) = store.begin(job, [item.index])
        if attempt is None:
            return False  # another copy of this chunk settled it meanwhile
        attempt_of[_name(item)] = attempt
        if attempt > context.settings.max_deliveries:
            message = f"the worker was lost {attempt - 1} times while explaining this item"
            raise ItemError("worker-lost", message)
        return True

    inputs = [
        ItemInput(
            name=_name(item),
            source=redacted(item.uri),
            load=lambda item=item: _read_input(context, payload, item),
            target=target,
            label=item.label,
            start=lambda item=item: start(item),
        )
        for item, target in runnable
    ]
    timings = Timings()
    try:
        outcomes = (
            explain_items(
                inputs,
                loaded,
                payload.params,
                context.limits(),
                slots=context.slots(),
                deliver=lambda outcome: _store_artifacts(
                    context, payload, outcome, attempt_of[outcome.name]
                ),
                timings=timings,
                admit_until=run.admit_until,
            )
            if inputs
            else []
        )
    except torch.AcceleratorError as error:
        # The device, not the items: every item of the group goes back uncharged, what
        # was already decided settles, and the worker leaves (HandBack.fatal); an item
        # that broke as many devices as EXPLAINCTL_MAX_HAND_BACKS fails with the code.
        message = str(error).strip().splitlines()[0][:200]
        if payload.handed_back >= context.settings.max_hand_backs:
            failure = _failure("device-error", message)
            settled += [(item.index, "failed", failure) for item, _ in runnable]
            run.finished |= store.settle(job, settled)
            return
        run.finished |= store.settle(job, settled)
        _give_back(store, job, [i for i, _ in runnable], attempt_of, run, ("device-error", message))
        return
    if inputs:
        metrics.record_idle(timings.idle_fraction)
    # Back to the queue, uncharged: items never started (deferred), and items whose failure
    # was this worker's environment (`failure`: the first of them, for the strike).
    back: list[ChunkItem] = []
    failure: tuple[ErrorCode, str] | None = None
    for (item, _), outcome in zip(runnable, outcomes, strict=True):
        if outcome.skipped:
            continue
        if outcome.deferred:
            back.append(item)
        elif outcome.ok:
            settled.append((item.index, "done", _record(outcome)))
        elif outcome.environment_failure and payload.handed_back < context.settings.max_hand_backs:
            back.append(item)
            failure = failure or (outcome.error_code, outcome.error)
        else:
            settled.append((item.index, "failed", _failure(outcome.error_code, outcome.error)))
    # One masks file, one part and one round trip for the group, after every artifact of
    # it is stored.
    masks = {
        item.index: load_mask(outcome.files[MASK_NPY])
        for (item, _), outcome in zip(runnable, outcomes, strict=True)
        if outcome.ok and outcome.files and MASK_NPY in outcome.files
    }
    try:
        run.finished |= records.settle(
            store, context.storage(payload.output), job, payload.chunk, settled, masks
        )
    except ItemError as error:
        # Storage took the artifacts but not the part: the done items go back like any
        # storage failure, the failed ones settle (their errors live in Redis).
        done = {index for index, state, _ in settled if state == "done"}
        back += [item for item, _ in runnable if item.index in done]
        settled = [change for change in settled if change[0] not in done]
        failure = failure or (error.code, error.message)
        run.finished |= store.settle(job, settled)
    metrics.record_items(settled)
    if back:
        _give_back(store, job, back, attempt_of, run, failure)


def _name(item: ChunkItem) -> str:
    """The item's folder, from the URI its records hold (redacted), as readers derive it."""
    return item_name(item.index, redacted(item.uri))


def _give_back(store: JobStore, job: str, items: list[ChunkItem], attempt_of: dict[str, int],
               run: _Run, failure: tuple[ErrorCode, str] | None) -> None:  # fmt: skip
    """Hand `items` back through the run: those this worker began with their attempt
    taken back (one that another copy settled meanwhile stays settled), and those it
    never began as they are."""
    begun = [i for i in items if _name(i) in attempt_of]
    released = set(store.release(job, [i.index for i in begun])) if begun else set()
    back = [i for i in items if _name(i) not in attempt_of or i.index in released]
    run.hand_back(back, *(failure or (None, "")))


def run_chunk(
    payload: ChunkPayload, context: WorkerContext, admit_until: float | None = None
) -> None:
    """Run the chunk's pending items; raises HandBack with the items that must go to
    another worker. admit_until: the time.monotonic() after which no further item starts
    (default: ADMIT_SHARE of EXPLAINCTL_CHUNK_TIME_LIMIT from now)."""
    store = context.store
    job = payload.job_id
    if not context.output_allowed(payload.output):
        # Nothing of the job is read or written here: another worker, whose reach covers
        # the output, may take its items (or they fail after EXPLAINCTL_MAX_HAND_BACKS).
        message = f"this worker does not write to {one_line(payload.output)!r}"
        _outside_reach(context, payload, "output-not-allowed", message)
        return
    if not store.live(job):
        # A copy delivered after the job's records expired: its manifest holds the job.
        # Without a manifest, Redis lost the job's records (a restart without persistence,
        # a failover): nothing here can recover it, but the operator must hear of it.
        if context.storage(payload.output).exists(job_key(job, ITEMS_JSONL)):
            log.info("job %s chunk %d: the job's records are gone; nothing to do", job,
                     payload.chunk)  # fmt: skip
        else:
            log.error("job %s chunk %d: the job vanished from Redis before it finished "
                      "(no manifest): its %d items are lost", job, payload.chunk,
                      len(payload.items))  # fmt: skip
        return
    if (protocol := store.protocol(job)) > PROTOCOL:
        fail_incompatible(context, job, payload.output, [i.index for i in payload.items], protocol)
        return
    if protocol < OLDEST_READABLE:
        # Records of the layout before this one: nothing here can read or write them.
        log.error("job %s chunk %d: recorded with protocol %d, which this worker cannot read: "
                  "finish it with workers of that version, or submit it again", job,
                  payload.chunk, protocol)  # fmt: skip
        return
    deliveries = store.record_delivery(job, payload.chunk)
    states = store.states(job, [item.index for item in payload.items])
    if unknown := sum(state is None for state in states):
        log.error("job %s chunk %d: %d of its items are not in the job's records (Redis lost "
                  "writes)", job, payload.chunk, unknown)  # fmt: skip
    pending = [
        item
        for item, state in zip(payload.items, states, strict=True)
        if state is not None and state not in TERMINAL_STATES
    ]
    log.info(
        "job %s chunk %d: %d pending, delivery %d", job, payload.chunk, len(pending), deliveries
    )
    if not pending:
        # A copy of a chunk whose job already finished: the run that finished it may have
        # died before writing the manifest, so write it again (it is idempotent).
        if store.status(job).finished_at is not None:
            write_manifest(store, context.storage(payload.output), job)
        return

    if admit_until is None:
        admit_until = time.monotonic() + ADMIT_SHARE * context.settings.chunk_time_limit
    run = _Run(admit_until=admit_until)
    if store.is_cancelled(job):
        run.finished = store.settle(job, [(item.index, "cancelled", None) for item in pending])
    elif not context.model_allowed(payload.model):
        message = f"this worker does not accept model {payload.model.name!r}"
        _environment_failed(context, payload, pending, "model-not-allowed", message, run)
    elif not context.weights_allowed(payload.model):
        message = f"this worker does not load weights {one_line(payload.model.weights)!r}"
        _environment_failed(context, payload, pending, "weights-not-allowed", message, run)
    elif (refusal := context.unverified(job)) is not None:
        # The job's, not this worker's: no other worker would verify it either.
        log.error("job %s chunk %d: %s", job, payload.chunk, refusal)
        failure = _failure("record-tampered", refusal)
        run.finished = store.settle(job, [(i.index, "failed", failure) for i in pending])
    else:
        try:
            loaded = context.models.get(payload.model, context.torch_device())
            loaded = loaded.with_labels(context.labels(job))
        except ExplainctlError as error:
            _environment_failed(context, payload, pending, "model-unavailable", str(error), run)
        else:
            try:
                _, resolved = loaded.prepare(payload.params)
            except InvalidInput as error:
                failure = _failure("bad-params", str(error))
                run.finished = store.settle(job, [(i.index, "failed", failure) for i in pending])
            else:
                context.record_resolved(job, resolved)
                _run_pending(context, payload, pending, loaded, deliveries, run)
    if run.finished:
        write_manifest(store, context.storage(payload.output), job)
    if run.handed:
        raise HandBack(run.handed, run.code, run.message)


class _Addressed(BaseModel):
    """What any protocol's chunk message holds: whose items, and where the job's output is."""

    model_config = ConfigDict(extra="ignore")

    class _Index(BaseModel):
        model_config = ConfigDict(extra="ignore")
        index: int = Field(ge=0)

    job_id: str = Field(pattern=f"^{JOB_ID_PATTERN.pattern}$")
    output: str
    items: list[_Index]


def refuse_newer(message: dict, protocol: int, context: WorkerContext) -> None:
    """A chunk sent with a newer protocol than this worker's: read only whose items it
    holds, and fail them (a message it cannot read at all is dropped with a log line)."""
    try:
        chunk = _Addressed.model_validate(message)
    except ValidationError as error:
        log.error("dropping a chunk of protocol %d: %s", protocol, str(error).splitlines()[0])
        return
    indices = [item.index for item in chunk.items]
    fail_incompatible(context, chunk.job_id, chunk.output, indices, protocol)


def fail_incompatible(
    context: WorkerContext, job: str, output: str, indices: list[int], protocol: int
) -> None:
    """Fail items sent or recorded with a newer protocol, in this one delivery: waiting
    for a newer worker could loop forever where none comes, and `retry` runs them again
    once the workers are upgraded."""
    message = (f"this worker speaks protocol {PROTOCOL}, the chunk protocol {protocol}: "
               f"upgrade the workers, then `explainctl retry {job}`")  # fmt: skip
    log.error("job %s: %s", job, message)
    failure = _failure("worker-incompatible", message)
    finished = context.store.settle(job, [(index, "failed", failure) for index in indices])
    if finished and context.output_allowed(output):
        write_manifest(context.store, context.storage(output), job)


def _outside_reach(context, payload: ChunkPayload, code: ErrorCode, message: str) -> None:
    """A chunk this worker may not touch at all: its items go back whole, no attempt
    taken, or fail in Redis alone once EXPLAINCTL_MAX_HAND_BACKS workers refused them
    (the failure is not written to an output this worker must not write)."""
    if payload.handed_back < context.settings.max_hand_backs:
        raise HandBack(list(payload.items), code, message)
    log.error("job %s chunk %d: %s; its items fail", payload.job_id, payload.chunk, message)
    failure = _failure(code, message)
    context.store.settle(payload.job_id, [(i.index, "failed", failure) for i in payload.items])


def _environment_failed(context, payload, pending, code: ErrorCode, message: str, run) -> None:
    """Before any item started: hand them all back, or fail them once as many workers in
    turn as EXPLAINCTL_MAX_HAND_BACKS met the same."""
    if payload.handed_back < context.settings.max_hand_backs:
        run.hand_back(pending, code, message)
    else:
        failure = _failure(code, message)
        run.finished = context.store.settle(
            payload.job_id, [(i.index, "failed", failure) for i in pending]
        )


def _run_pending(context, payload, pending, loaded, deliveries, run: _Run) -> None:
    # After a lost delivery, run items one at a time: a poison item that kills the worker
    # then takes only itself down, and reaches the attempt cap alone.
    groups = [[item] for item in pending] if deliveries > 1 else [pending]
    for position, group in enumerate(groups):
        if position and (run.out_of_time() or run.code in FATAL_CODES):
            run.hand_back([item for g in groups[position:] for item in g])
            return
        # The caller checked before the first group; later groups may have been cancelled.
        if position and context.store.is_cancelled(payload.job_id):
            rest = [item for g in groups[position:] for item in g]
            run.finished |= context.store.settle(
                payload.job_id, [(item.index, "cancelled", None) for item in rest]
            )
            return
        _explain_group(context, payload, group, loaded, run)
