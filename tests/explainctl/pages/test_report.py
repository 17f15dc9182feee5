"""The report page itself: data that cannot break out of its script element, every
declared result field on the page, the job's findings, trust flags and the detail view."""

import base64
import io
import json
import re
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explainctl.pages import report
from explainctl.pages.report import build_report
from explainctl.spec.contracts import THUMB_PARTS, THUMBS_WEBP
from explainctl.spec.errors import InvalidInput
from explainctl.spec.results import SCORE_FIELDS, SORT_KEYS, ItemRecord, ItemScores, shown
from explainctl.spec.trust import FLAGS
from tests.support import browser

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
        elif name == "precision":
            values[name] = "bf16"
        elif name == "target_name":
            values[name] = "tabby"
        elif name in ("predicted_name", "label_name"):
            values[name] = name.replace("_", " ")
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
    # The prediction and the ground truth have their own columns, by name where known.
    assert cells["predicted_index"] == "predicted name" and cells["label_index"] == "label name"
    for name in SCORE_FIELDS:
        if name in ("target_index", "target_name", "predicted_name", "label_name"):
            continue
        if name in ("predicted_index", "label_index"):
            assert name in heads
            continue
        assert name in heads, f"{name}: declared but has no column in the report"
        assert cells.get(name) == shown(name, scores[name]), f"{name}: value not rendered"
    # The job's means of the sortable scores, one card each.
    cards = browser.card_values(dom)
    assert cards["mean p keep"] == shown("prob_keep", scores["prob_keep"])
    options = set(re.findall(r'<option value="([a-z_]+)"', dom))
    assert set(SORT_KEYS) <= options | {"class"}


# --- the job's findings, trust flags and the detail view ---

# (class name, class index, p before, p after, mask area, p ratio, class changed,
#  compactness, stability IoU, deletion AUC blur, insertion AUC)
ITEMS = [
    ("tabby", 281, 0.9, 0.01, 0.12, 0.0111, True, 0.8, 0.9, 0.2, 0.7),  # trustworthy
    ("tabby", 281, 0.8, 0.6, 0.42, 0.75, False, 0.3, 0.2, 0.5, 0.4),  # every flag
    ("tabby", 281, 0.7, 0.07, 0.27, 0.1, True, 0.6, None, None, None),  # stability not measured
    (None, 7, 0.6, 0.03, 0.63, 0.05, False, 0.45, 0.72, 0.3, 0.6),  # diffuse
    (None, 7, 0.5, 0.55, 0.08, 1.1, False, 0.9, None, None, None),  # not removed, p rose
]
KINDS = ("original", "mask", "overlay", "perturbed")


def _png(i: int, kind: str) -> bytes:
    mode = "L" if kind == "mask" else "RGB"
    ramp = np.linspace(0, 255, 640, dtype=np.uint8)[None, :].repeat(480, axis=0)
    pixels = ramp if mode == "L" else np.stack([ramp, np.roll(ramp, 40 * i, 1), ramp[::-1]], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _findings_job() -> tuple[list[ItemRecord], dict[str, bytes]]:
    records, files = [], {}
    for i, (name, index, pb, pa, area, ratio, changed, compact, iou, dab, ins) in enumerate(ITEMS):
        for kind in KINDS:
            files[f"/img/{i}/{kind}.png"] = _png(i, kind)
        records.append(ItemRecord(
            index=i, uri=f"/img/{i}/original.png", item=f"{i:06d}-photo", state="done",
            artifacts={f"{k}.png": f"/img/{i}/{k}.png" for k in KINDS[1:]},
            target_index=index, target_name=name, prob_before=pb, prob_after=pa,
            mask_area=area, prob_ratio=ratio, class_changed=changed, compactness=compact,
            stability_iou=iou, deletion_auc_blur=dab, insertion_auc=ins, iterations=100,
            seconds=1.0,
        ))  # fmt: skip
    records.append(ItemRecord(index=5, uri="/img/5/original.png", item="000005-broken",
                              state="failed", error_code="corrupt", error="truncated"))  # fmt: skip
    return records, files


def _bins(*at: int) -> list[int]:
    counts = [0] * report.HISTOGRAM_BINS
    for i in at:
        counts[i] += 1
    return counts


EXPECTED_BINS = {
    "mask_area": _bins(2, 8, 5, 12, 1),  # 0.12, 0.42, 0.27, 0.63, 0.08 in bins of 0.05
    "drop": _bins(17, 4, 12, 11),  # 0.89, 0.2, 0.63, 0.57; -0.05 falls below
    "stability_iou": _bins(18, 4, 14),  # 0.9, 0.2, 0.72
}
EXPECTED_STANDOUTS = {
    "largest-masks": [3, 1, 2, 0, 4],
    "smallest-masks": [4, 0, 2, 1, 3],
    "least-stable": [1, 3, 0],
    "least-compact": [1, 3, 2, 0, 4],
    "not-removed": [4, 1],
}


def _data(page: str) -> dict:
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(blob.group(1))


def test_the_findings_are_computed_from_the_done_items():
    records, files = _findings_job()
    data = _data(build_report(_status("completed_with_failures", 5, 1), records, files.get))
    findings = data["summary"]["findings"]
    assert findings["done"] == 5
    tabby, seven = findings["classes"]  # most items first
    assert tabby == {"class": "tabby", "count": 3, "prob_before": 0.8, "prob_after": 0.2267,
                     "mask_area": 0.27, "deletion_auc_blur": 0.35, "insertion_auc": 0.55,
                     "stability_iou": 0.55}  # fmt: skip
    assert seven["class"] == "7" and seven["count"] == 2  # no name: the class index
    assert seven["deletion_auc_blur"] == 0.3 and seven["stability_iou"] == 0.72  # one measured
    histograms = {h["key"]: h for h in findings["histograms"]}
    assert {key: h["counts"] for key, h in histograms.items()} == EXPECTED_BINS
    assert histograms["drop"]["below"] == 1 and histograms["mask_area"]["below"] == 0
    standouts = {s["key"]: [i["index"] for i in s["items"]] for s in findings["standouts"]}
    assert standouts == EXPECTED_STANDOUTS
    # Without ground truth: nothing about right and wrong, and no flag that needs it.
    assert findings["flagged"] == {"not-removed": 2, "diffuse": 2, "unstable": 1}
    assert findings["truth"] is None
    assert "misclassified" not in {f["name"] for f in data["flags"]}
    assert [r["flags"] for r in data["rows"]] == [
        [],
        ["not-removed", "diffuse", "unstable"],
        [],
        ["diffuse"],
        ["not-removed"],
        [],
    ]


def test_full_size_images_go_to_the_first_items_and_those_that_stand_out(monkeypatch):
    monkeypatch.setattr(report, "DETAIL_ITEMS", 1)
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)
    records, files = _findings_job()
    reads = []
    page = build_report(_status("completed_with_failures", 5, 1), records,
                        lambda uri: reads.append(uri) or files[uri])  # fmt: skip
    rows = _data(page)["rows"]
    # Item 0 is first; 3 has the largest mask, 4 the smallest, 1 is least stable.
    assert [i for i, r in enumerate(rows) if "detail" in r] == [0, 1, 3, 4]
    assert sorted(u for u in reads if u.endswith("mask.png")) == [
        f"/img/{i}/mask.png" for i in (0, 1, 3, 4)
    ]
    assert all(rows[2]["images"][k] for k in ("original", "overlay", "perturbed"))
    for key in KINDS:
        full = rows[1]["detail"][key]
        assert full.startswith("data:image/webp;base64,")
        with Image.open(io.BytesIO(base64.b64decode(full.split(",", 1)[1]))) as image:
            assert (image.format, image.size) == ("WEBP", (report.DETAIL, 336))  # 640x480
    thumbnail = rows[1]["images"]["original"]
    assert thumbnail.startswith("data:image/webp;base64,")
    with Image.open(io.BytesIO(base64.b64decode(thumbnail.split(",", 1)[1]))) as thumb:
        assert (thumb.format, thumb.size) == ("WEBP", (report.THUMBNAIL, 90))


def _findings_page(tmp_path) -> Path:
    records, files = _findings_job()
    page = tmp_path / "report.html"
    page.write_text(build_report(_status("completed_with_failures", 5, 1), records, files.get))
    return page


def _block(dom: str, attribute: str, value: str, tag: str = "div") -> str:
    found = re.search(rf'<{tag}[^>]* {attribute}="{re.escape(value)}"[^>]*>(.*?)</{tag}>', dom,
                      re.S)  # fmt: skip
    assert found, f"no <{tag} {attribute}={value}>"
    return found.group(1)


def test_the_findings_flags_and_detail_view_render_in_a_browser(tmp_path):
    dom = browser.dump_dom(_findings_page(tmp_path), tmp_path / "profile", fragment="item=1")
    body = browser.body_data(dom)
    # The per-class table.
    tabby = dict(re.findall(r'<td data-col="([a-z_]+)">([^<]*)</td>',
                            _block(dom, "data-class", "tabby", "tr")))  # fmt: skip
    assert tabby == {"prob_before": "0.800", "prob_after": "0.227", "mask_area": "0.270",
                     "deletion_auc_blur": "0.350", "insertion_auc": "0.550",
                     "stability_iou": "0.550"}  # fmt: skip
    assert "<td>3</td>" in _block(dom, "data-class", "tabby", "tr")
    # The three histograms: inline SVG, one bar per bin, heights from the counts.
    for key, counts in EXPECTED_BINS.items():
        figure = _block(dom, "data-histogram", key, "figure")
        assert "<svg" in figure
        bars = re.findall(r'<rect class="bar"[^>]*height="([0-9.]+)"[^>]*data-count="(\d+)"',
                          figure)  # fmt: skip
        assert [int(c) for _, c in bars] == counts
        assert all((float(h) > 0) == (int(c) > 0) for h, c in bars)
    assert "1 below 0 (p rose under the mask)" in _block(dom, "data-histogram", "drop", "figure")
    # Each item that stands out is a link to its detail view.
    for key, indices in EXPECTED_STANDOUTS.items():
        links = re.findall(r'<a href="#item=(\d+)" data-item="\d+">', _block(dom, "data-standout",
                           key))  # fmt: skip
        assert [int(i) for i in links] == indices, key
    # The gallery's badges carry the sentence.
    sentences = {f.name: f.sentence for f in FLAGS}
    row = _block(dom, "data-index", "1", "tr")
    assert re.findall(r'<span class="flag" data-flag="([a-z-]+)" title="([^"]*)">', row) == [
        (name, sentences[name]) for name in ("not-removed", "diffuse", "unstable")
    ]
    assert 'class="flag"' not in _block(dom, "data-index", "0", "tr")
    assert body["images-total"] == body["images-loaded"] == "15"
    # The detail view, open on load: four full-size images, every number, each flag in words.
    assert body["detail"] == "1"
    assert re.search(r'<div id="detail"[^>]*>', dom).group(0).find("hidden") < 0
    assert body["detail-images-total"] == body["detail-images-loaded"] == "4"
    assert body["detail-images-widths"] == ",".join([str(report.DETAIL)] * 4)
    numbers = dict(re.findall(r'<td data-detail-field="([a-z_]+)">([^<]*)</td>', dom))
    assert numbers["prob_ratio"] == "0.750" and numbers["stability_iou"] == "0.200"
    assert numbers["drop"] == "0.200" and numbers["class_changed"] == "no"
    assert set(SCORE_FIELDS) <= set(numbers)
    flags_shown = _block(dom, "id", "detail-flags", "ul")
    assert all(sentences[name] in flags_shown for name in ("not-removed", "diffuse", "unstable"))


@pytest.mark.parametrize(
    ("flag", "shown"), [("unstable", [1]), ("any", [1, 3, 4]), ("none", [0, 2]), ("", None)]
)
def test_the_gallery_filters_by_flag(tmp_path, flag, shown):
    fragment = f"flag={flag}" if flag else ""
    dom = browser.dump_dom(_findings_page(tmp_path), tmp_path / "profile", fragment=fragment)
    rows = [int(i) for i in re.findall(r'<tr class="[a-z]+" data-state="[a-z]+" data-index="(\d+)"',
                                       dom)]  # fmt: skip
    assert rows == (shown if shown is not None else list(range(6)))
    assert browser.body_data(dom)["shown"] == str(len(rows))
    assert "data-detail" not in re.search(r"<body[^>]*>", dom).group(0)
    assert re.search(r'<div id="detail"[^>]*hidden', dom)


def test_the_detail_view_falls_back_to_thumbnails_past_the_embedded_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "DETAIL_ITEMS", 0)
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)  # item 2 stands out in no list
    dom = browser.dump_dom(_findings_page(tmp_path), tmp_path / "profile", fragment="item=2")
    body = browser.body_data(dom)
    assert body["detail"] == "2"
    assert body["detail-images-loaded"] == "3"  # original, overlay, perturbed
    assert body["detail-images-widths"] == ",".join([str(report.THUMBNAIL)] * 3)
    assert "unavailable" in _block(dom, "data-image", "mask", "figure")
    assert "Thumbnails: full-size images" in _block(dom, "id", "detail-note", "p")


class _Reread:
    """Records that count how often they are read from the start (the report reads twice,
    so that a job of a million items is streamed, never held)."""

    def __init__(self, records: list[ItemRecord]) -> None:
        self.records, self.reads = records, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.records)


def _bounded(gallery: report.Gallery) -> tuple[dict, list[str], _Reread]:
    records, files = _findings_job()
    source, reads = _Reread(records), []
    page = build_report(_status("completed_with_failures", 5, 1), source,
                        lambda uri: reads.append(uri) or files[uri], gallery)  # fmt: skip
    return _data(page), reads, source


@pytest.mark.parametrize(
    ("gallery", "rows", "matched"),
    [
        (report.Gallery(limit=1), [0, 1, 3, 4], 6),  # the first item, then the stand-outs
        (report.Gallery(flag="none"), [0, 1, 2, 3, 4], 2),  # 0 and 2 carry no flag
        (report.Gallery(state="failed"), [1, 3, 4, 5], 1),
        (report.Gallery(flag="any", limit=1), [1, 3, 4], 3),  # 1 is the first flagged
    ],
)
def test_the_gallery_holds_what_matches_and_the_standouts_and_the_findings_count_all(
    monkeypatch, gallery, rows, matched
):
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)  # 3 largest, 4 smallest, 1 least stable
    data, reads, source = _bounded(gallery)
    assert [r["index"] for r in data["rows"]] == rows
    assert data["summary"]["gallery"] == {
        "filters": gallery.filters(), "matched": matched, "limit": gallery.limit,
        "rows": len(rows),
    }  # fmt: skip
    assert data["summary"]["findings"]["done"] == 5  # whatever the gallery holds
    assert sum(c["count"] for c in data["summary"]["findings"]["classes"]) == 5
    assert source.reads == 2
    # Images are read only for the rows on the page.
    assert {int(uri.split("/")[2]) for uri in reads} == set(rows) - {5}


@pytest.mark.parametrize(
    ("values", "message"),
    [({"flag": "shaky"},
      "--flag takes one of not-removed, diffuse, unstable, misclassified, any, none"),
     ({"state": "lost"}, "--state takes one of queued, running, done, failed, cancelled"),
     ({"limit": 0}, "--limit takes a number of items of at least 1")],
)  # fmt: skip
def test_a_gallery_filter_that_cannot_match_is_refused_in_one_line(values, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        report.Gallery(**values)


def test_a_bounded_gallery_says_what_it_holds_in_a_browser(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)
    records, files = _findings_job()
    page = tmp_path / "report.html"
    page.write_text(build_report(_status("completed_with_failures", 5, 1), records, files.get,
                                 report.Gallery(limit=1)))  # fmt: skip
    dom = browser.dump_dom(page, tmp_path / "profile")
    note = re.search(r'<p class="note" id="gallery-note"([^>]*)>([^<]*)</p>', dom)
    assert "hidden" not in note.group(1)
    assert note.group(2) == (
        "The gallery holds 4 of the job's 6 items: the first 1, and the items that stand out."
        " The findings above count every item."
    )
    assert browser.body_data(dom)["rendered"] == "4"
    # A gallery of every item says nothing.
    dom = browser.dump_dom(_findings_page(tmp_path), tmp_path / "profile2")
    assert re.search(r'<p class="note" id="gallery-note" hidden', dom)


def test_the_page_runs_only_its_own_script_under_its_policy(tmp_path):
    """The Content-Security-Policy names the page's script by hash: the page works, and a
    script that slipped into it past the escaping does not run."""
    name = '<img src=x onerror="document.body.dataset.pwned=1">'
    record = ItemRecord(index=0, uri="/images/cat.png", item="000000-cat", state="done",
                        artifacts={}, **{**_every_score(), "target_name": name})  # fmt: skip
    page = build_report(_status("completed", 1, 0), [record], lambda uri: b"")
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    assert policy.startswith("default-src 'none'; img-src data:; style-src 'unsafe-inline'; ")
    slipped = page.replace("</body>", "<script>document.body.dataset.pwned = '2'</script></body>")
    (tmp_path / "report.html").write_text(slipped)
    dom = browser.dump_dom(tmp_path / "report.html", tmp_path / "profile")
    assert "&lt;img src=x onerror=" in dom  # the page drew its table, the name as text
    drawn = browser.body_data(dom)
    assert drawn and "pwned" not in drawn


def test_only_the_formats_workers_write_are_decoded_under_the_pixel_cap():
    rgb = np.full((30, 30, 3), 200, np.uint8)

    def encoded(fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=fmt)
        return buffer.getvalue()

    files = {"/o/orig.tif": encoded("TIFF"), "/o/overlay.png": encoded("PNG"),
             "/o/perturbed.bmp": encoded("BMP"), "/o/mask.png": encoded("PNG")}  # fmt: skip
    record = ItemRecord(index=0, uri="/o/orig.tif", item="000000-orig", state="done",
                        artifacts={"overlay.png": "/o/overlay.png", "perturbed.png":
                                   "/o/perturbed.bmp", "mask.png": "/o/mask.png"})  # fmt: skip
    rows = _data(build_report(_status("completed", 1, 0), [record], files.get))["rows"]
    images = rows[0]["images"]
    assert images["original"] and images["overlay"]  # a TIFF input, as workers read
    assert images["perturbed"] is None  # a BMP where workers write PNG: not opened
    capped = build_report(_status("completed", 1, 0), [record], files.get, max_pixels=899)
    assert not any(_data(capped)["rows"][0]["images"].values())
    # A progressive JPEG of thousands of scans: refused before its decode, as by workers.
    from tests.support.hostile import many_scan_jpeg

    files["/o/orig.tif"] = many_scan_jpeg(scans=300, side=32)
    rows = _data(build_report(_status("completed", 1, 0), [record], files.get))["rows"]
    assert rows[0]["images"]["original"] is None and rows[0]["images"]["overlay"]


# --- with ground truth: right and wrong ---


# Per done item of _findings_job: (predicted index, name), (label index, name), raw label.
# 0 right; 1 and 2 a tiger cat taken for a tabby; 3 a tabby taken for class 7; 4 a label
# that names no class.
TRUTH = [
    ((281, "tabby"), (281, "tabby"), "281"),
    ((281, "tabby"), (282, "tiger cat"), "tiger cat"),
    ((281, "tabby"), (282, "tiger cat"), "Tiger Cat"),
    ((7, None), (281, "tabby"), "tabby"),
    ((7, None), (None, None), "zebra"),
]


def _truth_job() -> tuple[list[ItemRecord], dict[str, bytes]]:
    records, files = _findings_job()
    labelled = []
    for record in records:
        values = record.model_dump()
        if record.index < len(TRUTH):
            (p, pname), (t, tname), raw = TRUTH[record.index]
            values |= {"predicted_index": p, "predicted_name": pname, "label_index": t,
                       "label_name": tname, "correct": None if t is None else p == t,
                       "label": raw}  # fmt: skip
        labelled.append(ItemRecord(**values))
    return labelled, files


def test_with_ground_truth_the_findings_hold_accuracy_per_class_tables_and_confusions():
    records, files = _truth_job()
    data = _data(build_report(_status("completed_with_failures", 5, 1), records, files.get))
    truth = data["summary"]["findings"]["truth"]
    assert (truth["labelled"], truth["correct"], truth["unmatched"]) == (4, 1, 1)
    assert truth["accuracy"] == 0.25
    by_truth = {c["class"]: c for c in truth["by_truth"]}
    assert {k: (c["count"], c["correct"], c["accuracy"]) for k, c in by_truth.items()} == {
        "tabby": (2, 1, 0.5), "tiger cat": (2, 0, 0.0)
    }  # fmt: skip
    assert by_truth["tiger cat"]["prob_before"] == 0.75  # items 1 and 2: 0.8, 0.7
    by_prediction = {c["class"]: (c["count"], c["correct"]) for c in truth["by_prediction"]}
    assert by_prediction == {"tabby": (3, 1), "7": (1, 0)}  # no name: the index
    assert truth["confusions"] == [
        {"truth": "tiger cat", "predicted": "tabby", "count": 2, "items": [1, 2]},
        {"truth": "tabby", "predicted": "7", "count": 1, "items": [3]},
    ]
    assert data["summary"]["findings"]["flagged"]["misclassified"] == 3
    rows = {r["index"]: r for r in data["rows"]}
    assert [i for i in rows if "misclassified" in rows[i]["flags"]] == [1, 2, 3]
    assert (rows[4]["truth"], rows[4]["label"]) == (None, "zebra")


def test_the_confusions_items_get_their_masks_whatever_the_gallery_holds(monkeypatch):
    monkeypatch.setattr(report, "DETAIL_ITEMS", 0)
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)  # 3 largest, 4 smallest, 1 least stable
    records, files = _truth_job()
    page = build_report(_status("completed_with_failures", 5, 1), records, files.get,
                        report.Gallery(flag="none", limit=1))  # fmt: skip
    rows = {r["index"]: r for r in _data(page)["rows"]}
    # Item 2 is in the gallery only as a confusion's item, with its full-size mask.
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[2]["detail"]["mask"].startswith("data:image/webp;base64,")


def test_right_and_wrong_render_in_a_browser_and_misclassified_filters(tmp_path):
    records, files = _truth_job()
    page = tmp_path / "report.html"
    page.write_text(build_report(_status("completed_with_failures", 5, 1), records, files.get))
    dom = browser.dump_dom(page, tmp_path / "profile", fragment="item=2")
    assert re.search(r'<div id="truth"[^>]*>', dom).group(0) == '<div id="truth">'  # shown
    assert re.search(r'<div id="by-class" hidden', dom)
    cards = browser.card_values(dom)
    assert (cards["accuracy"], cards["misclassified"]) == ("0.250", "3")
    summary = _block(dom, "id", "truth-summary", "p")
    assert "for 1 of the 4 items whose label matched a class" in summary
    assert "1 more carry a label that names no class" in summary

    def table(table_id: str) -> dict[str, list[str]]:
        body = _block(dom, "id", table_id, "table")
        rows = re.findall(r'<tr data-class="([^"]*)">(.*?)</tr>', body)
        cell = r'<td data-col="(?:correct|accuracy)">([^<]*)</td>'
        return {name: re.findall(cell, row) for name, row in rows}

    assert table("by-truth") == {"tabby": ["1", "0.500"], "tiger cat": ["0", "0.000"]}
    assert table("by-prediction") == {"tabby": ["1", "0.333"], "7": ["0", "0.000"]}
    confusions = re.findall(r'<li data-confusion="([^"]*)">(.*?)</li>', dom)
    assert [name for name, _ in confusions] == ["tiger cat → tabby", "tabby → 7"]
    links = [re.findall(r'<a href="#item=(\d+)"', li) for _, li in confusions]
    assert links == [["1", "2"], ["3"]]
    # The prediction and the truth columns; a label of no class shown as given.
    assert re.findall(r'<td data-field="label_index">([^<]*)</td>', dom) == [
        "tabby", "tiger cat", "tiger cat", "tabby", "zebra (no such class)", ""
    ]  # fmt: skip
    assert '<td data-field="predicted_index" class="wrong">tabby</td>' in _block(
        dom, "data-index", "1", "tr"
    )
    assert 'data-flag="misclassified"' in _block(dom, "data-index", "3", "tr")
    # A confusion's item opens with its mask at full size, one click from the list.
    body = browser.body_data(dom)
    assert body["detail"] == "2" and body["detail-images-loaded"] == "4"
    assert "unavailable" not in _block(dom, "data-image", "mask", "figure")
    # The gallery's Trust filter (and the address's flag=) narrow to the misclassified.
    dom = browser.dump_dom(page, tmp_path / "profile", fragment="flag=misclassified")
    shown = re.findall(r'<tr class="[a-z]+" data-state="[a-z]+" data-index="(\d+)"', dom)
    assert shown == ["1", "2", "3"]
    assert '<option value="misclassified"' in dom


def test_without_ground_truth_the_page_says_nothing_of_right_and_wrong(tmp_path):
    dom = browser.dump_dom(_findings_page(tmp_path), tmp_path / "profile")
    assert re.search(r'<div id="truth" hidden', dom)
    assert re.search(r'<div id="by-class">', dom)
    assert "accuracy" not in browser.card_values(dom)
    assert 'data-field="predicted_index"' not in dom and 'data-field="correct"' not in dom
    assert "misclassified" not in dom.split('<script id="data"')[0]


# --- the gallery from the worker's thumbs.webp ---


def _thumbs_job() -> tuple[list[ItemRecord], dict[str, bytes]]:
    """The findings job with the thumbnails a worker writes (explainctl_worker.artifact),
    except item 4's, an item of an older job."""
    from explainctl_worker.artifact import thumbs

    records, files = _findings_job()
    with_thumbs = []
    for record in records:
        if record.state == "done" and record.index != 4:
            i, uri = record.index, f"/img/{record.index}/thumbs.webp"
            parts = [Image.open(io.BytesIO(files[f"/img/{i}/{k}.png"])) for k in THUMB_PARTS]
            files[uri] = thumbs(parts)
            record = record.model_copy(update={"artifacts": {**record.artifacts, THUMBS_WEBP: uri}})
        with_thumbs.append(record)
    return with_thumbs, files


def test_the_gallery_reads_the_workers_thumbnails_and_older_items_the_full_files(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(report, "DETAIL_ITEMS", 0)
    monkeypatch.setattr(report, "STANDOUT_ITEMS", 1)  # 3 largest, 4 smallest, 1 least stable
    records, files = _thumbs_job()
    reads = []
    page = build_report(_status("completed_with_failures", 5, 1), records,
                        lambda uri: reads.append(uri) or files[uri])  # fmt: skip
    rows = {r["index"]: r for r in _data(page)["rows"]}
    # 0 and 2 stand out in no list: one small file each, embedded as it is.
    for i in (0, 2):
        assert [u for u in reads if u.startswith(f"/img/{i}/")] == [f"/img/{i}/thumbs.webp"]
        strip = base64.b64encode(files[f"/img/{i}/thumbs.webp"]).decode()
        assert rows[i]["images"] == {"strip": "data:image/webp;base64," + strip}
    # The items whose detail view embeds full-size images read those, as before.
    assert "detail" in rows[1] and "detail" in rows[3]
    assert {"original", "overlay", "perturbed"} <= set(rows[4]["images"])  # no thumbs.webp
    path = tmp_path / "report.html"
    path.write_text(page)
    dom = browser.dump_dom(path, tmp_path / "profile", fragment="item=2")
    body = browser.body_data(dom)
    assert body["images-total"] == body["images-loaded"] == "15"
    # Each part of the strip in its own cell: the strip (360 px) shifted by whole parts.
    row = _block(dom, "data-index", "0", "tr")
    crop = r'<div class="crop" data-part="([a-z]+)"><img [^>]*style="margin-left: ([^;"]+);'
    crops = re.findall(crop, row)
    assert crops == [("original", "0%"), ("overlay", "-100%"), ("perturbed", "-200%")]
    widths = body["images-widths"].split(",")
    assert widths.count(str(3 * report.THUMBNAIL)) == 6  # rows 0 and 2; the others their own
    # The detail view of an item without full-size images shows the strip's parts too.
    assert body["detail"] == "2" and body["detail-images-loaded"] == "3"
    assert "unavailable" in _block(dom, "data-image", "mask", "figure")
