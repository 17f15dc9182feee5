"""A real `submit` of 10,000 URIs SIGKILLed half-way: the job says it was interrupted and
how far it got, `submit --resume` queues exactly the missing items, and `cancel` ends one."""

import json
import signal
import subprocess
import time

import redis

from explainctl.jobs.keys import JOBS_KEY, job_key
from explainctl.jobs.queue import waiting_chunks
from tests.support import cli

N = 10_000


def _killed_submit(listing, env) -> str:
    """Start a submit of the list and SIGKILL it once a quarter of the items are recorded."""
    client = redis.Redis.from_url(env["EXPLAINCTL_BROKER_URL"], decode_responses=True)
    before = set(client.zrange(JOBS_KEY, 0, -1))
    process = subprocess.Popen(
        [cli.EXPLAINCTL, "submit", f"@{listing}", "--chunk-size", "5", "--json"],
        env=cli.env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = set(client.zrange(JOBS_KEY, 0, -1)) - before
        if new:
            (job,) = new
            total = int(client.hget(job_key(job, "meta"), "total") or 0)
            if total >= N // 4:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return job
        assert process.poll() is None, "the submit ended before it could be killed"
        time.sleep(0.002)
    raise AssertionError("the submit never got a quarter of the way")


def _status(job, env) -> dict:
    done = cli.run("status", job, "--json", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_interrupted_submit_is_shown_and_resumed_without_duplicates(tmp_path, worker_env):
    env = worker_env  # no worker runs: every message stays in the queue to be counted
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(f"s3://photos/audit/{i:05d}.jpg\n" for i in range(N)))
    job = _killed_submit(listing, env)
    other = _killed_submit(listing, env)

    # Once the dead submit's claim lapses, the job says what happened and how far it got.
    deadline = time.monotonic() + 60
    while _status(job, env)["state"] != "interrupted":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    recorded = _status(job, env)["total"]
    assert N // 4 <= recorded < N
    shown = cli.run("status", job, **env).stdout
    assert "interrupted" in shown and f"--resume {job}" in shown
    jobs = cli.run("jobs", **env).stdout
    assert "interrupted" in jobs

    # Other inputs are refused; the same inputs queue exactly the rest.
    wrong = tmp_path / "other.txt"
    wrong.write_text("".join(f"s3://photos/other/{i:05d}.jpg\n" for i in range(N)))
    refused = cli.run("submit", "--resume", job, f"@{wrong}", **env)
    assert refused.returncode == 2 and "not the ones" in refused.stderr
    done = cli.run("submit", "--resume", job, f"@{listing}", "--json", **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == N
    status = _status(job, env)
    assert (status["state"], status["total"], status["counts"]["queued"]) == ("queued", N, N)

    client = redis.Redis.from_url(env["EXPLAINCTL_BROKER_URL"], decode_responses=True)
    queued = [i["index"] for p in waiting_chunks(client, env["EXPLAINCTL_QUEUE"])
              if p["job_id"] == job for i in p["items"]]  # fmt: skip
    assert len(queued) == N and set(queued) == set(range(N))  # each item once
    assert client.strlen(job_key(job, "state")) == N  # each item recorded once
    again = cli.run("submit", "--resume", job, f"@{listing}", **env)
    assert again.returncode == 2 and "only an interrupted job" in again.stderr

    # An interrupted job can be cancelled instead, and then it is finished.
    assert _status(other, env)["state"] == "interrupted"
    assert cli.run("cancel", other, **env).returncode == 0
    ended = _status(other, env)
    assert ended["state"] == "cancelled" and ended["finished_at"] is not None
    client.delete(env["EXPLAINCTL_QUEUE"])
