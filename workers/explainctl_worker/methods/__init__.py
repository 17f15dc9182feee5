"""Explanation methods, chosen by ExplainParams.method; each is a `Runner` (common.py)
that the slot engine (slot.py) drives."""

from __future__ import annotations

from explainctl_worker.methods import extremal, paper, seed
from explainctl_worker.methods.common import Runner

RUNNERS: dict[str, Runner] = {
    "seed": seed.RUNNER,
    "paper": paper.RUNNER,
    "extremal": extremal.RUNNER,
}
