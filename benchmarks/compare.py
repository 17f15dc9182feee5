"""`explainctl compare` on two jobs of N items, masks read one object per item (jobs written
before chunk masks files) against one object per chunk, side by side in one run.

Two synthetic jobs over the same N URIs are written through the real storage code
(explainctl.io.storage) to a local folder and, with --s3, to a moto S3 server over HTTP:
each item's mask.npy (28x28 float32, as workers write) and each chunk's masks file
(explainctl.jobs.masks, 16 items per chunk, the default chunk size). The same records are
then compared twice by explainctl.pages.comparison.Comparison with the production reader
(jobs.masks.read_mask_file): once without `mask_file` in the records (per-item files), once
with it. The masks and scores are identical, so the two runs must give the same summary.

    python benchmarks/compare.py --items 10000 [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from explainctl.io.storage import open_storage  # noqa: E402
from explainctl.jobs.masks import encode, read_mask_file  # noqa: E402
from explainctl.pages.comparison import Comparison, JobView  # noqa: E402
from explainctl.spec.contracts import (  # noqa: E402
    MASK_NPY,
    artifact_key,
    chunk_masks_key,
    item_name,
)
from explainctl.spec.results import ItemRecord  # noqa: E402

CHUNK = 16
SIDE = 28


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_job(storage, job_id: str, items: int, seed: int) -> tuple[list, list]:
    """The job's masks in storage, both ways; (records without, records with mask_file)."""
    rng = np.random.default_rng(seed)
    per_item, per_chunk = [], []
    for low in range(0, items, CHUNK):
        masks = {
            i: rng.random((SIDE, SIDE), dtype=np.float32)
            for i in range(low, min(low + CHUNK, items))
        }
        chunk_uri = storage.put(
            chunk_masks_key(job_id, low, max(masks), low // CHUNK, "bench"), encode(masks)
        )
        for index, mask in masks.items():
            uri = f"s3://photos/{index}.jpg"
            name = item_name(index, uri)
            mask_uri = storage.put(artifact_key(job_id, name, MASK_NPY, 1), _npy(mask))
            fields = dict(index=index, uri=uri, item=name, state="done", target_index=index % 7,
                          prob_before=0.9, prob_after=0.1, mask_area=float(mask.mean()),
                          iterations=40, seconds=1.0, attempt=1,
                          artifacts={MASK_NPY: mask_uri})  # fmt: skip
            per_item.append(ItemRecord(**fields))
            per_chunk.append(ItemRecord(**fields, mask_file=chunk_uri))
    return per_item, per_chunk


def view(job_id: str, items: int, output: str) -> JobView:
    return JobView(job_id, "completed", "resnet50", {}, items, output)


def run_compare(a, b, records_a, records_b) -> tuple[float, dict, int]:
    reads = 0

    def read(uri: str) -> bytes:
        nonlocal reads
        reads += 1
        return read_mask_file(uri)

    started = time.perf_counter()
    comparison = Comparison(a, b, records_a, records_b, read)
    for _ in comparison:
        pass
    return time.perf_counter() - started, comparison.summary.as_json(), reads


def bench(name: str, root: str, items: int) -> dict:
    storage = open_storage(root)
    started = time.perf_counter()
    a_item, a_chunk = write_job(storage, "job-a", items, 1)
    b_item, b_chunk = write_job(storage, "job-b", items, 2)
    wrote = time.perf_counter() - started
    a, b = view("job-a", items, root), view("job-b", items, root)
    before, summary_before, reads_before = run_compare(a, b, a_item, b_item)
    after, summary_after, reads_after = run_compare(a, b, a_chunk, b_chunk)
    assert summary_before == summary_after, "the two readers disagree"
    assert summary_after["compared"] == items
    return {"storage": name, "items": items, "write_s": round(wrote, 1),
            "per_item_s": round(before, 2), "per_item_reads": reads_before,
            "per_chunk_s": round(after, 2), "per_chunk_reads": reads_after,
            "speedup": round(before / after, 1),
            "mean_iou": round(summary_after["mean_iou"], 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--s3", action="store_true", help="also on a moto S3 server over HTTP")
    args = parser.parse_args()
    print(f"# {describe()}")
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(bench("local folder", folder, args.items)), flush=True)
    if args.s3:
        import os

        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():  # fmt: skip
            os.environ[key] = value
        with contextlib.suppress(Exception):
            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
        boto3.client("s3").create_bucket(Bucket="bench")
        try:
            print(json.dumps(bench("moto S3 over HTTP", "s3://bench/out", args.items)), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
