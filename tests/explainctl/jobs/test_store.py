"""The job records against a real Redis."""

import time

import pytest

from explainctl.jobs.keys import job_key
from explainctl.jobs.signing import SigningKeys
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import (
    STATE_CODES,
    TERMINAL_STATES,
    ChunkItem,
    JobInfo,
    ModelSpec,
)
from explainctl.spec.errors import InvalidInput, JobNotFound, RecordTampered, ServiceUnavailable
from explainctl.spec.ids import new_job_id
from explainctl.spec.methods import ExplainParams


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
    assert job_store.settle(job_id, [(0, "done", None)]) is False
    assert (
        job_store.settle(job_id, [(1, "failed", {"error_code": "corrupt", "error": "bad"})])
        is False
    )
    assert job_store.settle(job_id, [(i, "done", None) for i in (2, 3, 4)]) is False
    assert job_store.settle(job_id, [(5, "done", None)]) is True  # the change that finishes it
    status = job_store.status(job_id)
    assert status.counts == {"queued": 0, "running": 0, "done": 5, "failed": 1, "cancelled": 0}
    assert status.state == "completed_with_failures"
    assert status.finished_at is not None


def test_release_puts_running_items_back_without_their_attempt(job_store):
    """A worker whose environment failed hands items back uncharged: the next start is
    attempt 1 again; an item not running is left as it is."""
    job_id = _job(job_store, 3)
    assert job_store.begin(job_id, [0, 1]) == [1, 1]
    job_store.settle(job_id, [(1, "done", None)])
    assert job_store.release(job_id, [0, 1, 2]) == [0]
    assert job_store.states(job_id, [0, 1, 2]) == ["queued", "done", "queued"]
    assert job_store.status(job_id).counts["running"] == 0
    assert job_store.begin(job_id, [0]) == [1]


def test_a_chunk_delivered_twice_counts_each_item_once(job_store):
    job_id = _job(job_store, 4)
    job_store.mark_submitted(job_id)
    for _ in range(2):  # the same chunk, run twice
        job_store.begin(job_id, [0, 1, 2, 3])
        finished = job_store.settle(job_id, [(i, "done", None) for i in range(4)])
    assert finished is False  # the second run changed nothing, so it finished nothing
    status = job_store.status(job_id)
    assert status.counts["done"] == 4 and sum(status.counts.values()) == 4
    assert [r.attempts for r in job_store.entries(job_id)] == [1, 1, 1, 1]  # not run again


def test_final_states_are_final(job_store):
    job_id = _job(job_store, 1)
    job_store.settle(job_id, [(0, "failed", {"error_code": "x", "error": "y"})])
    job_store.settle(job_id, [(0, "done", None)])
    job_store.begin(job_id, [0])
    assert [r.state for r in job_store.entries(job_id)] == ["failed"]


def test_job_finishing_before_submission_ends_is_noticed_by_submission(job_store):
    job_id = _job(job_store, 2)
    assert job_store.settle(job_id, [(0, "done", None), (1, "done", None)]) is False
    assert job_store.mark_submitted(job_id) is True
    assert job_store.status(job_id).state == "completed"


def test_entries_come_back_in_order_from_compact_records(job_store):
    """State and attempts are a byte per item, inputs a field per chunk: Redis holds no
    per-item hash field but a failed item's error."""
    job_id = _job(job_store, 2500, chunk_size=500)
    job_store.begin(job_id, [1234, 2000])
    failure = {"error_code": "corrupt", "error": "bad"}
    job_store.settle(job_id, [(1234, "done", None), (2000, "failed", failure)])
    entries = list(job_store.entries(job_id))
    assert [e.index for e in entries] == list(range(2500))
    assert (entries[7].uri, entries[7].state, entries[7].attempts) == ("/images/7.png", "queued", 0)
    assert (entries[1234].state, entries[1234].attempts, entries[1234].error) == ("done", 1, None)
    assert (entries[2000].error_code, entries[2000].error) == ("corrupt", "bad")
    assert [e.index for e in job_store.entries(job_id, {"done", "failed"})] == [1234, 2000]
    redis = job_store.redis
    assert redis.strlen(job_key(job_id, "state")) == 2500
    assert redis.hlen(job_key(job_id, "items")) == 5
    assert redis.hkeys(job_key(job_id, "errors")) == ["2000"]  # the scores are not here
    assert job_store.chunk_items(job_id, 498, 502).items[0].uri == "/images/498.png"
    assert [i.index for i in job_store.chunk_items(job_id, 498, 502).items] == [498, 499, 500, 501]


def test_a_chunk_records_consecutive_items_only(job_store):
    job_id = _job(job_store, 0)
    with pytest.raises(ValueError):
        job_store.add_chunk(job_id, [ChunkItem(index=i, uri="/a.png") for i in (0, 2)])
    with pytest.raises(ValueError):
        job_store.settle(job_id, [(0, "running", None)])
    with pytest.raises(ValueError, match="jobs.records"):  # its scores would be lost
        job_store.settle(job_id, [(0, "done", {"mask_area": 0.1})])


def test_cancel_and_reopen(job_store):
    job_id = _job(job_store, 5)
    job_store.mark_submitted(job_id)
    job_store.begin(job_id, [0])
    job_store.settle(job_id, [(1, "failed", {"error_code": "corrupt", "error": "bad"})])
    assert job_store.cancel(job_id) == 3  # items 2, 3, 4 were queued
    assert job_store.is_cancelled(job_id)
    assert job_store.status(job_id).state == "running"  # item 0 still runs
    job_store.settle(job_id, [(0, "done", None)])
    assert job_store.status(job_id).state == "cancelled"
    reopened = job_store.reopen(job_id, {"failed"})
    assert [i.index for i in reopened.items] == [1] and reopened.tampered == []
    status = job_store.status(job_id)
    assert status.counts["queued"] == 1 and status.counts["failed"] == 0
    assert not status.cancelled and status.finished_at is None
    assert [r.attempts for r in job_store.entries(job_id, {"queued"})] == [0]


def test_cancelling_a_finished_job_changes_nothing(job_store):
    job_id = _job(job_store, 2)
    job_store.mark_submitted(job_id)
    job_store.settle(job_id, [(0, "done", None), (1, "failed", {"error_code": "x", "error": "y"})])
    cancelled = job_store.cancel(job_id)
    status = job_store.status(job_id)
    assert (status.state, status.cancelled) == ("completed_with_failures", False)
    assert cancelled is None  # nothing was cancelled: the job had finished


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
    job_store.settle(job_id, [(0, "done", None)])
    # The copy sees item 0 settled (None) and counts attempts only for what it runs.
    assert job_store.begin(job_id, [0, 1, 2]) == [None, 2, 2]


def test_cancelling_never_discards_a_started_item(job_store):
    job_id = _job(job_store, 2)
    job_store.mark_submitted(job_id)
    job_store.begin(job_id, [0])
    job_store.settle(job_id, [(0, "cancelled", None), (1, "cancelled", None)], mode="queued-only")
    assert [r.state for r in job_store.entries(job_id)] == ["running", "cancelled"]


def test_the_scripts_are_given_the_declared_terminal_states(job_store):
    given = []

    def recording(bound):
        def call(keys, args, client=None):
            given.append(args)
            return bound(keys=keys, args=args, client=client)

        return call

    job_store._transition = recording(job_store._transition)
    job_store._submitted = recording(job_store._submitted)
    job_id = _job(job_store, 3)
    job_store.begin(job_id, [0, 1])
    job_store.settle(job_id, [(0, "done", None), (1, "failed", {"error_code": "x", "error": "y"})])
    job_store.settle(job_id, [(2, "cancelled", {})], mode="queued-only")
    assert job_store.mark_submitted(job_id) is True
    assert [r.index for r in job_store.reopen(job_id, {"failed", "cancelled"}).items] == [1, 2]
    assert len(given) == 2 + 2 + 1 + 1 + 2

    def named(args: dict, field: str) -> set[str]:
        if "codes" not in args:  # submitted.lua: the names themselves
            return set(args[field].split(","))
        name_of = dict(zip(args["codes"], args["states"].split(","), strict=True))
        return {name_of[code] for code in args[field]}

    for args in given:
        assert named(args, "terminal") == TERMINAL_STATES
    retry = [args for args in given if args.get("mode") == "retry"]
    assert named(retry[0], "reopenable") == TERMINAL_STATES - {"done"}
    assert {args["new"] for args in given if "codes" in args} <= set(STATE_CODES.values())


@pytest.mark.parametrize("persistent", [False, True])
def test_check_server_warns_when_redis_persists_nothing(tmp_path, persistent):
    from tests.support.services import RedisServer

    server = RedisServer(tmp_path / "redis", persistent=persistent).start()
    try:
        warnings = JobStore.connect(server.url).check_server()
    finally:
        server.stop()
    assert bool(warnings) is not persistent
    assert all("persists nothing" in warning for warning in warnings)


def test_check_server_refuses_every_evicting_policy(tmp_path):
    from tests.support.services import RedisServer

    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        store = JobStore.connect(server.url)
        for policy in ("allkeys-lru", "volatile-ttl", "allkeys-random"):
            store.redis.config_set("maxmemory-policy", policy)
            with pytest.raises(ServiceUnavailable, match=f"maxmemory-policy {policy}"):
                store.check_server()
    finally:
        server.stop()


def test_the_first_workers_resolved_model_is_kept_in_the_record(job_store):
    from explainctl.spec.contracts import ResolvedModel

    job_id = _job(job_store, 2)
    assert job_store.status(job_id).as_json()["resolved_model"] is None
    first = ResolvedModel(source="timm", image_size=160, mean=(0.5,) * 3, std=(0.5,) * 3)
    second = first.model_copy(update={"image_size": 224})
    assert job_store.record_resolved(job_id, first) is True
    assert job_store.record_resolved(job_id, second) is False
    status = job_store.status(job_id)
    assert status.resolved == first
    # job.json's document carries it and reads back.
    assert type(status).from_document(status.document()).resolved == first
    # A job whose records are gone is not brought back by a late worker.
    assert job_store.record_resolved(new_job_id(), first) is False


def test_targets_and_labels_travel_with_their_items_and_old_records_still_read(job_store):
    job_id = _job(job_store, 0)
    items = [
        ChunkItem(index=0, uri="/a.png"),
        ChunkItem(index=1, uri="/b.png", target="7"),
        ChunkItem(index=2, uri="/c.png", label="tabby"),
        ChunkItem(index=3, uri="/d.png", target="top1", label="3"),
    ]
    job_store.add_chunk(job_id, items)
    assert job_store.chunk_items(job_id, 0, 4).items == items
    assert job_store.items_at(job_id, [2]).items == [items[2]]
    assert [(e.target, e.label) for e in job_store.entries(job_id)] == [
        (None, None), ("7", None), (None, "tabby"), ("top1", "3")]  # fmt: skip
    assert [e.item for e in job_store.entries(job_id)] == items
    # A record written before labels existed: [uri] and [uri, target] only.
    job_store.redis.hset(job_key(job_id, "items"), "0", _stored([["/a.png"], ["/b.png", "7"]]))
    assert [(e.uri, e.target, e.label) for e in job_store.entries(job_id)][:2] == [
        ("/a.png", None, None), ("/b.png", "7", None)]  # fmt: skip


def _stored(plain: list) -> str:
    import base64
    import json
    import zlib

    return base64.b64encode(zlib.compress(json.dumps(plain).encode())).decode()


def test_redis_holds_the_redacted_uri(job_store):
    job_id = new_job_id()
    info = JobInfo(job_id=job_id, created=time.time(), model=ModelSpec(), params=ExplainParams(),
                   output="/tmp/out", queue="explain", chunk_size=2)  # fmt: skip
    job_store.create(info)
    job_store.add_chunk(job_id, [ChunkItem(index=0, uri="https://h/a.png?X-Amz-Signature=f00d"),
                                 ChunkItem(index=1, uri="s3://b/odd?key#.png")])  # fmt: skip
    assert [e.uri for e in job_store.entries(job_id)] == ["https://h/a.png", "s3://b/odd?key#.png"]
    assert job_store.chunk_items(job_id, 0, 2).items[0].uri == "https://h/a.png"


OLD, NEW = b"old-key-0123456789abcdef", b"new-key-0123456789abcdef"


def _keyed(job_store: JobStore, *secrets: bytes) -> JobStore:
    return JobStore(job_store.redis, keys=SigningKeys(secrets))


def test_records_written_with_a_key_carry_one_mac_a_chunk_and_read_back_verified(job_store):
    store = _keyed(job_store, NEW)
    job_id = _job(store, 10)
    macs = store.redis.hgetall(job_key(job_id, "macs"))
    assert sorted(macs) == ["0", "4", "8", "info"]
    assert store.verified_info(job_id).job_id == job_id
    recorded = store.items_at(job_id, range(10))
    assert [i.uri for i in recorded.items] == [f"/images/{i}.png" for i in range(10)]
    assert recorded.tampered == []
    # Written without a key, nothing is added and nothing is checked on reading.
    plain = _job(job_store, 4)
    assert not job_store.redis.exists(job_key(plain, "macs"))
    assert len(job_store.items_at(plain, range(4)).items) == 4


def test_items_edited_in_redis_are_never_read_back_to_be_sent(job_store):
    store = _keyed(job_store, NEW)
    job_id = _job(store, 10)
    genuine = store.redis.hget(job_key(job_id, "items"), "4")  # the second chunk, 4..7
    store.redis.hset(job_key(job_id, "items"), "4", _stored([["/etc/passwd"]] * 4))
    recorded = store.items_at(job_id, [1, 5, 9])
    assert [i.index for i in recorded.items] == [1, 9] and recorded.tampered == [5]
    assert store.chunk_items(job_id, 0, 10).tampered == [4, 5, 6, 7]
    # A MAC copied from another chunk does not vouch for this one.
    macs = job_key(job_id, "macs")
    store.redis.hset(macs, "4", store.redis.hget(macs, "0"))
    assert store.chunk_items(job_id, 4, 8).tampered == [4, 5, 6, 7]
    # A genuine record whose MAC was deleted is refused too where keys are set, or deleting
    # the MAC would pass any edit.
    store.redis.hset(job_key(job_id, "items"), "4", genuine)
    store.redis.hdel(macs, "4")
    assert store.items_at(job_id, [6]).tampered == [6]
    # The last chunk's own length is not trusted: its items are bounded by the reader's.
    store.redis.hset(job_key(job_id, "items"), "8", _stored([["/etc/shadow"]]))
    assert store.items_at(job_id, [8, 9]).tampered == [8, 9]


def test_a_retry_reopens_tampered_items_only_to_fail_them_with_their_code(job_store):
    store = _keyed(job_store, NEW)
    job_id = _job(store, 8)
    store.mark_submitted(job_id)
    failure = {"error_code": "corrupt", "error": "bad"}
    store.settle(job_id, [(i, "failed", failure) for i in range(8)])
    store.redis.hset(job_key(job_id, "items"), "0", _stored([["/etc/passwd"]] * 4))
    reopened = store.reopen(job_id, {"failed"})
    assert [i.index for i in reopened.items] == [4, 5, 6, 7]
    assert reopened.tampered == [0, 1, 2, 3]
    assert store.fail_tampered(job_id, reopened.tampered) is False  # 4..7 are queued
    codes = {e.index: e.error_code for e in store.entries(job_id)}
    assert [codes[i] for i in range(8)] == ["record-tampered"] * 4 + [None] * 4
    # Read to be shown, not sent, the record is as Redis holds it.
    assert next(store.entries(job_id)).uri == "/etc/passwd"


def test_a_job_info_edited_in_redis_or_without_a_mac_is_refused(job_store):
    store = _keyed(job_store, NEW)
    job_id = _job(store, 4)
    meta = job_key(job_id, "meta")
    raw = store.redis.hget(meta, "info")
    store.redis.hset(meta, "info", raw.replace('"/tmp/out"', '"s3://elsewhere/x"'))
    with pytest.raises(RecordTampered, match="does not verify"):
        store.verified_info(job_id)
    assert store.info(job_id).output == "s3://elsewhere/x"  # shown as it is, never sent
    store.redis.hset(meta, "info", raw)
    assert store.verified_info(job_id).output == "/tmp/out"
    # Written by a client without the key (or before records carried MACs): refused too,
    # or deleting the MAC would pass any edit.
    plain = _job(job_store, 4)
    with pytest.raises(RecordTampered, match="carries no MAC"):
        store.verified_info(plain)
    assert store.items_at(plain, [0]).tampered == [0]


def test_records_of_a_key_being_rotated_out_verify_while_it_is_listed(job_store):
    job_id = _job(_keyed(job_store, OLD), 6)
    rotating = _keyed(job_store, NEW, OLD)
    assert rotating.verified_info(job_id).job_id == job_id
    assert len(rotating.items_at(job_id, range(6)).items) == 6
    dropped = _keyed(job_store, NEW)
    with pytest.raises(RecordTampered):
        dropped.verified_info(job_id)
    assert dropped.items_at(job_id, range(6)).tampered == list(range(6))
