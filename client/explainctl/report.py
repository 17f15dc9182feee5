"""The audit report: one self-contained HTML file for a person reviewing model decisions.

Images are small JPEG thumbnails embedded as data URIs (no network requests, opens from
disk); the gallery is drawn by a short script from a JSON blob, a page at a time, so a
job of thousands of items still opens quickly. Every text from the job (URIs, class
names, errors) reaches the page as JSON and is set with textContent, never as HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from PIL import Image, ImageOps

from explainctl.contracts import OVERLAY_PNG, PERTURBED_PNG
from explainctl.errors import ExplainctlError
from explainctl.item import SCORE_FIELDS, ItemRecord, field_views, sort_value

THUMBNAIL = 120  # the gallery shows them 120 px wide
ORIGINAL_MAX_BYTES = 50 * 1024 * 1024


def thumbnail(data: bytes, size: int = THUMBNAIL) -> str:
    """A data URI of a JPEG thumbnail of the encoded image `data`."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size * 2, size * 2))  # JPEG decodes at a reduced scale: fast
        small = ImageOps.exif_transpose(image).convert("RGB")
        small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _row(record: ItemRecord, read: Callable[[str], bytes]) -> dict:
    row = {
        "index": record.index,
        "item": record.item,
        "uri": record.uri,
        "state": record.state,
        "class": record.target_name
        or (str(record.target_index) if record.target_index is not None else ""),
        "drop": sort_value(record, "drop"),
        "error": f"{record.error_code}: {record.error}" if record.error else None,
        **{name: getattr(record, name) for name in SCORE_FIELDS},
    }
    if record.state != "done":
        return row
    images = {}
    for key, uri in (
        ("original", record.uri),
        ("overlay", record.artifacts.get(OVERLAY_PNG)),
        ("perturbed", record.artifacts.get(PERTURBED_PNG)),
    ):
        try:
            images[key] = thumbnail(read(uri)) if uri else None
        except (ExplainctlError, OSError, ValueError, Image.DecompressionBombError):
            images[key] = None  # shown as "unavailable"; the rest of the report stands
    row["images"] = images
    return row


def build_report(
    status: dict, records: list[ItemRecord], read: Callable[[str], bytes], workers: int = 16
) -> str:
    """The report's HTML. `status` is a job status (`JobStatus.as_json()` plus `info`),
    `read` fetches a URI's bytes (S3 or local)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda r: _row(r, read), records))
    done = [r for r in rows if r["state"] == "done"]
    fields = field_views()
    seconds = [r["seconds"] for r in done if r["seconds"] is not None]
    wall = (status.get("finished_at") or time.time()) - status["created"]
    summary = {
        "job_id": status["job_id"],
        "state": status["state"],
        "model": status["info"]["model"]["name"],
        "params": status["info"]["params"],
        "total": status["total"],
        "counts": status["counts"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["created"])),
        "wall_seconds": round(wall, 1),
        "item_seconds": round(sum(seconds) / len(seconds), 3) if seconds else None,
        "throughput": round(len(done) / wall, 3) if wall > 0 else None,
        "output": status["info"]["output"],
    }
    # The job's mean of every sortable score its items have (the faithfulness ones only
    # where --metrics measured them).
    means = {}
    for view in fields:
        values = [r[view["key"]] for r in done if view["sort"] and r[view["key"]] is not None]
        if values:
            means[view["key"]] = round(sum(values) / len(values), 4)
    summary["means"] = means
    # Every "<" escaped, so no text from the job can end or comment out the script element.
    data = json.dumps({"summary": summary, "fields": fields, "rows": rows}).replace("<", "\\u003c")
    title = html.escape(f"explainctl audit {status['job_id']}")
    template = resources.files("explainctl").joinpath("report.html").read_text()
    return template.replace("{{TITLE}}", title).replace("{{DATA}}", data)
