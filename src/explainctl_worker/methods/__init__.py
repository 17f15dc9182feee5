"""Explanation methods: one module per entry of the method table (explainctl.spec.methods),
named after it and holding its `RUNNER` (common.Runner), driven by the slot engine
(engine/slots.py). A new method is its entry in the table and its module here."""

from __future__ import annotations

from importlib import import_module

from explainctl.spec.methods import METHODS
from explainctl_worker.methods.common import Runner

RUNNERS: dict[str, Runner] = {
    info.name: import_module(f"{__name__}.{info.name}").RUNNER for info in METHODS
}
