"""The precision of the model's passes: params.precision, with `auto` resolved per device.

bf16 autocast runs the convolutions and matrix products in bfloat16 and everything it
deems unsafe in float32; the mask, the loss terms and the optimiser stay float32 (the
model's logits are cast back before the loss). `auto` picks bf16 where the hardware computes
bf16 products natively, which is where it pays: CUDA devices that support it, and CPUs
with bf16 matrix units (Intel AMX, `amx_bf16`) or bf16 dot-product instructions
(AVX512-BF16, `avx512_bf16`; on an AMD EPYC with them, VGG19 ran 1.8x faster per pass).
Elsewhere bf16 is emulated and slower, so `auto` is fp32 (benchmarks/README.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache
from pathlib import Path

import torch

from explainctl.spec.methods import Precision

Resolved = str  # "fp32" or "bf16": what a pass actually ran in


# CPU flags (Linux's /proc/cpuinfo) of native bf16 products.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU reports one of BF16_CPU_FLAGS (False where it cannot tell)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()
    }
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve(precision: Precision, device: torch.device) -> Resolved:
    """fp32 or bf16: what `precision` means on `device`."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def autocast(resolved: Resolved, device: torch.device) -> AbstractContextManager:
    """The context the model's passes run in."""
    if resolved == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
