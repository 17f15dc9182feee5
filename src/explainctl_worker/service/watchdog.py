"""The broker watchdog: a worker that cannot reach its broker for too long exits non-zero,
so its supervisor (the launcher, Kubernetes, Slurm) starts a fresh one.

Celery reconnects on its own after a Redis restart; this is for the connection that
stalls without an error (a half-open socket, a partition): the main process pings Redis
on a connection of its own every few seconds, and after EXPLAINCTL_BROKER_STALL_SECONDS
without an answer it kills its pool children and exits with STALLED. Their chunks come
back through their leases (lease.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

log = logging.getLogger("explainctl.worker")
STALLED = 75  # EX_TEMPFAIL: try again


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found += [int(part) for part in text.split()]
    return found


def _exit_stalled(seconds: float) -> None:
    log.critical("no answer from the broker for %.0f s: exiting so a fresh worker starts", seconds)
    for child in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os._exit(STALLED)


def watch(
    url: str,
    stall_seconds: float,
    *,
    every: float | None = None,
    on_stall: Callable[[float], None] = _exit_stalled,
) -> threading.Thread | None:
    """Ping the broker every `every` seconds (default a fifth of the limit, at most 10)
    in a daemon thread; call `on_stall` once no ping has succeeded for `stall_seconds`."""
    if stall_seconds <= 0:
        return None
    every = every or min(10.0, stall_seconds / 5)
    client = redis.Redis.from_url(url, socket_timeout=every, socket_connect_timeout=every)

    def loop() -> None:
        last = time.monotonic()
        while True:
            time.sleep(every)
            try:
                client.ping()
                last = time.monotonic()
            except redis.RedisError:
                silent = time.monotonic() - last
                if silent >= stall_seconds:
                    on_stall(silent)
                    return

    thread = threading.Thread(target=loop, name="broker-watchdog", daemon=True)
    thread.start()
    return thread
