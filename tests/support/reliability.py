"""The reliability table: for each fault, what was submitted, done, failed as expected,
lost and duplicated. Rows are collected by the fault tests and printed at the end of the
run (pytest_terminal_summary in conftest)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from explainctl.io.sources import read_uri
from explainctl.io.storage import open_storage
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ITEMS_JSONL, RESULT_JSON, job_key
from explainctl.spec.results import SCORE_FIELDS

ROWS: list[Row] = []


@dataclass
class Row:
    fault: str
    submitted: int
    done: int
    failed_as_expected: int
    lost: int
    duplicated: int
    disagreeing: int = 0  # done items whose result.json in storage is not their record

    def markdown(self) -> str:
        return (
            f"| {self.fault} | {self.submitted} | {self.done} | {self.failed_as_expected} "
            f"| {self.lost} | {self.duplicated} | {self.disagreeing} |"
        )


HEADER = (
    "| fault or input | submitted | done | failed as expected | lost | duplicated "
    "| record ≠ storage |\n|---|---|---|---|---|---|---|"
)


def _agrees(record) -> bool:
    """result.json, as stored, says what the record says: same attempt, same scores."""
    stored = json.loads(read_uri(record.artifacts[RESULT_JSON], max_bytes=1 << 20))
    return stored.get("attempt") == record.attempt and all(
        stored.get(name) == getattr(record, name) for name in SCORE_FIELDS
    )


def audit(store: JobStore, job_id: str, fault: str, expected_failed: set[int] = frozenset(),
          expected_cancelled: int = 0) -> Row:  # fmt: skip
    """Check a settled job against its records, its manifest and its artifacts."""
    status = store.status(job_id)
    records = list(store.items(job_id))
    failed = {r.index for r in records if r.state == "failed"}
    done = [r for r in records if r.state == "done"]
    missing_artifacts = disagreeing = 0
    for record in done:
        try:
            for uri in record.artifacts.values():
                read_uri(uri, max_bytes=512 * 1024 * 1024)
        except Exception:  # any unreadable artifact counts as lost
            missing_artifacts += 1
            continue
        disagreeing += not _agrees(record)
    settled = status.counts["done"] + status.counts["failed"] + status.counts["cancelled"]
    unsettled = status.total - settled
    manifest = open_storage(status.info.output).get(job_key(job_id, ITEMS_JSONL)).splitlines()
    indices = [json.loads(line)["index"] for line in manifest if line.strip()]
    lost = unsettled + missing_artifacts + (status.total - len(set(indices)))
    lost += len(failed - expected_failed) + max(0, status.counts["cancelled"] - expected_cancelled)
    duplicated = (sum(status.counts.values()) - status.total) + (len(indices) - len(set(indices)))
    row = Row(fault, status.total, len(done), len(failed & expected_failed), lost, duplicated,
              disagreeing)  # fmt: skip
    ROWS.append(row)
    return row


def table() -> str:
    return "\n".join([HEADER, *(row.markdown() for row in ROWS)])


def write(path: str | None) -> None:
    if path and ROWS:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(table() + "\n")
