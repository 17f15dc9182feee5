"""Explanation methods, chosen by ExplainParams.method; each exposes
`run(problem, params, progress) -> MethodResult` (see common.py)."""

from __future__ import annotations

from explainctl_worker.methods import extremal, paper, seed

RUNNERS = {"seed": seed.run, "paper": paper.run, "extremal": extremal.run}
