"""End to end: `explainctl submit` -> Redis/Celery -> real worker processes -> S3 (moto)."""

import html
import io
import json
import re

import boto3
import numpy as np
from PIL import Image

from explainctl.spec.contracts import ARTIFACT_FILES, IMAGENET_MEAN
from explainctl.spec.results import ItemRecord
from tests.support import browser, cli

TINY = [
    "--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size", "8",
    "--iterations", "5",
]  # fmt: skip


def _encoded(seed: int, fmt: str, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (40 + seed, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16))
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _dataset() -> dict[str, bytes]:
    """20 good images in mixed formats and modes, and 2 broken ones."""
    files = {}
    kinds = [("png", "PNG", "RGB"), ("jpg", "JPEG", "RGB"), ("webp", "WEBP", "RGB"),
             ("bmp", "BMP", "RGB"), ("gif", "GIF", "P"), ("tif", "TIFF", "RGB"),
             ("png", "PNG", "L"), ("png", "PNG", "RGBA"), ("png", "PNG", "I;16"),
             ("jpg", "JPEG", "CMYK")]  # fmt: skip
    for n in range(20):
        ext, fmt, mode = kinds[n % len(kinds)]
        files[f"images/batch{n % 2}/img{n:02d}.{ext}"] = _encoded(n, fmt, mode)
    files["images/broken-text.jpg"] = b"definitely not a jpeg"
    files["images/broken-truncated.png"] = _encoded(99, "PNG")[:200]
    return files


def test_submit_to_s3_with_two_workers(s3_bucket, start_workers, worker_env, tmp_path):
    s3 = boto3.session.Session().client("s3")
    for key, data in _dataset().items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    start_workers(2)

    output = f"s3://{s3_bucket}/audits"
    # The job names the model's classes itself (--labels), on S3 like its images.
    names = [f"class {n} <b>" for n in range(10)]
    s3.put_object(Bucket=s3_bucket, Key="labels.json", Body=json.dumps(names).encode())
    s3.put_object(Bucket=s3_bucket, Key="empty.txt", Body=b"\n\n")
    refused = cli.run("submit", f"s3://{s3_bucket}/images/", "--labels",
                      f"s3://{s3_bucket}/empty.txt", *TINY, **worker_env)  # fmt: skip
    assert refused.returncode == 2 and "no class names" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    submitted = cli.run("submit", f"s3://{s3_bucket}/images/", "--output", output, "--chunk-size",
                        "4", "--json", "--labels", f"s3://{s3_bucket}/labels.json", *TINY,
                        **worker_env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["total"] == 22 and job["chunks"] == 6

    waited = cli.run(
        "wait", job["job_id"], "--json", "--interval", "0.2", timeout=240, **worker_env
    )
    assert waited.returncode == 1, waited.stderr + waited.stdout  # two items failed
    assert waited.stdout, waited.stderr
    final = json.loads(waited.stdout)
    assert final["state"] == "completed_with_failures"
    assert final["counts"] == {"queued": 0, "running": 0, "done": 20, "failed": 2, "cancelled": 0}

    listed = cli.run("results", job["job_id"], "--json", **worker_env)
    records = [ItemRecord.model_validate_json(line) for line in listed.stdout.splitlines()]
    assert len(records) == 22 and sorted(r.index for r in records) == list(range(22))
    failed = {r.uri.rsplit("/", 1)[1]: r for r in records if r.state == "failed"}
    assert set(failed) == {"broken-text.jpg", "broken-truncated.png"}
    assert failed["broken-text.jpg"].error_code == "unsupported-format"
    assert failed["broken-truncated.png"].error_code == "corrupt"
    assert all(r.error and "\n" not in r.error for r in failed.values())

    prefix = f"audits/{job['job_id']}/"
    for record in (r for r in records if r.state == "done"):
        assert record.target_name == names[record.target_index]
        assert sorted(record.artifacts) == sorted(ARTIFACT_FILES)
        assert record.attempt == 1
        for name, uri in record.artifacts.items():
            assert uri == f"s3://{s3_bucket}/{prefix}{record.item}/attempt-1/{name}"
            body = s3.get_object(Bucket=s3_bucket, Key=uri.split("/", 3)[3])["Body"].read()
            if name.endswith((".png", ".webp")):  # thumbs.webp: what a report's gallery reads
                Image.open(io.BytesIO(body)).verify()
            elif name == "mask.npy":
                assert np.load(io.BytesIO(body)).shape == (8, 8)
            else:
                stored = json.loads(body)
                assert stored["item"] == record.item and stored["attempt"] == record.attempt
                assert stored["target_name"] == record.target_name
                # The record says how long each mask ran and why it stopped, as result.json.
                assert (stored["iterations"], stored["stop_reason"]) == (5, "budget")
                assert (record.iterations, record.stop_reason) == (5, "budget")

    manifest = s3.get_object(Bucket=s3_bucket, Key=f"{prefix}items.jsonl")["Body"].read()
    lines = [ItemRecord.model_validate_json(line) for line in manifest.splitlines()]
    assert [line.model_dump() for line in lines] == [r.model_dump() for r in records]
    job_json = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{prefix}job.json")["Body"].read())
    assert job_json["status"]["counts"] == final["counts"]
    assert job_json["info"]["params"]["iterations"] == 5
    assert job_json["info"]["labels"] == names
    # The first worker recorded what it made of the model: a module:callable has no
    # configuration of its own, so ImageNet's statistics and the job's input size.
    resolved = final["resolved_model"]
    assert resolved == job_json["status"]["resolved_model"], job_json["status"]
    assert resolved["source"] == "callable" and resolved["labels"] == "job"
    assert resolved["image_size"] == int(TINY[TINY.index("--image-size") + 1])
    assert tuple(resolved["mean"]) == IMAGENET_MEAN

    # The audit report of that job, with images fetched from S3, in a real browser.
    page = tmp_path / "report.html"
    made = cli.run("report", job["job_id"], "--out", str(page), **worker_env)
    assert made.returncode == 0, made.stderr
    dom = browser.dump_dom(page, tmp_path / "profile")
    data = browser.body_data(dom)
    assert data["rendered"] == "22"
    assert data["images-total"] == "60" and data["images-loaded"] == "60"
    cards = browser.card_values(dom)
    assert (cards["items"], cards["done"], cards["failed"]) == ("22", "20", "2")
    assert dom.count('data-state="failed"') == 2 and "unsupported-format:" in dom
    first_name = next(r.target_name for r in records if r.state == "done")
    assert f">{html.escape(first_name, quote=False)}<" in dom  # the label, as text
    # A gallery of the failed items only: the findings still count every item.
    failed_page = tmp_path / "failed.html"
    made = cli.run("report", job["job_id"], "--state", "failed", "--out", str(failed_page),
                   **worker_env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>',
                     failed_page.read_text(), re.S).group(1)  # fmt: skip
    shown = json.loads(blob)
    assert shown["summary"]["gallery"]["matched"] == 2
    assert shown["summary"]["gallery"]["filters"] == {"state": "failed"}
    assert [r["state"] for r in shown["rows"]].count("failed") == 2
    assert shown["summary"]["findings"]["done"] == 20
    refused = cli.run("report", job["job_id"], "--flag", "shaky", **worker_env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--flag takes one of" in refused.stderr
    stored = cli.run("report", job["job_id"], **worker_env)
    assert stored.stdout.strip() == f"s3://{s3_bucket}/{prefix}report.html"
    s3.head_object(Bucket=s3_bucket, Key=f"{prefix}report.html")
