"""The worker's Celery app: `celery -A explainctl_worker.app worker -Q explain`.

Configuration comes from the environment (explainctl.config), so `explainctl worker` and a
plain `celery` command behave the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from celery.signals import (
    task_postrun,
    task_received,
    worker_init,
    worker_process_init,
    worker_ready,
)
from pydantic import ValidationError

from explainctl.config import Settings
from explainctl.jobs import leases
from explainctl.jobs.queue import make_app, send_chunk, signing_keys, warn_exposure
from explainctl.jobs.store import JobStore
from explainctl.local import embedded
from explainctl.spec.contracts import (
    PROTOCOL,
    TASK_EXPLAIN_CHUNK,
    ChunkPayload,
    ModelSpec,
    sent_protocol,
)
from explainctl.spec.errors import WORKER_STRIKES, ExplainctlError, ServiceUnavailable
from explainctl_worker.service import lease, metrics, watchdog
from explainctl_worker.service.chunk import HandBack, WorkerContext, refuse_newer, run_chunk

log = logging.getLogger("explainctl.worker")
# A worker started with no broker configured joins this machine's embedded Redis.
settings = embedded.resolve(Settings.load())
app = make_app(settings)
keys = signing_keys(app)

_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context() -> WorkerContext:
    """This pool process's context, made on first use (after the fork, never before)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = WorkerContext.from_settings(settings)
        return _context


_reservations: lease.Reservations | None = None
strikes = watchdog.Strikes()


@worker_init.connect
def _check_broker(**_) -> None:
    """In the main process, before it consumes: a Redis that may evict keys is refused."""
    warn_exposure(settings.broker_url, log.warning)
    if not keys.enabled:
        log.warning("no signing key (EXPLAINCTL_SIGNING_KEYS or EXPLAINCTL_SIGNING_KEY_FILE): "
                    "chunk messages are not verified, so whoever can write to Redis steers "
                    "this worker")  # fmt: skip
    try:
        for warning in JobStore.connect(settings.broker_url).check_server():
            log.warning("%s", warning)
    except ExplainctlError as error:
        watchdog.refuse(str(error))


@worker_ready.connect
def _start_watchdog(**_) -> None:
    # In the main process, which holds the broker connection the pool children feed from.
    global _reservations
    watchdog.watch(settings.broker_url, settings.broker_stall_seconds)
    watchdog.on_leave()
    _reservations = lease.Reservations(JobStore.connect(settings.broker_url).redis,
                                       settings.lease_seconds)  # fmt: skip


@task_received.connect
def _reserve(request, **_) -> None:
    """In the main process, on receipt: the chunk is ours until its pool process starts it."""
    if _reservations is None or request.name != TASK_EXPLAIN_CHUNK or not request.args:
        return
    if keys.verify(request.args[0]) not in ("verified", "not-checked"):
        return  # refused once it starts; nothing of it is kept meanwhile
    queue = lease.delivered_queue(request, settings.queue)
    try:
        _reservations.take(request.id, request.args[0], queue)
    except Exception as error:  # a reservation helps recovery; it must never drop a chunk
        log.warning("cannot reserve chunk %s: %s", request.id, error)


@worker_process_init.connect
def _start_reaper(**_) -> None:
    lease.start_reaper(context().store, app, settings.lease_seconds, settings.reconcile_seconds)
    metrics.serve(settings.metrics_port)


@worker_process_init.connect
def _preload(**_) -> None:
    # Loading a model can take minutes; the signal handler must return within seconds, so
    # the load runs in a thread and the first chunk waits on the cache's lock if needed.
    def load() -> None:
        for name in settings.preload:
            try:
                context().models.get(ModelSpec(name=name), context().torch_device())
                log.info("preloaded model %s", name)
            except Exception as error:  # a failed preload must not kill the worker
                log.error("cannot preload %s: %s", name, error)

    if settings.preload:
        threading.Thread(target=load, name="preload", daemon=True).start()


def _trusted(payload: object) -> bool:
    """Whether the chunk may run: signed by a key of this worker's, or this worker holds
    none. A refused message is acknowledged and dropped, one line in the log and a count
    in the metrics: nothing it names was read, and no item of a genuine job is lost, since
    items queued in no message are sent again, signed, by the reconciler."""
    verdict = keys.verify(payload)
    if verdict in ("verified", "not-checked"):
        return True
    named = payload.get("job_id") if isinstance(payload, dict) else None
    log.error("refusing a chunk message (%s) that names job %.40r: not signed by a key of "
              "this worker's", verdict, named)  # fmt: skip
    metrics.record_refused(verdict)
    return False


@app.task(name=TASK_EXPLAIN_CHUNK, bind=True)
def explain_chunk_task(self, payload: dict) -> None:
    # Started: the reservation taken on receipt gives way to the run's own lease below.
    leases.release(context().store.redis, lease.reservation_key(self.request.id))
    if not _trusted(payload):
        return
    if (protocol := sent_protocol(payload)) > PROTOCOL:
        refuse_newer(payload, protocol, context())
        return
    try:
        chunk = ChunkPayload.model_validate(payload)
    except ValidationError as error:
        # Nothing in it can be trusted, not even the job ID: log it and drop it.
        log.error("dropping a malformed chunk message: %s", str(error).splitlines()[0])
        return
    started = time.time()
    queue = lease.delivered_queue(self.request, settings.queue)  # where a re-send goes
    with lease.hold(context().store.redis, chunk, queue, settings.lease_seconds, payload) as mine:
        if not mine:
            log.info("job %s chunk %d runs elsewhere under a live lease", chunk.job_id, chunk.chunk)
            return
        try:
            run_chunk(chunk, context())
        except HandBack as back:
            strikes.record(back.strike, back.fatal)
            _hand_back(chunk, back, queue)
        else:
            strikes.record(False)
    metrics.record_chunk(chunk.sent_at, started, context().device)
    with contextlib.suppress(ServiceUnavailable):  # a gauge is not worth failing a chunk for
        metrics.record_redis(context().store.memory())
    if 0 < strikes.count < WORKER_STRIKES and not strikes.fatal:
        # Slower than a healthy worker, so a broken one cannot drain the queue (one about
        # to leave need not wait).
        time.sleep(strikes.pause())


def _hand_back(chunk: ChunkPayload, back: HandBack, queue: str) -> None:
    """Send the items back for another worker, as a chunk of a new number (a delivery of
    the old one would read as a lost worker); a strike against this one when its
    environment failed."""
    number = context().store.new_chunk_number(chunk.job_id)
    again = {"items": back.items, "chunk": number}
    if back.strike:
        again["handed_back"] = chunk.handed_back + 1
        log.error(
            "job %s chunk %d: handing %d items back as chunk %d (%s), strike %d of %d",
            chunk.job_id, chunk.chunk, len(back.items), number, back, strikes.count,
            WORKER_STRIKES,
        )  # fmt: skip
    else:
        log.info("job %s chunk %d: handing %d items back as chunk %d (%s)",
                 chunk.job_id, chunk.chunk, len(back.items), number, back)  # fmt: skip
    send_chunk(app, chunk.model_copy(update=again), queue)


@task_postrun.connect
def _leave_when_broken(**_) -> None:
    """In the pool process, once its chunk's lease is released: after WORKER_STRIKES
    chunks in a row handed back, the whole worker leaves (watchdog.leave)."""
    if strikes.fatal:
        watchdog.leave("its accelerator failed (a CUDA error is sticky)")
    elif strikes.count >= WORKER_STRIKES:
        watchdog.leave(f"{strikes.count} chunks in a row failed in this worker's environment")
