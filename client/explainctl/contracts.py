"""Shapes both sides agree on: method parameters, model specs, result.json, artifact names.

The client validates with these models before anything runs or is queued; the worker
reads the same models back, so a parameter means the same thing on both sides.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Files written for every explained item, in OUT/<item>/ (locally) or <prefix>/<job>/<item>/.
MASK_NPY = "mask.npy"
MASK_PNG = "mask.png"
HEATMAP_PNG = "heatmap.png"
OVERLAY_PNG = "overlay.png"
PERTURBED_PNG = "perturbed.png"
RESULT_JSON = "result.json"
ARTIFACT_FILES = (MASK_NPY, MASK_PNG, HEATMAP_PNG, OVERLAY_PNG, PERTURBED_PNG, RESULT_JSON)

Substrate = Literal["average", "gaussian", "median"]
Upsample = Literal["bilinear", "nearest"]
Method = Literal["seed", "paper", "extremal"]
Variant = Literal["preserve", "delete", "dual"]
Precision = Literal["fp32", "bf16"]
# Why an item's optimisation ended: its convergence rule held, or it spent its budget.
StopReason = Literal["converged", "budget"]

# Parameters that only some methods read: (methods, names). Setting one for another method
# is refused, so a flag given with the wrong --method fails at submit time, not silently.
_ONLY_FOR = (
    (("paper", "extremal"), ("blur_levels",)),
    (("extremal",), ("areas", "variant", "area_coeff", "area_growth", "momentum")),
)


def _method_defaults(method: str, values: dict) -> dict:
    """Defaults of `method` that differ from the seed's (Fong & Vedaldi 2017 and Fong,
    Patrick & Vedaldi 2019 reference settings)."""
    if method == "paper":
        return {
            "iterations": 300,
            "lr": 0.1,
            "mask_size": 28,
            "l1_coeff": 1e-4,
            "tv_coeff": 1e-2,
            "tv_beta": 3.0,
            "noise_std": 0.0,
            "upsample": "nearest",
            "blur_sigma": 10.0,
            "blur_levels": 8,
            "jitter": 4,
            # Measured only for the seed's method so far: the paper's runs its budget.
            "early_stop": False,
        }
    if method == "extremal":
        try:
            side = int(values.get("image_size", 224))
        except (TypeError, ValueError):
            side = 224  # the field validator reports the bad image_size itself
        return {
            "iterations": 800,
            "lr": 0.01,
            # One parameter per ~7 px of the model input, as in the reference setting.
            "mask_size": max(2, min(side, round(side / 7))),
            "l1_coeff": 0.0,
            "tv_coeff": 0.0,
            "noise_std": 0.0,
            "early_stop": False,  # its loss grows with the area weight: no fixed point
            "blur_sigma": 20.0,
            "blur_levels": 8,
            "areas": (0.1,),
            "variant": "preserve",
            "area_coeff": 300.0,
            "area_growth": 1.0035,
            "momentum": 0.9,
        }
    return {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExplainParams(_Strict):
    """Parameters of one explanation method; defaults follow the seed unless `method` says.

    method "seed" (the default), after the seed script:
      loss(m) = l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m))_c
      with x_m = up(m) * x + (1 - up(m)) * substrate(x) + N(0, noise_std^2).
    method "paper", Fong & Vedaldi (2017) as published: sums instead of means,
      loss(m) = l1_coeff * sum|1 - m| + tv_coeff * sum((dx^2 + dy^2)^(tv_beta/2))
                + softmax(f(jitter(Phi(x; m))))_c,
      Phi a blur whose sigma falls from blur_sigma (m = 0) to 0 (m = 1) over blur_levels.
    method "extremal", Fong, Patrick & Vedaldi (2019): for each area a in `areas`,
      max_p  score(p) - area_coeff * area_growth^t * mean((sort(p) - r_a)^2),
      p a smooth mask of area a (the preserved region), r_a = (1-a)N zeros then aN ones.

    Parameters a method does not read keep their seed defaults (or None) and do nothing;
    method defaults fill only the keys the input leaves out, so the values recorded with a
    result are the values used.
    """

    method: Method = "seed"
    iterations: int = Field(500, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0)
    mask_size: int = Field(28, ge=2, le=512)
    image_size: int = Field(224, ge=8, le=2048)
    l1_coeff: float = Field(0.01, ge=0)
    tv_coeff: float = Field(0.2, ge=0)
    tv_beta: float = Field(3.0, ge=1)
    noise_std: float = Field(0.2, ge=0)
    substrate: Substrate = "average"
    blur_kernel: int = Field(11, ge=1, le=101)
    blur_sigma: float = Field(5.0, gt=0)
    median_kernel: int = Field(11, ge=1, le=101)
    upsample: Upsample = "bilinear"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    early_stop: bool = Field(
        True, description="stop each mask once its block average moves no more than its noise"
    )
    early_stop_window: int = Field(
        50, ge=10, multiple_of=10, description="iterations per block of the stop rule"
    )
    early_stop_ratio: float = Field(
        1.5, ge=0, description="drift allowed, in units of the block's own flicker"
    )
    early_stop_tol: float = Field(1e-3, ge=0, description="drift allowed in any case")
    jitter: int = Field(0, ge=0, le=64, description="random shift of up to this many px")
    blur_levels: int | None = Field(None, ge=2, le=32, description="levels of the blur pyramid")
    areas: tuple[float, ...] | None = Field(None, min_length=1, max_length=16)
    variant: Variant | None = None
    area_coeff: float | None = Field(None, gt=0)
    area_growth: float | None = Field(None, ge=1, le=1.1)
    momentum: float | None = Field(None, ge=0, lt=1)
    precision: Precision = Field(
        "fp32", description="the model's passes on CUDA: fp32, or bf16 autocast"
    )
    metrics: bool = False
    metric_steps: int | None = Field(None, ge=1, description="curve steps; None: image side")
    metric_batch: int = Field(64, ge=1, le=4096, description="most images per metric pass")

    @model_validator(mode="before")
    @classmethod
    def _fill_method_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        method = data.get("method", "seed")
        if not isinstance(method, str):
            return data  # the field validator reports it
        defaults = _method_defaults(method.strip().lower(), data)
        missing = {k: v for k, v in defaults.items() if data.get(k) is None}
        return {**data, **missing} if missing else data

    @field_validator("method", "variant", mode="before")
    @classmethod
    def _strip(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("areas", mode="before")
    @classmethod
    def _split_areas(cls, value):
        # `--param areas=0.05,0.1` arrives as one string.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int | float):
            return [value]
        return value

    @field_validator("areas")
    @classmethod
    def _areas_in_unit_interval(cls, value):
        if value is not None and any(not (0 < a < 1) for a in value):
            raise ValueError("areas must lie strictly between 0 and 1")
        return value

    @field_validator("blur_kernel", "median_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel sizes must be odd")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.mask_size > self.image_size:
            raise ValueError("mask_size cannot exceed image_size")
        for methods, names in _ONLY_FOR:
            if self.method not in methods:
                for name in names:
                    if getattr(self, name) is not None:
                        used_by = " and ".join(methods)
                        raise ValueError(f"{name}: applies only to method {used_by}")
        if self.method != "seed" and self.blur_sigma > 100:
            raise ValueError("blur_sigma: above 100 px needs kernels wider than any image")
        if self.method == "extremal":
            if self.early_stop:
                raise ValueError("early_stop: does not apply to method extremal (its loss grows)")
            if self.l1_coeff or self.tv_coeff:
                raise ValueError("l1_coeff, tv_coeff: method extremal has none, its area is fixed")
        if self.metric_steps is not None and self.metric_steps > self.image_size**2:
            raise ValueError("metric_steps: cannot exceed the number of pixels")
        return self


class ModelSpec(_Strict):
    """Which classifier to explain and how its inputs are normalised.

    `name` is a torchvision model name (``vgg19``), a TorchScript file path, or
    ``module:callable`` returning an ``nn.Module``.
    """

    name: str = "vgg19"
    weights: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("name")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model name must not be empty")
        return value.strip()

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        if any(not (math.isfinite(s) and s > 0) for s in value):
            raise ValueError("std values must be positive")
        return value


class Target(_Strict):
    """The class to explain: the top-1 class when both fields are empty."""

    index: int | None = Field(None, ge=0)
    name: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Target:
        if text is None or text.strip() == "" or text.strip().lower() == "top1":
            return cls()
        text = text.strip()
        if text.lstrip("-").isdigit():
            return cls(index=int(text))
        return cls(name=text)


class ItemResult(_Strict):
    """result.json: what one explained image produced."""

    source: str
    item: str
    model: str
    target_index: int
    target_name: str | None
    prob_before: float
    prob_after: float
    mask_area: float = Field(description="mean(1 - mask): the fraction of the image deleted")
    iterations: int = Field(description="iterations the mask was optimised for")
    stop_reason: StopReason = Field("budget", description="why the optimisation ended")
    seconds: float
    image_width: int
    image_height: int
    params: ExplainParams
    versions: dict[str, str]
    artifacts: list[str] = list(ARTIFACT_FILES)
    method: Method = "seed"
    # Faithfulness (params.metrics): RISE deletion/insertion areas under the curve of the
    # target's probability, pixels ranked by saliency 1 - up(mask), most salient first.
    deletion_auc: float | None = Field(None, description="deletion towards 0 (normalised)")
    deletion_auc_blur: float | None = Field(None, description="deletion towards a blur")
    insertion_auc: float | None = Field(None, description="insertion from a blur")
    prob_keep: float | None = Field(
        None, description="p(target) keeping only the salient region, the rest blurred"
    )


# --- The queue: task names and payloads ------------------------------------------------

TASK_EXPLAIN_CHUNK = "explainctl.explain_chunk"


class ChunkItem(_Strict):
    index: int = Field(ge=0)
    uri: str
    target: str | None = None


class ChunkPayload(_Strict):
    """One task message: a chunk of a job's items, explained as one batch.

    Holds no credentials: workers reach storage with their own configuration.
    """

    job_id: str = Field(pattern=r"^[0-9a-hjkmnp-tv-z]{18}$")  # explainctl.ids
    chunk: int = Field(ge=0)
    model: ModelSpec
    params: ExplainParams
    output: str
    items: list[ChunkItem]
    sent_at: float | None = None  # when the client queued it, for the queue-wait metric


# --- Storage layout: <output>/<job_id>/... ---------------------------------------------

JOB_JSON = "job.json"
ITEMS_JSONL = "items.jsonl"
REPORT_HTML = "report.html"


def item_name(index: int, uri: str) -> str:
    """Folder of an item among its job's artifacts: `000042-cat`, unique and path-safe."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60].strip("_")
    return f"{index:06d}-{safe or 'image'}"


def artifact_key(job_id: str, item: str, filename: str) -> str:
    return f"{job_id}/{item}/{filename}"


def job_key(job_id: str, filename: str) -> str:
    return f"{job_id}/{filename}"


# --- Job records -----------------------------------------------------------------------

ItemState = Literal["queued", "running", "done", "failed", "cancelled"]
ITEM_STATES: tuple[str, ...] = get_args(ItemState)
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})  # an item never leaves these
JobState = Literal[
    "submitting", "queued", "running", "completed", "completed_with_failures", "cancelled"
]
FINISHED_JOB_STATES = frozenset({"completed", "completed_with_failures", "cancelled"})


class JobInfo(_Strict):
    """What a job was asked to do; fixed at submission (job.json holds it with the status)."""

    job_id: str
    created: float
    model: ModelSpec
    params: ExplainParams
    output: str
    queue: str
    chunk_size: int


class ItemRecord(_Strict):
    """One line of items.jsonl and of `results --json`."""

    index: int
    uri: str
    item: str
    state: ItemState
    target: str | None = None
    error_code: str | None = None
    error: str | None = None
    attempts: int = 0
    artifacts: dict[str, str] = {}
    target_index: int | None = None
    target_name: str | None = None
    prob_before: float | None = None
    prob_after: float | None = None
    mask_area: float | None = None
    iterations: int | None = None
    stop_reason: StopReason | None = None
    seconds: float | None = None
    method: str | None = None
    deletion_auc: float | None = None
    deletion_auc_blur: float | None = None
    insertion_auc: float | None = None
    prob_keep: float | None = None
