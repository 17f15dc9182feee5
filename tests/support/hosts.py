"""Several hosts on one machine: Linux network namespaces on a bridge of their own.

Each host is a namespace with one veth link to a bridge in the root namespace, where the
test itself runs (it reaches every host at its address). Cutting a host's link (`ip link
set DEV down` on the root side) partitions it without stopping its processes; removing a
host kills its processes and deletes the namespace. Everything made is removed on close.
Needs root and iproute2; `Network.available()` says why not, for a clear skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str  # the namespace
    address: str
    link: str  # the root side of its veth pair
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Run a process on this host, in a process group of its own."""
        handle = open(log, "ab")  # noqa: SIM115 - the child keeps it; closed with the host
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args],
            env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        handle.close()
        self.processes.append(process)
        return process

    def kill(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


class Network:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:4]
        self.prefix = f"xc{tag}"
        self.subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.bridge = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "no `ip` (iproute2) on this machine"
        probe = f"xcprobe{uuid.uuid4().hex[:4]}"
        try:
            _ip("netns", "add", probe)
        except (subprocess.CalledProcessError, OSError) as error:
            return f"cannot make a network namespace: {error}"
        _ip("netns", "del", probe)
        return None

    def add(self, name: str) -> Host:
        netns = f"{self.prefix}-{name}"
        address = f"{self.subnet}.{len(self.hosts) + 2}"
        link = f"{self.prefix}{len(self.hosts)}"
        _ip("netns", "add", netns)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = Host(netns, address, link)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.link, "up")

    def remove(self, host: Host) -> None:
        """The host is gone for good: its processes die, its link and namespace go."""
        host.kill()
        # Deleting the root end removes the pair at once; a namespace can outlive its
        # name while the kernel still holds it, and its veth with it.
        subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", host.name], capture_output=True)

    def close(self) -> None:
        for host in self.hosts.values():
            self.remove(host)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def wait_for_port(address: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers on {address}:{port}") from None
            time.sleep(0.1)
