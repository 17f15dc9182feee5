"""End to end: a labelled parquet file through `explainctl submit --target label` to a real
worker: rows staged to the job's storage, labels in the records, their classes explained."""

import json
import os
from pathlib import Path

from explainctl.spec.results import ItemRecord
from tests.support import cli
from tests.support import datasets as built

TINY = [
    "--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size", "8",
    "--iterations", "5",
]  # fmt: skip


def test_a_labelled_parquet_file_explains_each_rows_true_class(start_workers, worker_env, tmp_path):
    images = [built.png(0), built.png(1), built.png(2), built.png(3, size=96)]
    path = built.parquet(tmp_path / "audit.parquet", 4, image=images, label=["3", "7", None, "1"])
    start_workers(1)
    # The client's byte limit refuses the 96 px row before anything is staged.
    submitted = cli.run("submit", str(path), "--target", "label", "--json", *TINY,
                        EXPLAINCTL_MAX_IMAGE_BYTES="8000", **worker_env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job_id"]
    waited = cli.run("wait", job, "--json", "--interval", "0.2", timeout=240, **worker_env)
    assert json.loads(waited.stdout)["counts"]["done"] == 2, waited.stderr

    listed = cli.run("results", job, "--json", **worker_env)
    records = [ItemRecord.model_validate_json(line) for line in listed.stdout.splitlines()]
    assert [r.uri for r in records] == [f"parquet:{path}#row={n}" for n in range(4)]
    assert [r.label for r in records] == ["3", "7", None, "1"]
    assert [r.state for r in records] == ["done", "done", "failed", "failed"]
    assert [r.target_index for r in records[:2]] == [3, 7]  # the label's class, not top-1
    assert records[2].error_code == "bad-target" and "no ground-truth label" in records[2].error
    assert records[3].error_code == "too-large"
    output = worker_env["EXPLAINCTL_OUTPUT"]
    staged = sorted(os.listdir(os.path.join(output, job, "inputs")))
    assert staged == [f"00000{n}-audit-{n}.png" for n in range(3)]  # the too large one: never
    assert records[0].staged == os.path.join(output, job, "inputs", "000000-audit-0.png")
    result = json.loads(Path(records[1].artifacts["result.json"]).read_text())
    assert result["target_index"] == 7 and result["item"] == "000001-audit-1"
    # The manifest keeps the rows' ground truth once Redis forgets the job.
    manifest = (Path(output) / job / "items.jsonl").read_text().splitlines()
    assert [json.loads(line).get("label") for line in manifest] == ["3", "7", None, "1"]
