"""deploy/slurm/ run for real: worker.sbatch and audit.sbatch submitted to a one-node Slurm
cluster started for the session (tests/support/slurm.py, Debian's packages), their jobs
explaining with the tests' Redis, the S3 server and real worker processes.

The site is set up as deploy/slurm/env.example says: an ENV_FILE with the broker, the S3
endpoint and credentials and the model, and the VENV the scripts activate; sbatch passes
nothing else on. The node has no GPU. Each test adds a row to the reliability table, and where
Slurm cannot run here the table says so.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from explainctl.jobs.store import JobStore
from tests.deploy.checks import SLURM
from tests.e2e.test_faults import images, submit, tiny, wait
from tests.support import cli, reliability
from tests.support.reliability import audit
from tests.support.slurm import SlurmCluster, unavailable

# One process runs them all (pytest-xdist): they share the session's Slurm cluster.
pytestmark = [pytest.mark.reliability, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

if (why := unavailable()) is not None:
    reliability.skipped("Slurm allocations (tests/deploy/test_slurm.py)", why)
    pytest.skip(f"Slurm suite skipped: {why}", allow_module_level=True)

MODEL = "tests.support.models:tiny_classifier"
# What fits the 2-core test node; it has no GPU, so no GRES (the script asks for gpu:4).
SMALL = ("--cpus-per-task=1", "--mem=1G", "--gres=none")
# Boto3's settings that the session's S3 server fixture put in this process's environment.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED",
)  # fmt: skip
SUCCEEDED_RE = re.compile(r"Task explainctl\.explain_chunk\[\S+\] succeeded in")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=min(2, os.cpu_count() or 1))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _venv(directory: Path) -> Path:
    """This interpreter's virtualenv, or a stand-in whose bin/activate puts it on PATH."""
    if (Path(sys.prefix) / "bin" / "activate").exists():
        return Path(sys.prefix)
    (directory / "bin").mkdir(parents=True)
    (directory / "bin" / "activate").write_text(
        f'export PATH="{Path(sys.executable).parent}:$PATH"\n'
    )
    return directory


@dataclass
class Site:
    """What an operator sets up once for the sbatch scripts, and the outputs of its jobs."""

    slurm: SlurmCluster
    directory: Path
    settings: dict[str, str]  # the env file's lines; the test's own commands use them too
    venv: Path

    def env_file(self, name: str = "env", **extra: str) -> Path:
        path = self.directory / name
        lines = {**self.settings, **extra}.items()
        path.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in lines))
        path.chmod(0o600)
        return path

    def sbatch(self, script: str, *options: str, name: str, env_file: Path | None = None) -> int:
        return self.slurm.sbatch(
            SLURM / script, *options, output=self.directory / f"{name}-%j.out",
            ENV_FILE=str(env_file or self.env_file()), VENV=str(self.venv),
        )  # fmt: skip

    def output(self, name: str, job_id: int) -> str:
        path = self.directory / f"{name}-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, job_id: int, text: str, timeout: float = 120) -> None:
        """Until the job's output shows `text`; fails if the job ends first."""
        deadline = time.monotonic() + timeout
        while text not in self.output(name, job_id):
            state = self.slurm.job(job_id)["JobState"]
            if state not in ("PENDING", "CONFIGURING", "RUNNING") or time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} is {state}, no {text!r} in:\n{self.output(name, job_id)[-3000:]}"
                )
            time.sleep(0.2)


@pytest.fixture
def site(slurm, redis_url, s3_server, s3_bucket, tmp_path) -> Site:
    settings = {
        "EXPLAINCTL_BROKER_URL": redis_url,
        "EXPLAINCTL_QUEUE": f"slurm-{uuid.uuid4().hex[:8]}",
        "EXPLAINCTL_OUTPUT": f"s3://{s3_bucket}/{tmp_path.name}",
        "EXPLAINCTL_ALLOWED_MODELS": MODEL,
        "EXPLAINCTL_PRELOAD": MODEL,
        "AWS_ENDPOINT_URL": s3_server,
        **{name: os.environ[name] for name in AWS_VARIABLES},
        "OMP_NUM_THREADS": "1",
        # The tiny model is a module of this repository.
        "PYTHONPATH": cli.env()["PYTHONPATH"],
    }
    return Site(slurm, tmp_path, settings, _venv(tmp_path / "venv"))


def _store(site: Site) -> JobStore:
    return JobStore.connect(site.settings["EXPLAINCTL_BROKER_URL"])


def _stop(site: Site, name: str, job_id: int) -> None:
    """Stop a worker allocation the gentle way and check that it ended well."""
    site.slurm.stop_job(job_id)
    fields = site.slurm.wait_job(job_id)
    log = site.output(name, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "worker exited with status 0" in log


# From sbatch to a worker ready for a chunk: about 5 s here, 11 s on a machine loaded 4 times
# over, which leaves the chunk's lead.
STARTUP_LEAD = 15.0
# The chunk is queued this long before the time-limit check and runs about 9 s (far longer on
# a busy machine), so it is running whichever moment of that second the check comes.
CHUNK_LEAD = 5.0
ITERATIONS = 3500


# First in the file: slurmctld has just started, and its first time-limit test, ~30 s away,
# leaves the worker time to start; after another test it could be too near, and a wait for
# the next one would cost up to 30 s.
def test_walltime_warning_lets_the_chunk_finish_and_a_new_allocation_does_the_rest(
    slurm, site, tmp_path
):
    folder = tmp_path / "in"
    images(folder, 3)
    check = slurm.next_time_limit_check(lead=STARTUP_LEAD)
    # Slurm tests time limits every 30 s and warns at the first test that finds the job
    # within N + 30 s of its limit: warned N = 150 s before a three-minute limit, that is its
    # first test after the job started, and the chunk then has two minutes before the kill.
    first = site.sbatch("worker.sbatch", *SMALL, "--time=3", "--signal=B:TERM@150", name="walltime")
    site.wait_for("walltime", first, " ready.")
    time.sleep(max(0.0, check - CHUNK_LEAD - time.time()))
    # Chunks of 2: the first (items 0 and 1) runs into the warning, the second waits.
    job = submit(site.settings, str(folder), "--chunk-size", "2", *tiny(ITERATIONS))
    site.wait_for("walltime", first, "SIGTERM: warm shutdown", timeout=120)
    # The next allocation starts while the warned one still finishes its chunk: it must take
    # the waiting chunk only.
    second = site.sbatch("worker.sbatch", *SMALL, name="second")
    site.wait_for("second", second, " ready.")

    fields = slurm.wait_job(first)
    log = site.output("walltime", first)
    warned = re.search(rf"warning signal 15 to JobId={first}\b", slurm.ctld_log.read_text())
    assert warned, "slurmctld sent no walltime warning"
    # It left on its own before the time limit (not TIMEOUT), the chunk it ran finished.
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "worker exited with status 0" in log
    assert len(SUCCEEDED_RE.findall(log)) == 1, log[-3000:]
    received, term = log.find(" received"), log.find("SIGTERM: warm shutdown")
    succeeded = SUCCEEDED_RE.search(log).start()
    assert 0 <= received < term < succeeded, (
        f"the warning did not come while the chunk ran (received, SIGTERM, succeeded at "
        f"{received}, {term}, {succeeded}):\n{log[-3000:]}"
    )

    final = wait(site.settings, job)
    assert final["state"] == "completed", final
    assert len(SUCCEEDED_RE.findall(site.output("second", second))) == 1
    # Each item ran once: the warned chunk was not run again by the second allocation.
    store = _store(site)
    assert [(r.state, r.attempts) for r in store.entries(job)] == [("done", 1)] * 3
    row = audit(store, job, "Slurm: walltime warning mid-chunk, the rest in a new allocation",
                folder)  # fmt: skip
    assert (row.done, row.lost, row.re_executed, row.disagreeing) == (3, 0, 0, 0)
    _stop(site, "second", second)


def test_a_worker_allocation_joins_and_finishes_a_queued_job(site, tmp_path):
    folder = tmp_path / "in"
    images(folder, 3)
    job = submit(site.settings, str(folder), "--chunk-size", "1", *tiny(40))
    allocation = site.sbatch("worker.sbatch", *SMALL, name="worker")
    site.wait_for("worker", allocation, " ready.")
    final = wait(site.settings, job)
    assert final["state"] == "completed", final
    log = site.output("worker", allocation)
    # No GPU on the node: one process on the CPU, named after the Slurm job.
    assert "explainctl worker --gpus none" in log, log[-3000:]
    assert re.search(rf"explain-slurm{allocation}@\S+ ready\.", log), log[-3000:]
    assert len(SUCCEEDED_RE.findall(log)) == 3, log[-3000:]  # every chunk ran in it
    row = audit(_store(site), job, "Slurm: a worker.sbatch allocation joins a queued job", folder)
    assert (row.done, row.lost, row.re_executed, row.disagreeing) == (3, 0, 0, 0)
    _stop(site, "worker", allocation)


def test_an_audit_fails_on_a_corrupt_image_and_completes_on_clean_ones(
    slurm, site, start_workers, s3_bucket, tmp_path
):
    s3 = boto3.session.Session().client("s3")
    prefix = f"s3://{s3_bucket}/{tmp_path.name}"
    for index, path in enumerate(images(tmp_path / "in", 2)):
        for audit_name in ("clean", "broken"):
            s3.upload_file(str(path), s3_bucket, f"{tmp_path.name}/{audit_name}/img{index}.png")
    corrupt = f"{tmp_path.name}/broken/img2.png"
    s3.put_object(Bucket=s3_bucket, Key=corrupt, Body=b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    start_workers(1, **site.settings)
    # Both audits at once: 1 CPU each on the 2-CPU node (the worker runs outside Slurm).
    audits = {}
    for audit_name in ("clean", "broken"):
        env_file = site.env_file(
            f"env-{audit_name}",
            AUDIT_INPUT=f"{prefix}/{audit_name}/",
            AUDIT_OUTPUT=f"{prefix}/audits",
            AUDIT_ARGS=" ".join(["--model", MODEL, *tiny(20)]),
        )
        audits[audit_name] = site.sbatch(
            "audit.sbatch", "--cpus-per-task=1", "--mem=512M", name=audit_name, env_file=env_file
        )
    outcome = {name: slurm.wait_job(job_id) for name, job_id in audits.items()}

    clean, broken = (site.output(name, audits[name]) for name in ("clean", "broken"))
    assert (outcome["clean"]["JobState"], outcome["clean"]["ExitCode"]) == ("COMPLETED", "0:0"), (
        clean[-3000:]
    )
    assert "audit finished with status 0" in clean
    assert outcome["broken"]["JobState"] == "FAILED", broken[-3000:]
    code = re.search(r"audit finished with status (\d+)", broken)
    assert code and code.group(1) != "0", broken[-3000:]
    assert outcome["broken"]["ExitCode"] == f"{code.group(1)}:0"
    assert outcome["broken"]["Reason"] == "NonZeroExitCode"

    job = re.search(r"audit of \S+\n(\w+)\n", broken)
    assert job, broken[-3000:]
    store = _store(site)
    states = {r.uri: r.state for r in store.entries(job.group(1))}
    assert states == {
        f"{prefix}/broken/img0.png": "done",
        f"{prefix}/broken/img1.png": "done",
        f"s3://{s3_bucket}/{corrupt}": "failed",
    }
    row = audit(store, job.group(1), "Slurm: audit.sbatch with a corrupt image",
                [f"{prefix}/broken/img{i}.png" for i in range(3)], expected_failed={2})  # fmt: skip
    assert (row.done, row.failed_as_expected, row.lost) == (2, 1, 0)
