"""Comparing two jobs item by item: the same images under two models or two settings.

Items are paired by URI (redacted, as records hold it). One job's items are held as small
`Side` records keyed by URI while the other job's are streamed past them, so neither job
is held whole; a URI listed several times in a job pairs its occurrences in order. Per
pair: both jobs' classes, probabilities and mask areas, their differences (B - A), and the
agreement of the two masks (explainctl.pages.agreement, the worker's stability measures),
read a chunk's masks file at a time (explainctl.jobs.masks; an older job's from each
item's mask.npy). `compare_jobs` reads jobs through Client.status and Client.results, so
jobs whose Redis records expired compare from their manifests. The page is drawn by
pages/compare.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from explainctl.io.uri import redacted
from explainctl.jobs.masks import MaskReader, error_line, read_mask_file
from explainctl.jobs.store import JobStatus
from explainctl.pages.agreement import mask_agreement
from explainctl.spec.contracts import MASK_NPY, MAX_PIXELS, OVERLAY_PNG
from explainctl.spec.errors import ExplainctlError
from explainctl.spec.results import COMPARE_FIELDS, ItemRecord, sort_value

IMAGE_MAX_BYTES = 64 * 1024 * 1024
# Pairs measured per round of the thread pool: enough to hide S3 latency, few in memory.
BATCH = 64

Read = Callable[[str], bytes]


@dataclass(frozen=True)
class JobView:
    """What the comparison shows of a job."""

    job_id: str
    state: str
    model: str
    params: dict[str, Any]
    total: int
    output: str

    @classmethod
    def of(cls, status: JobStatus) -> JobView:
        return cls(
            job_id=status.job_id,
            state=status.state,
            model=status.info.model.name,
            params=status.info.params.model_dump(mode="json"),
            total=status.total,
            output=status.info.output,
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Side:
    """What a Side does; its fields are made below, its scores from the declaration."""

    __slots__ = ()

    @classmethod
    def of(cls, record: ItemRecord) -> Side:
        return cls(
            index=record.index,
            item=record.item,
            state=record.state,
            **{name: getattr(record, name) for name in COMPARE_FIELDS},
            error_code=record.error_code,
            mask_uri=record.artifacts.get(MASK_NPY),
            mask_file=record.mask_file,
            overlay_uri=record.artifacts.get(OVERLAY_PNG),
        )

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def drop(self) -> float | None:
        return sort_value(self, "drop")

    def as_json(self) -> dict[str, Any]:
        shown = {"index": self.index, "item": self.item, "state": self.state}
        for name in COMPARE_FIELDS:
            shown[name] = getattr(self, name)
            if name == "prob_after":  # drop, p before - p after, follows its terms
                shown["drop"] = self.drop
        shown["error_code"] = self.error_code
        return shown


def _maybe(name: str, annotation: Any) -> tuple[str, Any, Any]:
    return name, annotation, dataclasses.field(default=None)


# One job's item, as little of it as a comparison needs: where it is, its state, the
# scores declared with compare=True (explainctl.spec.results.COMPARE_FIELDS, None until done),
# and where its mask and overlay are.
Side = dataclasses.make_dataclass(
    "Side",
    [
        ("index", int),
        ("item", str),
        ("state", str),
        *(_maybe(name, ItemRecord.model_fields[name].annotation) for name in COMPARE_FIELDS),
        _maybe("error_code", str | None),
        _maybe("mask_uri", str | None),
        _maybe("mask_file", str | None),
        _maybe("overlay_uri", str | None),
    ],
    bases=(_Side,),
    frozen=True,
    slots=True,
)
Side.__module__ = __name__
Side.__doc__ = "One job's item, as little of it as a comparison needs."


def _difference(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a


@dataclass(frozen=True)
class Pair:
    """One URI in both jobs. `iou` and `rank` are None where the masks could not be
    compared (an item not done, a mask unreadable: `note` says which); `rank` also for a
    constant mask."""

    uri: str
    a: Side
    b: Side
    iou: float | None = None
    rank: float | None = None
    note: str | None = None

    @property
    def class_changed(self) -> bool | None:
        """The two jobs explained different classes of this image."""
        if self.a.target_index is None or self.b.target_index is None:
            return None
        return self.a.target_index != self.b.target_index

    @property
    def only_right(self) -> str | None:
        """ "a" or "b": the job whose model got this image's ground truth right while the
        other's got it wrong; None where both agree or either lacks ground truth."""
        if self.a.correct is None or self.b.correct is None or self.a.correct == self.b.correct:
            return None
        return "a" if self.a.correct else "b"

    @property
    def delta_prob_after(self) -> float | None:
        return _difference(self.b.prob_after, self.a.prob_after)

    @property
    def delta_drop(self) -> float | None:
        return _difference(self.b.drop, self.a.drop)

    @property
    def delta_mask_area(self) -> float | None:
        return _difference(self.b.mask_area, self.a.mask_area)

    def disagreement(self) -> tuple:
        """Sort key, most disagreeing first: lowest IoU, then a changed class, then the
        lowest rank correlation; pairs without masks to compare last, in A's order."""
        if self.iou is None:
            return (1, 0.0, 0, 0.0, self.a.index)
        rank = self.rank if self.rank is not None else 2.0
        return (0, self.iou, 0 if self.class_changed else 1, rank, self.a.index)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "pair",
            "uri": self.uri,
            "a": self.a.as_json(),
            "b": self.b.as_json(),
            "class_changed": self.class_changed,
            "only_right": self.only_right,
            "delta_prob_after": self.delta_prob_after,
            "delta_drop": self.delta_drop,
            "delta_mask_area": self.delta_mask_area,
            "iou": self.iou,
            "rank": self.rank,
            "note": self.note,
        }


@dataclass(frozen=True)
class Unpaired:
    """An item of one job whose URI the other job does not have."""

    uri: str
    job: str  # "a" or "b"
    side: Side

    def as_json(self) -> dict[str, Any]:
        return {"kind": f"only_{self.job}", "uri": self.uri, self.job: self.side.as_json()}


class _Mean:
    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count, self.total = 0, 0.0

    def add(self, value: float | None) -> None:
        if value is not None:
            self.count += 1
            self.total += value

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


@dataclass
class Summary:
    """The comparison as a whole. Means are over the pairs that have the value."""

    a: JobView
    b: JobView
    paired: int = 0
    compared: int = 0  # pairs whose masks were compared
    only_a: int = 0
    only_b: int = 0
    class_changed: int = 0
    # Pairs with ground truth on both sides, and those only one job got right.
    judged: int = 0
    right_a: int = 0
    right_b: int = 0
    only_right_a: int = 0
    only_right_b: int = 0
    _means: dict[str, _Mean] = field(
        default_factory=lambda: {k: _Mean() for k in ("iou", "rank", "dpa", "ddrop", "darea")}
    )

    def add(self, entry: Pair | Unpaired) -> None:
        if isinstance(entry, Unpaired):
            if entry.job == "a":
                self.only_a += 1
            else:
                self.only_b += 1
            return
        self.paired += 1
        self.compared += entry.iou is not None
        self.class_changed += bool(entry.class_changed)
        if entry.a.correct is not None and entry.b.correct is not None:
            self.judged += 1
            self.right_a += entry.a.correct
            self.right_b += entry.b.correct
        self.only_right_a += entry.only_right == "a"
        self.only_right_b += entry.only_right == "b"
        means = self._means
        means["iou"].add(entry.iou)
        means["rank"].add(entry.rank)
        means["dpa"].add(entry.delta_prob_after)
        means["ddrop"].add(entry.delta_drop)
        means["darea"].add(entry.delta_mask_area)

    @property
    def params_differ(self) -> list[str]:
        keys = dict.fromkeys([*self.a.params, *self.b.params])
        return [k for k in keys if self.a.params.get(k) != self.b.params.get(k)]

    def as_json(self) -> dict[str, Any]:
        means = self._means
        return {
            "kind": "summary",
            "a": self.a.as_json(),
            "b": self.b.as_json(),
            "params_differ": self.params_differ,
            "paired": self.paired,
            "compared": self.compared,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "class_changed": self.class_changed,
            "judged": self.judged,
            "right_a": self.right_a,
            "right_b": self.right_b,
            "only_right_a": self.only_right_a,
            "only_right_b": self.only_right_b,
            "mean_iou": means["iou"].value,
            "mean_rank": means["rank"].value,
            "mean_delta_prob_after": means["dpa"].value,
            "mean_delta_drop": means["ddrop"].value,
            "mean_delta_mask_area": means["darea"].value,
        }


def pair_records(
    records_a: Iterable[ItemRecord], records_b: Iterable[ItemRecord]
) -> Iterator[tuple[str, Side | None, Side | None]]:
    """(uri, side in A, side in B) for every item of either job: A's items in A's order,
    then B's that A does not have, in B's order. B is held as Sides, A is streamed. URIs
    pair in their redacted form (io.uri.redacted), the one records hold: the same image
    presigned twice pairs with itself."""
    held: dict[str, deque[Side]] = {}
    for record in records_b:
        held.setdefault(redacted(record.uri), deque()).append(Side.of(record))
    for record in records_a:
        uri = redacted(record.uri)
        waiting = held.get(uri)
        other = waiting.popleft() if waiting else None
        if waiting is not None and not waiting:
            del held[uri]
        yield uri, Side.of(record), other
    leftover = ((uri, side) for uri, sides in held.items() for side in sides)
    for uri, side in sorted(leftover, key=lambda entry: entry[1].index):
        yield uri, None, side


def measure(uri: str, a: Side, b: Side, masks: MaskReader) -> Pair:
    """The pair with its mask agreement, or a note saying why there is none."""
    for name, side in (("A", a), ("B", b)):
        if not side.done:
            return Pair(uri, a, b, note=f"{side.state} in {name}")
        if not side.mask_uri and not side.mask_file:
            return Pair(uri, a, b, note=f"no {MASK_NPY} in {name}")
    pair = []
    for name, side in (("A", a), ("B", b)):
        try:
            mask = masks.mask(side)
        except (ExplainctlError, OSError, ValueError) as error:
            return Pair(uri, a, b, note=f"{MASK_NPY} of {name} unreadable: {error_line(error)}")
        if mask is None:
            return Pair(uri, a, b, note=f"no {MASK_NPY} in {name}")
        pair.append(mask)
    try:
        iou, rank = mask_agreement(pair[0], pair[1])
    except ValueError as error:
        return Pair(uri, a, b, note=error_line(error))
    return Pair(uri, a, b, iou=iou, rank=rank)


class Comparison:
    """Two jobs compared item by item. Iterate once to get every Pair and Unpaired item as
    it is measured (A's order, then B's leftovers); `summary` is complete after that."""

    def __init__(
        self,
        a: JobView,
        b: JobView,
        records_a: Iterable[ItemRecord],
        records_b: Iterable[ItemRecord],
        read: Read,
        workers: int = 8,
        max_pixels: int = MAX_PIXELS,
    ):
        self.a, self.b = a, b
        self._records = (records_a, records_b)
        self.read = read
        self.max_pixels = max_pixels
        self.masks = MaskReader(read, max_pixels=max_pixels)
        self.workers = workers
        self.summary = Summary(a, b)
        self._started = False

    def _one(self, entry: tuple[str, Side | None, Side | None]) -> Pair | Unpaired:
        uri, a, b = entry
        if a is None:
            return Unpaired(uri, "b", b)
        if b is None:
            return Unpaired(uri, "a", a)
        return measure(uri, a, b, self.masks)

    def __iter__(self) -> Iterator[Pair | Unpaired]:
        if self._started:
            raise RuntimeError("a Comparison is iterated once")
        self._started = True
        entries = pair_records(*self._records)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            while batch := list(itertools.islice(entries, BATCH)):
                for result in pool.map(self._one, batch):
                    self.summary.add(result)
                    yield result

    def collect(self) -> ComparisonResult:
        pairs, only_a, only_b = [], [], []
        for entry in self:
            if isinstance(entry, Pair):
                pairs.append(entry)
            else:
                (only_a if entry.job == "a" else only_b).append(entry)
        pairs.sort(key=Pair.disagreement)
        return ComparisonResult(self.summary, pairs, only_a, only_b)


@dataclass(frozen=True)
class ComparisonResult:
    """A finished comparison: pairs most disagreeing first (`Pair.disagreement`)."""

    summary: Summary
    pairs: list[Pair]
    only_a: list[Unpaired]
    only_b: list[Unpaired]


def compare_jobs(client, job_a: str, job_b: str, read: Read | None = None) -> Comparison:
    """Compare two jobs of `client` (an explainctl.client.Client): live records or, once
    they expired, the manifests. JobNotFound for a job in neither."""
    from explainctl.io.sources import read_uri

    status_a, status_b = client.status(job_a), client.status(job_b)
    if read is None:

        def read(uri: str) -> bytes:
            if uri.endswith((".npy", ".npz")):
                return read_mask_file(uri)
            return read_uri(uri, max_bytes=IMAGE_MAX_BYTES)

    return Comparison(
        JobView.of(status_a),
        JobView.of(status_b),
        client.results(job_a),
        client.results(job_b),
        read,
        max_pixels=client.settings.max_pixels,
    )
