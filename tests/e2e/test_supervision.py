"""Supervision of real worker processes: the launcher starts a dead worker again and says
how it died, a worker whose broker stops answering exits so that happens, and two
workers on one host get two node names."""

import os
import re
import signal
import time
from pathlib import Path

from tests.e2e.test_faults import images, status, submit, tiny, until
from tests.support.services import RedisServer


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_a_dead_or_stalled_worker_is_started_again(tmp_path, start_workers, worker_env):
    server = RedisServer(tmp_path / "redis").start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url,
           "EXPLAINCTL_BROKER_STALL_SECONDS": "4"}  # fmt: skip
    try:
        (worker,) = start_workers(1, **env)
        (first,) = _children(worker.process.pid)  # the launcher's one Celery process
        os.kill(first, signal.SIGKILL)
        until(lambda: "killed by SIGKILL; restarting" in worker.log(), timeout=30)
        until(lambda: worker.log().count(" ready.") == 2, timeout=90, every=0.5)
        (second,) = _children(worker.process.pid)
        assert second != first

        # The broker stops answering without closing a connection (a frozen host).
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            until(lambda: "exited with code 75; restarting" in worker.log(), timeout=60)
            assert "no answer from the broker" in worker.log()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        until(lambda: worker.log().count(" ready.") >= 3, timeout=120, every=0.5)

        # The launcher itself never stopped, and its new worker runs jobs.
        assert worker.process.poll() is None
        images(tmp_path / "in", 2)
        job = submit(env, str(tmp_path / "in"), *tiny(5))
        until(lambda: status(env, job)["state"] == "completed", timeout=120, every=0.5)
    finally:
        server.stop()


def test_two_workers_on_one_host_have_their_own_node_names(start_workers):
    first, second = start_workers(2)
    names = [re.search(r"(explain-[^\s@]+@\S+) v\d", w.log()) for w in (first, second)]
    assert all(names), [w.log()[-1500:] for w in (first, second)]
    assert names[0].group(1) != names[1].group(1)
    time.sleep(1)
    assert "DuplicateNodenameWarning" not in first.log() + second.log()
