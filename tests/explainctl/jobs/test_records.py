"""Item records: Redis's entries joined with the parts in storage, against a real Redis."""

import json
import time

import pytest

from explainctl.io.storage import open_storage
from explainctl.jobs import records
from explainctl.jobs.keys import job_key
from explainctl.jobs.records import item_records
from explainctl.spec.contracts import (
    ARTIFACT_FILES,
    PARTS,
    ChunkItem,
    JobInfo,
    ModelSpec,
    artifact_key,
    item_name,
    part_key,
    part_span,
)
from explainctl.spec.errors import ItemError
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemRecord

SCORES = {"target_index": 3, "target_name": "cat", "prob_before": 0.9, "prob_after": 0.1,
          "mask_area": 0.2, "iterations": 40, "stop_reason": "converged", "seconds": 1.5,
          "method": "original"}  # fmt: skip


def _job(store, output: str, n: int, chunk_size: int = 4) -> str:
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output=output, queue="explain", chunk_size=chunk_size)  # fmt: skip
    store.create(info)
    items = [ChunkItem(index=i, uri=f"/images/{i}.png") for i in range(n)]
    for start in range(0, n, chunk_size):
        store.add_chunk(job_id, items[start : start + chunk_size])
    store.mark_submitted(job_id)
    return job_id


def _done(storage, job_id: str, index: int, attempt: int, **scores) -> dict:
    name = item_name(index, f"/images/{index}.png")
    artifacts = {f: storage.uri(artifact_key(job_id, name, f, attempt)) for f in ARTIFACT_FILES}
    return {"attempt": attempt, "artifacts": artifacts, **SCORES, **scores}


def test_scores_go_to_a_part_and_read_back_whole(job_store, tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    job_id = _job(job_store, storage.root, 3)
    job_store.begin(job_id, [0, 1, 2])
    done = _done(storage, job_id, 0, 1)
    failure = {"error_code": "corrupt", "error": "bad"}
    finished = records.settle(
        job_store, storage, job_id, 0, [(0, "done", done), (1, "failed", failure)]
    )
    assert finished is False
    (key,) = storage.list(f"{job_id}/{PARTS}/")
    assert part_span(key) == (0, 0)  # only done items go to storage; errors stay in Redis
    assert [json.loads(line)["index"] for line in storage.get(key).splitlines()] == [0]
    assert records.settle(
        job_store, storage, job_id, 0, [(2, "done", _done(storage, job_id, 2, 1))]
    )
    first, failed, last = item_records(job_store, storage, job_id)
    assert first.item == "000000-0" and first.artifacts == done["artifacts"] and first.attempt == 1
    assert {k: getattr(first, k) for k in SCORES} == SCORES
    assert (first.state, first.attempts, first.uri) == ("done", 1, "/images/0.png")
    assert (failed.state, failed.error_code, failed.artifacts, failed.mask_area) == (
        "failed", "corrupt", {}, None)  # fmt: skip
    assert last.state == "done" and last.index == 2
    # Redis holds no score of them
    assert job_store.redis.hkeys(job_key(job_id, "errors")) == ["1"]


def test_a_job_streams_in_index_order_across_out_of_order_parts(job_store, tmp_path):
    """Parts of retried and handed-back chunks span other parts' indices; the reader
    still yields every item once, in index order, and a copy that lost its race to settle
    an item does not replace nor add to it."""
    storage = open_storage(str(tmp_path / "out"))
    job_id = _job(job_store, storage.root, 40)
    job_store.begin(job_id, list(range(40)))
    # chunk 9 (a retry) holds items 3 and 35; chunks 0..3 hold the rest in runs
    records.settle(job_store, storage, job_id, 9,
                   [(i, "done", _done(storage, job_id, i, 1)) for i in (3, 35)])  # fmt: skip
    for chunk, run in enumerate((range(0, 10), range(10, 20), range(20, 30), range(30, 40))):
        changes = [(i, "done", _done(storage, job_id, i, 1, mask_area=i / 100)) for i in run]
        records.settle(
            job_store, storage, job_id, chunk, [c for c in changes if c[0] not in (3, 35)]
        )
    # a second copy of chunk 1 that ran item 12 again, attempt 2, after it had settled
    storage.put(part_key(job_id, 12, 12, 1, "late"),
                json.dumps({"index": 12, **_done(storage, job_id, 12, 2)}).encode())  # fmt: skip
    read = list(item_records(job_store, storage, job_id))
    assert [r.index for r in read] == list(range(40))
    assert all(r.state == "done" and r.artifacts for r in read)
    assert read[17].mask_area == 0.17 and read[35].mask_area == SCORES["mask_area"]
    assert read[12].attempt == 2  # both copies wrote whole files; the later one is named


def test_a_part_from_a_newer_worker_still_reads(job_store, tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    job_id = _job(job_store, storage.root, 1)
    job_store.begin(job_id, [0])
    fields = {**_done(storage, job_id, 0, 1), "future_score": 7}
    records.settle(job_store, storage, job_id, 0, [(0, "done", fields)])
    (record,) = item_records(job_store, storage, job_id)
    assert record.mask_area == SCORES["mask_area"] and not hasattr(record, "future_score")


def test_storage_refusing_the_part_moves_nothing(job_store, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    storage = open_storage(str(tmp_path / "a-file" / "out"))  # nothing can be written there
    job_id = _job(job_store, storage.root, 1)
    job_store.begin(job_id, [0])
    with pytest.raises(ItemError):
        records.settle(job_store, storage, job_id, 0, [(0, "done", _done(storage, job_id, 0, 1))])
    assert job_store.states(job_id, [0]) == ["running"]


def test_an_items_ground_truth_is_in_its_record(job_store, tmp_path):
    storage = open_storage(str(tmp_path / "out"))
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output=storage.root, queue="explain", chunk_size=2)  # fmt: skip
    job_store.create(info)
    job_store.add_chunk(job_id, [ChunkItem(index=0, uri="/a.png", label="tabby"),
                                 ChunkItem(index=1, uri="/b.png", target="2")])  # fmt: skip
    first, second = item_records(job_store, storage, job_id)
    assert (first.label, first.target, second.label, second.target) == ("tabby", None, None, "2")
    assert first.model_dump(mode="json")["label"] == "tabby"


def test_a_reader_derives_artifact_uris_and_never_follows_a_forged_record(tmp_path):
    output = str(tmp_path / "out")
    job_id = new_job_id()
    forged = ItemRecord(
        index=7, uri="https://u:pw@host/cat.png?sig=s3cret", item="../../etc", state="done",
        attempt=2, artifacts={"overlay.png": "/etc/passwd", "mask.npy": "s3://other/m.npy",
                              "run.sh": "/tmp/run.sh"},
    )  # fmt: skip
    trusted = records.derived(forged, output, job_id)
    storage = open_storage(output)
    assert trusted.item == item_name(7, "https://host/cat.png") == "000007-cat"
    assert trusted.uri == "https://host/cat.png"
    assert trusted.artifacts == {
        name: storage.uri(artifact_key(job_id, "000007-cat", name, 2))
        for name in ("overlay.png", "mask.npy")
    }
    bucket = records.derived(forged, "s3://audit/runs", job_id)
    assert bucket.artifacts["mask.npy"] == f"s3://audit/runs/{job_id}/000007-cat/attempt-2/mask.npy"
    # A staged input is kept only where it is the job's own.
    own = storage.uri(f"{job_id}/inputs/000007-test-7.png")
    assert records.derived(forged.model_copy(update={"staged": own}), output, job_id).staged == own
    elsewhere = forged.model_copy(update={"staged": "/etc/passwd", "mask_file": "/etc/passwd"})
    assert records.derived(elsewhere, output, job_id).staged is None
    assert records.derived(elsewhere, output, job_id).mask_file is None
    # So is a chunk's masks file.
    masks = storage.uri(f"{job_id}/masks/000000000-000000015-0000000-ab12.npz")
    own = records.derived(forged.model_copy(update={"mask_file": masks}), output, job_id)
    assert own.mask_file == masks


def test_a_chunks_masks_go_to_one_file_that_its_records_name(job_store, tmp_path):
    import numpy as np

    from explainctl.jobs.masks import MaskReader
    from explainctl.spec.contracts import MASKS

    storage = open_storage(str(tmp_path / "out"))
    job_id = _job(job_store, storage.root, 3)
    job_store.begin(job_id, [0, 1, 2])
    masks = {0: np.full((4, 4), 0.25, np.float32), 2: np.eye(4, dtype=np.float32)}
    changes = [(0, "done", _done(storage, job_id, 0, 1)),
               (1, "failed", {"error_code": "corrupt", "error": "bad"}),
               (2, "done", _done(storage, job_id, 2, 1))]  # fmt: skip
    assert records.settle(job_store, storage, job_id, 0, changes, masks) is True
    (key,) = storage.list(f"{job_id}/{MASKS}/")
    (part,) = storage.list(f"{job_id}/{PARTS}/")
    assert key.rsplit("/", 1)[1][:-4] == part.rsplit("/", 1)[1][:-6]  # one name, two files
    done = [r for r in item_records(job_store, storage, job_id) if r.state == "done"]
    assert [r.mask_file for r in done] == [storage.uri(key)] * 2
    reader = MaskReader(lambda uri: storage.get(key))
    assert np.array_equal(reader.mask(done[1]), masks[2])
    assert reader.mask(done[0]).tolist() == masks[0].tolist()
    assert reader.fetched == 1  # the chunk's file, once for both
