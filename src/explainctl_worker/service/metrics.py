"""Prometheus metrics of a worker process, served on EXPLAINCTL_METRICS_PORT when set.

Each Celery worker process (one per GPU) runs one pool child, which runs the chunks, so
the child serves its own metrics; with several GPUs the launcher gives each process the
next port.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

ITEMS = Counter("explainctl_items_total", "Items settled by this worker", ["state", "error_code"])
ITEM_SECONDS = Histogram(
    "explainctl_item_seconds",
    "Engine seconds per explained item (each pass's time shared by the items in it)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
ITEM_ITERATIONS = Histogram(
    "explainctl_item_iterations",
    "Iterations an item's mask was optimised for before it converged or hit its budget",
    buckets=(10, 50, 100, 150, 200, 300, 400, 500, 800, 1000, 2000),
)
DEVICE_IDLE = Histogram(
    "explainctl_chunk_device_idle_ratio",
    "Share of a chunk's engine time the device waited for decoding or the last renders",
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1),
)
CHUNK_SECONDS = Histogram(
    "explainctl_chunk_seconds",
    "Wall time of one chunk on this worker, storage included",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
QUEUE_WAIT = Histogram(
    "explainctl_queue_wait_seconds",
    "Time from a chunk being queued to a worker starting it",
    buckets=(0.1, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 14400),
)
REFUSED = Counter(
    "explainctl_chunks_refused_total",
    "Chunk messages refused unread: unsigned, or signed by no key this worker holds",
    ["reason"],
)
GPU_MEMORY = Gauge("explainctl_gpu_memory_bytes", "GPU memory held by torch", ["kind"])
REDIS_MEMORY = Gauge(
    "explainctl_redis_memory_bytes",
    "Redis memory as this worker last read it (used, peak; maxmemory: its cap, 0 for none)",
    ["kind"],
)


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def record_items(settled: Iterable[tuple[int, str, dict]]) -> None:
    for _, state, fields in settled:
        ITEMS.labels(state=state, error_code=fields.get("error_code") or "").inc()
        if state == "done" and fields.get("seconds") is not None:
            ITEM_SECONDS.observe(fields["seconds"])
        if state == "done" and fields.get("iterations") is not None:
            ITEM_ITERATIONS.observe(fields["iterations"])


def record_idle(ratio: float) -> None:
    DEVICE_IDLE.observe(ratio)


def record_redis(memory: dict[str, int]) -> None:
    for kind, value in memory.items():
        REDIS_MEMORY.labels(kind=kind).set(value)


def record_chunk(sent_at: float | None, started: float, device) -> None:
    CHUNK_SECONDS.observe(time.time() - started)
    if sent_at:
        QUEUE_WAIT.observe(max(0.0, started - sent_at))
    if device is not None and device.type == "cuda":
        import torch

        GPU_MEMORY.labels(kind="allocated").set(torch.cuda.memory_allocated(device))
        GPU_MEMORY.labels(kind="reserved").set(torch.cuda.memory_reserved(device))


def record_refused(reason: str) -> None:
    REFUSED.labels(reason=reason).inc()
