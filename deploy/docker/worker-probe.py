#!/usr/bin/env python3
"""Health probe of an explainctl worker container, installed in the image as `explainctl-probe`.

Exits 0 when every Celery node the container runs answers a ping through the broker, else 1:

    explainctl-probe [--gpus all|0,1] [--timeout SECONDS]

Give it the `--gpus` (and `--name`) value the worker was started with. `explainctl worker
--gpus all` runs one Celery node per GPU, named explain-<tag>-gpu<N>@<host>; without --gpus one
node, explain-<tag>@<host>, where <tag> (the Slurm job or launcher PID) keeps names unique on a
host. The probe asks every node for a pong and looks for those of this host; the GPU list
comes from the launcher's own parsing, so they cannot disagree.

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
import re
import signal
import socket
import sys

STOPPING_FILE = "/tmp/explainctl-stopping"


def node_patterns(gpus: str | None, host: str, name: str | None = None) -> list[re.Pattern]:
    """What the node names `explainctl worker [--gpus GPUS] [--name NAME]` gives its
    processes on `host` look like, one pattern per process."""
    from explainctl.local import launcher  # imports no torch

    indices = launcher.parse_gpus(gpus)
    if name:
        node, _, at = name.partition("@")
        suffix = re.escape("@" + (at or host))
        head = re.escape(node)
    else:
        suffix, head = re.escape("@" + host), r"explain(?:-[^@]+)?"
    if not indices:
        return [re.compile(f"^{head}{suffix}$")]
    return [re.compile(f"^{head}-gpu{gpu}{suffix}$") for gpu in indices]


def _give_up(_signum, _frame):
    print("unhealthy: no answer in time (broker unreachable?)", flush=True)
    os._exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explainctl-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default=None, help="the worker's --gpus value (all, 0,1)")
    parser.add_argument("--name", default=None, help="the worker's --name value, if any")
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
    from explainctl.jobs.queue import make_app
    from explainctl.spec.errors import ExplainctlError

    try:
        settings = Settings.load()
        if not settings.broker_url:
            # Unset, the settings fall back to an embedded Redis that no worker here uses.
            print("unhealthy: EXPLAINCTL_BROKER_URL is not set")
            return 1
        patterns = node_patterns(args.gpus, socket.gethostname(), args.name)
        app = make_app(settings)
        replies = app.control.inspect(timeout=args.timeout).ping() or {}
    except ExplainctlError as error:
        print(f"unhealthy: {error}")
        return 1
    except Exception as error:  # the broker refused the connection, bad URL...
        print(f"unhealthy: {type(error).__name__}: {error}")
        return 1
    found = [next((n for n in sorted(replies) if p.match(n)), None) for p in patterns]
    if None in found:
        missing = [p.pattern for p, n in zip(patterns, found, strict=True) if n is None]
        print(f"unhealthy: no reply from a node like {', '.join(missing)}")
        return 1
    print(f"ok: {', '.join(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
