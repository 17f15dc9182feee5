"""Every Redis key explainctl owns, built from one namespace, and the Lua scripts over them.

    explainctl:jobs                    sorted set: job IDs by creation time
    explainctl:job:<id>:<part>         a job's records (jobs/store.py: JOB_PARTS and below)
    explainctl:leases                  sorted set: chunk leases by expiry (jobs/leases.py)
    explainctl:lease:<lease>           a lease's payload: the chunk and the queue it came from
    explainctl:busy                    list: one member per lease (its length: chunks held)
    explainctl:suspects:<id>           a job's items that looked lost (jobs/reconcile.py)
    explainctl:runner:<id>:<chunk>     which lease runs a chunk now

Kombu's own keys (a list per queue, `unacked`) are not ours and are not here.

Each script lives in lua/<name>.lua, whose opening comment names every KEYS[i] and ARGV[i]
in order (`-- KEYS[1] name  meaning`; `KEYS[3..]` for a variable tail). `Script` reads
those names from the file and is called with dicts by name, so no caller depends on the
order of a Python list: the file's header is the one place the order is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

NAMESPACE = "explainctl"

JOBS_KEY = f"{NAMESPACE}:jobs"
LEASES_KEY = f"{NAMESPACE}:leases"
BUSY_KEY = f"{NAMESPACE}:busy"

JobPart = Literal[
    "meta", "items", "macs", "state", "errors", "attempts", "counts", "deliveries", "submitter",
    "index",
]  # fmt: skip
# The parts that make up a job's live records: they expire together once it is sealed
# (`submitter` has its own short expiry; `index` outlives them).
JOB_PARTS: tuple[JobPart, ...] = (
    "state", "counts", "errors", "meta", "attempts", "items", "macs", "deliveries"
)  # fmt: skip


def job_key(job_id: str, part: JobPart) -> str:
    return f"{NAMESPACE}:job:{job_id}:{part}"


def job_pattern(job_id: str) -> str:
    """A SCAN/KEYS pattern for every key of the job."""
    return f"{NAMESPACE}:job:{job_id}:*"


def lease_member(job_id: str, chunk: int, run: str) -> str:
    """A running chunk's member of the leases set: one per run, not per chunk."""
    return f"{job_id}:{chunk}:{run}"


def reservation_member(task_id: str) -> str:
    """A received, not yet started chunk's member of the leases set."""
    return f"reserved:{task_id}"


def lease_key(member: str) -> str:
    """Where the payload of the lease `member` is kept."""
    return f"{NAMESPACE}:lease:{member}"


def suspects_key(job_id: str) -> str:
    return f"{NAMESPACE}:suspects:{job_id}"


def runner_key(job_id: str, chunk: int) -> str:
    return f"{NAMESPACE}:runner:{job_id}:{chunk}"


# --- Lua scripts -----------------------------------------------------------------------

_CONTRACT = re.compile(r"^-- (KEYS|ARGV)\[(\d+)(\.\.)?\]\s+(\w+)", re.MULTILINE)


@dataclass(frozen=True)
class Contract:
    """The names of a script's KEYS and ARGV, in order; `*_tail`: the last one is a list
    that fills the rest (KEYS[n..])."""

    keys: tuple[str, ...]
    args: tuple[str, ...]
    keys_tail: bool = False
    args_tail: bool = False


def _contract(name: str, text: str) -> Contract:
    found: dict[str, list[tuple[str, bool]]] = {"KEYS": [], "ARGV": []}
    for table, number, tail, label in _CONTRACT.findall(text):
        names = found[table]
        if int(number) != len(names) + 1 or (names and names[-1][1]):
            raise ValueError(f"{name}.lua: {table}[{number}] is out of order")
        names.append((label, bool(tail)))

    def tail(table: str) -> bool:
        return bool(found[table]) and found[table][-1][1]

    return Contract(
        keys=tuple(label for label, _ in found["KEYS"]),
        args=tuple(label for label, _ in found["ARGV"]),
        keys_tail=tail("KEYS"),
        args_tail=tail("ARGV"),
    )


def _ordered(what: str, names: tuple[str, ...], tail: bool, given: Mapping[str, Any]) -> list:
    if set(given) != set(names):
        missing, extra = set(names) - set(given), set(given) - set(names)
        raise TypeError(f"{what}: missing {sorted(missing)}, unexpected {sorted(extra)}")
    ordered = [given[n] for n in names]
    if tail:
        ordered[-1:] = list(ordered[-1])
    return ordered


class Script:
    """lua/<name>.lua, called with its KEYS and ARGV by the names its header gives."""

    def __init__(self, name: str):
        self.name = name
        self.text = (resources.files("explainctl.jobs") / "lua" / f"{name}.lua").read_text()
        self.contract = _contract(name, self.text)

    def keys(self, **named: str | Iterable[str]) -> list[str]:
        c = self.contract
        return _ordered(f"{self.name}.lua KEYS", c.keys, c.keys_tail, named)

    def args(self, **named: Any) -> list:
        c = self.contract
        return _ordered(f"{self.name}.lua ARGV", c.args, c.args_tail, named)

    def on(self, client) -> Bound:
        """This script registered with a redis client (loaded by SHA, sent once)."""
        return Bound(self, client.register_script(self.text))


@dataclass(frozen=True)
class Bound:
    script: Script
    registered: Any  # redis.commands.core.Script

    def __call__(self, keys: Mapping[str, Any], args: Mapping[str, Any], client=None):
        """Run it, on `client` (a pipeline) when given; `keys` and `args` by name."""
        return self.registered(
            keys=self.script.keys(**keys), args=self.script.args(**args), client=client
        )


def argv_set(values: Iterable[str]) -> str:
    """A set of names as one ARGV: sorted, comma-separated (the scripts split on commas)."""
    return ",".join(sorted(values))
