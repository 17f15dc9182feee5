#!/usr/bin/env python3
"""Health probe of an explainctl worker container, installed in the image as `explainctl-probe`.

Exits 0 when every Celery node the container runs answers a ping through the broker, else 1:

    explainctl-probe [--gpus all|0,1] [--timeout SECONDS]

Give it the `--gpus` value the worker was started with. `explainctl worker --gpus all` runs one
Celery node per GPU, named explain-gpu<N>@<host>; without --gpus the worker runs one node,
explain@<host>. The names come from the launcher's own GPU parsing, so they cannot disagree.

It pings with the workers' own Celery settings (broker, visibility timeout) and imports no torch.
`celery -A explainctl_worker.app inspect ping -d NODE` does the same through the worker app, which
loads torch: about 700 MB and 3 s for every probe.

Celery stops answering remote-control commands as soon as its warm shutdown starts (SIGTERM),
while the current chunk finishes. A Kubernetes preStop hook creates STOPPING_FILE just before
that signal; the probe then reports healthy, so a liveness probe cannot kill a worker that is
finishing its chunk. This stands in for a health command that the CLI does not have yet.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

STOPPING_FILE = "/tmp/explainctl-stopping"


def node_names(gpus: str | None, host: str) -> list[str]:
    """The Celery node names `explainctl worker [--gpus GPUS]` gives its processes on `host`."""
    from explainctl_worker import launcher  # imports no torch

    indices = launcher.parse_gpus(gpus)
    if not indices:
        return [f"explain@{host}"]
    return [f"explain-gpu{gpu}@{host}" for gpu in indices]


def _give_up(_signum, _frame):
    print("unhealthy: no answer in time (broker unreachable?)", flush=True)
    os._exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explainctl-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default=None, help="the worker's --gpus value (all, 0,1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for pongs")
    parser.add_argument("--stopping-file", default=STOPPING_FILE, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if os.path.exists(args.stopping_file):
        print("ok: warm shutdown in progress, finishing the current chunk")
        return 0

    # A broker that does not answer must fail the probe, not hang it.
    signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(max(1, int(args.timeout * 3)))

    from explainctl.config import Settings
    from explainctl.errors import ExplainctlError
    from explainctl.queue import make_app

    try:
        settings = Settings.load()
        if not settings.broker_url:
            # Unset, the settings fall back to an embedded Redis that no worker here uses.
            print("unhealthy: EXPLAINCTL_BROKER_URL is not set")
            return 1
        nodes = node_names(args.gpus, socket.gethostname())
        app = make_app(settings)
        replies = app.control.inspect(destination=nodes, timeout=args.timeout).ping() or {}
    except ExplainctlError as error:
        print(f"unhealthy: {error}")
        return 1
    except Exception as error:  # the broker refused the connection, bad URL...
        print(f"unhealthy: {type(error).__name__}: {error}")
        return 1
    missing = [node for node in nodes if node not in replies]
    if missing:
        print(f"unhealthy: no reply from {', '.join(missing)}")
        return 1
    print(f"ok: {', '.join(nodes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
