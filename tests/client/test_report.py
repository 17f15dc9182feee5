"""The report page itself: data that cannot break out of its script element."""

import json
import re
import time

from explainctl.contracts import ItemRecord
from explainctl.report import build_report

HOSTILE = "<!--<script>alert(1)</script>"


def test_text_from_the_job_cannot_end_or_comment_out_the_script():
    record = ItemRecord(index=0, uri=f"/images/{HOSTILE}.png", item="000000-x", state="failed",
                        error_code="corrupt", error=HOSTILE)  # fmt: skip
    status = {
        "job_id": "01m8m5ytrjk834w7f5", "state": "completed_with_failures", "total": 1,
        "counts": {"queued": 0, "running": 0, "done": 0, "failed": 1, "cancelled": 0},
        "created": time.time() - 5, "finished_at": time.time(),
        "info": {"model": {"name": "m"}, "params": {}, "output": "/tmp/out"},
    }  # fmt: skip
    page = build_report(status, [record], lambda uri: b"")
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert "<" not in data.group(1)
    assert json.loads(data.group(1))["rows"][0]["error"] == f"corrupt: {HOSTILE}"
    assert page.count("<script") == 2  # the data block and the page's own script
