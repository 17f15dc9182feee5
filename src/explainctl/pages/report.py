"""The audit report: one self-contained HTML file for a person reviewing model decisions.

Images are small WebP thumbnails embedded as data URIs (no network requests, opens from
disk; WebP is about a third smaller than JPEG at the same quality, and the page's size is
what its opening time follows). The gallery is drawn by a short script from a JSON blob,
a page at a time, so a page of 10,000 items shows its first rows in about a second
(benchmarks/README.md). Every text from the job (URIs, class names, errors) reaches the
page as JSON and is set with textContent, never as HTML.
The job's findings (per-class means, histograms, the items that stand out and, with
ground truth, accuracy, per-class tables and confusions) are computed here, in one pass
over the rows, so they are tested without a browser.
"""

from __future__ import annotations

import base64
import heapq
import io
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image, ImageOps

from explainctl.pages.page import render_page
from explainctl.spec.contracts import (
    ARTIFACT_FORMATS,
    INPUT_FORMATS,
    ITEM_STATES,
    MASK_PNG,
    MAX_JPEG_SCANS,
    MAX_PIXELS,
    OVERLAY_PNG,
    PERTURBED_PNG,
    THUMB_PARTS,
    THUMB_SIDE,
    THUMBS_WEBP,
    jpeg_scans,
)
from explainctl.spec.errors import ExplainctlError, InvalidInput
from explainctl.spec.results import SCORE_FIELDS, ItemRecord, field_views, sort_value
from explainctl.spec.trust import FLAG_NAMES, flag_views, flags

THUMBNAIL = THUMB_SIDE  # the gallery shows them 120 px wide
DETAIL = 448  # the detail view's images: twice the model's input, enough to see a mask's edge
# A full-size image weighs about 8 thumbnails (18 KB against 2.3 KB for a photo), four per
# item: for every item a 10,000-item page would pass 1 GB. So only the first DETAIL_ITEMS
# done items and the items that stand out (at most 25 more: the ones an auditor opens
# first) get them, about 5 MB in all; the others' detail view shows their thumbnails.
DETAIL_ITEMS = 25

# The most items the gallery embeds: the page grows by about 6.5 KB per item (65 MiB at
# 10,000, which opens in about a second: benchmarks/README.md). The findings count every
# item whatever the gallery holds.
GALLERY_ITEMS = 10_000
STANDOUT_ITEMS = 5  # per list of items that stand out
HISTOGRAM_BINS = 20
# (key, label, lowest, highest): fixed ranges, so bins fill in one pass over the rows.
HISTOGRAMS = (
    ("mask_area", "mask area", 0.0, 1.0),
    ("drop", "probability drop (p before − p after)", 0.0, 1.0),
    ("stability_iou", "stability IoU", 0.0, 1.0),
)
# The per-class table's means; those a job may not measure are None where it did not.
CLASS_MEANS = (
    "prob_before", "prob_after", "mask_area", "deletion_auc_blur", "insertion_auc",
    "stability_iou",
)  # fmt: skip
# (key, label, field, largest first, only items with this flag)
STANDOUTS = (
    ("largest-masks", "largest masks", "mask_area", True, None),
    ("smallest-masks", "smallest masks", "mask_area", False, None),
    ("least-stable", "least stable", "stability_iou", False, None),
    ("least-compact", "least compact", "compactness", False, None),
    ("not-removed", "prediction not removed", "prob_ratio", True, "not-removed"),
)
# With ground truth: the confusion pairs (true -> predicted) listed, most items first, and
# the first items of each, whose full-size images and mask the page embeds (one click).
CONFUSIONS = 10
CONFUSION_ITEMS = 4


def _images(
    data: bytes,
    sizes: tuple[int, ...],
    formats: tuple[str, ...] = ARTIFACT_FORMATS,
    max_pixels: int = MAX_PIXELS,
) -> list[str]:
    """Data URIs of WebP images of the encoded image `data`, one per largest side, decoded
    once. Only `formats` are opened (an auditor's machine decodes what a worker would, no
    more), and no image over `max_pixels` by its header: ValueError."""
    with Image.open(io.BytesIO(data), formats=formats) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"{width}x{height} pixels, above the limit of {max_pixels}")
        if image.format == "JPEG" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise ValueError(f"a JPEG of {scans} scans, above the limit of {MAX_JPEG_SCANS}")
        top = max(sizes)
        image.draft("RGB", (top * 2, top * 2))  # JPEG decodes at a reduced scale: fast
        full = ImageOps.exif_transpose(image).convert("RGB")
    uris = []
    for size in sizes:
        small = full.copy()
        small.thumbnail((size, size))
        buffer = io.BytesIO()
        small.save(buffer, format="WEBP", quality=75)
        uris.append("data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def thumbnail(data: bytes, size: int = THUMBNAIL, max_pixels: int = MAX_PIXELS) -> str:
    """A data URI of a WebP thumbnail of the encoded artifact `data` (a PNG)."""
    return _images(data, (size,), ARTIFACT_FORMATS, max_pixels)[0]


_UNREADABLE = (ExplainctlError, OSError, ValueError, Image.DecompressionBombError)


def _sources(record: ItemRecord) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(key, URI, formats) of the item's images: its input, decoded as a worker would, and
    its artifacts, PNG only."""
    return [
        ("original", record.staged or record.uri, INPUT_FORMATS),
        ("mask", record.artifacts.get(MASK_PNG), ARTIFACT_FORMATS),
        ("overlay", record.artifacts.get(OVERLAY_PNG), ARTIFACT_FORMATS),
        ("perturbed", record.artifacts.get(PERTURBED_PNG), ARTIFACT_FORMATS),
    ]


def _named(index: int | None, name: str | None) -> str | None:
    return name or (str(index) if index is not None else None)


def _numbers(record: ItemRecord) -> dict:
    """The item's row without its images: what the findings and the gallery's filter read.
    `truth` is the ground truth's class where the label matched one; `label` the label as
    the input gave it (the record's `label`), shown where it matched none."""
    return {
        "index": record.index,
        "item": record.item,
        "uri": record.uri,
        "state": record.state,
        "class": record.target_name
        or (str(record.target_index) if record.target_index is not None else ""),
        "predicted": _named(record.predicted_index, record.predicted_name),
        "truth": _named(record.label_index, record.label_name),
        "label": record.label,
        "drop": sort_value(record, "drop"),
        "error": f"{record.error_code}: {record.error}" if record.error else None,
        **{name: getattr(record, name) for name in SCORE_FIELDS},
        "flags": flags(record),
    }


def _strip(data: bytes) -> str | None:
    """The data URI of a worker's thumbs.webp, embedded as it is: the page shows each of
    its parts (THUMB_PARTS) by cropping, so the report decodes nothing. None for bytes
    that are not a WebP."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    return "data:image/webp;base64," + base64.b64encode(data).decode()


def _row(
    record: ItemRecord,
    read: Callable[[str], bytes],
    detail: bool,
    max_pixels: int,
    read_original: Callable[[str], bytes],
) -> dict:
    row = _numbers(record)
    if record.state != "done":
        return row
    thumbs = record.artifacts.get(THUMBS_WEBP)
    if thumbs and not detail:
        try:
            strip = _strip(read(thumbs))
        except _UNREADABLE:
            strip = None  # the full-size files may still be there
        if strip:
            row["images"] = {"strip": strip}
            return row
    images: dict[str, str | None] = {}
    full: dict[str, str | None] = {}
    for key, uri, formats in _sources(record):
        if key == "mask" and not detail:
            continue  # the gallery does not show it: read only for a detail view
        try:
            sizes = (DETAIL,) if key == "mask" else (THUMBNAIL, DETAIL) if detail else (THUMBNAIL,)
            made = (
                _images(
                    (read_original if key == "original" else read)(uri), sizes, formats, max_pixels
                )
                if uri
                else [None] * len(sizes)
            )
        except _UNREADABLE:
            made = [None, None]  # shown as "unavailable"; the rest of the report stands
        if key != "mask":
            images[key] = made[0]
        if detail:
            full[key] = made[-1]
    row["images"] = images
    if detail:
        row["detail"] = full
    return row


class _Extremes:
    """The `size` entries of lowest key seen so far, without keeping the others."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.heap: list[tuple[float, int, dict]] = []  # (-key, -position): the worst on top

    def add(self, key: float, position: int, entry: dict) -> None:
        item = (-key, -position, entry)
        if len(self.heap) < self.size:
            heapq.heappush(self.heap, item)
        elif (key, position) < (-self.heap[0][0], -self.heap[0][1]):
            heapq.heapreplace(self.heap, item)

    def sorted(self) -> list[tuple[int, dict]]:
        return [(-p, e) for _, p, e in sorted(self.heap, key=lambda i: (-i[0], -i[1]))]


class Findings:
    """What the report says about the job's done items, accumulated one row at a time."""

    def __init__(self) -> None:
        self.done = 0
        self.sortable = [f["key"] for f in field_views() if f["sort"]]
        self.sums: dict[str, list[float]] = {}  # key -> [sum, count], job means
        self.classes: dict[str, dict[str, list[float]]] = {}
        self.bins = {key: [0] * HISTOGRAM_BINS for key, *_ in HISTOGRAMS}
        self.outside = {key: [0, 0] for key, *_ in HISTOGRAMS}  # below, above the range
        self.flagged = dict.fromkeys(FLAG_NAMES, 0)
        self.standouts = {key: _Extremes(STANDOUT_ITEMS) for key, *_ in STANDOUTS}
        # Ground truth: items whose label matched a class, of them those the model got
        # right, and labelled items whose label matched none.
        self.labelled = self.correct = self.unmatched = 0
        self.by_truth: dict[str, dict[str, list[float]]] = {}
        self.by_prediction: dict[str, dict[str, list[float]]] = {}
        # (truth, predicted) -> [count, first item indices]: ints only, so a job of a
        # million items with many confusions stays small.
        self.confusions: dict[tuple[str, str], list] = {}

    @staticmethod
    def _add(sums: dict[str, list[float]], key: str, value: Any) -> None:
        if value is not None:
            total = sums.setdefault(key, [0.0, 0])
            total[0] += value
            total[1] += 1

    def add(self, position: int, row: dict) -> None:
        """Count `row`, the `position`-th row of the report, if it is done."""
        if row["state"] != "done":
            return
        self.done += 1
        for key in self.sortable:
            self._add(self.sums, key, row[key])
        per_class = self.classes.setdefault(row["class"], {"count": [0, 0]})
        per_class["count"][0] += 1
        for key in CLASS_MEANS:
            self._add(per_class, key, row[key])
        for key, _, lo, hi in HISTOGRAMS:
            value = row[key]
            if value is None:
                continue
            if value < lo or value > hi:
                self.outside[key][value > hi] += 1
                continue
            share = (value - lo) / (hi - lo)
            self.bins[key][min(int(share * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        for name in row["flags"]:
            self.flagged[name] += 1
        self._add_truth(row)
        for key, _, field, largest, flag in STANDOUTS:
            value = row[field]
            if value is None or (flag and flag not in row["flags"]):
                continue
            entry = {"index": row["index"], "item": row["item"], "class": row["class"],
                     "value": value}  # fmt: skip
            self.standouts[key].add(-value if largest else value, position, entry)

    def _add_truth(self, row: dict) -> None:
        if row["truth"] is None:
            self.unmatched += row["label"] is not None
            return
        self.labelled += 1
        right = bool(row["correct"])
        self.correct += right
        for table, key in ((self.by_truth, row["truth"]), (self.by_prediction, row["predicted"])):
            sums = table.setdefault(key or "", {"count": [0, 0], "correct": [0, 0]})
            sums["count"][0] += 1
            sums["correct"][0] += right
            for name in CLASS_MEANS:
                self._add(sums, name, row[name])
        if not right and row["predicted"] is not None:
            pair = self.confusions.setdefault((row["truth"], row["predicted"]), [0, []])
            pair[0] += 1
            if len(pair[1]) < CONFUSION_ITEMS:
                pair[1].append(row["index"])

    @property
    def has_truth(self) -> bool:
        """Whether any done item has ground truth (a label, matched to a class or not)."""
        return bool(self.labelled or self.unmatched)

    def top_confusions(self) -> list[tuple[tuple[str, str], list]]:
        ranked = sorted(self.confusions.items(), key=lambda c: (-c[1][0], c[0]))
        return ranked[:CONFUSIONS]

    def indices(self) -> set[int]:
        """The item index of every item that stands out, and of the confusions' items."""
        kept = {e["index"] for kept in self.standouts.values() for _, e in kept.sorted()}
        return kept | {i for _, (_, items) in self.top_confusions() for i in items}

    def mean(self, key: str) -> float | None:
        total = self.sums.get(key)
        return total[0] / total[1] if total else None

    def as_json(self) -> dict:
        def mean(sums: dict[str, list[float]], key: str) -> float | None:
            total = sums.get(key)
            return round(total[0] / total[1], 4) if total else None

        def table(classes: dict[str, dict[str, list[float]]], truth: bool = False) -> list[dict]:
            rows = []
            for name, sums in classes.items():
                count = int(sums["count"][0])
                row = {"class": name, "count": count}
                if truth:
                    right = int(sums["correct"][0])
                    row |= {"correct": right, "accuracy": round(right / count, 4)}
                rows.append(row | {key: mean(sums, key) for key in CLASS_MEANS})
            return sorted(rows, key=lambda c: (-c["count"], c["class"]))

        histograms = [
            {"key": key, "label": label, "lo": lo, "hi": hi, "counts": self.bins[key],
             "below": self.outside[key][0], "above": self.outside[key][1]}
            for key, label, lo, hi in HISTOGRAMS
        ]  # fmt: skip
        standouts = [
            {"key": key, "label": label, "field": field,
             "items": [entry for _, entry in self.standouts[key].sorted()]}
            for key, label, field, _, _ in STANDOUTS
        ]  # fmt: skip
        truth = None
        if self.has_truth:
            truth = {
                "labelled": self.labelled,
                "correct": self.correct,
                "accuracy": round(self.correct / self.labelled, 4) if self.labelled else None,
                "unmatched": self.unmatched,
                "by_truth": table(self.by_truth, truth=True),
                "by_prediction": table(self.by_prediction, truth=True),
                "confusions": [
                    {"truth": t, "predicted": p, "count": count, "items": items}
                    for (t, p), (count, items) in self.top_confusions()
                ],
                "confusion_pairs": len(self.confusions),
            }
        flagged = {f["name"]: self.flagged[f["name"]] for f in flag_views(self.has_truth)}
        return {
            "done": self.done,
            "classes": table(self.classes),
            "histograms": histograms,
            "standouts": standouts,
            "flagged": flagged,
            "truth": truth,  # None: no item has ground truth, and the page is as without it
        }


@dataclass(frozen=True)
class Gallery:
    """Which items the gallery embeds: those matching every filter given, the first
    `limit` of them by index, and always the items that stand out. `flag` is a trust flag,
    `any` or `none` (done with no flag), as the page's own Trust filter reads it."""

    flag: str | None = None
    class_name: str | None = None
    state: str | None = None
    limit: int = GALLERY_ITEMS

    FLAGS: ClassVar[tuple[str, ...]] = (*FLAG_NAMES, "any", "none")

    def __post_init__(self) -> None:
        if self.flag is not None and self.flag not in self.FLAGS:
            raise InvalidInput(f"--flag takes one of {', '.join(self.FLAGS)}, not {self.flag!r}")
        if self.state is not None and self.state not in ITEM_STATES:
            states = ", ".join(ITEM_STATES)
            raise InvalidInput(f"--state takes one of {states}, not {self.state!r}")
        if self.limit < 1:
            raise InvalidInput(f"--limit takes a number of items of at least 1, not {self.limit}")

    def admits(self, row: dict) -> bool:
        if self.state and row["state"] != self.state:
            return False
        if self.class_name and row["class"] != self.class_name:
            return False
        if self.flag == "none":
            return row["state"] == "done" and not row["flags"]
        if self.flag == "any":
            return bool(row["flags"])
        return not self.flag or self.flag in row["flags"]

    def filters(self) -> dict[str, str]:
        given = {"flag": self.flag, "class": self.class_name, "state": self.state}
        return {key: value for key, value in given.items() if value}


def _plan(records: Iterable[ItemRecord], standouts: set[int]) -> Iterator[tuple[ItemRecord, bool]]:
    done = 0
    for record in records:
        is_done = record.state == "done"
        yield record, is_done and (done < DETAIL_ITEMS or record.index in standouts)
        done += is_done


def build_report(
    status: dict,
    records: Iterable[ItemRecord],
    read: Callable[[str], bytes],
    gallery: Gallery = Gallery(),
    workers: int = 16,
    max_pixels: int = MAX_PIXELS,
    read_original: Callable[[str], bytes] | None = None,
) -> str:
    """The report's HTML. `status` is a job status (`JobStatus.as_json()` plus `info`),
    `records` every item's record, read twice (a list, or an iterable that starts over),
    so a job of a million items is never held in memory; `read` fetches a URI's bytes (S3
    or local): the caller derives the artifacts' URIs, never trusting a manifest's
    (Client.results). `read_original` reads the inputs (default: `read`), under a
    worker's limits. `max_pixels` caps every image decoded. The first pass counts the
    findings and chooses the gallery's items, the second fetches their images."""
    findings = Findings()
    chosen: set[int] = set()
    matched = 0
    for position, record in enumerate(records):
        row = _numbers(record)
        findings.add(position, row)
        if gallery.admits(row):
            matched += 1
            if len(chosen) < gallery.limit:
                chosen.add(record.index)
    standouts = findings.indices()
    wanted = chosen | standouts
    selected = (record for record in records if record.index in wanted)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        plans = _plan(selected, standouts)
        rows = list(
            pool.map(
                lambda plan: _row(plan[0], read, plan[1], max_pixels, read_original or read), plans
            )
        )
    wall = (status.get("finished_at") or time.time()) - status["created"]
    item_seconds = findings.mean("seconds")
    summary = {
        "job_id": status["job_id"],
        "state": status["state"],
        "model": status["info"]["model"]["name"],
        "params": status["info"]["params"],
        "total": status["total"],
        "counts": status["counts"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["created"])),
        "wall_seconds": round(wall, 1),
        "item_seconds": round(item_seconds, 3) if item_seconds is not None else None,
        "throughput": round(findings.done / wall, 3) if wall > 0 else None,
        "output": status["info"]["output"],
        "detail_items": DETAIL_ITEMS,
        # What the gallery holds when it is not every item (the findings count them all).
        "gallery": {
            "filters": gallery.filters(),
            "matched": matched,
            "limit": gallery.limit,
            "rows": len(rows),
        },  # fmt: skip
        # The job's mean of every sortable score its items have (the faithfulness ones
        # only where --metrics measured them).
        "means": {
            key: round(value, 4)
            for key in findings.sortable
            if (value := findings.mean(key)) is not None
        },
        "findings": findings.as_json(),
    }
    flags_shown = flag_views(findings.has_truth)
    data = {
        "summary": summary, "fields": field_views(), "flags": flags_shown, "rows": rows,
        "thumb_parts": THUMB_PARTS,
    }  # fmt: skip
    return render_page("report.html", f"explainctl audit {status['job_id']}", data)
