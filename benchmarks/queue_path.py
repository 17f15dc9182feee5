"""Time the queue path: submitting many URIs, and what workers add per item over the engine.

    PYTHONPATH=. python benchmarks/queue_path.py --json benchmarks/results/queue-cpu.jsonl

Needs a Redis server; it uses one database of it (default redis://127.0.0.1:6379/14) and
FLUSHDBs it before and after, so never point it at a database that holds anything.

1. submit: 10,000 URIs from a list file (paths that need not exist, no worker running),
   through the library (`Client.submit`, in a child process so its peak RSS is its own) and
   through `explainctl submit @list.txt --json` as a user runs it; plus a 1-URI submit of
   each, which is the fixed cost (interpreter, imports, connecting).
2. items: N tiny PNGs explained by 1, then 2, real `explainctl worker` processes with the
   tiny test model, timed from the job's creation to its last item settling, against
   `explain_paths` on the same images in one process with the same parameters. Both sides
   run with OMP_NUM_THREADS=1 (as each worker does) and after one untimed warm-up pass.

Every measurement runs --runs times (default 3) and reports the median, with the runs.
Prints one JSON object per line (and appends them to --json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from machine import describe  # benchmarks/machine.py, beside this script

_HERE = os.path.dirname(os.path.abspath(__file__))

ROOT = Path(_HERE).parent
EXPLAINCTL = str(Path(sys.executable).parent / "explainctl")
TIME = "/usr/bin/time"
MODEL = "tests.support.models:tiny_classifier"
IMAGE_SIZE, MASK_SIZE, ITERATIONS = 32, 4, 1
SETTLED = ("completed", "completed_with_failures", "cancelled")
# Celery's log line for a finished task; its runtime is measured in the pool process.
TASK_DONE = re.compile(rb"succeeded in ([0-9.]+)s")


# --------------------------------------------------------------------------- helpers


def child_env(broker: str, queue: str, output: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(
        EXPLAINCTL_BROKER_URL=broker,
        EXPLAINCTL_QUEUE=queue,
        EXPLAINCTL_OUTPUT=output,
        EXPLAINCTL_ALLOWED_MODELS="*",
        EXPLAINCTL_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def new_queue() -> str:
    return f"bench-queue-{uuid.uuid4().hex[:12]}"


def median(values: list[float], digits: int = 4) -> float:
    return round(statistics.median(values), digits)


def flush(broker: str) -> None:
    import redis

    client = redis.Redis.from_url(broker)
    try:
        client.flushdb()
    finally:
        client.close()


def check_broker(broker: str) -> None:
    import redis

    client = redis.Redis.from_url(broker, socket_connect_timeout=2)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        sys.exit(f"refusing to FLUSHDB database 0 of {broker}: give a spare database (…/14)")
    try:
        client.ping()
    except redis.RedisError as error:
        sys.exit(f"cannot reach Redis at {broker}: {error}")
    finally:
        client.close()


def run_checked(command: list[str], env: dict[str, str], timeout: float = 300):
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}… failed ({done.returncode}):\n{done.stderr}")
    return done


def emit(record: dict, json_path: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(line + "\n")


# --------------------------------------------------------------------------- children


def count_redis_traffic() -> dict[str, int]:
    """Count writes (round trips) and replies on every redis-py connection of this process."""
    from redis.connection import AbstractConnection

    counts = {"round_trips": 0, "replies": 0}
    send, read = AbstractConnection.send_packed_command, AbstractConnection.read_response

    def counted_send(self, *args, **kwargs):
        counts["round_trips"] += 1
        return send(self, *args, **kwargs)

    def counted_read(self, *args, **kwargs):
        counts["replies"] += 1
        return read(self, *args, **kwargs)

    AbstractConnection.send_packed_command = counted_send
    AbstractConnection.read_response = counted_read
    return counts


def child_submit(list_file: str) -> None:
    """Library path, in its own process: settings come from the environment."""
    started = time.perf_counter()
    from explainctl.client import Client
    from explainctl.config import Settings
    from explainctl.inputs import expand_inputs
    from explainctl.spec.contracts import ModelSpec
    from explainctl.spec.methods import ExplainParams

    counts = count_redis_traffic()
    imported = time.perf_counter()
    client = Client(Settings.load())
    done = client.submit(
        expand_inputs([list_file]),
        ModelSpec(name=MODEL),
        ExplainParams(iterations=ITERATIONS, image_size=IMAGE_SIZE, mask_size=MASK_SIZE),
        chunk_size=16,
    )
    finished = time.perf_counter()
    print(
        json.dumps(
            {
                "job_id": done.job_id,
                "total": done.total,
                "chunks": done.chunks,
                "import_seconds": imported - started,
                "submit_seconds": finished - imported,
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                **counts,
            }
        )
    )


def child_engine(image_dir: str, out_dir: str, runs: int) -> None:
    """Engine alone: explain_paths on the images, warm, with the workers' parameters."""
    import torch

    from explainctl.spec.contracts import ModelSpec
    from explainctl.spec.methods import ExplainParams
    from explainctl_worker.local_files import explain_paths
    from explainctl_worker.model import ModelCache

    paths = sorted(str(p) for p in Path(image_dir).glob("*.png"))
    params = ExplainParams(iterations=ITERATIONS, image_size=IMAGE_SIZE, mask_size=MASK_SIZE)
    load_started = time.perf_counter()
    loaded = ModelCache().get(ModelSpec(name=MODEL), torch.device("cpu"))
    load_seconds = time.perf_counter() - load_started
    # One untimed pass first, like the queue runs' warm-up job: the first pays one-off costs.
    list(explain_paths(paths, os.path.join(out_dir, "warm"), loaded, params, batch_size=16))
    seconds = []
    for run in range(runs):
        started = time.perf_counter()
        outcomes = list(
            explain_paths(paths, os.path.join(out_dir, str(run)), loaded, params, batch_size=16)
        )
        seconds.append(time.perf_counter() - started)
        if not all(outcome.ok for outcome in outcomes):
            raise RuntimeError("the engine failed on some benchmark images")
    print(
        json.dumps(
            {
                "seconds": seconds,
                "model_load_seconds": load_seconds,
                "threads": torch.get_num_threads(),
            }
        )
    )


# --------------------------------------------------------------------------- 1. submit


def submit_library(broker: str, list_file: str, tmp: Path) -> dict:
    flush(broker)
    env = child_env(broker, new_queue(), str(tmp / "out-submit"))
    started = time.perf_counter()
    done = run_checked([sys.executable, __file__, "--child-submit", list_file], env)
    wall = time.perf_counter() - started
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_seconds": wall}


def submit_cli(broker: str, list_file: str, tmp: Path) -> dict:
    flush(broker)
    env = child_env(broker, new_queue(), str(tmp / "out-submit"))
    command = [EXPLAINCTL, "submit", f"@{list_file}", "--json"]
    rss_file = tmp / "time.txt"
    if os.access(TIME, os.X_OK):
        command = [TIME, "-f", "%M", "-o", str(rss_file), *command]
    started = time.perf_counter()
    done = run_checked(command, env)
    wall = time.perf_counter() - started
    result = {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_seconds": wall}
    if rss_file.exists():
        result["peak_rss_kib"] = int(rss_file.read_text().split()[-1])
    return result


def bench_submit(args, tmp: Path) -> None:
    for uris in (args.uris, 1):
        list_file = tmp / f"list-{uris}.txt"
        list_file.write_text("".join(f"/nonexistent/bench/img-{i:06d}.png\n" for i in range(uris)))
        for path, measure in (("library", submit_library), ("cli", submit_cli)):
            runs = [measure(args.broker, str(list_file), tmp) for _ in range(args.runs)]
            if any(run["total"] != uris for run in runs):
                raise RuntimeError(f"{path} submit queued the wrong number of URIs: {runs}")
            # The CLI is timed as a user sees it: the whole process. The library is timed
            # around Client(...).submit(...) alone; its whole process is process_seconds.
            seconds = [r["wall_seconds"] if path == "cli" else r["submit_seconds"] for r in runs]
            record = {
                "bench": "submit",
                "path": path,
                "uris": uris,
                "chunk_size": 16,
                "chunks": runs[0]["chunks"],
                "runs": len(runs),
                "seconds": median(seconds),
                "seconds_runs": [round(s, 4) for s in seconds],
                "uris_per_second": round(uris / statistics.median(seconds), 1),
                "process_seconds": median([r["wall_seconds"] for r in runs]),
            }
            if path == "library":
                record["import_seconds"] = median([r["import_seconds"] for r in runs])
                record["redis_round_trips"] = runs[0]["round_trips"]
                record["redis_replies"] = runs[0]["replies"]
            if all("peak_rss_kib" in r for r in runs):
                record["peak_rss_mib"] = round(median([r["peak_rss_kib"] for r in runs]) / 1024, 1)
            emit({**record, **context()}, args.json_path)
    flush(args.broker)


# --------------------------------------------------------------------------- 2. items


class WorkerProcess:
    """One real `explainctl worker` in its own process group (launcher, celery, pool child)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> float:
        started = time.perf_counter()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [EXPLAINCTL, "worker", "--loglevel", "INFO"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.perf_counter() - started > timeout:
                self.stop()
                raise RuntimeError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return time.perf_counter() - started

    def task_seconds(self) -> list[float]:
        """Runtimes of the tasks this worker finished so far, from its log."""
        return [float(found) for found in TASK_DONE.findall(self.log_path.read_bytes())]

    def stop(self, timeout: float = 30) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()
        self.process = None


def make_images(directory: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img-{index:04d}.png")


def run_job(client, workers, env: dict[str, str], inputs: str, expected: int) -> dict:
    """Submit with the CLI; poll until the job settles. Times from the job's own stamps.

    Also sums the runtimes Celery logged for the job's chunks: the time inside the tasks.
    """
    logged_before = [len(worker.task_seconds()) for worker in workers]
    command = [
        EXPLAINCTL, "submit", inputs, "--json", "--model", MODEL,
        "--image-size", str(IMAGE_SIZE), "--mask-size", str(MASK_SIZE),
        "--iterations", str(ITERATIONS), "--chunk-size", "16",
        "--output", env["EXPLAINCTL_OUTPUT"],
    ]  # fmt: skip
    started = time.perf_counter()
    job_id = json.loads(run_checked(command, env).stdout.strip().splitlines()[-1])["job_id"]
    deadline = time.monotonic() + 300
    while (status := client.status(job_id)).state not in SETTLED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish: {status.counts}")
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if status.counts["done"] != expected:
        raise RuntimeError(f"job {job_id} ended {status.state}: {status.counts}")
    # A chunk's log line comes just after its items settle: wait for the last one.
    chunks, deadline = math.ceil(expected / 16), time.monotonic() + 10
    while True:
        tasks = [
            seconds
            for worker, before in zip(workers, logged_before, strict=True)
            for seconds in worker.task_seconds()[before:]
        ]
        if len(tasks) >= chunks or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {
        "job_seconds": status.finished_at - status.info.created,
        "wall_seconds": wall,
        "task_seconds": sum(tasks) if len(tasks) == chunks else None,
    }


def bench_items(args, tmp: Path) -> None:
    from explainctl.client import Client
    from explainctl.config import Settings

    images = tmp / "images"
    make_images(images, args.images)

    env = child_env(args.broker, new_queue(), str(tmp / "out-engine"))
    command = [sys.executable, __file__, "--child-engine", str(images), str(tmp / "out-engine")]
    engine = json.loads(
        run_checked([*command, "--runs", str(args.runs)], env).stdout.strip().splitlines()[-1]
    )
    engine_seconds = statistics.median(engine["seconds"])
    emit(
        {
            "bench": "engine",
            "images": args.images,
            "batch_size": 16,
            "threads": engine["threads"],
            "runs": len(engine["seconds"]),
            "seconds": median(engine["seconds"]),
            "seconds_runs": [round(s, 4) for s in engine["seconds"]],
            "seconds_per_item": round(engine_seconds / args.images, 5),
            "model_load_seconds": round(engine["model_load_seconds"], 4),
            **context(),
        },
        args.json_path,
    )

    for count in args.workers:
        flush(args.broker)
        queue = new_queue()
        env = child_env(args.broker, queue, str(tmp / f"out-{count}w"))
        client = Client(Settings.load(env={}, broker_url=args.broker, queue=queue))
        workers = [WorkerProcess(env, tmp / f"worker-{count}-{n}.log") for n in range(count)]
        try:
            start_seconds = [worker.start() for worker in workers]
            # An untimed warm-up job, so every worker has loaded the model (as long-running
            # workers have) and paid its one-off costs before anything is timed.
            run_job(client, workers, env, str(images), args.images)
            runs = [
                run_job(client, workers, env, str(images), args.images) for _ in range(args.runs)
            ]
        finally:
            for worker in workers:
                worker.stop()
            del client
        job_seconds = [r["job_seconds"] for r in runs]
        # Summed over workers: with one worker, job minus this is the time between tasks.
        task_seconds = [r["task_seconds"] for r in runs if r["task_seconds"] is not None]
        per_item = statistics.median(job_seconds) / args.images
        emit(
            {
                "bench": "queue",
                "workers": count,
                "images": args.images,
                "chunk_size": 16,
                "runs": len(runs),
                "seconds": median(job_seconds),
                "seconds_runs": [round(s, 4) for s in job_seconds],
                "wall_seconds": median([r["wall_seconds"] for r in runs]),
                "seconds_per_item": round(per_item, 5),
                "engine_seconds_per_item": round(engine_seconds / args.images, 5),
                "overhead_seconds_per_item": round(per_item - engine_seconds / args.images, 5),
                "task_seconds_sum": median(task_seconds) if task_seconds else None,
                "worker_start_seconds": round(max(start_seconds), 2),
                **context(),
            },
            args.json_path,
        )
    flush(args.broker)


# --------------------------------------------------------------------------- main


def context() -> dict:
    import explainctl

    return {
        "explainctl": explainctl.__version__,
        "python": platform.python_version(),
        "machine": describe(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="Flushed!")
    parser.add_argument("--uris", type=int, default=10_000, help="URIs to submit (10000).")
    parser.add_argument("--images", type=int, default=200, help="Images for workers (200).")
    parser.add_argument("--workers", default="1,2", help="Worker counts to time (1,2).")
    parser.add_argument("--runs", type=int, default=3, help="Runs per measurement (3).")
    parser.add_argument("--skip-submit", action="store_true")
    parser.add_argument("--skip-items", action="store_true")
    parser.add_argument("--json", dest="json_path", default=None, help="Append results here.")
    parser.add_argument("--child-submit", metavar="LIST", help=argparse.SUPPRESS)
    parser.add_argument(
        "--child-engine", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.child_submit:
        return child_submit(args.child_submit)
    if args.child_engine:
        return child_engine(*args.child_engine, args.runs)

    args.workers = [int(part) for part in args.workers.split(",") if part.strip()]
    check_broker(args.broker)
    flush(args.broker)
    try:
        with tempfile.TemporaryDirectory(prefix="explainctl-queue-bench-") as directory:
            if not args.skip_submit:
                bench_submit(args, Path(directory))
            if not args.skip_items:
                bench_items(args, Path(directory))
    finally:
        flush(args.broker)


if __name__ == "__main__":
    main()
