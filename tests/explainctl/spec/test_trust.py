"""Trust flags: each raised exactly by its condition, never on a field that was not measured."""

import pytest

from explainctl.spec import trust
from explainctl.spec.results import ItemRecord, ItemScores
from explainctl.spec.trust import FLAG_NAMES, FLAGS, flags, markdown_flags


def _record(**scores) -> ItemRecord:
    # A trustworthy item: evidence removed, compact, stable.
    base = {"target_index": 3, "prob_before": 0.9, "prob_after": 0.01, "mask_area": 0.1,
            "prob_ratio": 0.011, "class_changed": True, "compactness": 0.8,
            "stability_iou": 0.9, "iterations": 100, "seconds": 1.0}  # fmt: skip
    return ItemRecord(index=0, uri="/a.png", item="000000-a", state="done",
                      **{**base, **scores})  # fmt: skip


def test_a_trustworthy_item_raises_no_flag():
    assert flags(_record()) == []


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({"prob_ratio": 0.5, "class_changed": False}, ["not-removed"]),
        ({"prob_ratio": trust.NOT_REMOVED_RATIO, "class_changed": False}, ["not-removed"]),
        ({"prob_ratio": 0.099, "class_changed": False}, []),
        ({"prob_ratio": 0.5, "class_changed": True}, []),  # another class won: removed
        ({"compactness": 0.49}, ["diffuse"]),
        ({"compactness": trust.DIFFUSE_COMPACTNESS}, []),
        ({"stability_iou": 0.2}, ["unstable"]),
        ({"stability_iou": trust.UNSTABLE_IOU}, []),
        ({"correct": False}, ["misclassified"]),
        ({"correct": True}, []),
        (
            {"prob_ratio": 0.9, "class_changed": False, "compactness": 0.1, "stability_iou": 0},
            ["not-removed", "diffuse", "unstable"],
        ),
    ],
)
def test_each_flag_is_raised_by_its_condition(scores, expected):
    assert flags(_record(**scores)) == expected


@pytest.mark.parametrize(
    ("scores", "silent"),
    [
        ({"prob_ratio": None, "class_changed": False}, "not-removed"),
        ({"prob_ratio": 0.9, "class_changed": None}, "not-removed"),
        ({"compactness": None}, "diffuse"),
        ({"stability_iou": None}, "unstable"),  # not measured (no --stability)
        ({"correct": None}, "misclassified"),  # no ground truth, or a label of no class
    ],
)
def test_a_flag_that_cannot_be_evaluated_is_not_raised(scores, silent):
    worst = {"prob_ratio": 0.9, "class_changed": False, "compactness": 0.1, "stability_iou": 0,
             "correct": False}  # fmt: skip
    raised = flags(_record(**{**worst, **scores}))
    assert silent not in raised
    assert set(raised) == set(FLAG_NAMES) - {silent}


def test_a_failed_item_raises_nothing():
    failed = ItemRecord(index=1, uri="/b.png", item="000001-b", state="failed",
                        error_code="corrupt", error="x")  # fmt: skip
    assert flags(failed) == []


def test_every_flag_reads_declared_fields_and_is_documented():
    assert len(set(FLAG_NAMES)) == len(FLAGS)
    table = markdown_flags()
    for flag in FLAGS:
        assert set(flag.fields) <= set(ItemScores.model_fields), flag.name
        assert flag.sentence and f"`{flag.name}`" in table and flag.sentence in table
        for name in flag.fields:
            assert f"`{name}`" in flag.when, f"{flag.name}: its condition does not name {name}"


def test_a_job_without_ground_truth_is_shown_only_the_flags_it_can_raise():
    assert [f["name"] for f in trust.flag_views(truth=False)] == [
        f.name for f in FLAGS if f.name != "misclassified"
    ]
    assert [f["name"] for f in trust.flag_views()] == list(FLAG_NAMES)
