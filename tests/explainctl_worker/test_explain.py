"""explain_items: outcomes in input order, failures credited, host work beside the loop."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from explainctl.spec.contracts import ModelSpec, Target
from explainctl.spec.errors import ItemError
from explainctl.spec.methods import ExplainParams
from explainctl_worker.explain import ItemInput, Timings, _wanted, explain_items
from explainctl_worker.model import LoadedModel
from tests.support.models import tiny_classifier

PARAMS = ExplainParams(method="original", iterations=20, mask_size=4, image_size=32)


def _png(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _items() -> list[ItemInput]:
    good = [ItemInput(f"img{i}", f"mem://{i}.png", lambda i=i: _png(i)) for i in range(5)]
    broken = ItemInput("broken", "mem://broken.png", lambda: b"not an image")
    return [*good[:2], broken, *good[2:]]


@pytest.mark.parametrize("host_threads", [0, 2])
def test_outcomes_keep_input_order_and_failed_items_credit_their_budget(host_threads):
    loaded = LoadedModel(
        tiny_classifier().eval(), ModelSpec(name="tiny"), torch.device("cpu"), None
    )
    delivered, done, timings = [], [], Timings()
    outcomes = explain_items(
        _items(),
        loaded,
        PARAMS,
        slots=2,
        deliver=lambda o: delivered.append(o.name),
        progress=done.append,
        timings=timings,
        host_threads=host_threads,
    )
    assert [o.name for o in outcomes] == ["img0", "img1", "broken", "img2", "img3", "img4"]
    assert [o.ok for o in outcomes] == [True, True, False, True, True, True]
    assert outcomes[2].error_code == "unsupported-format"
    assert sorted(delivered) == ["img0", "img1", "img2", "img3", "img4"]
    assert sum(done) == 6 * PARAMS.iterations  # the progress bar completes
    assert timings.wall > 0 and 0 <= timings.idle_fraction <= 1 and timings.render > 0


def test_a_failed_delivery_fails_that_item_alone():
    loaded = LoadedModel(
        tiny_classifier().eval(), ModelSpec(name="tiny"), torch.device("cpu"), None
    )

    def deliver(outcome):
        if outcome.name == "img1":
            outcome.result, outcome.error_code, outcome.error = None, "store-error", "down"

    outcomes = explain_items(_items(), loaded, PARAMS, deliver=deliver)
    assert [o.error_code for o in outcomes] == [
        None,
        "store-error",
        "unsupported-format",
        None,
        None,
        None,
    ]


def test_a_jobs_labels_name_the_target_and_resolve_targets_by_name():
    loaded = LoadedModel(
        tiny_classifier().eval(), ModelSpec(name="tiny"), torch.device("cpu"), None
    )
    names = [f"kind {n}" for n in range(10)]
    named = loaded.with_labels(names)
    assert named.module is loaded.module and loaded.categories is None
    assert loaded.with_labels(None) is loaded
    items = [
        ItemInput("top", "mem://0.png", lambda: _png(0)),
        ItemInput("named", "mem://1.png", lambda: _png(1), Target(name="KIND 7")),
        ItemInput("unknown", "mem://2.png", lambda: _png(2), Target(name="kind 99")),
    ]
    top, by_name, unknown = explain_items(items, named, PARAMS, slots=2)
    assert top.result.target_name == names[top.result.target_index]
    assert (by_name.result.target_index, by_name.result.target_name) == (7, "kind 7")
    assert unknown.error_code == "bad-target" and "kind 99" in unknown.error
    # The module's output-width probe is shared, not run again per job.
    assert named.__dict__["_num_classes"] is loaded.__dict__["_num_classes"]


@pytest.mark.parametrize(
    ("label", "wanted"), [("7", Target(index=7)), ("Tabby", Target(name="Tabby"))]
)
def test_target_label_asks_for_the_items_ground_truth(label, wanted):
    assert _wanted(ItemInput("x", "mem://x", bytes, Target.parse("label"), label)) == wanted


@pytest.mark.parametrize("label", [None, "top1", "label", "-3"])
def test_target_label_without_a_usable_label_is_a_bad_target(label):
    with pytest.raises(ItemError) as caught:
        _wanted(ItemInput("x", "mem://x", bytes, Target.parse("label"), label))
    assert caught.value.code == "bad-target"


def test_ground_truth_is_matched_to_the_classes_and_set_against_the_prediction():
    """A label names a class by index or by name in any case; one that names no class
    leaves the item explained without ground truth."""
    loaded = LoadedModel(
        tiny_classifier().eval(), ModelSpec(name="tiny"), torch.device("cpu"), None
    ).with_labels([f"kind {n}" for n in range(10)])
    (probe,) = explain_items([ItemInput("probe", "mem://0.png", lambda: _png(0))], loaded, PARAMS)
    top = probe.result.predicted_index
    other = (top + 1) % 10
    items = [
        ItemInput("by-index", "mem://0.png", lambda: _png(0), label=str(top)),
        ItemInput("by-name", "mem://0.png", lambda: _png(0), label=f"KIND {other}"),
        ItemInput("unknown", "mem://0.png", lambda: _png(0), label="zebra"),
        ItemInput("out-of-range", "mem://0.png", lambda: _png(0), label="10"),
        ItemInput("none", "mem://0.png", lambda: _png(0)),
    ]
    by_index, by_name, unknown, out_of_range, none = explain_items(items, loaded, PARAMS, slots=2)
    assert probe.result.predicted_name == f"kind {top}"
    # The prediction is the top-1 whatever is explained; with top-1 they agree.
    assert probe.result.target_index == top
    assert (by_index.result.label_index, by_index.result.label_name) == (top, f"kind {top}")
    assert by_index.result.correct is True
    assert (by_name.result.label_index, by_name.result.label_name) == (other, f"kind {other}")
    assert by_name.result.correct is False and by_name.result.predicted_index == top
    for outcome in (unknown, out_of_range, none):
        assert outcome.ok, outcome.error
        assert (outcome.result.label_index, outcome.result.correct) == (None, None)
