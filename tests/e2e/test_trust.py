"""The queue's trust boundary, end to end: a real worker holding signing keys refuses chunks
written to Redis by anyone without them, and runs a genuine job signed with a key it is
rotating out; a job record edited in Redis is not sent again signed."""

import base64
import json
import socket
import urllib.request
import zlib

from PIL import Image

from explainctl.config import Settings
from explainctl.jobs.keys import job_key
from explainctl.jobs.queue import make_app, send_chunk, waiting_chunks
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ChunkItem, ChunkPayload, ModelSpec
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams
from tests.support import cli

TINY = ["--model", "tests.support.models:tiny_classifier", "--image-size", "32",
        "--mask-size", "4", "--iterations", "3"]  # fmt: skip
OLD, NEW, FORGED = "old-key-" + "a" * 24, "new-key-" + "b" * 24, "forged-" + "c" * 24


def test_a_chunk_written_to_redis_without_the_key_does_nothing(tmp_path, start_workers,
                                                                worker_env):  # fmt: skip
    (tmp_path / "in").mkdir()
    Image.new("RGB", (20, 20), "white").save(tmp_path / "in" / "a.png")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (worker,) = start_workers(1, EXPLAINCTL_SIGNING_KEYS=f"{NEW},{OLD}",
                              EXPLAINCTL_METRICS_PORT=str(port))  # fmt: skip
    broker, queue = worker_env["EXPLAINCTL_BROKER_URL"], worker_env["EXPLAINCTL_QUEUE"]
    forged_jobs = [new_job_id(), new_job_id()]
    for job_id, keys in zip(forged_jobs, [(), (FORGED,)], strict=True):
        payload = ChunkPayload(
            job_id=job_id, chunk=0, model=ModelSpec(name="tests.support.models:tiny_classifier"),
            params=ExplainParams(iterations=1), output=str(tmp_path / f"forged-{job_id}"),
            items=[ChunkItem(index=0, uri=str(tmp_path / "in" / "a.png"))],
        )  # fmt: skip
        send_chunk(make_app(Settings.load(env={}, broker_url=broker, signing_keys=keys)),
                   payload, queue)  # fmt: skip
    # Queued after the forged ones, so the worker met them first; the client signs with
    # the key the worker is rotating out, which still verifies.
    done = cli.run("submit", str(tmp_path / "in"), "--wait", "--json", *TINY,
                   **{**worker_env, "EXPLAINCTL_SIGNING_KEYS": OLD})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "completed"
    log = worker.log()
    assert "refusing a chunk message (unsigned)" in log
    assert "refusing a chunk message (bad-signature)" in log
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    assert 'explainctl_chunks_refused_total{reason="unsigned"} 1.0' in metrics
    assert 'explainctl_chunks_refused_total{reason="bad-signature"} 1.0' in metrics
    store = JobStore.connect(broker)
    for job_id in forged_jobs:
        assert not (tmp_path / f"forged-{job_id}").exists()
        assert not store.live(job_id)


def test_a_record_edited_in_redis_is_not_sent_again_signed(tmp_path, start_workers, worker_env):
    """Someone who can write to Redis but holds no key edits a stored item of a job while
    no worker runs; `retry`, which signs what it sends, fails that item instead, and no
    message ever names the edited input."""
    env = {**worker_env, "EXPLAINCTL_SIGNING_KEYS": NEW}
    (tmp_path / "in").mkdir()
    (tmp_path / "secret").mkdir()
    for name in ("in/a.png", "in/b.png", "secret/c.png"):
        Image.new("RGB", (20, 20), "white").save(tmp_path / name)
    submitted = cli.run("submit", str(tmp_path / "in"), "--chunk-size", "1", "--json", *TINY,
                        **env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job_id"]
    assert cli.run("cancel", job, **env).returncode == 0
    store = JobStore.connect(env["EXPLAINCTL_BROKER_URL"])
    secret = str(tmp_path / "secret" / "c.png")
    plain = json.dumps([[secret]]).encode()
    store.redis.hset(job_key(job, "items"), "1", base64.b64encode(zlib.compress(plain)).decode())
    assert cli.run("retry", job, **env).returncode == 0
    waiting = list(waiting_chunks(store.redis, env["EXPLAINCTL_QUEUE"]))
    assert secret not in json.dumps(waiting)
    start_workers(1, EXPLAINCTL_SIGNING_KEYS=NEW)
    waited = cli.run("wait", job, "--json", "--interval", "0.2", timeout=180, **env)
    assert json.loads(waited.stdout)["state"] == "completed_with_failures", waited.stderr
    entries = {e.index: (e.state, e.error_code) for e in store.entries(job)}
    assert entries == {0: ("done", None), 1: ("failed", "record-tampered")}
    assert not list((tmp_path / "secret").glob("*perturbed*"))
