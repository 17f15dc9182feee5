"""The report page itself: data that cannot break out of its script element, and every
declared result field on the page."""

import json
import re
import time
import typing

from explainctl.item import SCORE_FIELDS, SORT_KEYS, ItemRecord, ItemScores, shown
from explainctl.report import build_report
from tests import browser

HOSTILE = "<!--<script>alert(1)</script>"


def _status(state: str, done: int, failed: int) -> dict:
    return {
        "job_id": "01m8m5ytrjk834w7f5", "state": state, "total": done + failed,
        "counts": {"queued": 0, "running": 0, "done": done, "failed": failed, "cancelled": 0},
        "created": time.time() - 5, "finished_at": time.time(),
        "info": {"model": {"name": "m"}, "params": {}, "output": "/tmp/out"},
    }  # fmt: skip


def test_text_from_the_job_cannot_end_or_comment_out_the_script():
    record = ItemRecord(index=0, uri=f"/images/{HOSTILE}.png", item="000000-x", state="failed",
                        error_code="corrupt", error=HOSTILE)  # fmt: skip
    page = build_report(_status("completed_with_failures", 0, 1), [record], lambda uri: b"")
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert "<" not in data.group(1)
    assert json.loads(data.group(1))["rows"][0]["error"] == f"corrupt: {HOSTILE}"
    assert page.count("<script") == 2  # the data block and the page's own script


def _every_score() -> dict:
    """A value for every declared score, each one recognisable on the page."""
    values = {}
    for n, (name, info) in enumerate(ItemScores.model_fields.items()):
        kind = next(a for a in (*typing.get_args(info.annotation), info.annotation) if a is not
                    type(None))  # fmt: skip
        if name == "method":
            values[name] = "paper"
        elif name == "stop_reason":
            values[name] = "converged"
        elif name == "target_name":
            values[name] = "tabby"
        elif kind is bool:
            values[name] = True
        elif kind in (int, "int") or name in ("target_index", "iterations"):
            values[name] = 100 + n
        else:
            values[name] = round(0.01 * (n + 1) + 0.0001, 4)
    return values


def test_every_declared_score_is_rendered_in_a_browser(tmp_path):
    """A field added to ItemScores and not shown by the report fails here."""
    scores = _every_score()
    record = ItemRecord(index=0, uri="/images/cat.png", item="000000-cat", state="done",
                        artifacts={}, **scores)  # fmt: skip
    page = tmp_path / "report.html"
    page.write_text(build_report(_status("completed", 1, 0), [record], lambda uri: b""))
    dom = browser.dump_dom(page, tmp_path / "profile")
    cells = dict(re.findall(r'<td data-field="([a-z_]+)">([^<]*)</td>', dom))
    heads = set(re.findall(r'<th[^>]*data-field="([a-z_]+)"', dom))
    assert "tabby" in dom and str(scores["target_index"]) in dom  # the class column
    for name in SCORE_FIELDS:
        if name in ("target_index", "target_name"):
            continue
        assert name in heads, f"{name}: declared but has no column in the report"
        assert cells.get(name) == shown(name, scores[name]), f"{name}: value not rendered"
    # The job's means of the sortable scores, one card each.
    cards = browser.card_values(dom)
    assert cards["mean p keep"] == shown("prob_keep", scores["prob_keep"])
    options = set(re.findall(r'<option value="([a-z_]+)"', dom))
    assert set(SORT_KEYS) <= options | {"class"}
