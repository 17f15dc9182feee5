"""Item records: Redis's entries joined with the scores that went to storage.

A done item's scores and artifacts are written to the job's output as they settle, one
part per chunk attempt (`<job>/parts/<low>-<high>-<chunk>-<run>.jsonl`, a JSON line per
item, after the attempt's masks in one file, `<job>/masks/<same name>.npz`: jobs/masks.py),
before Redis marks the items done: an item is never done without its record, and
Redis keeps only what a live job needs (jobs/store.py). A part of an attempt that lost the
race to a second copy of its chunk holds a record Redis never counted; it names complete
artifacts all the same, and a reader takes, per done item, the record of the highest
attempt.

Readers stream the job in index order: the listing names each part's lowest and highest
index, so parts are read (a few at a time, in threads) as the index reaches them, and only
the records not yet reached are held.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from explainctl.io.storage import Storage
from explainctl.io.uri import key_uri, redacted
from explainctl.jobs.masks import encode as encode_masks
from explainctl.jobs.store import Entry, JobStore
from explainctl.spec.contracts import (
    ARTIFACT_NAMES,
    MASKS,
    PARTS,
    STAGED_INPUTS,
    artifact_key,
    chunk_masks_key,
    item_name,
    job_key,
    part_key,
    part_span,
)
from explainctl.spec.errors import ItemError, ServiceUnavailable
from explainctl.spec.results import ItemRecord

log = logging.getLogger("explainctl.records")

# Parts read ahead of the index; enough to hide a remote store's latency.
_READ_AHEAD = 16


def settle(
    store: JobStore,
    storage: Storage,
    job_id: str,
    chunk: int,
    changes: Iterable[tuple[int, str, dict | None]],
    masks: Mapping[int, np.ndarray] | None = None,
) -> bool:
    """Settle items: (index, state, fields). The masks of done items (index -> mask) are
    written as one chunk file, then their fields (attempt, artifacts, scores, the chunk
    file) as one part, then every item moves in Redis with a failed item's error; True if
    that finished the job. Raises ItemError when storage refuses either file, and then
    nothing moved."""
    changes = list(changes)
    done = sorted((index, fields) for index, state, fields in changes if state == "done")
    if done:
        run = secrets.token_hex(4)
        low, high = done[0][0], done[-1][0]
        held = {i: masks[i] for i, _ in done if masks and i in masks}
        if (data := encode_masks(held)) is not None:
            uri = storage.put(
                chunk_masks_key(job_id, low, high, chunk, run), data, "application/octet-stream"
            )
            done = [(i, {**(f or {}), "mask_file": uri} if i in held else f) for i, f in done]
        lines = "".join(json.dumps({"index": i, **(f or {})}) + "\n" for i, f in done)
        key = part_key(job_id, low, high, chunk, run)
        storage.put(key, lines.encode(), "application/x-ndjson")
    return store.settle(job_id, [(i, s, f if s == "failed" else None) for i, s, f in changes])


def item_records(
    store: JobStore, storage: Storage, job_id: str, states: set[str] | None = None
) -> Iterator[ItemRecord]:
    """Every item of a live job (those in `states` when given), in index order, with its
    scores once done."""
    done = _DoneRecords(storage, job_id)
    try:
        for entry in store.entries(job_id, states):
            fields = done.take(entry.index) if entry.state == "done" else {}
            yield _record(entry, fields, storage, job_id)
    finally:
        done.close()


def _record(entry: Entry, fields: dict, storage: Storage, job_id: str) -> ItemRecord:
    """The item's record: Redis's entry, over the fields its part holds."""
    held = {
        "staged": storage.uri(job_key(job_id, entry.staged)) if entry.staged else None,
        "index": entry.index,
        "uri": entry.uri,
        "target": entry.target,
        "label": entry.label,
        "item": item_name(entry.index, entry.uri),
        "state": entry.state,
        "attempts": entry.attempts,
        "error_code": entry.error_code,
        "error": entry.error,
    }
    scores = {k: v for k, v in fields.items() if k in ItemRecord.model_fields}
    return ItemRecord(**{**scores, **held})


def derived(record: ItemRecord, output: str, job_id: str) -> ItemRecord:
    """`record` as a reader may trust it: its folder and its artifacts' URIs derived from
    the job's output, the job, the item and the attempt (contracts.artifact_key), its URI
    redacted. Never the URIs a record gives: a manifest is a file anyone who can write the
    output can edit, and no reader (download, report, compare) may be sent by it to
    /etc/passwd or another bucket. Only names of ARTIFACT_NAMES are kept."""
    item = item_name(record.index, record.uri)
    artifacts = {
        name: key_uri(output, artifact_key(job_id, item, name, record.attempt))
        for name in record.artifacts
        if name in ARTIFACT_NAMES
    }
    update = {
        "uri": redacted(record.uri),
        "item": item,
        "artifacts": artifacts,
        "staged": own_file(record.staged, output, job_id, STAGED_INPUTS),
        "mask_file": own_file(record.mask_file, output, job_id, MASKS),
    }
    return record.model_copy(update=update)


def own_file(uri: str | None, output: str, job_id: str, folder: str) -> str | None:
    """`uri` if it names a file of this job's own `folder` (a staged input, a chunk's
    masks), else None: a record may not send a reader anywhere else."""
    if uri is None:
        return None
    name = uri.rsplit("/", 1)[-1]
    own = key_uri(output, job_key(job_id, f"{folder}/{name}"))
    return own if uri == own and re.fullmatch(r"[\w.-]+", name) else None


class _DoneRecords:
    """The records in a job's parts, taken in increasing index order."""

    def __init__(self, storage: Storage, job_id: str):
        self.storage = storage
        self.job_id = job_id
        # Listed on first use, so a reader of failed items only never lists them.
        self._parts: deque[str] | None = None
        self._reading: deque[tuple[int, Future]] = deque()
        self._held: dict[int, dict] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._missing = 0

    def take(self, index: int) -> dict:
        if self._parts is None:
            keys = self.storage.list(job_key(self.job_id, PARTS) + "/")
            self._parts = deque(sorted(keys, key=part_span))
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="parts")
        self._read_through(index)
        # Records of items Redis does not hold done (a copy that ran an item another copy
        # failed meanwhile) are passed by: let them go.
        for stale in [i for i in self._held if i < index]:
            del self._held[stale]
        fields = self._held.pop(index, None)
        if fields is None:
            self._missing += 1
            return {}
        return fields

    def _read_through(self, index: int) -> None:
        """Hold every record of the parts that start at or before `index`."""
        assert self._parts is not None and self._pool is not None
        while True:
            while self._parts and len(self._reading) < _READ_AHEAD:
                key = self._parts.popleft()
                self._reading.append((part_span(key)[0], self._pool.submit(self.storage.get, key)))
            if not self._reading or self._reading[0][0] > index:
                return
            _, future = self._reading.popleft()
            try:
                body = future.result()
            except ItemError as error:
                raise ServiceUnavailable(
                    f"cannot read the records of job {self.job_id}: {error.message}"
                ) from None
            for line in body.splitlines():
                if line.strip():
                    record = json.loads(line)
                    at = record.pop("index")
                    kept = self._held.get(at)
                    if kept is None or (record.get("attempt") or 0) > (kept.get("attempt") or 0):
                        self._held[at] = record

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._missing:
            log.warning(
                "job %s: %d done items have no record in storage", self.job_id, self._missing
            )
