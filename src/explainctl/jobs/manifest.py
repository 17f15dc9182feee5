"""The job manifest in the output storage (job.json and items.jsonl), so results outlive Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator

from explainctl.io.storage import Storage
from explainctl.jobs.records import item_records
from explainctl.jobs.store import JobStatus, JobStore
from explainctl.spec.contracts import ITEMS_JSONL, JOB_JSON, JobInfo, job_key
from explainctl.spec.errors import ItemError, JobNotFound, ServiceUnavailable
from explainctl.spec.ids import check_job_id
from explainctl.spec.results import ItemRecord


def write_job_json(storage: Storage, info: JobInfo, status: JobStatus | None = None) -> str:
    body = status.document() if status else {"info": info.model_dump(mode="json"), "status": None}
    data = (json.dumps(body, indent=2) + "\n").encode()
    return storage.put(job_key(info.job_id, JOB_JSON), data, "application/json")


def _batched(lines: Iterator[str], size: int = 1 << 20) -> Iterator[bytes]:
    """Lines joined into blocks of about `size` bytes, so a million small writes are few."""
    block: list[str] = []
    length = 0
    for line in lines:
        block.append(line)
        length += len(line)
        if length >= size:
            yield "".join(block).encode()
            block, length = [], 0
    if block:
        yield "".join(block).encode()


def write_manifest(store: JobStore, storage: Storage, job_id: str) -> str:
    """job.json with the final status, and one items.jsonl line per item, streamed from
    Redis and the job's parts to storage in constant memory; returns the URI of
    items.jsonl."""
    store.info(job_id)  # JobNotFound once the records expired: never overwrite the manifest
    status = store.status(job_id)
    records = item_records(store, storage, job_id)
    lines = (record.model_dump_json(exclude_none=True) + "\n" for record in records)
    uri = storage.put_stream(job_key(job_id, ITEMS_JSONL), _batched(lines), "application/x-ndjson")
    write_job_json(storage, status.info, status)
    store.seal(job_id)  # only now may the records expire: the manifest holds the job
    return uri


def read_manifest(storage: Storage, job_id: str) -> tuple[dict, Iterator[ItemRecord]]:
    """job.json and the items of a job whose Redis records are gone."""
    check_job_id(job_id)
    try:
        job = json.loads(storage.get(job_key(job_id, JOB_JSON)))
        found = storage.exists(job_key(job_id, ITEMS_JSONL))
    except ItemError as error:
        if error.code != "not-found":
            raise ServiceUnavailable(f"cannot read the manifest: {error.message}") from None
        found = False
    if not found:
        raise JobNotFound(f"no job {job_id} in Redis nor a manifest under {storage.root}")
    lines = storage.lines(job_key(job_id, ITEMS_JSONL))
    records = (ItemRecord.model_validate_json(line) for line in lines if line.strip())
    return job, records
