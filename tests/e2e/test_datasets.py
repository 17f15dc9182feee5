"""End to end: labelled datasets through `explainctl submit` to a real worker: rows staged
to the job's storage, labels in the records, their classes explained, and a report that
knows which decisions were wrong."""

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq

from explainctl.spec.results import ItemRecord
from tests.support import browser, cli
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


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
COLOURS = [
    "--model", "tests.support.models:colour_classifier", "--mean", "0.5,0.5,0.5",
    "--std", "0.5,0.5,0.5", "--image-size", "32", "--mask-size", "8", "--iterations", "4",
]  # fmt: skip


def _table(dom: str, table_id: str) -> dict[str, list[str]]:
    """A findings table's rows: class -> [count, correct, accuracy]."""
    body = re.search(rf'<table[^>]* id="{table_id}"[^>]*>(.*?)</table>', dom, re.S).group(1)
    rows = re.findall(r'<tr data-class="([^"]*)">(.*?)</tr>', body, re.S)
    return {name: re.findall(r"<td[^>]*>([^<]*)</td>", row)[1:4] for name, row in rows}


def test_a_labelled_parquet_file_and_a_saved_dataset_to_a_report_of_right_and_wrong(
    start_workers, worker_env, tmp_path
):
    """The colour model's top-1 is each image's colour, so which rows it gets wrong is
    known: 5 of 8 right, green taken for blue twice and blue for green once."""
    # Labels by name (any case) in the parquet file; a ClassLabel's index in the dataset.
    colours = [RED, GREEN, BLUE, BLUE, RED]
    path = built.parquet(tmp_path / "audit.parquet", 5, image=[built.patch(c) for c in colours],
                         label=["red", "Green", "green", "green", "red"])  # fmt: skip
    saved = built.saved_dataset(tmp_path / "saved", names=("red", "green", "blue"),
                                images=[built.patch(c) for c in (BLUE, GREEN, RED)],
                                labels=[2, 2, 0])  # fmt: skip
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    start_workers(1)
    submitted = cli.run("submit", str(path), f"{saved}/train", "--labels",
                        str(tmp_path / "labels.txt"), "--wait", "--json", *COLOURS,
                        timeout=240, **worker_env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout.splitlines()[0])["job_id"]

    table = tmp_path / "results.parquet"
    written = cli.run("results", job, "--parquet", str(table), **worker_env)
    assert written.returncode == 0, written.stderr
    rows = pq.read_table(table).to_pylist()
    assert [r["uri"] for r in rows] == [f"parquet:{path}#row={n}" for n in range(5)] + [
        f"hf-disk:{saved}/train#row={n}" for n in range(3)
    ]
    assert [r["label_index"] for r in rows] == [0, 1, 1, 1, 0, 2, 2, 0]
    assert [r["predicted_index"] for r in rows] == [0, 1, 2, 2, 0, 2, 1, 0]
    assert [r["correct"] for r in rows] == [True, True, False, False, True, True, False, True]
    assert [r["label_name"] for r in rows] == ["red", "green", "green", "green", "red", "blue",
                                              "blue", "red"]  # fmt: skip

    page = tmp_path / "report.html"
    made = cli.run("report", job, "--out", str(page), **worker_env)
    assert made.returncode == 0, made.stderr
    dom = browser.dump_dom(page, tmp_path / "profile")
    cards = browser.card_values(dom)
    assert (cards["accuracy"], cards["misclassified"]) == ("0.625", "3")
    assert "for 5 of the 8 items whose label matched a class" in dom
    assert _table(dom, "by-truth") == {
        "red": ["3", "3", "1.000"], "green": ["3", "1", "0.333"], "blue": ["2", "1", "0.500"]
    }  # fmt: skip
    assert _table(dom, "by-prediction") == {
        "red": ["3", "3", "1.000"], "blue": ["3", "1", "0.333"], "green": ["2", "1", "0.500"]
    }  # fmt: skip
    confusions = re.findall(r'<li data-confusion="([^"]*)">(.*?)</li>', dom)
    assert [name for name, _ in confusions] == ["green → blue", "blue → green"]
    links = [re.findall(r'<a href="#item=(\d+)"', li) for _, li in confusions]
    assert links == [["2", "3"], ["6"]]
    misclassified = re.findall(r'<tr class="[a-z]+" data-state="[a-z]+" data-index="(\d+)"[^>]*>'
                               r'(?:(?!</tr>).)*data-flag="misclassified"', dom, re.S)  # fmt: skip
    assert misclassified == ["2", "3", "6"]

    # Each confusion's item, one click away: its detail view with the mask at full size.
    for item in ("2", "6"):
        dom = browser.dump_dom(page, tmp_path / "profile", fragment=f"item={item}")
        body = browser.body_data(dom)
        assert body["detail"] == item and body["detail-images-loaded"] == "4"
        mask = re.search(r'<figure[^>]* data-image="mask"[^>]*>(.*?)</figure>', dom, re.S)
        assert '<img src="data:image/webp;base64,' in mask.group(1)
        assert "unavailable" not in mask.group(1)
