"""`explainctl worker`: one Celery worker process per GPU, or one on the CPU.

Each process is pinned to its GPU with CUDA_VISIBLE_DEVICES and runs the prefork pool
with one child, so time limits apply and CUDA only ever starts in the child. This module
imports no torch: the parent never touches CUDA.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

from explainctl.config import Settings
from explainctl.errors import InvalidInput


def celery_command(settings: Settings, name: str, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "explainctl_worker.app", "worker",
        "--queues", settings.queue,
        "--pool", "prefork",
        "--concurrency", "1",
        "--hostname", f"{name}@{socket.gethostname()}",
        "--loglevel", loglevel,
        # Gossip and mingle add chatter and start-up delay that single-GPU workers never use.
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def parse_gpus(text: str | None) -> list[str]:
    if not text:
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


def run_workers(settings: Settings, gpus: list[str], loglevel: str = "INFO") -> int:
    """Start the worker processes and wait; SIGTERM/SIGINT are passed on (warm shutdown)."""
    base_env = {**os.environ, **settings.environment()}
    plans = []
    if gpus:
        for position, gpu in enumerate(gpus):
            # One metrics port per process: base, base + 1, ...
            port = settings.metrics_port + position if settings.metrics_port else 0
            own = replace(settings, device="cuda", metrics_port=port).environment()
            env = {**base_env, **own, "CUDA_VISIBLE_DEVICES": gpu}
            plans.append((celery_command(settings, f"explain-gpu{gpu}", loglevel), env))
    else:
        plans.append((celery_command(settings, "explain", loglevel), base_env))

    children = [subprocess.Popen(command, env=env) for command, env in plans]

    def forward(signum, _frame):
        # Always a warm shutdown. Ctrl-C already sent SIGINT to every process of the
        # terminal, and Celery takes a second SIGINT as a cold shutdown that kills the chunk.
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return max(child.wait() for child in children)
