"""The job records against a real Redis."""

import time

import pytest

from explainctl.contracts import ChunkItem, JobInfo, ModelSpec
from explainctl.errors import InvalidInput, JobNotFound
from explainctl.ids import new_job_id
from explainctl.methods import ExplainParams


def _job(store, n: int, chunk_size: int = 4) -> str:
    job_id = new_job_id()
    store.create(
        JobInfo(
            job_id=job_id,
            created=time.time(),
            model=ModelSpec(),
            params=ExplainParams(),
            output="/tmp/out",
            queue="explain",
            chunk_size=chunk_size,
        )
    )
    items = [ChunkItem(index=i, uri=f"/images/{i}.png") for i in range(n)]
    for start in range(0, n, chunk_size):
        store.add_chunk(job_id, items[start : start + chunk_size])
    return job_id


def test_counts_follow_items_and_the_job_finishes_exactly_once(job_store):
    job_id = _job(job_store, 6)
    assert job_store.status(job_id).state == "submitting"
    assert job_store.mark_submitted(job_id) is False
    status = job_store.status(job_id)
    assert (status.state, status.total) == ("queued", 6)
    assert job_store.begin(job_id, [0, 1, 2]) == [1, 1, 1]
    assert job_store.status(job_id).counts["running"] == 3
    assert job_store.settle(job_id, [(0, "done", {"mask_area": 0.1})]) is False
    assert (
        job_store.settle(job_id, [(1, "failed", {"error_code": "corrupt", "error": "bad"})])
        is False
    )
    assert job_store.settle(job_id, [(i, "done", {}) for i in (2, 3, 4)]) is False
    assert job_store.settle(job_id, [(5, "done", {})]) is True  # the change that finishes it
    status = job_store.status(job_id)
    assert status.counts == {"queued": 0, "running": 0, "done": 5, "failed": 1, "cancelled": 0}
    assert status.state == "completed_with_failures"
    assert status.finished_at is not None


def test_a_chunk_delivered_twice_counts_each_item_once(job_store):
    job_id = _job(job_store, 4)
    job_store.mark_submitted(job_id)
    for _ in range(2):  # the same chunk, run twice
        job_store.begin(job_id, [0, 1, 2, 3])
        finished = job_store.settle(job_id, [(i, "done", {"seconds": 1.0}) for i in range(4)])
    assert finished is False  # the second run changed nothing, so it finished nothing
    status = job_store.status(job_id)
    assert status.counts["done"] == 4 and sum(status.counts.values()) == 4
    assert [r.attempts for r in job_store.items(job_id)] == [1, 1, 1, 1]  # not run again


def test_final_states_are_final(job_store):
    job_id = _job(job_store, 1)
    job_store.settle(job_id, [(0, "failed", {"error_code": "x", "error": "y"})])
    job_store.settle(job_id, [(0, "done", {})])
    job_store.begin(job_id, [0])
    assert [r.state for r in job_store.items(job_id)] == ["failed"]


def test_job_finishing_before_submission_ends_is_noticed_by_submission(job_store):
    job_id = _job(job_store, 2)
    assert job_store.settle(job_id, [(0, "done", {}), (1, "done", {})]) is False
    assert job_store.mark_submitted(job_id) is True
    assert job_store.status(job_id).state == "completed"


def test_items_come_back_in_order_with_their_results(job_store):
    job_id = _job(job_store, 2500, chunk_size=500)
    job_store.settle(job_id, [(1234, "done", {"mask_area": 0.25, "artifacts": {"a": "s3://b/k"}})])
    records = list(job_store.items(job_id))
    assert [r.index for r in records] == list(range(2500))
    assert records[1234].mask_area == 0.25 and records[1234].artifacts == {"a": "s3://b/k"}
    assert records[7].item == "000007-7"
    assert [r.index for r in job_store.items(job_id, {"done"})] == [1234]


def test_cancel_and_reopen(job_store):
    job_id = _job(job_store, 5)
    job_store.mark_submitted(job_id)
    job_store.begin(job_id, [0])
    job_store.settle(job_id, [(1, "failed", {"error_code": "corrupt", "error": "bad"})])
    assert job_store.cancel(job_id) == 3  # items 2, 3, 4 were queued
    assert job_store.is_cancelled(job_id)
    assert job_store.status(job_id).state == "running"  # item 0 still runs
    job_store.settle(job_id, [(0, "done", {})])
    assert job_store.status(job_id).state == "cancelled"
    reopened = job_store.reopen(job_id, {"failed"})
    assert [i.index for i in reopened] == [1]
    status = job_store.status(job_id)
    assert status.counts["queued"] == 1 and status.counts["failed"] == 0
    assert not status.cancelled and status.finished_at is None
    assert [r.attempts for r in job_store.items(job_id, {"queued"})] == [0]


def test_unknown_and_malformed_job_ids(job_store):
    with pytest.raises(JobNotFound):
        job_store.status(new_job_id())
    with pytest.raises(InvalidInput):
        job_store.status("../../etc")


def test_recent_lists_newest_first(job_store):
    first, second = _job(job_store, 1), _job(job_store, 1)
    recent = job_store.recent(50)
    assert recent.index(second) < recent.index(first)


def test_a_second_copy_of_a_chunk_skips_settled_items(job_store):
    job_id = _job(job_store, 3)
    job_store.mark_submitted(job_id)
    assert job_store.begin(job_id, [0, 1, 2]) == [1, 1, 1]
    job_store.settle(job_id, [(0, "done", {})])
    # The copy sees item 0 settled (None) and counts attempts only for what it runs.
    assert job_store.begin(job_id, [0, 1, 2]) == [None, 2, 2]


def test_cancelling_never_discards_a_started_item(job_store):
    job_id = _job(job_store, 2)
    job_store.mark_submitted(job_id)
    job_store.begin(job_id, [0])
    job_store.settle(job_id, [(0, "cancelled", {}), (1, "cancelled", {})], mode="queued-only")
    assert [r.state for r in job_store.items(job_id)] == ["running", "cancelled"]
