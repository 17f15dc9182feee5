"""Faults between hosts: Redis, the S3 server and each worker on a host of its own (network
namespaces, tests/support/hosts.py), partitioned by cutting links rather than killing processes.
Each test adds a row to the reliability table; every done item's result.json in storage
must agree with its record."""

import os
import subprocess
import sys
import time
import uuid

import boto3
import pytest

from explainctl.jobs.store import JobStore
from tests.e2e.test_faults import images, status, submit, tiny, until, wait
from tests.support import cli, reliability
from tests.support.hosts import Host, Network, wait_for_port
from tests.support.reliability import audit
from tests.support.services import redis_binary

# One process runs them all (pytest-xdist): they share the module's hosts.
pytestmark = [pytest.mark.reliability, pytest.mark.xdist_group("hosts")]

if (why := Network.available()) is not None:
    reliability.skipped("several hosts (tests/e2e/test_hosts.py)", why)
    pytest.skip(f"several-hosts suite skipped: {why}", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A network with a Redis host and an S3 host; workers join per test. (`s3_server`
    for the fake credentials it puts in the environment; its endpoint is not used.)"""
    logs = tmp_path_factory.mktemp("hosts")
    network = Network()
    try:
        redis_host = network.add("redis")
        redis_host.start(
            [redis_binary(), "--bind", redis_host.address, "--port", "6379", "--save", "",
             "--appendonly", "yes", "--dir", str(logs), "--protected-mode", "no"],
            os.environ.copy(), logs / "redis.log",
        )  # fmt: skip
        s3_host = network.add("s3")
        s3_host.start(
            [str(os.path.join(os.path.dirname(sys.executable), "moto_server")),
             "-H", s3_host.address, "-p", "5000"],
            os.environ.copy(), logs / "s3.log",
        )  # fmt: skip
        wait_for_port(redis_host.address, 6379)
        wait_for_port(s3_host.address, 5000)
        endpoint = f"http://{s3_host.address}:5000"
        bucket = f"hosts-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield network, redis_host, s3_host, endpoint, bucket, logs
    finally:
        network.close()


@pytest.fixture
def env(cluster, tmp_path, monkeypatch):
    _network, redis_host, _s3, endpoint, bucket, _logs = cluster
    # The test's own reads of S3 (the audit) go to the S3 host too.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return cli.env(
        EXPLAINCTL_BROKER_URL=f"redis://{redis_host.address}:6379/0",
        EXPLAINCTL_QUEUE=f"hosts-{uuid.uuid4().hex[:8]}",
        EXPLAINCTL_OUTPUT=f"s3://{bucket}/{tmp_path.name}",
        EXPLAINCTL_LEASE_SECONDS="4",
        EXPLAINCTL_ALLOWED_MODELS="*",
        EXPLAINCTL_DEVICE="cpu",
        EXPLAINCTL_HOME=str(tmp_path / "home"),
        AWS_ENDPOINT_URL=endpoint,
        OMP_NUM_THREADS="1",
    )


def _worker(cluster, env, name: str) -> Host:
    network, *_, logs = cluster
    host = network.add(name)
    log = logs / f"{name}.log"
    host.start([cli.EXPLAINCTL, "worker", "--loglevel", "INFO"], env, log)
    until(lambda: b" ready." in log.read_bytes(), timeout=90, every=0.2)
    return host


def _audit(env, job: str, fault: str, inputs):
    row = audit(JobStore.connect(env["EXPLAINCTL_BROKER_URL"]), job, fault, inputs)
    assert (row.lost, row.disagreeing) == (0, 0), row
    return row


def _worker_lost_mid_chunk(cluster, env, tmp_path, fault: str, lose) -> None:
    """Two workers each running a chunk; `lose` takes one of them away, and the other
    must run its chunk again."""
    first = _worker(cluster, env, f"w-{uuid.uuid4().hex[:4]}")
    _worker(cluster, env, f"w-{uuid.uuid4().hex[:4]}")
    images(tmp_path / "in", 4)
    job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(1500))
    until(lambda: status(env, job)["counts"]["running"] == 4, timeout=120)
    lose(first)
    final = wait(env, job, timeout=240)
    assert final["state"] == "completed", final
    assert _audit(env, job, fault, tmp_path / "in").done == 4
    # Its chunk ran again elsewhere: two attempts, one record each, and the record names
    # the attempt whose files it vouches for.
    records = list(JobStore.connect(env["EXPLAINCTL_BROKER_URL"]).entries(job))
    assert max(r.attempts for r in records) == 2


def test_a_worker_cut_off_longer_than_its_lease_and_then_back(cluster, env, tmp_path):
    network = cluster[0]

    def cut_then_restore(host: Host) -> None:
        network.cut(host)  # still computing, but reaching neither Redis nor S3
        time.sleep(15)  # well past its 4 s lease
        network.restore(host)

    _worker_lost_mid_chunk(
        cluster, env, tmp_path, "worker's link cut past its lease, then back", cut_then_restore
    )


def test_a_worker_host_gone_for_good(cluster, env, tmp_path):
    _worker_lost_mid_chunk(cluster, env, tmp_path, "worker host gone for good", cluster[0].remove)


def _service_unreachable(cluster, env, tmp_path, host: Host, seconds: float, fault: str):
    """One worker explains a job while `host` is unreachable for `seconds` mid-job."""
    network = cluster[0]
    _worker(cluster, env, f"w-{uuid.uuid4().hex[:4]}")
    images(tmp_path / "in", 4)
    job = submit(env, str(tmp_path / "in"), "--chunk-size", "1", *tiny(300))
    until(lambda: status(env, job)["counts"]["done"] >= 1, timeout=120)
    network.cut(host)
    time.sleep(seconds)
    network.restore(host)
    final = wait(env, job, timeout=300)
    assert final["state"] == "completed", final
    assert _audit(env, job, fault, tmp_path / "in").done == 4


def test_the_s3_link_down_for_a_few_seconds(cluster, env, tmp_path):
    _service_unreachable(cluster, env, tmp_path, cluster[2], 5, "S3 host's link down 5 s")


def test_redis_unreachable_for_30_seconds(cluster, env, tmp_path):
    _service_unreachable(cluster, env, tmp_path, cluster[1], 30, "Redis host unreachable 30 s")


def test_a_closed_network_leaves_no_namespace_behind():
    network = Network()
    host = network.add("probe")
    network.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert host.name not in listed
    assert host.link not in links and network.bridge not in links
