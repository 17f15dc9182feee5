"""End to end: the Python API's job side (explainctl.Client) -> Redis/Celery -> a real
worker process -> S3 (moto), read back as a DataFrame and a report."""

import io

import boto3
import numpy as np
from PIL import Image

import explainctl


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_notebook_submits_waits_and_reads_a_job(s3_bucket, start_workers, worker_env, tmp_path):
    s3 = boto3.session.Session().client("s3")
    for n in range(2):
        s3.put_object(Bucket=s3_bucket, Key=f"images/img{n}.png", Body=_png(n))
    s3.put_object(Bucket=s3_bucket, Key="images/broken.png", Body=b"not a png")
    start_workers(1)

    client = explainctl.Client(
        broker_url=worker_env["EXPLAINCTL_BROKER_URL"],
        queue=worker_env["EXPLAINCTL_QUEUE"],
        output=f"s3://{s3_bucket}/audits",
    )
    job = client.submit(
        f"s3://{s3_bucket}/images/",
        model="tests.support.models:tiny_classifier",
        labels=[f"class {n}" for n in range(10)],
        chunk_size=2,
        image_size=32,
        mask_size=8,
        iterations=5,
    )
    final = job.wait(interval=0.2)
    assert final.state == "completed_with_failures"
    assert job.status().counts["done"] == 2 and job.status().counts["failed"] == 1

    table = job.results()
    assert list(table["uri"]) == [f"s3://{s3_bucket}/images/{n}" for n in
                                  ("broken.png", "img0.png", "img1.png")]  # fmt: skip
    assert list(table["state"]) == ["failed", "done", "done"]
    assert table.loc[0, "error_code"] == "unsupported-format"
    done = table[table["state"] == "done"]
    assert (done["iterations"] == 5).all() and done["target_name"].str.startswith("class ").all()

    page = job.report(str(tmp_path / "report.html"))
    assert page == str(tmp_path / "report.html")
    assert job.id in (tmp_path / "report.html").read_text()
