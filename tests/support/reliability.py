"""The reliability table: for each fault, what was submitted, done, failed as expected,
lost and re-executed. Rows are collected by the fault tests and printed at the end of the
run (pytest_terminal_summary in conftest).

"lost" is counted against the inputs the test submitted, an oracle outside Redis (as
Jepsen's checkers keep their own history): an input with no settled record in the
manifest is lost, whatever Redis's own counters say. Counting an item twice is not a
column: `audit` fails the test outright.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from explainctl.io.sources import read_uri
from explainctl.io.storage import open_storage
from explainctl.jobs.records import item_records
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import ITEMS_JSONL, RESULT_JSON, job_key
from explainctl.spec.results import SCORE_FIELDS

ROWS: list[Row] = []
# Suites that could not run here, with why: the table says so instead of growing shorter.
SKIPPED: list[tuple[str, str]] = []
# The running test's place (file, line), set by conftest: rows are ordered by it, so the
# table reads the same whether one process ran the suite or several (pytest-xdist).
RUNNING: tuple[str, int] = ("", 0)


@dataclass
class Row:
    fault: str
    submitted: int
    done: int
    failed_as_expected: int
    lost: int
    re_executed: int  # items started more than once: the cost a fault adds on a GPU
    disagreeing: int = 0  # done items whose result.json in storage is not their record
    where: tuple[str, int] = ("", 0)  # the test that made it

    def markdown(self) -> str:
        return (
            f"| {self.fault} | {self.submitted} | {self.done} | {self.failed_as_expected} "
            f"| {self.lost} | {self.re_executed} | {self.disagreeing} |"
        )


HEADER = (
    "| fault or input | submitted | done | failed as expected | lost | re-executed "
    "| record ≠ storage |\n|---|---|---|---|---|---|---|"
)


def _agrees(record) -> bool:
    """result.json, as stored, says what the record says: same attempt, same scores."""
    stored = json.loads(read_uri(record.artifacts[RESULT_JSON], max_bytes=1 << 20))
    return stored.get("attempt") == record.attempt and all(
        stored.get(name) == getattr(record, name) for name in SCORE_FIELDS
    )


def submitted(inputs: Iterable[str | Path] | Path) -> list[str]:
    """The URIs a test submitted, as a job names them: a folder stands for the files in
    it; a local path or `file://` URI is its absolute, normalised path; any other URI is
    taken as given."""
    if isinstance(inputs, Path) and inputs.is_dir():
        return sorted(str(path) for path in inputs.iterdir() if path.is_file())
    uris = []
    for uri in map(str, inputs):
        local = uri.removeprefix("file://") if uri.startswith("file://") else None
        if local is None and "://" not in uri:
            local = uri
        uris.append(os.path.normpath(os.path.abspath(local)) if local is not None else uri)
    return uris


def audit(store: JobStore, job_id: str, fault: str, inputs: Iterable[str | Path] | Path,
          expected_failed: set[int] = frozenset(), expected_cancelled: int = 0) -> Row:  # fmt: skip
    """Check a settled job against the inputs submitted, its records, its manifest and its
    artifacts."""
    status = store.status(job_id)
    storage = open_storage(status.info.output)
    records = list(item_records(store, storage, job_id))
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
    manifest = storage.get(job_key(job_id, ITEMS_JSONL)).splitlines()
    lines = [json.loads(line) for line in manifest if line.strip()]
    indices = [line["index"] for line in lines]
    assert len(indices) == len(set(indices)), f"{fault}: an item is twice in the manifest"
    assert sum(status.counts.values()) == status.total, f"{fault}: an item counted twice"
    wanted = submitted(inputs)
    settled = Counter(line["uri"] for line in lines if line["state"] in ("done", "failed",
                                                                         "cancelled"))  # fmt: skip
    lost = sum((Counter(wanted) - settled).values()) + missing_artifacts
    lost += len(failed - expected_failed) + max(0, status.counts["cancelled"] - expected_cancelled)
    re_executed = sum(r.attempts > 1 for r in records)
    row = Row(fault, len(wanted), len(done), len(failed & expected_failed), lost, re_executed,
              disagreeing, RUNNING)  # fmt: skip
    ROWS.append(row)
    return row


def skipped(suite: str, why: str) -> None:
    SKIPPED.append((suite, why))


def table() -> str:
    missing = [f"| {suite}: **not run** ({why}) |{' – |' * 6}" for suite, why in SKIPPED]
    rows = sorted(ROWS, key=lambda row: row.where)  # stable: a test's rows keep their order
    return "\n".join([HEADER, *(row.markdown() for row in rows), *missing])


def exported() -> dict:
    """This process's rows and skipped suites, as a pytest-xdist worker hands them back."""
    return {"rows": [dataclasses.astuple(row) for row in ROWS], "skipped": SKIPPED}


def gather(output: dict) -> None:
    """Add a pytest-xdist worker's `exported()` to this (the controller's) table."""
    for values in output.get("rows", []):
        *counts, where = values
        ROWS.append(Row(*counts, where=tuple(where)))
    SKIPPED.extend(tuple(entry) for entry in output.get("skipped", []))


def write(path: str | None) -> None:
    if path and ROWS:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(table() + "\n")
