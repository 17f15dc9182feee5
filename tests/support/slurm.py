"""A one-node Slurm cluster of the tests' own: munged, slurmctld and slurmd from Debian's
packages, run as root on free ports with their key, state, spool and logs in directories of
their own, so that it needs no system configuration and leaves none behind.

`unavailable()` says why it cannot run here, for a clear skip.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.support.services import free_port

# The daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PACKAGES = "slurmctld slurmd munge slurm-client"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
# Jobs in these states are over; COMPLETING still has processes on the node.
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
}  # fmt: skip
# slurmctld tests time limits, and sends `--signal` warnings, once every this many seconds
# of its own clock (PERIODIC_TIMEOUT, fixed when Slurm is built), not at the second asked.
TIME_LIMIT_PERIOD = 30
_CHECK_RE = re.compile(
    r"^\[(?P<at>[^\]]+)\] (?:Running as primary controller"
    r"|debug2: Testing job time limits)", re.M
)  # fmt: skip


def unavailable() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [name for name in PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing); `make slurm` installs "
            f"Debian's {PACKAGES}"
        )
    if os.geteuid() != 0:
        return "slurmd and munged must run as root to start jobs, and this is not root"
    return None


def _program(name: str) -> str:
    found = shutil.which(name, path=SEARCH_PATH)
    assert found, f"{name} is missing"
    return found


class SlurmCluster:
    """One node (this host) in one partition; no GPUs, no accounting database: finished
    jobs stay in `scontrol show job` for an hour (MinJobAge)."""

    def __init__(self, directory: Path, cpus: int = 2, memory_mb: int = 4096):
        self.directory = directory
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.config = directory / "slurm.conf"
        self.ctld_log = directory / "slurmctld.log"
        self.processes: list[subprocess.Popen] = []
        # munged insists that everyone may traverse its socket's directory, and pytest's
        # temporary directories are private: it gets one of its own under /tmp.
        self.munge = Path(tempfile.mkdtemp(prefix="explainctl-munge-"))

    def env(self, **extra: str) -> dict[str, str]:
        """A bare environment for Slurm's commands; whatever a job needs it gets from
        `extra` (sbatch passes the submitter's environment on to the job)."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            # Log times in UTC, whatever this process's zone: time_limit_checks reads them.
            "TZ": "UTC",
            "SLURM_CONF": str(self.config),
            **extra,
        }

    def run(self, *args: str, timeout: float = 30, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_program(args[0]), *args[1:]],
            capture_output=True, text=True, timeout=timeout, env=self.env(**extra),
        )  # fmt: skip

    # ------------------------------------------------------------------- start and stop

    def _daemon(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.directory / f"{name}.out", "ab") as log:
            process = subprocess.Popen(
                [_program(name), *args],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        (d / "plugstack.conf").write_text("")  # not the system's /etc/slurm/plugstack.conf
        self.config.write_text(
            f"ClusterName=explainctl\n"
            f"SlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmctldPort={free_port()}\n"
            f"SlurmdPort={free_port()}\n"
            f"AuthType=auth/munge\nCredType=cred/munge\n"
            f"AuthInfo=socket={self.munge / 'socket'}\n"
            f"SlurmUser=root\nSlurmdUser=root\n"
            f"StateSaveLocation={d / 'state'}\nSlurmdSpoolDir={d / 'spool'}\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\nSlurmdPidFile={d / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.ctld_log}\nSlurmdLogFile={d / 'slurmd.log'}\n"
            # debug2 logs each time-limit check, which the walltime test times its chunk by.
            f"SlurmctldDebug=debug2\nSlurmdDebug=info\n"
            f"PlugStackConfig={d / 'plugstack.conf'}\n"
            # The cgroup plugins need a cgroup tree of their own, which a container may not
            # give. A job's processes keep its process group (no step calls setsid), even
            # those orphaned when the batch shell dies first, and slurmd kills that group.
            f"ProctrackType=proctrack/pgid\nTaskPlugin=task/none\n"
            f"JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n"
            f"MpiDefault=none\nSwitchType=switch/none\n"
            # Batch jobs start at once rather than up to 3 s later, as a busy cluster batches them.
            f"SchedulerType=sched/builtin\nSchedulerParameters=batch_sched_delay=0\n"
            f"SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            # KillWait: a plain scancel at teardown kills a worker 5 s after its SIGTERM.
            f"ReturnToService=2\nMinJobAge=3600\nKillWait=5\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName=explainctl Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _start_munge(self) -> None:
        self.munge.chmod(0o755)
        key = self.munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.munge
        self._daemon(
            "munged", "--foreground", f"--key-file={key}", f"--socket={m / 'socket'}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'seed'}",
            f"--log-file={m / 'munged.log'}",
        )  # fmt: skip
        self._until(lambda: (m / "socket").exists(), "munged did not create its socket")

    def start(self) -> SlurmCluster:
        self._start_munge()
        self._write_config()
        self._daemon("slurmctld", "-D", "-i")
        self._daemon("slurmd", "-D", "-N", self.node)
        self._until(self._node_idle, "the node did not come up idle")
        return self

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "--noheader", "--nodes", self.node, "--format", "%T")
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _until(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} ({', '.join(dead) or 'timed out'}):\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        """The daemons' logs, last lines of each, for a failure message."""
        parts = []
        paths = [*sorted(self.directory.glob("*.out")), *sorted(self.directory.glob("*.log")),
                 self.munge / "munged.log"]  # fmt: skip
        for path in paths:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            # Every job first, while slurmd can still end its processes.
            self.run("scancel", "--partition", "explainctl")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = self.run("squeue", "--noheader")
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(0.5)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        shutil.rmtree(self.munge, ignore_errors=True)

    # ------------------------------------------------------------------- jobs

    def sbatch(self, script: Path, *options: str, output: Path, **env: str) -> int:
        """Submit `script` with `options` (they override its #SBATCH lines), its output to
        `output`; the job's environment is `env` on top of the bare one. Returns the job ID."""
        done = self.run(
            "sbatch", "--parsable", f"--output={output}", f"--chdir={output.parent}",
            *options, str(script), **env,
        )  # fmt: skip
        assert done.returncode == 0, f"sbatch {' '.join(options)}: {done.stderr}"
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, ExitCode, Reason, ...)."""
        done = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        assert done.returncode == 0, done.stderr
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait_job(self, job_id: int, timeout: float = 180) -> dict[str, str]:
        """The job's fields once it is over."""
        deadline = time.monotonic() + timeout
        while (fields := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {fields['JobState']}:\n{self.logs()}")
            time.sleep(0.2)
        return fields

    def stop_job(self, job_id: int) -> None:
        """The gentle stop the deploy README gives: SIGTERM to the batch shell only."""
        done = self.run("scancel", "--batch", "--signal=TERM", str(job_id))
        assert done.returncode == 0, done.stderr

    # ------------------------------------------------------------------- time limits

    def time_limit_checks(self) -> list[float]:
        """When slurmctld started its time-limit clock, then each check it made (epoch s)."""
        text = self.ctld_log.read_text(errors="replace")
        return [
            datetime.fromisoformat(m["at"]).replace(tzinfo=UTC).timestamp()
            for m in _CHECK_RE.finditer(text)
        ]

    def next_time_limit_check(self, lead: float) -> float:
        """The epoch second from which slurmctld's next time-limit check runs, waiting for a
        check to pass first when the next one is less than `lead` seconds away. The check
        itself comes within the second that follows."""
        last = self.time_limit_checks()[-1]
        upcoming = math.floor(last) + TIME_LIMIT_PERIOD
        if upcoming - time.time() >= lead:
            return upcoming
        seen = len(self.time_limit_checks())
        self._until(
            lambda: len(self.time_limit_checks()) > seen,
            "slurmctld did not test time limits",
            timeout=TIME_LIMIT_PERIOD * 3,
        )
        return math.floor(self.time_limit_checks()[-1]) + TIME_LIMIT_PERIOD
