"""Comparing two jobs: pairing by URI, the per-pair numbers from real mask.npy bytes, the
summary, the JSON shapes, and the page in a real browser."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from explainctl.pages.agreement import mask_agreement, resize_bilinear
from explainctl.pages.compare import build_page
from explainctl.pages.comparison import Comparison, JobView, Pair, pair_records
from explainctl.spec.errors import ItemError
from explainctl.spec.results import ItemRecord
from tests.support import browser

HOSTILE = "<!--<script>alert(1)</script>"


def _npy(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, mask.astype(np.float32))
    return buffer.getvalue()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Store:
    """Artifacts in memory, read as `build_report` and `compare` read URIs."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.reads: list[str] = []

    def __call__(self, uri: str) -> bytes:
        self.reads.append(uri)
        if uri not in self.files:
            raise ItemError("not-found", f"no such object {uri}")
        return self.files[uri]


def _done(store: Store, job: str, index: int, uri: str, mask: np.ndarray, **scores):
    item = f"{index:06d}-x"
    artifacts = {name: f"mem://{job}/{item}/{name}" for name in ("mask.npy", "overlay.png")}
    store.files[artifacts["mask.npy"]] = _npy(mask)
    store.files[artifacts["overlay.png"]] = _png(index + (100 if job == "b" else 0))
    values = {"target_index": 3, "prob_before": 0.9, "prob_after": 0.2, "mask_area": 0.3}
    return ItemRecord(index=index, uri=uri, item=item, state="done", artifacts=artifacts,
                      **{**values, **scores})  # fmt: skip


def _failed(index: int, uri: str) -> ItemRecord:
    return ItemRecord(index=index, uri=uri, item=f"{index:06d}-x", state="failed",
                      error_code="corrupt", error="damaged")  # fmt: skip


def _view(job_id: str, **params) -> JobView:
    return JobView(job_id=job_id, state="completed", model=f"model-{job_id}",
                   params={"iterations": 5, "mask_size": 8, **params}, total=4,
                   output="/out")  # fmt: skip


def _uris(sides):
    return [(uri, a and a.index, b and b.index) for uri, a, b in sides]


def test_items_pair_by_uri_in_as_order_then_bs_leftovers_in_bs_order():
    a = [ItemRecord(index=i, uri=u, item=f"{i:06d}-x", state="queued")
         for i, u in enumerate(["/p/1", "/p/2", "/p/dup", "/p/dup", "/p/only-a"])]  # fmt: skip
    b = [ItemRecord(index=i, uri=u, item=f"{i:06d}-x", state="queued")
         for i, u in enumerate(["/p/z", "/p/dup", "/p/2", "/p/y", "/p/1"])]  # fmt: skip
    assert _uris(pair_records(a, b)) == [
        ("/p/1", 0, 4),
        ("/p/2", 1, 2),
        ("/p/dup", 2, 1),  # a URI twice in A and once in B: the first pairs, the second not
        ("/p/dup", 3, None),
        ("/p/only-a", 4, None),
        ("/p/z", None, 0),
        ("/p/y", None, 3),
    ]


def test_b_is_read_whole_before_a_streams_and_a_is_never_held():
    pulled = []

    def records(job, uris):
        for i, uri in enumerate(uris):
            pulled.append((job, i))
            yield ItemRecord(index=i, uri=uri, item=f"{i:06d}-x", state="queued")

    pairs = pair_records(records("a", ["/1", "/2", "/3"]), records("b", ["/3", "/1"]))
    assert next(pairs)[0] == "/1"
    # All of B (the side held by URI), but only A's first item so far.
    assert pulled == [("b", 0), ("b", 1), ("a", 0)]


def _comparison():
    """A: 8x8 masks; B: 4x4 masks of the same or other images, a failure, unpaired items."""
    rng = np.random.default_rng(0)
    store = Store()
    small = rng.random((4, 4), dtype=np.float32)
    same = resize_bilinear(small, 8, 8)  # B's 4x4 mask, as A's 8x8 grid sees it
    other_a, other_b = rng.random((8, 8), dtype=np.float32), rng.random((4, 4), dtype=np.float32)
    inverted = 1 - small  # the saliency reversed
    records_a = [
        _done(store, "a", 0, "/img/same.png", same),
        _done(store, "a", 1, "/img/other.png", other_a, prob_after=0.1, mask_area=0.2),
        _done(store, "a", 2, f"/img/{HOSTILE}.png", same, target_index=7),
        _failed(3, "/img/broken.png"),
        _done(store, "a", 4, "/img/only-a.png", same),
        _done(store, "a", 5, "/img/inverted.png", same, target_index=2),
    ]
    records_b = [
        _done(store, "b", 0, "/img/broken.png", small),
        _done(store, "b", 1, "/img/same.png", small),
        _done(store, "b", 2, "/img/other.png", other_b, prob_after=0.4, mask_area=0.5),
        _done(store, "b", 3, f"/img/{HOSTILE}.png", small, target_index=8),
        _done(store, "b", 4, "/img/only-b.png", small),
        _done(store, "b", 5, "/img/inverted.png", inverted, target_index=2),
    ]
    comparison = Comparison(_view("a"), _view("b", mask_size=4, seed=1), records_a, records_b,
                            store)  # fmt: skip
    expected = {
        "other": mask_agreement(other_a, other_b),
    }
    return comparison, store, expected


def test_pairs_carry_both_sides_their_differences_and_mask_agreement():
    comparison, _, expected = _comparison()
    entries = list(comparison)
    kinds = [(e.as_json()["kind"], e.uri.removeprefix("/img/")) for e in entries]
    assert kinds == [
        ("pair", "same.png"), ("pair", "other.png"), ("pair", f"{HOSTILE}.png"),
        ("pair", "broken.png"), ("only_a", "only-a.png"), ("pair", "inverted.png"),
        ("only_b", "only-b.png"),
    ]  # fmt: skip
    pairs = {e.uri.removeprefix("/img/"): e for e in entries if isinstance(e, Pair)}
    # A 4x4 mask and its own upsampling to 8x8 agree completely.
    assert pairs["same.png"].iou == pytest.approx(1.0)
    assert pairs["same.png"].rank == pytest.approx(1.0)
    other = pairs["other.png"]
    assert (other.iou, other.rank) == pytest.approx(expected["other"])
    assert other.iou < 0.9
    assert other.delta_prob_after == pytest.approx(0.3)
    assert other.delta_drop == pytest.approx(-0.3)  # drop 0.8 in A, 0.5 in B
    assert other.delta_mask_area == pytest.approx(0.3)
    assert other.class_changed is False
    assert pairs[f"{HOSTILE}.png"].class_changed is True
    assert pairs["inverted.png"].rank == pytest.approx(-1.0)
    assert pairs["inverted.png"].iou == 0.0
    broken = pairs["broken.png"]
    assert broken.iou is None and broken.note == "failed in A"
    assert broken.as_json()["a"]["error_code"] == "corrupt"

    summary = comparison.summary.as_json()
    assert (summary["paired"], summary["compared"], summary["only_a"], summary["only_b"]) == (
        5, 4, 1, 1,
    )  # fmt: skip
    assert summary["class_changed"] == 1
    measured = [p for p in pairs.values() if p.iou is not None]
    assert summary["mean_iou"] == pytest.approx(np.mean([p.iou for p in measured]))
    assert summary["mean_rank"] == pytest.approx(np.mean([p.rank for p in measured]))
    assert summary["mean_delta_prob_after"] == pytest.approx(0.3 / 4)
    assert summary["params_differ"] == ["mask_size", "seed"]
    assert summary["a"]["model"] == "model-a" and summary["b"]["params"]["seed"] == 1


def test_the_json_shapes_are_stable():
    comparison, _, _ = _comparison()
    entries = [e.as_json() for e in comparison]
    side = ["index", "item", "state", "target_index", "target_name", "predicted_index",
            "predicted_name", "label_index", "label_name", "correct", "prob_before",
            "prob_after", "drop", "mask_area", "error_code"]  # fmt: skip
    pair = next(e for e in entries if e["kind"] == "pair")
    assert list(pair) == ["kind", "uri", "a", "b", "class_changed", "only_right",
                          "delta_prob_after", "delta_drop", "delta_mask_area", "iou", "rank",
                          "note"]  # fmt: skip
    assert list(pair["a"]) == side and list(pair["b"]) == side
    only = [e for e in entries if e["kind"].startswith("only_")]
    assert [list(e) for e in only] == [["kind", "uri", "a"], ["kind", "uri", "b"]]
    assert list(comparison.summary.as_json()) == [
        "kind", "a", "b", "params_differ", "paired", "compared", "only_a", "only_b",
        "class_changed", "judged", "right_a", "right_b", "only_right_a", "only_right_b",
        "mean_iou", "mean_rank", "mean_delta_prob_after", "mean_delta_drop",
        "mean_delta_mask_area",
    ]  # fmt: skip
    json.dumps(entries)  # every value is plain JSON


def test_an_unreadable_or_foreign_mask_leaves_the_pair_without_agreement():
    store = Store()
    mask = np.ones((4, 4), dtype=np.float32)
    a = [_done(store, "a", 0, "/1.png", mask), _done(store, "a", 1, "/2.png", mask)]
    b = [_done(store, "b", 0, "/1.png", mask), _done(store, "b", 1, "/2.png", mask)]
    del store.files[a[0].artifacts["mask.npy"]]
    store.files[b[1].artifacts["mask.npy"]] = b"\x93NUMPY not really"
    pairs = list(Comparison(_view("a"), _view("b"), a, b, store))
    assert pairs[0].iou is None and pairs[0].note.startswith("mask.npy of A unreadable: no such")
    assert pairs[1].iou is None and pairs[1].note.startswith("mask.npy of B unreadable")
    assert "\n" not in pairs[1].note


def test_pairs_sort_most_disagreeing_first():
    comparison, _, _ = _comparison()
    result = comparison.collect()
    names = [p.uri.removeprefix("/img/") for p in result.pairs]
    ious = [p.iou for p in result.pairs if p.iou is not None]
    assert ious == sorted(ious)
    assert names[-1] == "broken.png"  # nothing to compare: last
    # Equal IoU (1.0): the pair whose class changed comes first.
    assert names.index(f"{HOSTILE}.png") < names.index("same.png")
    assert [u.uri for u in result.only_a] == ["/img/only-a.png"]


def test_text_from_either_job_cannot_end_or_comment_out_the_script():
    comparison, store, _ = _comparison()
    page = build_page(comparison.collect(), store)
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    assert "<" not in data.group(1)
    uris = [row["uri"] for row in json.loads(data.group(1))["rows"]]
    assert f"/img/{HOSTILE}.png" in uris
    assert page.count("<script") == 2
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network


def test_the_page_renders_summary_and_rows_sorted_with_images_in_a_browser(tmp_path):
    comparison, store, _ = _comparison()
    result = comparison.collect()
    path = tmp_path / "compare.html"
    path.write_text(build_page(result, store))
    dom = browser.dump_dom(path, tmp_path / "profile")

    data = browser.body_data(dom)
    assert data["rendered"] == "5"
    # Both overlays of the four pairs with two done sides, none of the failed one.
    assert data["images-total"] == "9" and data["images-loaded"] == "9"
    cards = browser.card_values(dom)
    assert (cards["items paired"], cards["only in A"], cards["only in B"]) == ("5", "1", "1")
    assert cards["class changed"] == "1"
    assert cards["mean IoU"] == f"{result.summary.as_json()['mean_iou']:.3f}"
    assert cards["mean Δ p after"] == "+0.075"
    rows = re.findall(r'<tr data-uri="([^"]*)" data-order="(\d+)"', dom)
    assert [int(order) for _, order in rows] == list(range(5))
    assert [uri for uri, _ in rows] == [
        html_escape(p.uri) for p in sorted(result.pairs, key=Pair.disagreement)
    ]
    ious = re.findall(r'<td data-field="iou">([^<]*)</td>', dom)
    assert ious[:4] == sorted(ious[:4]) and ious[4] == ""
    assert HOSTILE not in dom  # shown as text, escaped by the browser
    # The jobs' parameters side by side, those that differ marked.
    assert re.search(r'<tr data-param="mask_size" class="differs"><th>mask_size</th><td>8</td>'
                     r'<td>4</td></tr>', dom)  # fmt: skip
    assert '<tr data-param="iterations"><th>' in dom
    assert "model-a" in dom and "model-b" in dom


def html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _judged():
    """Three images under two models, with ground truth: both right, only A right, only B
    right; and one without ground truth."""
    store, mask = Store(), np.ones((4, 4), dtype=np.float32)
    verdicts = [(True, True), (True, False), (False, True), (None, None)]
    a, b = [], []
    for i, (right_a, right_b) in enumerate(verdicts):
        a.append(_done(store, "a", i, f"/img/{i}.png", mask, correct=right_a))
        b.append(_done(store, "b", i, f"/img/{i}.png", mask, correct=right_b))
    return Comparison(_view("a"), _view("b"), a, b, store), store


def test_pairs_mark_the_items_only_one_model_gets_right():
    comparison, _ = _judged()
    pairs = list(comparison)
    assert [p.only_right for p in pairs] == [None, "a", "b", None]
    assert [p.as_json()["only_right"] for p in pairs] == [None, "a", "b", None]
    summary = comparison.summary.as_json()
    assert (summary["judged"], summary["right_a"], summary["right_b"]) == (3, 2, 2)
    assert (summary["only_right_a"], summary["only_right_b"]) == (1, 1)


def test_the_page_marks_right_and_wrong_and_filters_to_them_in_a_browser(tmp_path):
    comparison, store = _judged()
    path = tmp_path / "compare.html"
    path.write_text(build_page(comparison.collect(), store))
    dom = browser.dump_dom(path, tmp_path / "profile")
    cards = browser.card_values(dom)
    assert (cards["right in A"], cards["right in B"]) == ("2 / 3", "2 / 3")
    assert (cards["only A right"], cards["only B right"]) == ("1", "1")
    marks = dict(re.findall(r'<tr data-uri="/img/(\d).png"[^>]*>.*?<td data-field="only_right">'
                            r'(.*?)</td>', dom))  # fmt: skip
    assert marks == {"0": "yes / yes", "1": '<span class="right">only A</span>',
                     "2": '<span class="right">only B</span>', "3": "– / –"}  # fmt: skip
    assert not re.search(r'<label id="split-label"[^>]*hidden', dom)
    # Without ground truth the page has neither the column nor the filter.
    comparison, store, _ = _comparison()
    path.write_text(build_page(comparison.collect(), store))
    dom = browser.dump_dom(path, tmp_path / "profile")
    drawn = dom.split('<script id="data"')[0]  # the page, not its script
    assert 'data-field="only_right"' not in drawn and "only A right" not in drawn
    assert re.search(r'<label id="split-label"[^>]*hidden', dom)
