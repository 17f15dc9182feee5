"""Faults injected into real processes: killed and stopped workers, a restarted Redis, an
unreachable or throttling S3, poison items, duplicates and cancellation. Each test adds a row to the
reliability table (tests/support/reliability.py): the target is 0 lost, counted against
the inputs each test submitted."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from explainctl.config import Settings
from explainctl.jobs.keys import LEASES_KEY, job_key
from explainctl.jobs.queue import make_app, waiting_chunks
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import TASK_EXPLAIN_CHUNK, ChunkItem, ChunkPayload
from tests.support import cli
from tests.support.faults import SLOW_DOWN
from tests.support.reliability import audit
from tests.support.services import RedisServer, free_port

pytestmark = pytest.mark.reliability


def tiny(iterations: int) -> list[str]:
    # A fixed budget: faults are injected while chunks are still running, so every item
    # must run its iterations rather than stop once its mask has converged.
    return ["--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size",
            "4", "--iterations", str(iterations), "--no-early-stop"]  # fmt: skip


def images(folder, n: int, start: int = 0):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def submit(env, *args) -> str:
    done = cli.run("submit", *args, "--json", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["job_id"]


def status(env, job: str) -> dict:
    done = cli.run("status", job, "--json", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def until(predicate, timeout: float = 60, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


def wait(env, job: str, timeout: float = 180) -> dict:
    done = cli.run("wait", job, "--json", "--interval", "0.2", timeout=timeout, **env)
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_the_only_worker_killed_mid_chunk(tmp_path, start_workers, worker_env):
    """No worker is left to reap the lost chunk: `wait` sends it again, and the next
    worker to start finds it in the queue (what a scaled-to-zero cluster relies on)."""
    env = {**worker_env, "EXPLAINCTL_LEASE_SECONDS": "4"}
    images(tmp_path / "in", 4)
    (victim,) = start_workers(1, **env)
    job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(600))
    until(lambda: status(env, job)["counts"]["running"] > 0)
    admin = JobStore.connect(env["EXPLAINCTL_BROKER_URL"]).redis
    queue = env["EXPLAINCTL_QUEUE"]
    victim.kill()  # SIGKILL to the main process and its pool child: a lost node
    waiting_before = admin.llen(queue)
    waiting = cli.start("wait", job, "--json", "--interval", "0.2", **env)
    try:
        # No worker is alive: only `wait` can have sent the lost chunk back to the queue.
        until(lambda: admin.llen(queue) > waiting_before and not admin.zcard(LEASES_KEY))
        start_workers(1, **env)
        out, _ = waiting.communicate(timeout=240)
    finally:
        waiting.kill()
    final = json.loads(out)
    assert final["state"] == "completed", final
    store = JobStore.connect(env["EXPLAINCTL_BROKER_URL"])
    assert max(r.attempts for r in store.entries(job)) == 2  # the lost chunk ran again
    row = audit(store, job, "the only worker SIGKILLed mid-chunk", tmp_path / "in")
    assert (row.done, row.lost) == (4, 0)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (int(c) for c in (task / "children").read_text().split()):
            found += [child, *_descendants(child)]
    return found


def test_worker_killed_with_a_chunk_received_but_not_started(tmp_path, start_workers, worker_env):
    """Reserved, not running: without a lease on receipt it would wait out the 2,100 s
    visibility timeout in Redis's unacked hash."""
    env = {**worker_env, "EXPLAINCTL_LEASE_SECONDS": "4"}
    images(tmp_path / "in", 2)
    (victim,) = start_workers(1, **env)
    (pool,) = _descendants(victim.process.pid)[-1:]  # the Celery pool process, a leaf
    os.kill(pool, signal.SIGSTOP)  # it cannot start what its main process receives
    job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(20))
    client = JobStore.connect(env["EXPLAINCTL_BROKER_URL"]).redis
    until(lambda: any(k.startswith("reserved:") for k in client.zrange(LEASES_KEY, 0, -1)))
    assert status(env, job)["counts"]["queued"] == 2  # received, not started
    victim.kill()
    started = time.monotonic()
    start_workers(1, **env)
    final = wait(env, job, timeout=120)
    assert final["state"] == "completed" and time.monotonic() - started < 120
    row = audit(JobStore.connect(env["EXPLAINCTL_BROKER_URL"]), job,
                "worker SIGKILLed holding a reserved chunk", tmp_path / "in")  # fmt: skip
    assert (row.done, row.lost) == (2, 0)


def test_worker_sigterm_mid_chunk_is_a_warm_shutdown(tmp_path, start_workers, worker_env):
    images(tmp_path / "in", 4)
    (worker,) = start_workers(1)
    job = submit(worker_env, str(tmp_path / "in"), "--chunk-size", "4", *tiny(1500))
    until(lambda: status(worker_env, job)["counts"]["running"] > 0)
    worker.terminate()
    assert worker.process.wait(120) == 0, worker.log()[-2000:]
    assert status(worker_env, job)["state"] == "completed"
    row = audit(
        JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"]),
        job,
        "worker SIGTERMed",
        tmp_path / "in",
    )
    assert (row.done, row.lost) == (4, 0)


def test_redis_restarted_during_a_job(tmp_path, start_workers, worker_env):
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url}
    try:
        images(tmp_path / "in", 6)
        start_workers(1, **env)
        job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(800))
        follower = subprocess.Popen(
            [cli.EXPLAINCTL, "wait", job, "--json", "--interval", "0.2"],
            env=cli.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        until(lambda: status(env, job)["counts"]["done"] >= 1)
        server.stop()
        time.sleep(3)
        server.start()
        out, err = follower.communicate(timeout=180)
        assert follower.returncode == 0, err[-2000:]
        assert json.loads(out)["state"] == "completed"
        row = audit(JobStore.connect(server.url), job, "Redis restarted mid-job", tmp_path / "in")
        assert (row.done, row.lost) == (6, 0)
    finally:
        server.stop()


def test_redis_crashes_mid_submit_and_mid_run(tmp_path, start_workers, worker_env):
    """SIGKILL, not a shutdown, under the default appendfsync everysec: Redis comes back
    without up to a second of writes it acknowledged. The job ends with every input done,
    or its submit says at once, in one line, how many items Redis lost; it never ends
    short of its inputs, and never hangs."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url, "EXPLAINCTL_LEASE_SECONDS": "4",
           "EXPLAINCTL_RECONCILE_SECONDS": "6"}  # fmt: skip
    store = JobStore.connect(server.url)
    try:
        images(tmp_path / "in", 16)
        start_workers(2, **env)
        submitting = cli.start("submit", str(tmp_path / "in"), "--chunk-size", "1", "--json",
                               *tiny(200), **env)  # fmt: skip
        job = until(lambda: store.recent(1), every=0.01)[0]  # its first records are written
        server.crash()
        server.start()
        out, err = submitting.communicate(timeout=120)
        if submitting.returncode != 0:
            (line,) = err.strip().splitlines()
            lost = int(re.search(r"Redis lost (\d+) of the 16 items", line).group(1))
            assert lost > 0 and "Traceback" not in err
            fault = f"Redis SIGKILLed mid-submit: submit failed, naming {lost} lost"
        else:
            assert json.loads(out)["total"] == 16
            fault = "Redis SIGKILLed mid-submit, then mid-run"
            until(lambda: store.status(job).counts["done"] >= 3, timeout=120)
            server.crash()
            server.start()
            final = wait(env, job, timeout=240)
            assert final["state"] == "completed", final
            row = audit(store, job, fault + " (appendfsync everysec)", tmp_path / "in")
            assert (row.done, row.lost) == (16, 0)
    finally:
        server.stop()


def test_s3_unreachable_during_uploads(tmp_path, start_workers, worker_env, s3_server):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    flaky = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    flaky.start()
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    env = {**worker_env, "AWS_ENDPOINT_URL": endpoint}
    try:
        images(tmp_path / "in", 6)
        start_workers(1, **env)
        job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", "--output",
                     f"s3://{bucket}/out", *tiny(600))  # fmt: skip
        until(lambda: status(env, job)["counts"]["running"] > 0)
        flaky.stop()
        done_at_outage = status(env, job)["counts"]["done"]
        time.sleep(5)
        # Nothing can be marked done while its artifacts cannot be stored.
        assert status(env, job)["counts"]["done"] == done_at_outage
        flaky = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        flaky.start()
        final = wait(env, job)
        assert final["state"] == "completed", final
        row = audit(
            JobStore.connect(env["EXPLAINCTL_BROKER_URL"]), job, "S3 down 5 s", tmp_path / "in"
        )
        assert (row.done, row.lost) == (6, 0)
    finally:
        flaky.stop()


class HotObjects:
    """S3 throttling a fifth of the objects written, as a hot partition does: every fifth
    object a client writes answers 503 SlowDown to each attempt while `on`."""

    def __init__(self) -> None:
        self.on = True
        self._hot: dict[str, bool] = {}
        self._lock = threading.Lock()

    def __call__(self, request):
        if not (self.on and request.write):
            return None
        with self._lock:
            hot = self._hot.setdefault(request.key, len(self._hot) % 5 == 4)
        return SLOW_DOWN if hot else None


# The minute of 503s then two minutes down, scaled down with the deadlines: the
# throttling outlasts EXPLAINCTL_S3_DEADLINE (so it only passes if throttled writes get the
# longer EXPLAINCTL_S3_THROTTLE_DEADLINE), the outage does not.
THROTTLED_FOR, DOWN_FOR = 6.0, 3.0
S3_DEADLINE, S3_THROTTLE_DEADLINE = 5, 30


def test_s3_throttling_then_down_during_a_job(
    tmp_path, start_workers, worker_env, s3_bucket, s3_proxy
):
    """Two workers store a job's artifacts through S3 that throttles, then goes away: their
    writes wait both out, so no item is handed back for its storage (its GPU work redone),
    none fails storage-error, none is lost."""
    env = {**worker_env, "AWS_ENDPOINT_URL": s3_proxy.endpoint,
           "EXPLAINCTL_S3_DEADLINE": str(S3_DEADLINE),
           "EXPLAINCTL_S3_THROTTLE_DEADLINE": str(S3_THROTTLE_DEADLINE)}  # fmt: skip
    hot = s3_proxy.fault = HotObjects()
    images(tmp_path / "in", 6)
    workers = start_workers(2, **env)
    job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", "--output",
                 f"s3://{s3_bucket}/out", *tiny(100))  # fmt: skip
    # Each phase lasts its time from the first write it meets, so it falls on the job's
    # uploads however fast the machine.
    until(lambda: s3_proxy.counts["answered SlowDown"] > 0)
    time.sleep(THROTTLED_FOR)
    hot.on = False
    assert status(env, job)["state"] != "completed", "a throttled write still holds its item"
    s3_proxy.down = True
    until(lambda: s3_proxy.counts["cut"] > 0)
    time.sleep(DOWN_FOR)
    s3_proxy.down = False
    final = wait(env, job)
    assert final["state"] == "completed", final
    for worker in workers:  # no item went back to the queue for its storage
        assert "storage-error" not in worker.log() and "handing" not in worker.log()
    row = audit(
        JobStore.connect(env["EXPLAINCTL_BROKER_URL"]), job,
        f"S3: 503 SlowDown to 1 write in 5 for {THROTTLED_FOR:.0f} s, then down "
        f"{DOWN_FOR:.0f} s", tmp_path / "in",
    )  # fmt: skip
    assert (row.done, row.lost, row.re_executed) == (6, 0, 0)


def test_poison_item_fails_after_the_cap_and_the_rest_completes(
    tmp_path, start_workers, worker_env
):
    folder = tmp_path / "in"
    images(folder, 5)
    Image.new("RGB", (24, 24), (255, 0, 255)).save(folder / "img02b-poison.png")
    env = {**worker_env, "EXPLAINCTL_MAX_DELIVERIES": "2"}
    (worker,) = start_workers(1, **env)
    model = ["--model", "tests.support.models:poisoned_classifier", *tiny(20)[2:]]
    job = submit(env, str(folder), "--chunk-size", "3", *model)
    final = wait(env, job, timeout=240)
    assert final["counts"] == {"queued": 0, "running": 0, "done": 5, "failed": 1, "cancelled": 0}
    store = JobStore.connect(env["EXPLAINCTL_BROKER_URL"])
    (poison,) = [r for r in store.entries(job) if r.state == "failed"]
    assert poison.uri.endswith("poison.png") and poison.error_code == "worker-lost"
    assert "lost 2 times" in poison.error
    row = audit(
        store, job, "poison item (kills its worker)", folder, expected_failed={poison.index}
    )
    assert row.lost == 0
    # The worker is not stuck: it takes the next job.
    assert worker.process.poll() is None
    again = submit(env, str(folder / "img00.png"), *tiny(5))
    assert wait(env, again)["state"] == "completed"


def test_same_job_twice_and_a_chunk_delivered_twice(tmp_path, start_workers, worker_env):
    images(tmp_path / "in", 4)
    start_workers(1)
    first = submit(worker_env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(30))
    second = submit(worker_env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(30))
    assert wait(worker_env, first)["state"] == "completed"
    assert wait(worker_env, second)["state"] == "completed"
    output = tmp_path / "output"
    masks = sorted((output / first).glob("*/attempt-*/mask.npy"))
    assert len(masks) == 4
    for mask in masks:  # the same inputs and seed give the same artifacts
        twin = output / second / mask.relative_to(output / first)
        assert mask.read_bytes() == twin.read_bytes()
    store = JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"])
    audit(store, first, "same job submitted twice (1st)", tmp_path / "in")
    audit(store, second, "same job submitted twice (2nd)", tmp_path / "in")

    before = {p: p.read_bytes() for p in (output / first).rglob("*.npy")}
    info = store.info(first)
    items = [ChunkItem(index=r.index, uri=r.uri) for r in store.entries(first)][:2]
    payload = ChunkPayload(job_id=first, chunk=0, model=info.model, params=info.params,
                           output=info.output, items=items)  # fmt: skip
    app = make_app(Settings.load(broker_url=worker_env["EXPLAINCTL_BROKER_URL"]))
    app.send_task(TASK_EXPLAIN_CHUNK, args=[payload.model_dump(mode="json")],
                  queue=worker_env["EXPLAINCTL_QUEUE"])  # fmt: skip
    deliveries = job_key(first, "deliveries")
    until(lambda: store.redis.hget(deliveries, "0") == "2")
    time.sleep(0.5)
    assert {p: p.read_bytes() for p in (output / first).rglob("*.npy")} == before
    row = audit(store, first, "chunk delivered twice", tmp_path / "in")
    assert (row.done, row.lost) == (4, 0)


def test_a_broken_worker_hands_its_chunks_back_and_leaves(tmp_path, start_workers, worker_env):
    """A worker whose allow-list drifted (it refuses the job's model) fails no item: it
    hands each chunk back uncharged, pauses longer each time, and after three chunks in a
    row its process exits for a fresh one; a healthy worker then explains every item as
    its first attempt."""
    images(tmp_path / "in", 6)
    (broken,) = start_workers(1, EXPLAINCTL_ALLOWED_MODELS="vgg19")
    job = submit(worker_env, str(tmp_path / "in"), "--chunk-size", "1", *tiny(5))
    until(lambda: b"leaving: 3 chunks in a row" in broken.log_path.read_bytes(), timeout=90)
    assert b"(model-not-allowed: this worker does not accept" in broken.log_path.read_bytes()
    broken.terminate()  # its supervisor would start it again: the test has seen enough
    broken.process.wait(60)
    start_workers(1)
    final = wait(worker_env, job)
    assert (final["state"], final["counts"]["done"]) == ("completed", 6)
    store = JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"])
    assert {r.attempts for r in store.entries(job)} == {1}  # no attempt charged to the refusal
    row = audit(
        store, job, "a broken worker (refuses the model) beside a healthy one", tmp_path / "in"
    )
    assert (row.done, row.lost) == (6, 0)


def test_cancel_during_a_running_job(tmp_path, start_workers, worker_env):
    images(tmp_path / "in", 6)
    start_workers(1)
    job = submit(worker_env, str(tmp_path / "in"), "--chunk-size", "1", *tiny(1500))
    until(lambda: status(worker_env, job)["counts"]["done"] >= 1)
    assert cli.run("cancel", job, **worker_env).returncode == 0
    store = JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"])
    # What the cancel found: queued items became cancelled at once; the rest had started.
    at_cancel = {r.index: r.state for r in store.entries(job)}
    final = wait(worker_env, job)
    assert final["state"] == "cancelled"
    time.sleep(3)  # queued chunks reach the worker, which must not run them
    settled = {r.index: r.state for r in store.entries(job)}
    expected = {i: "cancelled" if s == "cancelled" else "done" for i, s in at_cancel.items()}
    assert settled == expected  # what was running when cancelled finished done
    cancelled = sum(s == "cancelled" for s in expected.values())
    assert cancelled >= 3
    row = audit(store, job, "cancel mid-job", tmp_path / "in", expected_cancelled=cancelled)
    assert row.lost == 0


def test_broker_refusing_a_retry(tmp_path, worker_env):
    """The broker refuses every chunk a retry sends (a Redis user that may not push to the
    queue): the reopened items fail `not-queued`, so the job ends instead of waiting for
    messages that were never sent, and a later retry queues them."""
    server = RedisServer(tmp_path / "redis").start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url}
    try:
        images(tmp_path / "in", 5)
        job = submit(env, str(tmp_path / "in"), "--chunk-size", "2", *tiny(5))
        assert cli.run("cancel", job, **env).stdout.startswith("cancelled 5")
        admin = JobStore.connect(server.url).redis
        admin.delete(env["EXPLAINCTL_QUEUE"])  # no worker runs: drop the cancelled chunks
        admin.acl_setuser("nopush", enabled=True, passwords=["+pw"], keys=["*"],
                          channels=["*"], commands=["+@all", "-lpush", "-rpush"])  # fmt: skip
        refusing = server.url.replace("redis://", "redis://nopush:pw@")

        refused = cli.run("retry", job, "--broker", refusing, **env)
        assert refused.returncode == 6, refused.stderr
        final = status(env, job)
        assert (final["state"], final["counts"]["failed"]) == ("completed_with_failures", 5)
        (line,) = refused.stderr.strip().splitlines()
        assert "requeued 0 of its 5 items" in line and "5 failed as not-queued" in line, line
        store = JobStore.connect(server.url)
        assert {r.error_code for r in store.entries(job)} == {"not-queued"}
        row = audit(
            store, job, "broker refuses a retry", tmp_path / "in", expected_failed=set(range(5))
        )
        assert row.lost == 0  # the manifest says so too

        # A submit the broker refuses ends at once too, its manifest written.
        images(tmp_path / "more", 3)
        refused = cli.run("submit", str(tmp_path / "more"), *tiny(5), "--broker", refusing,
                          **env)  # fmt: skip
        assert refused.returncode == 6, refused.stderr
        (other,) = set(re.findall(r"job ([0-9a-z]{18})", refused.stderr))
        assert status(env, other)["state"] == "completed_with_failures"
        row = audit(
            store, other, "broker refuses a submit", tmp_path / "more", expected_failed={0, 1, 2}
        )
        assert row.lost == 0

        # With the broker back, a retry queues each of them once.
        assert cli.run("retry", job, **env).stdout.startswith("requeued 5")
        queued = [i["index"] for p in waiting_chunks(admin, env["EXPLAINCTL_QUEUE"])
                  for i in p["items"]]  # fmt: skip
        assert sorted(queued) == list(range(5))
    finally:
        server.stop()
