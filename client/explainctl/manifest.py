"""The job manifest in the output storage (job.json and items.jsonl), so results outlive Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator

from explainctl.contracts import ITEMS_JSONL, JOB_JSON, JobInfo, job_key
from explainctl.errors import ItemError, JobNotFound, ServiceUnavailable
from explainctl.ids import check_job_id
from explainctl.item import ItemRecord
from explainctl.job import JobStatus, JobStore
from explainctl.storage import Storage


def write_job_json(storage: Storage, info: JobInfo, status: JobStatus | None = None) -> str:
    body = {"info": info.model_dump(mode="json"), "status": status.as_json() if status else None}
    data = (json.dumps(body, indent=2) + "\n").encode()
    return storage.put(job_key(info.job_id, JOB_JSON), data, "application/json")


def write_manifest(store: JobStore, storage: Storage, job_id: str) -> str:
    """job.json with the final status, and one items.jsonl line per item; returns its URI."""
    status = store.status(job_id)
    lines = (record.model_dump_json(exclude_none=True) + "\n" for record in store.items(job_id))
    uri = storage.put(job_key(job_id, ITEMS_JSONL), "".join(lines).encode(), "application/x-ndjson")
    write_job_json(storage, status.info, status)
    return uri


def read_manifest(storage: Storage, job_id: str) -> tuple[dict, Iterator[ItemRecord]]:
    """job.json and the items of a job whose Redis records are gone."""
    check_job_id(job_id)
    try:
        job = json.loads(storage.get(job_key(job_id, JOB_JSON)))
        raw = storage.get(job_key(job_id, ITEMS_JSONL))
    except ItemError as error:
        if error.code != "not-found":
            raise ServiceUnavailable(f"cannot read the manifest: {error.message}") from None
        raise JobNotFound(f"no job {job_id} in Redis nor a manifest under {storage.root}") from None
    records = (ItemRecord.model_validate_json(line) for line in raw.splitlines() if line.strip())
    return job, records
