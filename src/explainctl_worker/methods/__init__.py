"""Explanation methods: one `Runner` (common.py) per entry of the method table
(explainctl.spec.methods), driven by the slot engine (slot.py)."""

from __future__ import annotations

from explainctl_worker.methods import decisive, extremal, original, paper
from explainctl_worker.methods.common import Runner

RUNNERS: dict[str, Runner] = {
    "original": original.RUNNER,
    "paper": paper.RUNNER,
    "extremal": extremal.RUNNER,
    "decisive": decisive.RUNNER,
}
