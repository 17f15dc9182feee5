"""run_chunk against a real Redis: what a failure of the worker's environment does to the
items (handed back uncharged), and what it does once enough workers met it (they fail)."""

import time

import pytest
from PIL import Image

from explainctl.config import Settings
from explainctl.jobs.keys import job_key
from explainctl.jobs.signing import SigningKeys
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ChunkItem, ChunkPayload, JobInfo, ModelSpec
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams
from explainctl_worker.service.chunk import HandBack, WorkerContext, run_chunk
from tests.support.models import HALF, evidence_image


def _chunk(store: JobStore, tmp_path, output: str, n: int = 2) -> ChunkPayload:
    images = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(evidence_image()).save(path)
        images.append(ChunkItem(index=i, uri=str(path)))
    spec = ModelSpec(name="tests.support.models:evidence_detector", mean=HALF, std=HALF)
    params = ExplainParams(iterations=5, image_size=64, mask_size=8, precision="fp32")
    info = JobInfo(job_id=new_job_id(), created=time.time(), model=spec, params=params,
                   output=output, queue="explain", chunk_size=n)  # fmt: skip
    store.create(info)
    store.add_chunk(info.job_id, images)
    store.mark_submitted(info.job_id)
    return ChunkPayload(job_id=info.job_id, chunk=0, model=spec, params=params,
                        output=output, items=images)  # fmt: skip


def _context(store: JobStore, **settings) -> WorkerContext:
    return WorkerContext(settings=Settings(allowed_models=("*",), **settings), store=store)


def test_storage_a_worker_cannot_write_hands_the_items_back_uncharged(job_store, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    # No directory can be made under a file, whoever runs the test (root included).
    payload = _chunk(job_store, tmp_path, str(tmp_path / "a-file" / "out"))
    with pytest.raises(HandBack) as back:
        run_chunk(payload, _context(job_store))
    assert [item.index for item in back.value.items] == [0, 1]
    records = list(job_store.entries(payload.job_id))
    assert [(r.state, r.attempts) for r in records] == [("queued", 0), ("queued", 0)]


def test_once_enough_workers_handed_them_back_the_items_fail(job_store, tmp_path):
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    last = payload.model_copy(update={"handed_back": 2})
    refusing = Settings(allowed_models=("vgg19",), max_hand_backs=2)
    run_chunk(last, WorkerContext(settings=refusing, store=job_store))
    records = list(job_store.entries(payload.job_id))
    assert {(r.state, r.error_code) for r in records} == {("failed", "model-not-allowed")}
    assert job_store.status(payload.job_id).state == "completed_with_failures"


def test_a_model_the_worker_refuses_is_handed_back_before_anything_starts(job_store, tmp_path):
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    refusing = WorkerContext(settings=Settings(allowed_models=("vgg19",)), store=job_store)
    with pytest.raises(HandBack) as back:
        run_chunk(payload, refusing)
    assert back.value.code == "model-not-allowed" and len(back.value.items) == 2
    assert {r.attempts for r in job_store.entries(payload.job_id)} == {0}
    # A worker that accepts it then explains both, as their first attempt.
    run_chunk(payload.model_copy(update={"handed_back": 1}), _context(job_store))
    records = list(job_store.entries(payload.job_id))
    assert [(r.state, r.attempts) for r in records] == [("done", 1), ("done", 1)]


def test_a_chunk_out_of_time_starts_no_more_items_and_hands_the_rest_back(job_store, tmp_path):
    """Past its admission time a chunk starts nothing new (the first item always starts):
    the rest go back uncharged, with no strike, and a later run finishes them."""
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"), n=4)
    one_slot = _context(job_store, slots=1)
    with pytest.raises(HandBack) as back:
        run_chunk(payload, one_slot, admit_until=time.monotonic())
    assert not back.value.strike
    assert [item.index for item in back.value.items] == [1, 2, 3]
    records = list(job_store.entries(payload.job_id))
    assert [(r.state, r.attempts) for r in records] == [
        ("done", 1), ("queued", 0), ("queued", 0), ("queued", 0)
    ]  # fmt: skip
    run_chunk(payload.model_copy(update={"items": back.value.items}), one_slot)
    final = list(job_store.entries(payload.job_id))
    assert [(r.state, r.attempts) for r in final] == [("done", 1)] * 4
    assert job_store.status(payload.job_id).state == "completed"


def test_a_device_error_hands_the_items_back_and_the_worker_must_leave(job_store, tmp_path):
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    broken = payload.model_copy(
        update={"model": ModelSpec(name="tests.support.models:broken_device_classifier")}
    )
    with pytest.raises(HandBack) as back:
        run_chunk(broken, _context(job_store))
    assert back.value.code == "device-error" and back.value.fatal
    assert "illegal memory access" in back.value.message
    entries = list(job_store.entries(payload.job_id))
    assert [(e.state, e.attempts) for e in entries] == [("queued", 0), ("queued", 0)]


def test_items_that_broke_enough_devices_fail_and_old_records_are_left_alone(job_store, tmp_path):
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    last = payload.model_copy(update={
        "model": ModelSpec(name="tests.support.models:broken_device_classifier"),
        "handed_back": 8,
    })  # fmt: skip
    run_chunk(last, _context(job_store, max_hand_backs=8))
    assert {e.error_code for e in job_store.entries(payload.job_id)} == {"device-error"}
    # A job recorded before protocol 2: nothing is read or written.
    other = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    job_store.redis.hdel(f"explainctl:job:{other.job_id}:meta", "protocol")
    run_chunk(other, _context(job_store))
    assert job_store.states(other.job_id, [0, 1]) == ["queued", "queued"]


def test_an_output_outside_the_workers_reach_is_handed_back_untouched(job_store, tmp_path):
    outside = tmp_path / "elsewhere"
    payload = _chunk(job_store, tmp_path, str(outside))
    fenced = _context(job_store, allowed_outputs=(str(tmp_path / "outputs"),))
    with pytest.raises(HandBack) as back:
        run_chunk(payload, fenced)
    assert back.value.code == "output-not-allowed" and len(back.value.items) == 2
    assert {(r.state, r.attempts) for r in job_store.entries(payload.job_id)} == {("queued", 0)}
    # The last worker refusing it fails the items in Redis, and writes nothing there still.
    last = payload.model_copy(update={"handed_back": 8})
    run_chunk(last, fenced)
    records = list(job_store.entries(payload.job_id))
    assert {(r.state, r.error_code) for r in records} == {("failed", "output-not-allowed")}
    assert not outside.exists()


def test_a_weights_file_is_loaded_only_where_the_allow_list_names_it(job_store, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read")
    payload = _chunk(job_store, tmp_path, str(tmp_path / "out"))
    payload = payload.model_copy(update={"model": payload.model.model_copy(
        update={"weights": str(weights)})})  # fmt: skip
    with pytest.raises(HandBack) as back:
        run_chunk(payload, _context(job_store))
    assert back.value.code == "weights-not-allowed"
    # A link inside an allowed folder is judged by where it leads.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.pt").symlink_to(weights)
    linked = payload.model.model_copy(update={"weights": str(tmp_path / "models" / "w.pt")})
    context = _context(job_store, allowed_weights=(f"{tmp_path}/models/*.pt",))
    assert not context.weights_allowed(linked)
    assert context.weights_allowed(linked.model_copy(update={"weights": None}))
    assert _context(job_store, allowed_weights=(f"{tmp_path}/*.pt",)).weights_allowed(linked)


def test_a_job_record_edited_in_redis_fails_its_items_before_the_model_loads(job_store, tmp_path):
    """The job's class names are not in the signed message: a worker holding keys reads
    them from a record whose MAC verifies, or fails the items with `record-tampered`."""
    keys = SigningKeys((b"worker-key-0123456789abcdef",))
    store = JobStore(job_store.redis, keys=keys)
    payload = _chunk(store, tmp_path, str(tmp_path / "out"))
    meta = job_key(payload.job_id, "meta")
    raw = store.redis.hget(meta, "info")
    store.redis.hset(meta, "info", raw.replace('"labels":null', '"labels":["forged"]'))
    context = WorkerContext(settings=Settings(allowed_models=("*",)), store=store)
    run_chunk(payload, context)
    records = list(store.entries(payload.job_id))
    assert {(r.state, r.error_code) for r in records} == {("failed", "record-tampered")}
    assert store.status(payload.job_id).state == "completed_with_failures"
    assert not context.models._models  # nothing loaded
    assert not any((tmp_path / "out").rglob("*.png"))  # nothing explained
