"""Following, reading, cancelling and retrying jobs through the CLI, with real workers."""

import csv
import io
import json
import subprocess
import sys
import time

import numpy as np
import redis
from PIL import Image

from explainctl.jobs.keys import job_key, job_pattern
from explainctl.spec.contracts import ARTIFACT_FILES
from tests.support import browser, cli

TINY = [
    "--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size", "4",
    "--iterations", "3",
]  # fmt: skip


def _folder(tmp_path, good: int = 5, broken: int = 1):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in range(good):
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{n}.png")
    for n in range(broken):
        (folder / f"zbroken{n}.jpg").write_bytes(b"not an image")
    return folder


def _json(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cancel_retry_results_download(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path)
    job = _json(cli.run("submit", str(folder), "--chunk-size", "2", "--json", *TINY,
                        **worker_env))["job_id"]  # fmt: skip
    status = _json(cli.run("status", job, "--json", **worker_env))
    assert status["state"] == "queued" and status["counts"]["queued"] == 6

    # No worker yet: cancelling leaves nothing to run.
    cancelled = _json(cli.run("cancel", job, "--json", **worker_env))
    assert cancelled == {"job_id": job, "cancelled": 6, "finished": None}
    assert _json(cli.run("status", job, "--json", **worker_env))["state"] == "cancelled"
    start_workers(1)
    waited = cli.run("wait", job, "--json", "--interval", "0.2", **worker_env)
    assert waited.returncode == 1 and json.loads(waited.stdout)["counts"]["cancelled"] == 6
    listed = [line for line in cli.run("jobs", **worker_env).stdout.splitlines() if job in line]
    assert " 6/6 " in listed[0]  # cancelled items are settled too

    assert _json(cli.run("retry", job, "--json", **worker_env)) == {"job_id": job, "requeued": 6}
    waited = cli.run("wait", job, "--json", "--interval", "0.2", **worker_env)
    counts = json.loads(waited.stdout)["counts"]
    assert waited.returncode == 1 and counts["done"] == 5 and counts["failed"] == 1

    rows = list(csv.DictReader(io.StringIO(cli.run("results", job, "--csv", **worker_env).stdout)))
    assert len(rows) == 6 and {r["state"] for r in rows} == {"done", "failed"}
    failed = [r for r in rows if r["state"] == "failed"]
    assert failed[0]["error_code"] == "unsupported-format" and failed[0]["uri"].endswith(".jpg")
    assert all(r["artifacts"] for r in rows if r["state"] == "done")

    # Only failed items go again; done ones are not redone.
    assert cli.run("retry", job, "--failed", **worker_env).stdout.startswith("requeued 1")
    waited = cli.run("wait", job, "--json", "--interval", "0.2", **worker_env)
    assert json.loads(waited.stdout)["counts"]["done"] == 5
    records = [
        json.loads(line)
        for line in cli.run("results", job, "--json", **worker_env).stdout.splitlines()
    ]
    # A retry resets the attempt count that guards against poison items.
    assert [r["attempts"] for r in records if r["state"] == "failed"] == [1]
    assert {r["attempts"] for r in records if r["state"] == "done"} == {1}

    copied = _json(cli.run("download", job, str(tmp_path / "copy"), "--json", **worker_env))
    copied_files = 5 * len(ARTIFACT_FILES)  # every file of the 5 done items
    assert copied == {"job_id": job, "copied": copied_files, "directory": str(tmp_path / "copy")}
    assert Image.open(tmp_path / "copy" / "000000-img0" / "overlay.png").size == (24, 24)

    listed = [
        json.loads(line) for line in cli.run("jobs", "--json", **worker_env).stdout.splitlines()
    ]
    assert job in [entry["job_id"] for entry in listed]


def test_cancelling_a_finished_job_changes_nothing(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path, good=2, broken=0)
    start_workers(1)
    job = _json(cli.run("submit", str(folder), "--wait", "--json", *TINY, **worker_env))["job_id"]
    manifest = [tmp_path / "output" / job / name for name in ("job.json", "items.jsonl")]
    written = [(path.read_bytes(), path.stat().st_mtime_ns) for path in manifest]

    cancelled = cli.run("cancel", job, **worker_env)
    status = _json(cli.run("status", job, "--json", **worker_env))
    assert (status["state"], status["cancelled"]) == ("completed", False)
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in manifest] == written
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"job {job} already finished (completed): nothing to cancel\n"


def test_lists_stdin_and_per_item_targets(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path, good=3, broken=0)
    table = tmp_path / "audit.csv"
    table.write_text("uri,target,note\nimages/img0.png,3,x\nimages/img1.png,,y\n")
    start_workers(1)
    job = _json(cli.run("submit", str(table), "-", "--target", "7", "--json", "--wait", *TINY,
                        input=f"{folder / 'img2.png'}\n", **worker_env))  # fmt: skip
    records = [
        json.loads(line)
        for line in cli.run("results", job["job_id"], "--json", **worker_env).stdout.splitlines()
    ]
    assert [(r["uri"].rsplit("/", 1)[1], r["target_index"]) for r in records] == [
        ("img0.png", 3),  # the list's own target
        ("img1.png", 7),  # no target in the list: --target applies
        ("img2.png", 7),  # from stdin
    ]


def test_bad_input_is_refused_before_anything_is_queued(tmp_path, worker_env):
    folder = _folder(tmp_path, good=1, broken=0)
    queue_length = redis.Redis.from_url(worker_env["EXPLAINCTL_BROKER_URL"]).llen
    for args, code, fragment in (
        (["--iterations", "0"], 2, "iterations"),
        (["--param", "tv_coeff=nan"], 2, "finite"),
        (["--mean", "1,2"], 2, "three"),
        (["--chunk-size", "0"], 2, "chunk-size"),
    ):
        done = cli.run("submit", str(folder), *TINY, *args, **worker_env)
        assert done.returncode == code and fragment in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
    missing = cli.run("submit", str(tmp_path / "nope"), *TINY, **worker_env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert queue_length(worker_env["EXPLAINCTL_QUEUE"]) == 0


def test_unknown_jobs_and_unreachable_redis(worker_env):
    unknown = cli.run("status", "01m8m2bepx3dmf8zm3", **worker_env)
    assert unknown.returncode == 5 and "no job" in unknown.stderr
    malformed = cli.run("status", "../../etc/passwd", **worker_env)
    assert malformed.returncode == 2 and "not a job ID" in malformed.stderr
    down = cli.run(
        "status", "01m8m2bepx3dmf8zm3", "--broker", "redis://127.0.0.1:1/0", **worker_env
    )
    assert down.returncode == 6 and len(down.stderr.strip().splitlines()) == 1


def test_results_outlive_redis(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path, good=2, broken=0)
    start_workers(1)
    job = _json(cli.run("submit", str(folder), "--wait", "--json", *TINY, **worker_env))["job_id"]
    client = redis.Redis.from_url(worker_env["EXPLAINCTL_BROKER_URL"])
    client.delete(*client.keys(job_pattern(job)))
    listed = cli.run("results", job, "--json", **worker_env)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["state"] for line in listed.stdout.splitlines()] == ["done", "done"]


def test_a_finished_job_expires_and_every_command_still_answers(
    tmp_path, start_workers, worker_env
):
    env = {**worker_env, "EXPLAINCTL_JOB_TTL": "2"}
    folder = _folder(tmp_path, good=2, broken=1)
    start_workers(1, **env)
    done = cli.run("submit", str(folder), "--wait", "--json", *TINY, **env)
    assert done.returncode == 1, done.stderr  # one item failed, as planned
    job = json.loads(done.stdout)["job_id"]
    client = redis.Redis.from_url(env["EXPLAINCTL_BROKER_URL"], decode_responses=True)
    assert 0 < client.ttl(job_key(job, "meta")) <= 2
    time.sleep(3)
    assert client.keys(job_pattern(job)) == [job_key(job, "index")]

    # From the index entry and the manifest, as if nothing had expired.
    status = _json(cli.run("status", job, "--json", **env))
    assert (status["state"], status["counts"]["done"], status["counts"]["failed"]) == (
        "completed_with_failures",
        2,
        1,
    )
    listed = [
        json.loads(line) for line in cli.run("results", job, "--json", **env).stdout.splitlines()
    ]
    assert [r["state"] for r in listed] == ["done", "done", "failed"]
    assert all(
        r["artifacts"]["overlay.png"].startswith(env["EXPLAINCTL_OUTPUT"]) for r in listed[:2]
    )
    assert job in [
        json.loads(line)["job_id"] for line in cli.run("jobs", "--json", **env).stdout.splitlines()
    ]
    copied = cli.run("download", job, str(tmp_path / "copy"), **env)
    copied_files = 2 * len(ARTIFACT_FILES)  # the 2 done items' files
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.startswith(f"copied {copied_files} files"), copied.stdout
    assert (tmp_path / "copy" / listed[0]["item"] / "mask.npy").exists()
    page = str(tmp_path / "r.html")
    assert _json(cli.run("report", job, "--out", page, "--json", **env)) == {
        "job_id": job,
        "report": page,
    }

    # Once the index entry is gone too, job.json in storage still answers `status`, and
    # `prune` forgets the job.
    client.delete(job_key(job, "index"))
    assert _json(cli.run("status", job, "--json", **env))["state"] == "completed_with_failures"
    assert _json(cli.run("prune", "--json", **env))["forgotten"] >= 1
    assert job not in cli.run("jobs", "--json", **env).stdout


def test_worker_refuses_models_it_was_not_allowed(tmp_path, start_workers, worker_env):
    # No hand-backs allowed: the one worker's refusal is the item's final answer.
    folder = _folder(tmp_path, good=1, broken=0)
    start_workers(1, EXPLAINCTL_ALLOWED_MODELS="", EXPLAINCTL_MAX_HAND_BACKS="0")
    done = cli.run("submit", str(folder), "--wait", "--json", *TINY, **worker_env)
    job = json.loads(done.stdout)
    assert done.returncode == 1 and job["counts"]["failed"] == 1
    record = json.loads(cli.run("results", job["job_id"], "--json", **worker_env).stdout)
    assert record["error_code"] == "model-not-allowed"


def test_plain_celery_worker_runs_jobs(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path, good=2, broken=0)
    queue = worker_env["EXPLAINCTL_QUEUE"]
    command = [sys.executable, "-m", "celery", "-A", "explainctl_worker.app", "worker",
               "--queues", queue, "--concurrency", "1", "--loglevel", "INFO"]  # fmt: skip
    start_workers(1, command=command)
    job = _json(cli.run("submit", str(folder), "--wait", "--json", *TINY, **worker_env))
    assert job["state"] == "completed" and job["counts"]["done"] == 2


def test_worker_metrics(tmp_path, start_workers, worker_env):
    import urllib.request

    from tests.support.services import free_port

    folder = _folder(tmp_path, good=3, broken=1)
    port = free_port()
    (worker,) = start_workers(
        1,
        [cli.EXPLAINCTL, "worker", "--loglevel", "INFO", "--json"],
        EXPLAINCTL_METRICS_PORT=str(port),
    )
    cli.run("submit", str(folder), "--wait", *TINY, **worker_env)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples['explainctl_items_total{error_code="",state="done"}']) == 3
    failed = 'explainctl_items_total{error_code="unsupported-format",state="failed"}'
    assert float(samples[failed]) == 1
    assert float(samples["explainctl_queue_wait_seconds_count"]) == 1
    assert float(samples["explainctl_item_seconds_count"]) == 3
    # Redis memory as the worker read it after its chunk: the job's records are in it.
    assert float(samples['explainctl_redis_memory_bytes{kind="used"}']) > 0
    assert 'explainctl_redis_memory_bytes{kind="maxmemory"}' in samples

    # --json: a line as it starts and one as it stops, among the logs.
    assert worker.stop() == 0
    events = [json.loads(line) for line in worker.log().splitlines() if line.startswith('{"event"')]
    assert [e["event"] for e in events] == ["started", "stopped"]
    assert events[0]["queue"] == worker_env["EXPLAINCTL_QUEUE"] and events[0]["gpus"] == []
    assert events[0]["metrics_port"] == port and "@" not in events[0]["broker"]
    assert events[1]["exit_code"] == 0


def test_methods_and_metrics_through_the_queue(tmp_path, start_workers, worker_env):
    folder = _folder(tmp_path, good=3, broken=0)
    start_workers(1)
    small = [
        "--model",
        "tests.support.models:tiny_classifier",
        "--image-size",
        "32",
        "--iterations",
        "5",
    ]
    for method in (["--method", "paper", "--mask-size", "8"], ["--method", "extremal",
                   "--area", "0.2", "--variant", "preserve"]):  # fmt: skip
        done = cli.run("submit", str(folder), "--metrics", "--wait", "--json", *small, *method,
                       **worker_env)  # fmt: skip
        job = json.loads(done.stdout)
        assert job["state"] == "completed", done.stderr
        ordered = cli.run("results", job["job_id"], "--json", "--sort", "deletion_auc", "--desc",
                          **worker_env)  # fmt: skip
        records = [json.loads(line) for line in ordered.stdout.splitlines()]
        assert {r["method"] for r in records} == {method[1]}
        aucs = [r["deletion_auc"] for r in records]
        assert len(aucs) == 3 and aucs == sorted(aucs, reverse=True)
        assert all(0 <= r["insertion_auc"] <= 1 and 0 <= r["prob_keep"] <= 1 for r in records)
    page = tmp_path / "report.html"
    cli.run("report", job["job_id"], "--out", str(page), **worker_env)
    assert "mean deletion AUC" in browser.dump_dom(page, tmp_path / "profile")
    wrong = cli.run("submit", str(folder), "--area", "0.2", *small, **worker_env)
    assert wrong.returncode == 2 and "extremal" in wrong.stderr  # --area needs --method extremal


def test_a_redis_that_evicts_keys_is_refused_by_client_and_worker(tmp_path, worker_env):
    """Under memory pressure such a Redis drops queued chunks and job records silently:
    the CLI says so in one line, and a worker exits before it takes any chunk."""
    from tests.support.services import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url}
        refused = cli.run("jobs", **env)
        assert refused.returncode == 6
        (line,) = refused.stderr.strip().splitlines()
        assert "maxmemory-policy allkeys-lru" in line and "noeviction" in line
        command = [sys.executable, "-m", "celery", "-A", "explainctl_worker.app", "worker",
                   "--queues", env["EXPLAINCTL_QUEUE"], "--concurrency", "1"]  # fmt: skip
        worker = subprocess.run(command, env=cli.env(**env), capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert worker.returncode == 78, worker.stderr[-2000:]
        assert "cannot start: Redis evicts keys" in worker.stderr
    finally:
        server.stop()


def test_chunks_of_a_newer_protocol_fail_at_once_and_unknown_fields_are_ignored(
    tmp_path, start_workers, worker_env
):
    """A client one version ahead of the worker: a chunk whose protocol is newer fails its
    items as worker-incompatible in one delivery (not dropped, not looping); a field the
    worker does not know, in a chunk of its own protocol, is ignored."""
    from explainctl.config import Settings
    from explainctl.jobs.queue import make_app, send_chunk
    from explainctl.jobs.store import JobStore
    from explainctl.spec.contracts import PROTOCOL, ChunkItem, ChunkPayload, JobInfo, ModelSpec
    from explainctl.spec.ids import new_job_id
    from explainctl.spec.methods import ExplainParams

    folder = _folder(tmp_path, good=2, broken=0)
    store = JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"])
    app = make_app(Settings.load(env={}, broker_url=worker_env["EXPLAINCTL_BROKER_URL"]))
    model = ModelSpec(name="tests.support.models:tiny_classifier")
    params = ExplainParams(image_size=32, mask_size=4, iterations=3)
    jobs = {}
    for name, protocol in (("newer", PROTOCOL + 1), ("same", PROTOCOL)):
        info = JobInfo(job_id=new_job_id(), created=time.time(), model=model, params=params,
                       output=worker_env["EXPLAINCTL_OUTPUT"], queue=worker_env["EXPLAINCTL_QUEUE"],
                       chunk_size=2)  # fmt: skip
        items = [ChunkItem(index=i, uri=str(p)) for i, p in enumerate(sorted(folder.iterdir()))]
        store.create(info)
        store.add_chunk(info.job_id, items)
        store.mark_submitted(info.job_id)
        message = ChunkPayload(job_id=info.job_id, chunk=0, model=model, params=params,
                               output=info.output, items=items).wire()  # fmt: skip
        send_chunk(app, {**message, "protocol": protocol, "added_later": {"x": 1}}, info.queue)
        jobs[name] = info.job_id
    start_workers(1)
    waited = cli.run("wait", jobs["newer"], "--json", "--interval", "0.2", **worker_env)
    newer = json.loads(waited.stdout)
    assert waited.returncode == 1, waited.stderr
    assert newer["state"] == "completed_with_failures" and newer["counts"]["failed"] == 2
    entries = list(store.entries(jobs["newer"]))
    assert {(e.error_code, e.attempts) for e in entries} == {("worker-incompatible", 0)}
    assert "upgrade the workers" in entries[0].error
    same = _json(cli.run("wait", jobs["same"], "--json", "--interval", "0.2", **worker_env))
    assert same["state"] == "completed" and same["counts"]["done"] == 2
