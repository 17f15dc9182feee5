"""End to end: a real job (Redis, a worker process, moto S3) read out as a parquet table
(`results --parquet --masks`) and exported to FiftyOne (`export --to fiftyone`), twice."""

import io
import json
import subprocess
import sys

import boto3
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from explainctl.spec.contracts import MASKS
from explainctl.spec.trust import flags
from tests.support import cli

LABELS = [f"class {n}" for n in range(10)]


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(s3, uri: str) -> np.ndarray:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return np.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_a_job_becomes_a_parquet_table_and_a_fiftyone_dataset(
    s3_bucket, start_workers, worker_env, tmp_path, monkeypatch
):
    s3 = boto3.session.Session().client("s3")
    for n in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"images/img{n}.png", Body=_png(n))
    s3.put_object(Bucket=s3_bucket, Key="images/broken.png", Body=b"not a png")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    start_workers(1)
    env = {**worker_env, "EXPLAINCTL_OUTPUT": f"s3://{s3_bucket}/audits"}
    submitted = cli.run(
        "submit", f"s3://{s3_bucket}/images/", "--wait", "--json", "--chunk-size", "2",
        "--model", "tests.support.models:tiny_classifier", "--labels", str(tmp_path / "labels.txt"),
        "--image-size", "32", "--mask-size", "6", "--iterations", "4", **env,
    )  # fmt: skip
    assert submitted.returncode == 1, submitted.stderr  # the broken image failed
    job = json.loads(submitted.stdout.splitlines()[0])["job_id"]

    # Two chunks, each with one masks file beside the items' own artifacts.
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"audits/{job}/{MASKS}/")
    assert listed["KeyCount"] == 2

    out = tmp_path / "audit.parquet"
    written = cli.run("results", job, "--parquet", str(out), "--masks", "--json", **env)
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["rows"] == 4
    rows = pq.read_table(out).to_pylist()
    assert [r["state"] for r in rows] == ["failed", "done", "done", "done"]
    assert rows[0]["error_code"] == "unsupported-format" and rows[0]["mask"] is None
    from explainctl.spec.results import ItemRecord

    for r in rows[1:]:
        assert r["target_name"].startswith("class ") and r["iterations"] == 4
        assert r["mask_file"].startswith(f"s3://{s3_bucket}/audits/{job}/{MASKS}/")
        own = _npy(s3, r["artifact_mask_npy"])  # the item's mask.npy, from its own file
        mask = np.array(r["mask"], np.float32).reshape(r["mask_height"], r["mask_width"])
        assert own.shape == (6, 6) and np.array_equal(mask, own)
        fields = {k: v for k, v in r.items() if k in ItemRecord.model_fields}
        assert r["flags"] == flags(ItemRecord(**fields))

    # FiftyOne: its own database (the mongod its wheel ships) under this test's folder.
    fo_env = {
        "FIFTYONE_DATABASE_DIR": str(tmp_path / "fo-db"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(tmp_path / "fo-data"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_VALIDATION": "false",
    }
    media = tmp_path / "media"
    # FiftyOne and the exporter are the light side's: the export never imports torch.
    args = ["explainctl", "export", job, "--to", "fiftyone", "--dataset", "audit", "--media",
            str(media), "--json"]  # fmt: skip
    code = (f"import atexit, sys; sys.argv = {args!r}; atexit.register(lambda: sys.stderr."
            "write(f'torch imported: {\"torch\" in sys.modules}')); "
            "from explainctl.cli.commands import main; main()")  # fmt: skip
    exported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=cli.env(**env, **fo_env), timeout=300)  # fmt: skip
    assert "torch imported: False" in exported.stderr
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["samples"] == 4 and summary["downloaded"] == 4  # broken.png too: not decoded
    for name, value in fo_env.items():
        monkeypatch.setenv(name, value)
    import fiftyone as fo

    from explainctl.client import Client
    from explainctl.config import Settings

    # Again, from the library: the job's samples are updated, never doubled.
    settings = Settings.load(env={}, broker_url=env["EXPLAINCTL_BROKER_URL"], output=env[
        "EXPLAINCTL_OUTPUT"], queue=env["EXPLAINCTL_QUEUE"])  # fmt: skip
    again = Client(settings).export_fiftyone(job, "audit", str(media))
    assert again.samples == 4 and again.downloaded == 0
    dataset = fo.load_dataset("audit")
    assert len(dataset) == 4
    samples = {s["index"]: s for s in dataset}
    broken = samples[0]
    assert broken.tags == ["failed"] and broken["error_code"] == "unsupported-format"
    by_index = {r["index"]: r for r in rows}
    for index in (1, 2, 3):
        sample, r = samples[index], by_index[index]
        assert sample.filepath == str(media / job / f"{r['item']}.png")
        assert Image.open(sample.filepath).size == (48, 40)
        assert sample.tags == r["flags"]
        assert sample["explained"].label == r["target_name"]
        assert sample["explained"].confidence == r["prob_before"]
        assert sample["prediction"].label == r["target_name"]  # top-1 was explained
        for field in ("prob_after", "mask_area", "compactness", "stop_reason", "uri"):
            assert sample[field] == r[field]
        own = _npy(s3, r["artifact_mask_npy"])
        heatmap = sample["saliency"]
        assert np.allclose(heatmap.map, 1 - own)
        assert heatmap.range[0] == 0 and heatmap.range[1] == max(1 - own.min(), 0.25)
    assert "saliency" not in broken or broken["saliency"] is None
