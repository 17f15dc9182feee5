"""The comparison of two jobs as one self-contained HTML page (compare.html), drawn the way
the audit report is drawn: a JSON blob set with textContent, thumbnails as data URIs. What
it shows is measured by pages/comparison.py.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from explainctl.pages.comparison import Comparison, ComparisonResult, Pair, Read, Side
from explainctl.pages.page import render_page
from explainctl.pages.report import thumbnail
from explainctl.spec.contracts import MAX_PIXELS
from explainctl.spec.errors import ExplainctlError, InvalidInput


def default_page_name(job_a: str, job_b: str) -> str:
    return f"compare-{job_a}-{job_b}.html"


def _thumb(uri: str | None, read: Read, max_pixels: int) -> str | None:
    if not uri:
        return None
    try:
        return thumbnail(read(uri), max_pixels=max_pixels)
    except (ExplainctlError, OSError, ValueError, Image.DecompressionBombError):
        return None  # drawn as "unavailable"; the numbers still stand


def _side_row(side: Side) -> dict[str, Any]:
    label = side.target_name or (str(side.target_index) if side.target_index is not None else "")
    return {**side.as_json(), "class": label}


def build_page(
    result: ComparisonResult, read: Read, workers: int = 16, max_pixels: int = MAX_PIXELS
) -> str:
    """The comparison's HTML page; `read` fetches the overlays (S3 or local), PNGs of at
    most `max_pixels` only."""

    def row(numbered: tuple[int, Pair]) -> dict[str, Any]:
        order, pair = numbered
        return {
            **pair.as_json(),
            "order": order,
            "a": _side_row(pair.a),
            "b": _side_row(pair.b),
            "images": {
                "a": _thumb(pair.a.overlay_uri, read, max_pixels) if pair.a.done else None,
                "b": _thumb(pair.b.overlay_uri, read, max_pixels) if pair.b.done else None,
            },
        }

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(row, enumerate(result.pairs)))
    summary = result.summary
    data = {
        "summary": summary.as_json(),
        "rows": rows,
        "only_a": [{"uri": u.uri, "item": u.side.item} for u in result.only_a],
        "only_b": [{"uri": u.uri, "item": u.side.item} for u in result.only_b],
    }
    title = f"explainctl compare {summary.a.job_id} {summary.b.job_id}"
    return render_page("compare.html", title, data)


def write_page(comparison: Comparison, out: str | None = None) -> str:
    """Measure every pair, write the page to `out` (default compare-A-B.html here) and
    return its absolute path."""
    path = out or default_page_name(comparison.a.job_id, comparison.b.job_id)
    folder = os.path.dirname(os.path.abspath(path))
    # Checked before measuring: a comparison on S3 can take a while to be thrown away.
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise InvalidInput(f"cannot write {path}: not a writable file path")
    page = build_page(
        comparison.collect(), comparison.read, max_pixels=comparison.max_pixels
    ).encode()
    try:
        with open(path, "wb") as handle:
            handle.write(page)
    except OSError as error:
        raise InvalidInput(f"cannot write {path}: {error.strerror or error}") from None
    return os.path.abspath(path)
