"""One item's result, declared once from engine to report.

`ItemScores` holds what an explained item carries (its class, probabilities, area,
iterations, method, faithfulness); each field says how people see it (`label`, `fmt`),
whether `results --sort` and the report may order by it, and whether `explainctl compare`
shows it. `ItemResult` (result.json) is the scores plus the item's provenance;
`ItemRecord` (the job record, a line of items.jsonl and of `results --json`) is the item's
state plus every score, derived here, so a field added to `ItemScores` reaches the
worker's record, `results --json/--csv`, `--sort` and the report without another edit
(tests/explainctl/spec/test_declarations.py checks each). The worker's engine produces
every score by these names (explainctl_worker.engine.slots, checked by
tests/explainctl_worker/engine/test_slots.py): a new score is its declaration here and its
producer there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, create_model, field_validator

from explainctl.spec.contracts import ARTIFACT_FILES, ItemState, ResolvedModel, _Strict
from explainctl.spec.methods import ExplainParams, Method, method_info
from explainctl.spec.trust import NOT_REMOVED_RATIO

# Why an item's optimisation ended: its convergence rule held, or it spent its budget.
StopReason = Literal["converged", "budget"]


def score(
    default: Any = ...,
    *,
    label: str,
    help: str,
    fmt: str = "",
    sort: bool = False,
    compare: bool = False,
):
    """A result field: `label` is its name for people, `fmt` its number format,
    `sort` whether results and the report can be ordered by it, `compare` whether
    `explainctl compare` holds it for each side of a pair (explainctl.pages.comparison.Side)."""
    extra = {"label": label, "fmt": fmt, "sort": sort, "compare": compare}
    return Field(default, description=help, json_schema_extra=extra)


class ItemScores(_Strict):
    """What one explained image produced, whatever carries it."""

    target_index: int = score(label="class", help="index of the explained class", compare=True)
    target_name: str | None = score(
        None, label="class name", help="its name, where known", compare=True
    )
    # Right and wrong: the model's own decision on the image as is, and the ground truth
    # where the input's dataset gave one. None on records written before they existed.
    predicted_index: int | None = score(
        None, label="predicted", help="the model's top-1 class on the image as is", compare=True
    )
    predicted_name: str | None = score(
        None, label="predicted name", help="its name, where known", compare=True
    )
    label_index: int | None = score(
        None,
        label="truth",
        help="the ground truth (the input's label) matched to the model's classes, by index "
        "or case-insensitive name; None without a label or where it names no class",
        compare=True,
    )
    label_name: str | None = score(
        None, label="truth name", help="its name, where known", compare=True
    )
    correct: bool | None = score(
        None,
        label="correct",
        help="predicted == truth; None without a matched label",
        compare=True,
    )
    prob_before: float = score(
        label="p before",
        help="softmax probability of the class, image as is",
        fmt=".3f",
        sort=True,
        compare=True,
    )
    prob_after: float = score(
        label="p after",
        help="the same with the mask's deletion applied",
        fmt=".3f",
        sort=True,
        compare=True,
    )
    mask_area: float = score(
        label="mask area",
        help="mean(1 - mask): the fraction of the image deleted",
        fmt=".3f",
        sort=True,
        compare=True,
    )
    # How far to trust the explanation (the worker's diagnostics.py): None on records
    # written before they existed.
    prob_ratio: float | None = score(
        None,
        label="p ratio",
        help=f"p after / p before: below {NOT_REMOVED_RATIO} the mask removed the evidence",
        fmt=".3f",
        sort=True,
    )
    class_changed: bool | None = score(
        None, label="class changed", help="the model's top-1 class differs under the mask"
    )
    perturbation: float | None = score(
        None,
        label="perturbation",
        help="mean |perturbed - original| in pixel space (0 to 1): how hard the image was changed",
        fmt=".4f",
        sort=True,
    )
    compactness: float | None = score(
        None,
        label="compactness",
        help="share of the saliency in the most salient 10 % of the image (0.1 uniform, 1 compact)",
        fmt=".3f",
        sort=True,
    )
    regions: int | None = score(
        None, label="regions", help="connected regions of the deleted area (mask < 0.5)", sort=True
    )
    stability_iou: float | None = score(
        None,
        label="stability IoU",
        help="IoU of the most salient 10 % under a second seed (--stability)",
        fmt=".3f",
        sort=True,
    )
    stability_rank: float | None = score(
        None,
        label="stability rank",
        help="rank correlation of the saliency under a second seed (--stability)",
        fmt=".3f",
        sort=True,
    )
    iterations: int = score(label="iterations", help="steps the mask was optimised for",
                            sort=True)  # fmt: skip
    stop_reason: StopReason = score("budget", label="stopped", help="converged or budget")
    seconds: float = score(label="seconds", help="wall time of the item on the worker",
                           fmt=".2f", sort=True)  # fmt: skip
    # Records from before this field was written were all made by the original method.
    method: Method = score("original", label="method", help="the method that made it")
    precision: Literal["fp32", "bf16"] = score(
        "fp32",
        label="precision",
        help="what the model's passes ran in (the parameter `precision`, resolved on the worker)",
    )
    # Faithfulness (params.metrics): RISE deletion/insertion areas under the curve of the
    # target's probability, pixels ranked by saliency 1 - up(mask), most salient first.
    deletion_auc: float | None = score(
        None,
        label="deletion AUC",
        help="deletion towards zeros (lower is better)",
        fmt=".3f",
        sort=True,
    )
    deletion_auc_blur: float | None = score(
        None,
        label="deletion AUC (blur)",
        help="deletion towards the blurred image",
        fmt=".3f",
        sort=True,
    )
    insertion_auc: float | None = score(
        None,
        label="insertion AUC",
        help="insertion from the blurred image (higher is better)",
        fmt=".3f",
        sort=True,
    )
    prob_keep: float | None = score(
        None,
        label="p keep",
        help="p(class) keeping only the salient region, rest blurred",
        fmt=".3f",
        sort=True,
    )

    _method = field_validator("method", mode="before")(lambda value: _alias(value))


def _alias(value):
    # Records written before the original method was renamed say "seed".
    try:
        return method_info(value).name if isinstance(value, str) else value
    except KeyError:
        return value  # the field's own validation reports it


SCORE_FIELDS: tuple[str, ...] = tuple(ItemScores.model_fields)


class ItemResult(ItemScores):
    """result.json: the scores of one explained image and where they came from."""

    source: str
    item: str
    model: str
    # What the worker made of `model`: source, revision, input size, statistics, resampling.
    resolved_model: ResolvedModel | None = None
    image_width: int
    image_height: int
    params: ExplainParams
    versions: dict[str, str]
    artifacts: list[str] = list(ARTIFACT_FILES)
    attempt: int | None = Field(None, description="the worker's attempt that wrote these files")
    heatmap_max: float | None = Field(
        None, description="the saliency heatmap.png draws in its top colour (params.heatmap_scale)"
    )

    def scores(self) -> dict[str, Any]:
        return self.model_dump(include=set(SCORE_FIELDS), mode="json")


class _RecordState(_Strict):
    index: int
    uri: str
    item: str
    state: ItemState
    target: str | None = None
    # The input's ground truth as its dataset gave it (a class index or name), or None.
    label: str | None = None
    # Where the client staged a dataset row's image (`uri` is then the row's source id).
    staged: str | None = None
    # Written only from ErrorCode (explainctl.spec.errors); read as text, so a record from a
    # newer worker with a code this client does not know still lists.
    error_code: str | None = None
    error: str | None = None
    attempts: int = 0
    attempt: int | None = None  # the attempt whose files `artifacts` names (it settled it)
    artifacts: dict[str, str] = {}
    # The chunk's masks file holding this item's mask (contracts.chunk_masks_key); None on
    # records written before workers wrote one: their readers take artifacts' mask.npy.
    mask_file: str | None = None


def _optional(name: str) -> tuple[Any, Any]:
    info = ItemScores.model_fields[name]
    return (info.annotation | None, Field(None, description=info.description))


ItemRecord: type[_RecordState] = create_model(  # type: ignore[assignment]
    "ItemRecord",
    __base__=_RecordState,
    __doc__="One item of a job: its state and, once done, every score (None until then).",
    __validators__={"_method": field_validator("method", mode="before")(lambda v: _alias(v))},
    **{name: _optional(name) for name in SCORE_FIELDS},
)

# `results`' columns: the item, its scores, then its error; `drop` is p before - p after.
RESULT_COLUMNS: tuple[str, ...] = (
    "index", "uri", "item", "state", *SCORE_FIELDS, "error_code", "error",
)  # fmt: skip
SORT_KEYS: tuple[str, ...] = (
    "index",
    "drop",
    *(n for n in SCORE_FIELDS if ItemScores.model_fields[n].json_schema_extra["sort"]),
)
# What `explainctl compare` holds of each item and shows of each side, in declared order.
COMPARE_FIELDS: tuple[str, ...] = tuple(
    n for n in SCORE_FIELDS if ItemScores.model_fields[n].json_schema_extra["compare"]
)


def sort_value(record: Any, key: str) -> float | int | None:
    """The value `results --sort KEY` orders by; None where the item has none."""
    if key == "drop":
        if record.prob_before is None or record.prob_after is None:
            return None
        return record.prob_before - record.prob_after
    return getattr(record, key)


def field_views() -> list[dict[str, Any]]:
    """How each score is shown: key, label, help, number format, sortable."""
    views = []
    for name, info in ItemScores.model_fields.items():
        extra: dict = info.json_schema_extra  # type: ignore[assignment]
        shown = {k: v for k, v in extra.items() if k != "compare"}  # a choice, not a view
        views.append({"key": name, "help": info.description, **shown})
    return views


def shown(name: str, value: Any) -> str:
    """A score as people read it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    fmt = ItemScores.model_fields[name].json_schema_extra["fmt"]  # type: ignore[index]
    return format(value, fmt) if fmt else str(value)


def summary_line(scores: Mapping[str, Any]) -> str:
    """`class 281 tabby, p before 0.950, p after 0.012, ...`: every score that is set."""
    parts = []
    for view in field_views():
        value = scores.get(view["key"])
        if value is None or view["key"] == "target_name":
            continue
        text = shown(view["key"], value)
        if view["key"] == "target_index" and scores.get("target_name"):
            text += f" {scores['target_name']}"
        parts.append(f"{view['label']} {text}")
    return ", ".join(parts)


def markdown_fields() -> str:
    """The README's table of an item's result fields."""
    rows = ["| field | shown as | meaning |", "|---|---|---|"]
    rows += [f"| `{v['key']}` | {v['label']} | {v['help']} |" for v in field_views()]
    return "\n".join(rows)
