"""The one Celery app definition, shared by the client (which sends) and workers (which run).

Every setting that matters for long GPU tasks is here, with its reason; `send_chunk` is
the queue's boundary, where kombu's and redis's errors become ServiceUnavailable.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import time
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import redis
from celery import Celery
from kombu.compression import decompress
from kombu.exceptions import OperationalError

from explainctl.config import Settings
from explainctl.jobs.signing import NO_KEYS, SigningKeys
from explainctl.spec.contracts import TASK_EXPLAIN_CHUNK, ChunkItem, ChunkPayload, JobInfo
from explainctl.spec.errors import ServiceUnavailable


def waiting_chunks(client: redis.Redis, queue: str) -> Iterator[dict]:
    """The chunk payloads waiting in `queue` or reserved by a worker (kombu's Redis layout:
    a list per queue, and the `unacked` hash of reserved messages)."""
    raw = [*client.lrange(queue, 0, -1), *client.hvals("unacked")]
    for message in raw:
        try:
            envelope = json.loads(message)
            if isinstance(envelope, list):  # unacked entries: [message, exchange, routing key]
                envelope = envelope[0]
            body = base64.b64decode(envelope["body"])
            if compression := envelope["headers"].get("compression"):
                body = decompress(body, compression)
            yield json.loads(body)[0][0]
        except (ValueError, KeyError, IndexError, TypeError, zlib.error):
            continue  # not a chunk message


def broker_exposure(url: str) -> list[str]:
    """What an operator should hear about a broker URL: Redis on another machine with no
    password (anyone who reaches it steers the workers), or without TLS."""
    parts = urlsplit(url)
    if parts.scheme == "unix" or _loopback(parts.hostname or "localhost"):
        return []
    where = f"{parts.hostname}:{parts.port or 6379}"
    found = []
    if not parts.password and "password" not in parse_qs(parts.query):
        found.append(f"the broker {where} has no password: whoever reaches it can queue work "
                     "and read every job; set `requirepass` and put it in the URL")  # fmt: skip
    if parts.scheme == "redis":
        found.append(f"the broker {where} is reached without TLS: use `rediss://` where the "
                     "network between clients, workers and Redis is not trusted")  # fmt: skip
    return found


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned: set[str] = set()


def warn_exposure(url: str, warn: Callable[[str], None]) -> None:
    """broker_exposure's lines through `warn`, once per URL in this process."""
    if url in _warned:
        return
    _warned.add(url)
    for line in broker_exposure(url):
        warn(line)


def signing_keys(app: Celery) -> SigningKeys:
    """The keys `app` signs with (make_app's settings; none for an app made elsewhere)."""
    return getattr(app, "explainctl_signing", NO_KEYS)


def send_chunk(app: Celery, payload: ChunkPayload | dict, queue: str) -> None:
    """Queue one chunk, riding out a broker blip of a few seconds: the one way a chunk is
    queued, by a submit, a retry, a worker's hand-back, or a reaper re-sending a lost
    chunk. A new chunk (a ChunkPayload) is signed with the app's key; a re-sent one (the
    message as it was received, a dict) goes on unchanged with the signature it came
    with, so a payload planted in Redis is never signed by whoever re-sends it."""
    if isinstance(payload, ChunkPayload):
        message = signing_keys(app).sign(payload.wire())
    else:
        message = payload
    try:
        app.send_task(
            TASK_EXPLAIN_CHUNK,
            args=[message],
            queue=queue,
            # A million-item job waits in Redis as messages: compressed, and without
            # Celery's copy of the arguments for logs, a chunk of 16 takes 1.8 kB, not 4.8.
            compression="zlib",
            argsrepr=f"job {message.get('job_id')} chunk {message.get('chunk')}",
            kwargsrepr="{}",
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.5, "interval_step": 1},
        )
    except (OperationalError, redis.RedisError) as error:
        job = message.get("job_id") if isinstance(message, dict) else None
        raise ServiceUnavailable(f"cannot queue job {job}: {error}") from None


def send_items(app: Celery, info: JobInfo, items: list[ChunkItem], chunk: int) -> None:
    """Queue `items` of a job as its chunk number `chunk`, to the job's queue."""
    payload = ChunkPayload(job_id=info.job_id, chunk=chunk, model=info.model,
                           params=info.params, output=info.output, items=items,
                           sent_at=time.time())  # fmt: skip
    send_chunk(app, payload, info.queue)


def make_app(settings: Settings) -> Celery:
    app = Celery("explainctl", broker=settings.broker_url, set_as_current=False)
    app.explainctl_signing = SigningKeys(settings.signing_secrets())
    app.conf.update(
        # JSON only, both ways: a pickled message is refused, so the broker cannot be used
        # to run code on workers.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Job state lives in our own Redis records (explainctl.jobs.store), not in Celery results.
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=settings.queue,
        task_create_missing_queues=True,
        # Acknowledge a chunk only once it finished, so a worker that dies mid-chunk leaves
        # it in the queue for another worker. Items are idempotent (explainctl.jobs.store), so a
        # second run of a chunk skips what is done.
        task_acks_late=True,
        # A pool process killed (OOM, segfault) requeues its chunk at once instead of losing
        # it; explainctl.jobs.store counts attempts per item so a poison item cannot loop forever.
        task_reject_on_worker_lost=True,
        # Take one chunk at a time: with late acks a larger prefetch lets one worker hoard
        # chunks that idle workers could run.
        worker_prefetch_multiplier=1,
        task_time_limit=settings.chunk_time_limit,
        task_soft_time_limit=max(1, settings.chunk_time_limit - 30),
        # Redis redelivers a message unacknowledged for this long; it must outlast the hard
        # time limit (Settings.check) or a slow chunk runs twice at once.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Bound each blocking read, so a worker notices a dead connection.
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "health_check_interval": 25,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # A chunk running when the broker connection drops goes on: its results reach the
        # job records once Redis is back (JobStore retries), and the copy Redis redelivers
        # later finds its items settled and does nothing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app
