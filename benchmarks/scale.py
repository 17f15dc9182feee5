"""The size of one job: Redis bytes per item, and the time and peak memory of submitting,
settling, writing the manifest and reading results, for jobs of 10^4 to 10^6 items.

    PYTHONPATH=. python benchmarks/scale.py --items 10000 100000 1000000 \
        --json benchmarks/results/scale-cpu.jsonl

No model runs: items are settled through the worker's own code (JobStore.begin, then
jobs.records.settle with the record `chunk._record` builds from a result: the scores go to
one part per chunk in storage, a local directory here), so the records are the ones a real
job leaves. It starts a redis-server of its own (no persistence) for each size, so the memory
it reads is the job's alone, and it submits through `Client.submit` with real Celery
messages (the queue is drained as workers would drain it before memory is read).
Commands a user runs (`results --json`, `status`) run as child processes; their peak RSS
comes from the kernel (wait4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from machine import describe, emit  # benchmarks/machine.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The job's memory alone: nothing forks to write snapshots or rewrite a log.
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def _redis(
    directory: Path, options: tuple[str, ...] = NO_PERSISTENCE
) -> tuple[subprocess.Popen, str]:
    """A redis-server of this run's own on a free port, with `options` (soak.py gives the
    shipped deployment's)."""
    from tests.support.services import redis_binary

    port = _free_port()
    process = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def _child(args: list[str], env: dict[str, str]) -> dict:
    """Run a command to the end; its seconds and peak RSS (MiB). GNU time reports the RSS:
    a child forked from this process would inherit this process's high-water mark."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        started = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{args}: {done.stderr.decode()[-2000:]}")
        peak_kib = int(Path(rss.name).read_text().split()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_kib / 1024, 1)}


def _synthetic_result(index: int):
    from explainctl.spec.methods import ExplainParams
    from explainctl.spec.results import ItemResult

    return ItemResult(
        source=f"s3://photos/2026-11/{index:07d}.jpg", item=f"{index:06d}-{index:07d}",
        model="vgg19", target_index=281, target_name="tabby", prob_before=0.9513,
        prob_after=0.0123, mask_area=0.1234, iterations=240, stop_reason="converged",
        seconds=12.34, image_width=640, image_height=480, params=ExplainParams(),
        versions={"explainctl": "0", "torch": "0"},
    )  # fmt: skip


def run(n: int, chunk: int, work: Path) -> dict:
    from explainctl.client import Client
    from explainctl.config import Settings
    from explainctl.inputs import InputItem
    from explainctl.io.storage import open_storage
    from explainctl.jobs import records
    from explainctl.jobs.manifest import write_manifest
    from explainctl.jobs.store import JobStore
    from explainctl.spec.contracts import ITEMS_JSONL, PARTS, ModelSpec, artifact_key, job_key
    from explainctl.spec.methods import ExplainParams
    from explainctl_worker.explain import ItemOutcome
    from explainctl_worker.service.chunk import _record

    server, url = _redis(work)
    out = work / "out"
    try:
        client = redis.Redis.from_url(url)
        base = client.info("memory")["used_memory"]
        settings = Settings.load(env={}, broker_url=url, output=str(out), queue="scale")
        started = time.perf_counter()
        items = (InputItem(f"s3://photos/2026-11/{i:07d}.jpg") for i in range(n))
        job = Client(settings).submit(items, ModelSpec(), ExplainParams(), chunk_size=chunk)
        submit_seconds = time.perf_counter() - started
        queued_bytes = client.info("memory")["used_memory"] - base
        client.delete("scale")  # the messages, as workers take them
        store = JobStore.connect(url)
        storage = open_storage(str(out))
        template = _synthetic_result(0)
        started = time.perf_counter()
        for number, first in enumerate(range(0, n, chunk)):
            indices = list(range(first, min(n, first + chunk)))
            store.begin(job.job_id, indices)
            settled = []
            for i in indices:
                outcome = ItemOutcome(name=f"{i:06d}-{i:07d}", source="")
                outcome.result = template.model_copy(update={"item": outcome.name, "attempt": 1})
                outcome.artifacts = {
                    name: storage.uri(artifact_key(job.job_id, outcome.name, name, 1))
                    for name in template.artifacts
                }
                settled.append((i, "done", _record(outcome)))
            records.settle(store, storage, job.job_id, number, settled)
        settle_seconds = time.perf_counter() - started
        settled_bytes = client.info("memory")["used_memory"] - base
        started = time.perf_counter()
        write_manifest(store, storage, job.job_id)
        manifest_seconds = time.perf_counter() - started
        env = {**os.environ, "EXPLAINCTL_BROKER_URL": url, "EXPLAINCTL_OUTPUT": str(out),
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        explainctl = [sys.executable, "-m", "explainctl"]
        results = _child([*explainctl, "results", job.job_id, "--json"], env)
        manifest = _child(
            [sys.executable, "-c", "import sys; from explainctl.jobs.store import JobStore; "
             "from explainctl.jobs.manifest import write_manifest; "
             "from explainctl.io.storage import open_storage; "
             "write_manifest(JobStore.connect(sys.argv[1]), open_storage(sys.argv[2]), "
             "sys.argv[3])", url, str(out), job.job_id], env,
        )  # fmt: skip
        manifest_size = (out / job_key(job.job_id, ITEMS_JSONL)).stat().st_size
        parts = list((out / job.job_id / PARTS).iterdir())
        return {
            "items": n,
            "chunk_size": chunk,
            "redis_bytes_per_item": round(settled_bytes / n, 1),
            "redis_bytes_per_item_queued": round(queued_bytes / n, 1),
            "redis_mib": round(settled_bytes / 2**20, 1),
            "submit_seconds": round(submit_seconds, 2),
            "settle_seconds": round(settle_seconds, 2),
            "manifest_seconds": round(manifest_seconds, 2),
            "manifest_child": manifest,
            "manifest_mib": round(manifest_size / 2**20, 1),
            "parts": len(parts),
            "parts_mib": round(sum(p.stat().st_size for p in parts) / 2**20, 1),
            "results_child": results,
        }
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--json", help="append one JSON line per size to this file")
    parser.add_argument("--label", default="", help="what was measured (e.g. a commit)")
    args = parser.parse_args()
    for n in args.items:
        with tempfile.TemporaryDirectory() as work:
            row = {
                "machine": describe(),
                "label": args.label,
                **run(n, args.chunk_size, Path(work)),
            }
        emit(row, args.json)


if __name__ == "__main__":
    main()
