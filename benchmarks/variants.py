"""Earlier defaults of the decisive method, for benchmarks that set them beside today's.

Parameters alone cannot bring back the default before the "tenth of the compute" levers
(benchmarks/README.md): three of them live in the method's runner (plain Adam, the drift
stop rule, the mask stored without its order). A variant is today's runner with those
fields put back, installed in the method table while a run lasts (`runner_for`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from explainctl_worker.methods import RUNNERS, original
from explainctl_worker.methods.common import Runner

# The decisive default before the levers: 300 steps, the push and a constant learning
# rate over the whole budget, one jitter per step, fp32, with the "before" runner.
BEFORE = {"method": "decisive", "iterations": 300, "lr": 0.1, "push_steps": 300,
          "lr_final": 1.0, "jitter_draws": 1, "precision": "fp32",
          "runner": "before"}  # fmt: skip

_UNORDERED = {"finish": original.finish}
VARIANTS: dict[str, dict] = {
    "before": {**_UNORDERED, "optimizer": "adam", "stop": "drift"},
    "adam, unordered": {**_UNORDERED, "optimizer": "adam"},
    "unordered": _UNORDERED,
    "adam": {"optimizer": "adam"},
}


def variant(name: str) -> Runner:
    """Today's decisive runner with the fields of variant `name` put back."""
    return replace(RUNNERS["decisive"], **VARIANTS[name])


def params_only(values: dict) -> dict:
    """A candidate's parameters, without the name of its runner variant."""
    return {k: v for k, v in values.items() if k != "runner"}


@contextmanager
def runner_for(values: dict) -> Iterator[None]:
    """The method table's decisive runner, or the variant values["runner"] names, while
    the block runs."""
    name = values.get("runner")
    if name is None:
        yield
        return
    shipped = RUNNERS["decisive"]
    RUNNERS["decisive"] = variant(name)
    try:
        yield
    finally:
        RUNNERS["decisive"] = shipped
