"""Trust flags: the reasons an auditor should look twice at one explanation, declared once.

Each flag has a short name (a badge and a filter in the report), a sentence for people and
a condition over an item's diagnostics (`ItemScores`). `misclassified` is about the
decision rather than its explanation, but an auditor looks twice at it the same way: it
is raised only where the item has ground truth, and a report shows it only for a job
that has some. A flag whose fields the item lacks
(None: not measured, or a record older than the diagnostics) is not raised: no flag means
nothing found, not everything checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The "most salient tenth" that compactness and the stability IoU measure, on both sides.
TOP_SHARE = 0.1
# p after / p before at or above this, with the class unchanged: the evidence stayed.
NOT_REMOVED_RATIO = 0.1
# compactness (share of the saliency in the most salient TOP_SHARE) below this: spread out.
DIFFUSE_COMPACTNESS = 0.5
# stability_iou (agreement under a second seed) below this: the mask is not reproducible.
UNSTABLE_IOU = 0.5


@dataclass(frozen=True)
class Flag:
    name: str
    sentence: str
    when: str  # the condition in words, for the README
    fields: tuple[str, ...]  # every one must be set for the flag to be evaluated
    test: Callable[[Any], bool]
    truth: bool = False  # needs ground truth: a job without any never raises it


FLAGS: tuple[Flag, ...] = (
    Flag(
        "not-removed",
        f"the mask did not remove the evidence: p after is still at least "
        f"{NOT_REMOVED_RATIO:.0%} of p before and the class did not change",
        f"`prob_ratio` ≥ {NOT_REMOVED_RATIO} and not `class_changed`",
        ("prob_ratio", "class_changed"),
        lambda r: r.prob_ratio >= NOT_REMOVED_RATIO and not r.class_changed,
    ),
    Flag(
        "diffuse",
        "the saliency is spread out, not compact",
        f"`compactness` < {DIFFUSE_COMPACTNESS}",
        ("compactness",),
        lambda r: r.compactness < DIFFUSE_COMPACTNESS,
    ),
    Flag(
        "unstable",
        "a second seed gave a different mask",
        f"`stability_iou` < {UNSTABLE_IOU} (only where stability was measured)",
        ("stability_iou",),
        lambda r: r.stability_iou < UNSTABLE_IOU,
    ),
    Flag(
        "misclassified",
        "the model's top-1 class is not the item's ground truth",
        "`correct` is false (only where the item's label matched a class)",
        ("correct",),
        lambda r: not r.correct,
        truth=True,
    ),
)
FLAG_NAMES: tuple[str, ...] = tuple(flag.name for flag in FLAGS)


def flags(record: Any) -> list[str]:
    """The names of the flags `record` (an ItemRecord or anything with its fields) raises."""
    return [
        flag.name
        for flag in FLAGS
        if all(getattr(record, name, None) is not None for name in flag.fields)
        and flag.test(record)
    ]


def flag_views(truth: bool = True) -> list[dict[str, str]]:
    """How the report shows each flag: its name and its sentence; without `truth` (a job
    without ground truth) only those it can raise."""
    return [{"name": f.name, "sentence": f.sentence} for f in FLAGS if truth or not f.truth]


def markdown_flags() -> str:
    """The README's table of the trust flags."""
    rows = ["| flag | raised when | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {f.when} | {f.sentence} |" for f in FLAGS]
    return "\n".join(rows)
