"""The client library against a forged manifest: what it reads is derived from the job's
output, and `download` writes through no symlink it finds in its destination."""

import json
import os
import time

import pytest

from explainctl.client import Client
from explainctl.config import Settings
from explainctl.io.storage import open_storage
from explainctl.jobs.manifest import write_job_json
from explainctl.spec.contracts import (
    ITEMS_JSONL,
    JobInfo,
    ModelSpec,
    artifact_key,
    job_key,
)
from explainctl.spec.errors import InvalidInput, ItemError
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams


def _forged_job(tmp_path) -> tuple[Client, str]:
    """A job known only by its manifest, whose item names /etc/passwd and a file outside
    the output as its artifacts; the files the worker wrote are where the layout says."""
    output = str(tmp_path / "out")
    storage = open_storage(output)
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output=output, queue="explain", chunk_size=4)  # fmt: skip
    write_job_json(storage, info)
    (tmp_path / "private.json").write_text("private")
    forged = {"overlay.png": "/etc/passwd", "result.json": str(tmp_path / "private.json")}
    record = {"index": 0, "uri": "/in/cat.png", "item": "000000-cat", "state": "done",
              "attempt": 1, "artifacts": forged}  # fmt: skip
    storage.put(job_key(job_id, ITEMS_JSONL), (json.dumps(record) + "\n").encode())
    for name in ("overlay.png", "result.json"):
        storage.put(artifact_key(job_id, "000000-cat", name, 1), f"worker's {name}".encode())
    settings = Settings.load(broker_url=os.environ["EXPLAINCTL_TEST_REDIS_URL"], output=output)
    return Client(settings), job_id


@pytest.fixture(autouse=True)
def _redis(redis_url, monkeypatch):
    monkeypatch.setenv("EXPLAINCTL_TEST_REDIS_URL", redis_url)


def test_a_forged_manifest_cannot_aim_download_elsewhere(tmp_path):
    client, job_id = _forged_job(tmp_path)
    assert client.download(job_id, str(tmp_path / "got")) == 2
    got = tmp_path / "got" / "000000-cat"
    assert (got / "overlay.png").read_bytes() == b"worker's overlay.png"
    assert (got / "result.json").read_bytes() == b"worker's result.json"


def test_download_writes_through_no_planted_symlink(tmp_path):
    client, job_id = _forged_job(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    (tmp_path / "got").mkdir()
    (tmp_path / "got" / "000000-cat").symlink_to(victim)
    with pytest.raises(InvalidInput, match="not a plain folder"):
        client.download(job_id, str(tmp_path / "got"))
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]

    os.unlink(tmp_path / "got" / "000000-cat")
    (tmp_path / "got" / "000000-cat").mkdir()
    (tmp_path / "got" / "000000-cat" / "overlay.png").symlink_to(victim / "keep")
    assert client.download(job_id, str(tmp_path / "got")) == 2
    assert (victim / "keep").read_text() == "mine"  # the link was replaced, not followed
    placed = tmp_path / "got" / "000000-cat" / "overlay.png"
    assert not placed.is_symlink() and placed.read_bytes() == b"worker's overlay.png"


def test_a_live_jobs_output_edited_in_redis_is_never_read_or_written(tmp_path, redis_url):
    """With signing keys, `results`, `report` and `cancel` take a live job's output from
    its sealed record: an output edited in Redis sends no read and no write elsewhere."""
    from explainctl.jobs.keys import job_key as redis_key
    from explainctl.jobs.signing import SigningKeys
    from explainctl.jobs.store import JobStore
    from explainctl.spec.contracts import ChunkItem
    from explainctl.spec.errors import RecordTampered

    key = "audit-key-" + "k" * 24
    store = JobStore.connect(redis_url, keys=SigningKeys((key.encode(),)))
    output, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output=str(output), queue="explain", chunk_size=2)  # fmt: skip
    store.create(info)
    store.add_chunk(job_id, [ChunkItem(index=0, uri="/in/a.png")])
    store.mark_submitted(job_id)
    settings = Settings.load(env={}, broker_url=redis_url, output=str(output), signing_keys=(key,))
    client = Client(settings)
    assert [r.index for r in client.results(job_id)] == [0]  # sealed as written: read

    forged = info.model_copy(update={"output": str(elsewhere)}).model_dump_json()
    store.redis.hset(redis_key(job_id, "meta"), "info", forged)
    with pytest.raises(RecordTampered):
        list(client.results(job_id))
    with pytest.raises(RecordTampered):
        client.report(job_id, str(tmp_path / "report.html"))
    with pytest.raises(RecordTampered):
        client.cancel(job_id)  # its items are cancelled; no manifest goes elsewhere
    assert store.status(job_id).counts["cancelled"] == 1
    assert not elsewhere.exists() and not (tmp_path / "report.html").exists()


def test_originals_are_read_as_a_worker_would_and_staged_rows_only_where_they_are_the_jobs(
    tmp_path,
):
    output = tmp_path / "out"
    job_id = new_job_id()
    own = open_storage(str(output)).put(job_key(job_id, "inputs/000000-test-0.png"), b"row")
    other = open_storage(str(output)).put(job_key(new_job_id(), "inputs/000000-a.png"), b"no")
    inside, outside = tmp_path / "photos" / "a.png", tmp_path / "private.png"
    inside.parent.mkdir()
    inside.write_bytes(b"photo")
    outside.write_bytes(b"private")
    settings = Settings.load(env={}, broker_url=os.environ["EXPLAINCTL_TEST_REDIS_URL"],
                             output=str(output), allowed_roots=(str(inside.parent),))  # fmt: skip
    read = Client(settings)._originals(str(output), job_id)
    assert read(own) == b"row" and read(str(inside)) == b"photo"
    for refused in (other, str(outside), "parquet:/d.parquet#row=0"):
        with pytest.raises(ItemError):
            read(refused)
