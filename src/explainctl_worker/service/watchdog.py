"""When a worker should leave: it exits non-zero, so its supervisor (the launcher,
Kubernetes, Slurm) starts a fresh one. Three reasons, in one place:

- it cannot reach its broker for too long (`watch`, the broker watchdog);
- its environment failed WORKER_STRIKES chunks in a row (`Strikes`, `leave`): missing
  weights, a drifted allow-list, storage it cannot write. Its chunks went back to the
  queue uncharged; a fresh process may fix it (a sticky device error), and if it does not,
  the supervisor's back-off and restart count make the fault visible;
- its broker is a Redis that may evict keys (`refuse`, at start).

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
BROKEN = 78  # EX_CONFIG: this worker's configuration or environment is at fault
# The pause after a handed-back chunk doubles with each strike, from FIRST to at most MAX.
FIRST_PAUSE, MAX_PAUSE = 2.0, 30.0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found += [int(part) for part in text.split()]
    return found


def _exit(code: int) -> None:
    """End the main process now, and its pool children with it."""
    for child in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os._exit(code)


def _exit_stalled(seconds: float) -> None:
    log.critical("no answer from the broker for %.0f s: exiting so a fresh worker starts", seconds)
    _exit(STALLED)


class Strikes:
    """Chunks in a row a pool process handed back, its environment failing."""

    def __init__(self) -> None:
        self.count = 0
        self.fatal = False

    def record(self, struck: bool, fatal: bool = False) -> None:
        """One more chunk in the row, or the row broken by a chunk that was not; `fatal`:
        one the worker cannot survive (errors.FATAL_CODES)."""
        self.count = self.count + 1 if struck else 0
        self.fatal = self.fatal or fatal

    def pause(self) -> float:
        return min(MAX_PAUSE, FIRST_PAUSE * 2 ** (self.count - 1))


def on_leave() -> None:
    """In the main process: a pool process that asks to leave (SIGUSR2) ends the worker."""

    def leave_now(_signum, _frame) -> None:
        log.critical("this worker's environment failed: exiting so a fresh worker starts")
        _exit(BROKEN)

    signal.signal(signal.SIGUSR2, leave_now)


def refuse(reason: str) -> None:
    """In the main process, before it consumes anything: this worker cannot run here."""
    log.critical("cannot start: %s", reason)
    _exit(BROKEN)


def leave(reason: str) -> None:
    """In a pool process, between chunks: ask the main process to end the worker."""
    log.critical("leaving: %s", reason)
    os.kill(os.getppid(), signal.SIGUSR2)


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
