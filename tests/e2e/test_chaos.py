"""The chaos soak: one job of a hundred-odd items on three workers while faults of every
kind hit it, one every few seconds, for about a minute: a whole worker SIGKILLed (and
a replacement started), a worker frozen longer than its lease, Redis restarted, S3 gone.
Afterwards every item is done exactly once, the counters add up, the manifest has a line
per item and every record agrees with what storage holds."""

import os
import signal
import time
from collections import Counter

import pytest
from moto.server import ThreadedMotoServer

from explainctl.jobs.store import JobStore
from tests.e2e.test_faults import images, submit, tiny, until, wait
from tests.support.reliability import audit
from tests.support.services import RedisServer, free_port

pytestmark = pytest.mark.reliability

ITEMS = 120
WORKERS = 3
LEASE = 4
# A fault starts FAULT_EVERY seconds after the previous one started (later when that one
# overran, as a replacement worker's start can), in this order, for CYCLES rounds.
KINDS = ("SIGSTOP", "Redis restart", "S3 outage", "SIGKILL")
FAULT_EVERY = 5.0
CYCLES = 3
# Stopped for two fault slots: well past its lease, so its chunk is reaped and runs
# elsewhere while it sleeps, then it wakes up and finishes its own, now stale, copy.
STOPPED_FOR = 2 * FAULT_EVERY
REDIS_DOWN = 2.0
S3_DOWN = 4.0  # under the uploads' own retry deadline, so items wait rather than fail
# At the default EXPLAINCTL_MAX_DELIVERIES (3): a worker is lost every few seconds, and
# only the items a lost worker had begun are charged, one at a time after the first loss.
# Enough work that the job is still running when the last fault ends on a 2-core machine.
ITERATIONS = 900


class FlakyS3:
    """A moto server on a fixed port that can go away and come back; moto keeps its
    buckets in this process, so the new server serves what the old one stored."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _progress(store: JobStore, job: str) -> tuple[int, bool]:
    status = store.status(job)
    return status.counts["done"], status.finished_at is not None


@pytest.mark.timeout(480)
def test_chaos_soak(tmp_path, start_workers, worker_env, s3_bucket):
    redis_server = RedisServer(tmp_path / "redis", persistent=True).start()
    s3 = FlakyS3()
    s3.start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": redis_server.url,
           "AWS_ENDPOINT_URL": s3.endpoint, "EXPLAINCTL_LEASE_SECONDS": str(LEASE)}  # fmt: skip
    store = JobStore.connect(redis_server.url)
    workers = start_workers(WORKERS, **env)
    stopped = None
    try:
        images(tmp_path / "in", ITEMS)
        job = submit(env, str(tmp_path / "in"), "--chunk-size", "4",
                     "--output", f"s3://{s3_bucket}/out", *tiny(ITERATIONS))  # fmt: skip
        until(lambda: store.status(job).counts["running"] > 0)

        injected: Counter[str] = Counter()
        began = time.monotonic()
        due = began
        for slot in range(CYCLES * len(KINDS)):
            time.sleep(max(0.0, due - time.monotonic()))
            due = time.monotonic() + FAULT_EVERY
            if _progress(store, job)[1]:
                break  # a faster machine: the rounds that ran must still be enough
            kind = KINDS[slot % len(KINDS)]
            cycle = slot // len(KINDS)
            if kind == "SIGSTOP":
                stopped, stopped_at = workers[cycle % WORKERS], time.monotonic()
                os.killpg(stopped.process.pid, signal.SIGSTOP)
            elif kind == "Redis restart":
                # The frozen worker sleeps through it and wakes to dead connections.
                redis_server.stop()
                time.sleep(REDIS_DOWN)
                redis_server.start()
            elif kind == "S3 outage":
                time.sleep(max(0.0, stopped_at + STOPPED_FOR - time.monotonic()))
                os.killpg(stopped.process.pid, signal.SIGCONT)
                stopped = None
                s3.stop()
                time.sleep(S3_DOWN)
                s3.start()
            else:
                position = (cycle + 1) % WORKERS  # not the worker that was just frozen
                workers[position].kill()
                (workers[position],) = start_workers(1, **env)
            injected[kind] += 1
        if stopped is not None:
            os.killpg(stopped.process.pid, signal.SIGCONT)
            stopped = None
        last_fault = time.time()
        window = time.monotonic() - began
        done_at_last_fault, finished = _progress(store, job)
        print(f"\nchaos: {dict(injected)} in {window:.0f} s; "
              f"{done_at_last_fault}/{ITEMS} done at the last fault")  # fmt: skip
        # At least two rounds of every kind while the job ran, or the soak proves little.
        assert all(injected[kind] >= 2 for kind in KINDS), (injected, "raise ITERATIONS")

        final = wait(env, job, timeout=300)
        assert final["state"] == "completed", final
        assert final["counts"] == {"queued": 0, "running": 0, "done": ITEMS, "failed": 0,
                                   "cancelled": 0}  # fmt: skip
        recovery = final["finished_at"] - last_fault
        print(f"chaos: completed {recovery:.0f} s after the last fault")
        assert recovery < 240  # liveness: the job does not hang on what the faults left

        attempts = Counter(r.attempts for r in store.entries(job))
        print(f"chaos: items by attempts {dict(sorted(attempts.items()))}")
        assert max(attempts) >= 2  # faults did cost some items a rerun
        faults = sum(injected.values())
        fault = (f"chaos soak ({ITEMS} items, {WORKERS} workers, {faults} faults, "
                 f"one every {FAULT_EVERY:.0f} s)")  # fmt: skip
        row = audit(store, job, fault, tmp_path / "in")
        assert (row.done, row.lost, row.disagreeing) == (ITEMS, 0, 0)
    finally:
        if stopped is not None:
            os.killpg(stopped.process.pid, signal.SIGCONT)  # a frozen worker cannot act on SIGTERM
        for worker in workers:
            worker.stop()
        redis_server.stop()
        s3.stop()
