"""The machine a benchmark ran on, as one line for its results."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cpus, {model}"
