"""The machine a benchmark ran on, as one line for its results."""

from __future__ import annotations

import json
import os
import platform

# The CPU flags that decide what a pass costs: bf16 matrix units (AMX), bf16 vector
# instructions, and the vector widths.
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_flags() -> list[str]:
    """Which of FLAGS this CPU reports (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next(line for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    present = set(line.split(":", 1)[1].split())
    return [flag for flag in FLAGS if flag in present]


def describe() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    units = "bf16 matrix units (AMX)" if "amx_bf16" in flags else "no bf16 matrix units"
    if "avx512_bf16" in flags:
        units += ", bf16 dot-product instructions (AVX512-BF16)"
    shown = " ".join(flags) or "none of " + " ".join(FLAGS)
    return f"{platform.machine()}, {os.cpu_count()} cpus, {model}, {units} (flags: {shown})"


def emit(row: dict, path: str | None) -> None:
    """Print one result row as a JSON line, and append it to `path` when given."""
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
