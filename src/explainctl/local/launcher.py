"""`explainctl worker`: one Celery worker process per GPU, or one on the CPU, supervised.

Each process is pinned to its GPU with CUDA_VISIBLE_DEVICES and runs the prefork pool
with one child, so time limits apply and CUDA only ever starts in the child. A process
that dies is started again with backoff, and the log says how it died. Node names are
unique per host and process, so two launchers on one node (two Slurm jobs) never share
one. This module imports no torch: the parent never touches CUDA.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace

from explainctl.config import Settings
from explainctl.spec.errors import InvalidInput

log = logging.getLogger("explainctl.launcher")

# A process that died is started again after 1 s, then 2, 4, ... up to a minute; one that
# had run this long before dying starts the count again.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 60.0
HEALTHY_AFTER = 120.0


def node_name(base: str = "explain") -> str:
    """`<base>-<Slurm job or PID>@<host>`: unique per host and launcher process."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and "SLURM_STEP_ID" in os.environ:
        tag = f"slurm{job}.{os.environ['SLURM_STEP_ID']}"
    elif job:
        tag = f"slurm{job}"
    else:
        tag = f"pid{os.getpid()}"
    return f"{base}-{tag}@{socket.gethostname()}"


def celery_command(settings: Settings, name: str, loglevel: str = "INFO") -> list[str]:
    """The command of one worker process; `name` is its full node name (node_name)."""
    return [
        sys.executable, "-m", "celery", "-A", "explainctl_worker.app", "worker",
        "--queues", settings.queue,
        "--pool", "prefork",
        "--concurrency", "1",
        "--hostname", name,
        "--loglevel", loglevel,
        # Gossip and mingle add chatter and start-up delay that single-GPU workers never use.
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def parse_gpus(text: str | None) -> list[str]:
    # "none": one process on the CPU, for a batch script that found no GPU to hand on.
    if not text or text == "none":
        return []
    if text == "all":
        return _visible_gpus()
    gpus = [part.strip() for part in text.split(",") if part.strip()]
    if not all(g.isdigit() for g in gpus):
        raise InvalidInput(f"--gpus takes indices like 0,1 or 'all', got {text!r}")
    return gpus


def _visible_gpus() -> list[str]:
    # nvidia-smi rather than torch: the parent must not initialise CUDA before children fork.
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        raise InvalidInput("--gpus all: nvidia-smi is not available on this machine") from None
    gpus = [str(n) for n, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU")]
    if not gpus:
        raise InvalidInput("--gpus all: no GPU found")
    return gpus


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Process:
    """One supervised worker process: what it runs, and its current incarnation."""

    command: list[str]
    env: dict[str, str]
    name: str
    child: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None

    def start(self) -> None:
        self.child = subprocess.Popen(self.command, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None


def run_workers(
    settings: Settings, gpus: list[str], loglevel: str = "INFO", name: str | None = None
) -> int:
    """Start the worker processes and supervise them until SIGTERM/SIGINT, which are
    passed on (warm shutdown); returns the worst exit code of the last incarnations."""
    base = name or node_name()
    base_env = {**os.environ, **settings.environment()}
    processes = []
    if gpus:
        node, _, host = base.partition("@")
        for position, gpu in enumerate(gpus):
            # One metrics port per process: base, base + 1, ...
            port = settings.metrics_port + position if settings.metrics_port else 0
            own = replace(settings, device="cuda", metrics_port=port).environment()
            env = {**base_env, **own, "CUDA_VISIBLE_DEVICES": gpu}
            full = f"{node}-gpu{gpu}@{host}" if host else f"{node}-gpu{gpu}"
            processes.append(_Process(celery_command(settings, full, loglevel), env, full))
    else:
        processes.append(_Process(celery_command(settings, base, loglevel), base_env, base))

    stopping = threading.Event()

    def forward(signum, _frame):
        # Always a warm shutdown. Ctrl-C already sent SIGINT to every process of the
        # terminal, and Celery takes a second SIGINT as a cold shutdown that kills the chunk.
        stopping.set()
        for process in processes:
            if process.child is not None and process.child.poll() is None:
                process.child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    for process in processes:
        process.start()
    codes: dict[str, int] = {}
    while True:
        now = time.monotonic()
        for process in processes:
            if process.restart_at is not None:
                if stopping.is_set():
                    process.restart_at = None
                elif now >= process.restart_at:
                    log.warning("starting %s again", process.name)
                    process.start()
                continue
            if process.child is None or (code := process.child.poll()) is None:
                continue
            codes[process.name] = code
            if stopping.is_set():
                process.child = None
                continue
            if now - process.started >= HEALTHY_AFTER:
                process.backoff = FIRST_BACKOFF
            log.error(
                "worker %s %s; restarting in %.0f s", process.name, _how(code), process.backoff
            )
            process.restart_at = now + process.backoff
            process.backoff = min(MAX_BACKOFF, process.backoff * 2)
            process.child = None
        if all(p.child is None and p.restart_at is None for p in processes):
            return max((abs(c) for c in codes.values()), default=0)
        stopping.wait(0.2)
