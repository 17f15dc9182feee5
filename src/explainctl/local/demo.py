"""`explainctl demo`: the whole pipeline on one machine, from nothing to an audit report.

Starts the embedded Redis and a local worker on the best device present, submits the
bundled example photos, follows the job, writes the report next to the artifacts, and
stops the worker it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from explainctl.client import Client
from explainctl.config import Settings
from explainctl.inputs import InputItem
from explainctl.local import embedded
from explainctl.spec.contracts import ModelSpec
from explainctl.spec.errors import MissingDependency
from explainctl.spec.methods import ExplainParams


@dataclass(frozen=True)
class DemoResult:
    job_id: str
    report: str
    state: str
    counts: dict[str, int]


def example_images() -> list[str]:
    folder = resources.files("explainctl").joinpath("examples")
    return sorted(str(Path(str(p))) for p in folder.iterdir() if p.name.endswith(".jpg"))


def check_model(spec: ModelSpec) -> None:
    """Fail in one line now, not per item later, when the model or its weights are missing."""
    try:
        from explainctl_worker.model import ensure_weights
    except ImportError as error:
        raise MissingDependency(
            f"the demo runs a local worker, which needs pip install 'explainctl[worker]': {error}"
        ) from None
    ensure_weights(spec)


def run_demo(
    settings: Settings,
    spec: ModelSpec,
    params: ExplainParams,
    follow: Callable[[Client, str], None],
    device: str | None = None,
) -> DemoResult:
    """Run the demo with `settings` as loaded. The embedded Redis, when needed, starts
    only once the model and its weights are found, so an offline failure leaves nothing
    running."""
    check_model(spec)
    settings = embedded.resolve(settings)
    client = Client(settings)
    env = replace(
        settings, allowed_models=(spec.name,), device=device or settings.device
    ).environment()
    log_path = client.settings.home_dir / "demo-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        worker = embedded.spawn_worker(env, log, ["--loglevel", "INFO"])
    try:
        items = (InputItem(uri) for uri in example_images())
        submitted = client.submit(items, spec, params, chunk_size=len(example_images()))
        follow(client, submitted.job_id)
        status = client.status(submitted.job_id)
        report = client.report(submitted.job_id)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    return DemoResult(submitted.job_id, report, status.state, status.counts)
