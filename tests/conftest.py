"""Shared fixtures. Each backing service (S3 now, Redis later) gets its own section."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

# --------------------------------------------------------------------------- config file


@pytest.fixture(scope="session", autouse=True)
def _no_config_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty config home for the session and every process it starts, so the
    developer's own ~/.config/explainctl/config.toml cannot change what tests see."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
        mp.delenv("EXPLAINCTL_CONFIG", raising=False)
        mp.delenv("EXPLAINCTL_PROFILE", raising=False)
        yield


# --------------------------------------------------------------------------- S3 (moto)

# Fake credentials: moto accepts any, and setting them keeps boto3 from finding real ones.
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Anything that could point boto3 at a real account or another endpoint.
_UNSET_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto S3 server over HTTP on a free local port; yields its endpoint URL.

    For the whole session the environment holds fake credentials and AWS_ENDPOINT_URL,
    so code under test finds the server through boto3's normal configuration chain.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # An empty directory for config files, so ~/.aws cannot add profiles or endpoints.
    no_config = tmp_path_factory.mktemp("aws-config")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in _UNSET_AWS_ENV:
                mp.delenv(name, raising=False)
            for name, value in _FAKE_AWS_ENV.items():
                mp.setenv(name, value)
            mp.setenv("AWS_CONFIG_FILE", str(no_config / "config"))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_config / "credentials"))
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the moto server; unique so tests never see each other's keys."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_proxy(s3_server: str):
    """A fault-injecting proxy in front of the moto server (tests.support.faults); point
    AWS_ENDPOINT_URL at its `endpoint` to go through it."""
    from tests.support.faults import S3Proxy

    proxy = S3Proxy(s3_server).start()
    yield proxy
    proxy.stop()


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: EXPLAINCTL_TEST_REDIS_URL (a database of the tests' own, emptied before
    and after), or else a redis-server started for the session."""
    import os

    import redis

    from tests.support.services import RedisServer

    given = os.environ.get("EXPLAINCTL_TEST_REDIS_URL")
    if given:
        given = _database_of_this_process(given)
        client = redis.Redis.from_url(given)
        client.flushdb()
        yield given
        client.flushdb()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


def _database_of_this_process(url: str) -> str:
    """`url` for this process: under pytest-xdist each worker process (gw0, gw1, ...) takes
    the database after the last one's, since each empties its own."""
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    base, _, database = url.rpartition("/")
    return f"{base}/{int(database or 0) + int(worker[2:])}"


@pytest.fixture
def job_store(redis_url: str):
    from explainctl.jobs.store import JobStore

    return JobStore.connect(redis_url)


# --------------------------------------------------------------------------- Workers


@pytest.fixture
def worker_env(redis_url: str, s3_server: str, tmp_path) -> dict[str, str]:
    """Environment for worker processes and CLI calls of one test: its own queue."""
    return {
        "EXPLAINCTL_BROKER_URL": redis_url,
        "EXPLAINCTL_QUEUE": f"test-{uuid.uuid4().hex[:8]}",
        "EXPLAINCTL_ALLOWED_MODELS": "*",
        "EXPLAINCTL_DEVICE": "cpu",
        "EXPLAINCTL_OUTPUT": str(tmp_path / "output"),
        # Workers share the machine's 2 cores: one thread each keeps them from fighting.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def start_workers(worker_env, tmp_path):
    """Call with n to start n real worker processes; all are stopped after the test."""
    from tests.support.services import Worker

    started: list[Worker] = []

    def start(n: int = 1, command: list[str] | None = None, **extra_env: str) -> list[Worker]:
        new = [
            Worker(
                {**worker_env, **extra_env},
                tmp_path / f"worker-{len(started) + i}.log",
                command,
            )
            for i in range(n)
        ]
        for worker in new:
            started.append(worker)  # stopped at teardown even if it fails to start
            worker.start()
        return new

    yield start
    for worker in started:  # all at once: each warm shutdown takes a few seconds
        if worker.process is not None and worker.process.poll() is None:
            worker.terminate()
    for worker in started:
        worker.stop()


# --------------------------------------------------------------------------- Reliability


def pytest_runtest_setup(item):
    from tests.support import reliability

    reliability.RUNNING = tuple(item.location[:2])


def pytest_sessionfinish(session):
    from tests.support import reliability

    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: hand the rows back
        session.config.workeroutput["reliability"] = reliability.exported()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from tests.support import reliability

    reliability.gather(getattr(node, "workeroutput", {}).get("reliability", {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the fault suite's table (and save it where EXPLAINCTL_RELIABILITY_TABLE says)."""
    import os

    from tests.support import reliability

    if reliability.ROWS or reliability.SKIPPED:
        terminalreporter.write_sep("=", "reliability: 0 lost, against the inputs submitted")
        terminalreporter.write_line(reliability.table())
        reliability.write(os.environ.get("EXPLAINCTL_RELIABILITY_TABLE"))
