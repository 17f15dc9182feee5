"""A month in an hour: N nights of a nightly audit job against a Redis set up as the
deployment ships it, with the default job TTL and faults injected, and per night Redis's
peak memory, the items lost, the items run twice, and the seconds.

    PYTHONPATH=. python benchmarks/soak.py --nights 30 --night-seconds 60 --items 30000 \\
        --json benchmarks/results/soak-cpu.jsonl

A month cannot run on a real clock, so the clock and the job are scaled, not mocked:

- One night is --night-seconds of wall time, and the job TTL is seven nights
  (EXPLAINCTL_JOB_TTL's default, 7 days, counted in nights), so a week-old job really
  expires in Redis while later nights run.
- A night's job is --items instead of the million items of the audit it models, and
  Redis's maxmemory is the shipped cap (--shipped-mib: 1024, Compose's `1gb`; Kubernetes
  ships 1536) times the same factor. Each row also projects its peak back to a million
  items: what Redis holds before the first night (after one chunk has run through every
  path, so its scripts and connections are counted), plus what the night added over it,
  divided by the factor.

Redis runs with the shipped options: append-only, maxmemory-policy noeviction, default
snapshots. Every night submits its job through `Client.submit` (real Celery messages),
waits for the whole job to be queued (GPU workers drain a million items over hours; the
submit takes minutes), then drains the queue as workers do: each message is popped and run
through the worker's own `run_chunk` under its lease (`lease.hold`), as the Celery task
runs it, a hand-back included. Only the model is left out: `explain_items` returns the
synthetic result of scale.py and its artifact files are not written; the per-chunk parts
and the manifest go to a local directory. The run that settles the last item writes the
manifest, which seals the job. The night's row counts its items lost against its input
list, from the manifest (an item is lost unless it is done, with its input and its
scores), and the items run twice (attempts > 1).

Faults, a few a night on chunks drawn with --seed:

- kill: the worker dies mid-chunk, after `begin` and before any settle: its lease stops
  being renewed and is left to expire, and `leases.reap` sends the chunk again (every
  worker's reaper does, every lease/2 seconds; here the draining loop does). Its items
  run a second time: each is one re-execution.
- drop: a message is taken and lost. `reconcile` must find its items, queued yet in no
  message and under no lease, on two looks --grace seconds apart. It looks only while
  the queue is short (reconcile.MAX_WAITING, 5,000 messages, scaled like the job), so
  orphans are found at the job's tail, as in production.
- hiccup: storage refuses one chunk's part (`storage-error`): `run_chunk` puts its items
  back to queued without the attempt and hands them back, sent again as a new chunk.

Kombu's redelivery of an unacknowledged message after the visibility timeout (35 minutes)
is not modelled: a popped message is gone, so only the lease and the reconciler bring
work back. `JobStore.prune` runs once a night, as an operator's cron would.

Redis 7.0 has no way to reset its peak (`MEMORY RESET-STATS` is unknown, `CONFIG
RESETSTAT` keeps used_memory_peak), so a thread samples used_memory every --sample
seconds; a night whose peak is Redis's highest so far takes used_memory_peak itself
(`peak_source`: "server"), the others the sampled high ("sampled").
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import redis
from kombu.compression import decompress
from machine import describe, emit  # benchmarks/machine.py, beside this script
from scale import _redis, _synthetic_result  # benchmarks/scale.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MILLION = 1_000_000  # items a night in the audit the run is a model of
MIB = 2**20
SHIPPED_MIB = {"compose": 1024, "kubernetes": 1536}
WEEK = 7  # EXPLAINCTL_JOB_TTL's default, 7 days, in nights
QUEUE = "soak"
CHUNK = 16  # the default chunk size


class _Killed(Exception):
    """The worker running a chunk died (a SIGKILL, a lost node)."""


def _uri(night: int, index: int, pad: str = "") -> str:
    """An input of the night; `pad` lengthens every one (a deeper bucket layout)."""
    return f"s3://audit/{pad}night-{night:02d}/{index:07d}.jpg"


def _pad(length: int, seed: int) -> str:
    """A directory that brings _uri to `length` characters: Redis keeps each input until
    its job expires, so its length weighs on every retained job."""
    short = len(_uri(0, 0))
    if length <= short:
        return ""
    rng = random.Random(seed)
    return "".join(rng.choice("0123456789abcdef") for _ in range(length - short - 1)) + "/"


class _PeakSampler(threading.Thread):
    """used_memory, read every `every` seconds on a connection of its own; `take` returns
    the high since the last take."""

    def __init__(self, url: str, every: float):
        super().__init__(name="peak-sampler", daemon=True)
        self.client = redis.Redis.from_url(url)
        self.every = every
        self.high = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.sample()

    def sample(self) -> int:
        used = int(self.client.info("memory")["used_memory"])
        with self.lock:
            self.high = max(self.high, used)
        return used

    def take(self) -> int:
        self.sample()
        with self.lock:
            high, self.high = self.high, 0
        return high


def _reset_peak(client: redis.Redis) -> bool:
    """Whether Redis reset used_memory_peak (on servers that can)."""
    try:
        client.execute_command("MEMORY", "RESET-STATS")
    except redis.ResponseError:
        return False
    memory = client.info("memory")
    return int(memory["used_memory_peak"]) <= int(memory["used_memory"]) * 1.01


class _Storage:
    """The job's output storage (a local directory) without the artifact files, which
    Redis never sees; can refuse the next part it is given, as S3 past its deadlines."""

    def __init__(self, inner):
        from explainctl.spec.contracts import ITEMS_JSONL, JOB_JSON, PARTS

        self.inner = inner
        self.kept = {PARTS, ITEMS_JSONL, JOB_JSON}
        self.refuse_next_part = False

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        from explainctl.spec.contracts import PARTS
        from explainctl.spec.errors import ItemError

        place = key.split("/")[1]
        if place == PARTS and self.refuse_next_part:
            self.refuse_next_part = False
            raise ItemError("storage-error", "injected: storage refused the part")
        if place not in self.kept:  # the URI the record names, without touching the disk
            return os.path.join(self.inner.root, *key.split("/"))
        return self.inner.put(key, data, content_type)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _Models:
    """The worker's model cache, holding no model: `explain_items` is synthetic here."""

    def get(self, spec, device):
        return self

    def with_labels(self, labels):
        return self


class _Worker:
    """One worker taking the queue's messages one at a time and running each as the
    Celery task does (explainctl_worker.app.explain_chunk_task), with the night's faults."""

    def __init__(self, settings, storage: _Storage):
        import torch

        from explainctl.jobs.queue import make_app
        from explainctl.spec.contracts import ARTIFACT_FILES
        from explainctl_worker.service.chunk import WorkerContext

        self.settings = settings
        self.app = make_app(settings)
        self.context = WorkerContext.from_settings(settings)
        self.context.models = _Models()
        self.context.device = torch.device("cpu")
        self.context._storages[settings.output] = storage
        self.storage = storage
        self.redis = self.context.store.redis
        self.template = _synthetic_result(0)
        self.files = {name: b"" for name in ARTIFACT_FILES}
        self.kills: set[int] = set()
        self.drops: set[int] = set()
        self.hiccups: set[int] = set()
        self.dying = False
        self.counts: Counter = Counter()

    def explain_items(self, inputs, loaded, params, limits=None, *, deliver, **_):
        """In place of the engine: every item begun (its `start`, as the engine's reader
        calls it) and explained at once, its files handed to `deliver` (the worker's own
        `_store_artifacts`)."""
        from explainctl.spec.errors import ItemError
        from explainctl_worker.explain import ItemOutcome

        outcomes, begun = [], []
        for item in inputs:
            outcome = ItemOutcome(name=item.name, source=item.source)
            outcomes.append(outcome)
            try:
                if item.start is not None and not item.start():
                    outcome.skipped = True
                    continue
            except ItemError as error:
                outcome.error_code, outcome.error = error.code, error.message
                continue
            begun.append((item, outcome))
        if self.dying:  # after `begin`, before anything settles
            self.dying = False
            raise _Killed
        for item, outcome in begun:
            outcome.result = self.template.model_copy(
                update={"item": item.name, "source": item.source}
            )
            outcome.files = dict(self.files)
            deliver(outcome)
        return outcomes

    def take(self) -> dict | None:
        """The oldest message's chunk (kombu pushes on the left and pops on the right)."""
        raw = self.redis.rpop(QUEUE)
        if raw is None:
            return None
        envelope = json.loads(raw)
        body = base64.b64decode(envelope["body"])
        if compression := envelope["headers"].get("compression"):
            body = decompress(body, compression)
        return json.loads(body)[0][0]

    def run(self, message: dict) -> None:
        from explainctl.jobs.queue import send_chunk
        from explainctl.spec.contracts import ChunkPayload
        from explainctl.spec.errors import ExplainctlError
        from explainctl_worker.service import lease
        from explainctl_worker.service.chunk import HandBack, run_chunk

        number = message["chunk"]
        if number in self.drops:
            self.drops.discard(number)
            self.counts["dropped"] += 1
            return
        if number in self.kills:
            self.kills.discard(number)
            self.dying = True
        if number in self.hiccups:
            self.hiccups.discard(number)
            self.storage.refuse_next_part = True
        chunk = ChunkPayload.model_validate(message)
        seconds = self.settings.lease_seconds
        try:
            with lease.hold(self.redis, chunk, QUEUE, seconds) as mine:
                if not mine:
                    self.counts["ran_elsewhere"] += 1
                    return
                try:
                    run_chunk(chunk, self.context)
                except HandBack as back:
                    # explainctl_worker.app._hand_back: a new chunk number, so the items
                    # do not read as a lost worker's delivery
                    number = self.context.store.new_chunk_number(chunk.job_id)
                    again = {"items": back.items, "chunk": number}
                    if back.strike:
                        again["handed_back"] = chunk.handed_back + 1
                    send_chunk(self.app, chunk.model_copy(update=again), QUEUE)
                    self.counts["handed_back"] += len(back.items)
        except _Killed:
            self.counts["killed"] += 1
        except (ExplainctlError, redis.RedisError) as error:
            self.failed(error)  # its lease expires, and the chunk runs again
        finally:  # a fault the chunk never reached (nothing to run) is not left armed
            self.dying = self.storage.refuse_next_part = False

    def failed(self, error: Exception) -> None:
        """A refusal by Redis (noeviction refuses writes once it is full), counted."""
        self.counts[f"error: {str(error)[:100]}"] += 1

    def drain(self, job_id: str, deadline: float, lease_seconds: float, grace: float) -> bool:
        """Take the queue's messages until the job's manifest is written (True) or the
        deadline passes, reaping and reconciling on the way as every worker's reaper
        thread does (lease.start_reaper)."""
        from explainctl.jobs import leases, reconcile
        from explainctl.spec.contracts import ITEMS_JSONL, job_key
        from explainctl.spec.errors import ExplainctlError
        from explainctl_worker.service import chunk

        reaped = looked = time.monotonic()
        with mock.patch.object(chunk, "explain_items", self.explain_items):
            while time.monotonic() < deadline:
                message = self.take()
                if message is not None:
                    self.run(message)
                now = time.monotonic()
                try:
                    if now - reaped >= lease_seconds / 2:
                        reaped = now
                        self.counts["reaped"] += leases.reap(self.redis, self.app)
                    if now - looked >= grace / 2:
                        looked = now
                        self.counts["reconciled"] += reconcile.reconcile(
                            self.context.store, self.app, job_id, grace=grace
                        )
                    if message is None:
                        if self.context.store.status(job_id).finished_at is not None and (
                            self.storage.exists(job_key(job_id, ITEMS_JSONL))
                        ):
                            return True
                        time.sleep(0.05)
                except (ExplainctlError, redis.RedisError) as error:
                    self.failed(error)
                    time.sleep(0.05)
        return False


def _audit(storage, job_id: str | None, night: int, items: int, pad: str) -> dict:
    """The night's input list against the job's manifest: what is lost, what ran twice."""
    from explainctl.spec.contracts import ITEMS_JSONL, job_key

    found: dict[int, dict] = {}
    with contextlib.suppress(Exception):  # no job or no manifest: every item is lost
        for line in storage.lines(job_key(job_id, ITEMS_JSONL)):
            if line.strip():
                record = json.loads(line)
                found[record["index"]] = record
    lost = re_executed = 0
    for index in range(items):
        record = found.get(index)
        if (
            record is None
            or record["uri"] != _uri(night, index, pad)
            or record["state"] != "done"
            or "prob_before" not in record  # done in Redis, its part missing
        ):
            lost += 1
        elif record.get("attempts", 0) > 1:
            re_executed += 1
    return {"lost": lost, "re_executed": re_executed, "extra_records": len(found) - items}


def _pick(rng: random.Random, chunks: int, counts: dict[str, int]) -> dict[str, set[int]]:
    """Distinct chunks for each fault."""
    drawn = rng.sample(range(chunks), min(chunks, sum(counts.values())))
    picked, start = {}, 0
    for name, count in counts.items():
        picked[name] = set(drawn[start : start + count])
        start += count
    return picked


def soak(args: argparse.Namespace, work: Path, outputs: Path):
    """One row per night, then the summary: Redis keeps its files (the append-only log)
    in `work`, the jobs their output in `outputs`."""
    from explainctl.client import Client
    from explainctl.config import Settings
    from explainctl.inputs import InputItem
    from explainctl.io.storage import open_storage
    from explainctl.jobs import reconcile
    from explainctl.jobs.keys import JOBS_KEY
    from explainctl.jobs.store import JobStore
    from explainctl.spec.contracts import ModelSpec
    from explainctl.spec.errors import ExplainctlError
    from explainctl.spec.methods import ExplainParams

    factor = args.items / MILLION
    pad = _pad(args.uri_length, args.seed)
    cap = int(args.shipped_mib * MIB * factor)
    server, url = _redis(
        work, ("--appendonly", "yes", "--maxmemory", str(cap), "--maxmemory-policy", "noeviction")
    )
    out = os.path.abspath(outputs / "out")
    base = int(redis.Redis.from_url(url).info("memory")["used_memory"])  # no client yet
    sampler = _PeakSampler(url, args.sample)
    sampler.start()
    try:
        settings = Settings.load(
            env={}, broker_url=url, output=out, queue=QUEUE,
            job_ttl=WEEK * args.night_seconds, lease_seconds=args.lease_seconds,
            allowed_models=("*",),
        )  # fmt: skip
        client = Client(settings)
        storage = _Storage(open_storage(out))
        worker = _Worker(settings, storage)
        store: JobStore = worker.context.store
        admin = redis.Redis.from_url(url)
        # One chunk through every path first: Redis then holds its scripts and a query
        # buffer for each connection (some 25 kB each, all the run opens), which the
        # projection to a million items must not scale with the job.
        warm = client.submit(
            (InputItem(_uri(0, i, pad)) for i in range(CHUNK)), ModelSpec(), ExplainParams()
        )
        worker.drain(warm.job_id, time.monotonic() + 60, args.lease_seconds, args.grace)
        fixed = int(admin.info("memory")["used_memory"])
        # The reconciler reads every waiting message only below MAX_WAITING: as many as
        # a million-item job's last 5,000 chunks, so as many of the model's.
        reconcile.MAX_WAITING = max(1, round(reconcile.MAX_WAITING * factor))
        machine = describe()
        version = admin.info("server")["redis_version"]
        rows: list[dict] = []
        seen: set[str | None] = set()
        started = time.monotonic()
        for night in range(1, args.nights + 1):
            dawn = max(time.monotonic(), started + (night - 1) * args.night_seconds)
            rng = random.Random(f"{args.seed}:{night}")
            resets = _reset_peak(admin)
            server_peak = int(admin.info("memory")["used_memory_peak"])
            sampler.take()
            night_started = time.monotonic()
            inputs = (InputItem(_uri(night, i, pad)) for i in range(args.items))
            error = None
            try:
                job = client.submit(inputs, ModelSpec(), ExplainParams(), chunk_size=CHUNK)
                job_id, chunks = job.job_id, job.chunks
            except ExplainctlError as refused:  # noeviction: Redis full, the submit refused
                error = f"submit: {refused}"
                newest = [j.decode() for j in admin.zrevrange(JOBS_KEY, 0, 0)]
                job_id = newest[0] if newest and newest[0] not in seen else None
                chunks = store.progress(job_id)[1] if job_id else 0
            submitted = time.monotonic()
            at_submit = sampler.sample()
            picked = _pick(
                rng, chunks, {"kills": args.kills, "drops": args.drops, "hiccups": args.hiccups}
            )
            worker.kills, worker.drops, worker.hiccups = (
                set(picked["kills"]), set(picked["drops"]), set(picked["hiccups"]),
            )  # fmt: skip
            worker.counts = Counter()
            expected_re_executed = sum(min(CHUNK, args.items - n * CHUNK) for n in picked["kills"])
            deadline = night_started + args.night_seconds * args.overrun
            finished = job_id is not None and worker.drain(
                job_id, deadline, args.lease_seconds, args.grace
            )
            drained = time.monotonic()
            audit = _audit(storage, job_id, night, args.items, pad)
            seen.add(job_id)
            try:
                pruned = store.prune()  # an operator's nightly cron
            except ExplainctlError as error:
                pruned = {"error": str(error)}
            if job_id:  # audited: its output is of no further use here
                shutil.rmtree(Path(out) / job_id, ignore_errors=True)
            work_seconds = time.monotonic() - night_started
            time.sleep(max(0.0, dawn + args.night_seconds - time.monotonic()))
            sampled = sampler.take()
            memory = admin.info("memory")
            after = int(memory["used_memory_peak"])
            if resets or after > server_peak:
                peak, source = max(after, sampled), "server"
            else:
                peak, source = sampled, "sampled"
            persistence = admin.info("persistence")
            live = [
                job for job in (j.decode() for j in admin.zrange(JOBS_KEY, 0, -1))
                if job != warm.job_id and store.live(job)
            ]  # fmt: skip
            projected = fixed + (peak - fixed) / factor
            counts = worker.counts
            row = {
                "machine": machine,
                "redis": version,
                "night": night,
                "items": args.items,
                "chunks": chunks,
                "job_id": job_id,
                "finished": finished,
                "error": error,
                "peak_bytes": peak,
                "peak_pct_of_cap": round(100 * peak / cap, 1),
                "peak_source": source,
                "used_after_submit_bytes": at_submit,
                "used_end_bytes": int(memory["used_memory"]),
                "cap_bytes": cap,
                "base_bytes": base,
                "fixed_bytes": fixed,
                "projected_million_mib": round(projected / MIB, 1),
                **{
                    f"projected_pct_of_{name}": round(100 * projected / (mib * MIB), 1)
                    for name, mib in SHIPPED_MIB.items()
                },
                "live_jobs": len(live),
                "keys": admin.dbsize(),
                "aof_mib": round(int(persistence["aof_current_size"]) / MIB, 1),
                "aof_rewrites": int(persistence.get("aof_rewrites", 0)),
                "lost": audit["lost"],
                "re_executed": audit["re_executed"],
                "expected_re_executed": expected_re_executed,
                "extra_records": audit["extra_records"],
                "faults": {
                    "kills": counts["killed"],
                    "drops": counts["dropped"],
                    "hiccups": len(picked["hiccups"]) - len(worker.hiccups),
                },
                "recovered": {
                    "reaped_chunks": counts["reaped"],
                    "reconciled_items": counts["reconciled"],
                    "handed_back_items": counts["handed_back"],
                    "ran_elsewhere": counts["ran_elsewhere"],
                },
                "worker_errors": {k: v for k, v in counts.items() if k.startswith("error")},
                "pruned": pruned,
                "submit_seconds": round(submitted - night_started, 1),
                "drain_seconds": round(drained - submitted, 1),
                "work_seconds": round(work_seconds, 1),
                "seconds": round(time.monotonic() - night_started, 1),
            }
            rows.append(row)
            yield row
        yield _summary(rows, args, cap, time.monotonic() - started)
    finally:
        sampler.stopping.set()
        server.terminate()
        server.wait(30)


def _summary(rows: list[dict], args: argparse.Namespace, cap: int, seconds: float) -> dict:
    def span(key: str, nights: list[dict]) -> list[float] | None:
        return [min(r[key] for r in nights), max(r[key] for r in nights)] if nights else None

    steady = [r for r in rows if r["night"] > WEEK]  # a week of sealed jobs held
    highest = max(rows, key=lambda r: r["peak_bytes"])
    return {
        "summary": True,
        "machine": rows[0]["machine"],
        "redis": rows[0]["redis"],
        "label": args.label,
        "nights": len(rows),
        "items_per_night": args.items,
        "uri_length": len(_uri(0, 0, _pad(args.uri_length, args.seed))),
        "night_seconds": args.night_seconds,
        "job_ttl_seconds": WEEK * args.night_seconds,
        "scale": args.items / MILLION,
        "cap_bytes": cap,
        "shipped_mib": args.shipped_mib,
        "peak_pct_of_cap_first_week": span("peak_pct_of_cap", rows[:WEEK]),
        "peak_pct_of_cap_after_first_week": span("peak_pct_of_cap", steady),
        "peak_max_bytes": highest["peak_bytes"],
        "peak_max_pct_of_cap": highest["peak_pct_of_cap"],
        "peak_max_night": highest["night"],
        **{
            f"projected_max_pct_of_{name}": max(r[f"projected_pct_of_{name}"] for r in rows)
            for name in SHIPPED_MIB
        },
        "unfinished_nights": sum(not r["finished"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "re_executed": sum(r["re_executed"] for r in rows),
        "expected_re_executed": sum(r["expected_re_executed"] for r in rows),
        "faults": dict(sum((Counter(r["faults"]) for r in rows), Counter())),
        "recovered": dict(sum((Counter(r["recovered"]) for r in rows), Counter())),
        "worker_errors": sum(sum(r["worker_errors"].values()) for r in rows),
        "work_seconds_max": max(r["work_seconds"] for r in rows),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--night-seconds", type=int, default=60, help="wall seconds a night")
    parser.add_argument("--items", type=int, default=30_000, help="items a night")
    parser.add_argument(
        "--shipped-mib", type=int, default=SHIPPED_MIB["compose"],
        help="the shipped maxmemory that --items / 10^6 scales (Compose 1024, Kubernetes 1536)",
    )  # fmt: skip
    parser.add_argument(
        "--uri-length", type=int, default=0,
        help=f"characters of each input URI (default and least: {len(_uri(0, 0))})",
    )  # fmt: skip
    parser.add_argument("--kills", type=int, default=2, help="workers killed mid-chunk a night")
    parser.add_argument("--drops", type=int, default=2, help="messages lost a night")
    parser.add_argument("--hiccups", type=int, default=2, help="parts storage refuses a night")
    parser.add_argument("--lease-seconds", type=int, default=2)
    parser.add_argument("--grace", type=float, default=2.0, help="the reconciler's grace")
    parser.add_argument("--sample", type=float, default=0.02, help="seconds between samples")
    parser.add_argument(
        "--overrun", type=float, default=3.0,
        help="a night's job is given up after this many nights",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--json", help="append one JSON line per night and the summary")
    parser.add_argument("--label", default="", help="what was measured (e.g. a commit)")
    args = parser.parse_args()
    # The jobs' output in memory where there is a tmpfs: S3 stands a fleet's writes, one
    # local disk syncing a part per chunk would be the bottleneck of this one process.
    memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory(dir=memory) as outputs:
        for row in soak(args, Path(work), Path(outputs)):
            emit(row, args.json)


if __name__ == "__main__":
    main()
