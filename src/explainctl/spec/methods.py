"""The method table: every explanation method, its parameters, their defaults and rules.

Declared once here, torch-free. `ExplainParams` holds each parameter (type, default,
range, one-line help, CLI flag, which methods read it); `METHODS` holds each method
(what it is, the defaults it changes, its own rules). Everything else derives from the
two: the CLI's options and their help (explainctl.cli.options), validation at submit time,
the parameters recorded in result.json, the README's tables (`markdown_*`, checked by a
test) and the worker's runners (explainctl_worker.methods, one per entry, checked too).

Adding a method: its entry in METHODS, parameters only it reads (`only=`), its runner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Substrate = Literal["average", "gaussian", "median"]
Upsample = Literal["bilinear", "nearest"]
Variant = Literal["preserve", "delete", "dual"]
Precision = Literal["auto", "fp32", "bf16"]
HeatmapScale = Literal["item", "absolute"]


def _extremal_mask_size(values: Mapping[str, Any]) -> int:
    # One parameter per ~7 px of the model input, as in the reference setting. A model's
    # own input size is known only on the worker: 224 stands in for it here.
    try:
        side = int(values.get("image_size") or 224)
    except (TypeError, ValueError):
        side = 224  # the field validator reports the bad image_size itself
    return max(2, min(side, round(side / 7)))


def _paper_check(params: ExplainParams) -> str | None:
    if params.blur_sigma > 100:
        return "blur_sigma: above 100 px needs kernels wider than any image"
    return None


def _extremal_check(params: ExplainParams) -> str | None:
    if params.early_stop:
        return "early_stop: does not apply to method extremal (its loss grows)"
    if params.l1_coeff or params.tv_coeff:
        return "l1_coeff, tv_coeff: method extremal has none, its area is fixed"
    return _paper_check(params)


@dataclass(frozen=True)
class MethodInfo:
    """One method: `defaults` are the values it changes from ExplainParams' own (a value,
    or a function of the given values); `check` returns why a combination is refused."""

    name: str
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    check: Callable[[ExplainParams], str | None] | None = None


# The first is the default: decisive removes the evidence on every photo of
# benchmarks/diagnostics.py, where the original's masks left the class standing on 4 of 10
# (benchmarks/README.md).
METHODS: tuple[MethodInfo, ...] = (
    MethodInfo(
        "decisive",
        "the smallest smooth deletion that takes the class below `drop` of its probability: "
        "the original's loss with a hinge on the class's log-odds instead of p, a growing "
        "push of the mask to 0 or 1, and jitter instead of noise (`jitter_draws` copies a "
        "step); it anneals once the class is under its bar, stops when the deletion stands "
        "still, and orders the cells inside each side of the stored mask",
        defaults={
            # A budget, not a schedule: the stop rule ends most items well before it.
            "iterations": 60,
            "lr": 0.05,
            "l1_coeff": 1.0,
            # Five times the original's: a third fewer islands of deletion and steadier
            # rankings across seeds at the same faithfulness (benchmarks/README.md).
            "tv_coeff": 1.0,
            # The hinge's bar is p_0 of the clean image: under input noise the class may
            # already sit below it, silencing the hinge (benchmarks/README.md).
            "noise_std": 0.0,
            "jitter": 4,
            "drop": 0.05,
            "binary_coeff": 0.5,
            "push_steps": 20,
            "anneal_steps": 15,
            "lr_final": 0.1,
            "jitter_draws": 2,
        },
    ),
    MethodInfo(
        "original",
        "the original script: L1 and TV as means, a blurred substrate, noise on the input",
        aliases=("seed",),  # its name until 0.2; jobs and scripts that say `seed` still run
    ),
    MethodInfo(
        "paper",
        "Fong & Vedaldi 2017 as published: a blur whose strength follows the mask (a "
        "differentiable pyramid of `blur_levels` blurs up to `blur_sigma`), random jitter, "
        "L1 and TV as sums",
        defaults={
            "iterations": 300,
            "l1_coeff": 1e-4,
            "tv_coeff": 1e-2,
            "noise_std": 0.0,
            "upsample": "nearest",
            "blur_sigma": 10.0,
            "blur_levels": 8,
            "jitter": 4,
            "early_stop": False,  # the stop rule was measured for the original's loss only
        },
        check=_paper_check,
    ),
    MethodInfo(
        "extremal",
        "Fong, Patrick & Vedaldi 2019: masks of fixed areas (one per `--area`, all kept in "
        "`masks.npy`), `--variant` preserve, delete or dual, a smooth-max parametrisation "
        "and a growing area penalty",
        defaults={
            "iterations": 800,
            "lr": 0.01,
            "mask_size": _extremal_mask_size,
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
        },
        check=_extremal_check,
    ),
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
_BY_NAME = {name: m for m in METHODS for name in (m.name, *m.aliases)}
ALL_NAMES: tuple[str, ...] = tuple(_BY_NAME)  # names and aliases, for the CLI's choices
DEFAULT_METHOD = METHODS[0].name


def method_info(name: str) -> MethodInfo:
    """The method called `name` (or one of its aliases); KeyError if there is none."""
    return _BY_NAME[name.strip().lower()]


def param(default: Any, help: str, *, flag: str | bool = False, only=None, **bounds) -> Any:
    """One parameter: `help` is its one-line meaning; `flag` gives it a CLI option of its
    own (True: `--name-with-dashes`), otherwise it is set with `--param KEY=VALUE`; `only`
    names the methods that read it (setting it for another is refused)."""
    extra = {"flag": flag, "only": tuple(only) if only else None}
    return Field(default, description=help, json_schema_extra=extra, **bounds)


class ExplainParams(BaseModel):
    """Parameters of one explanation; a method's defaults fill only the keys left out, so
    the values recorded with a result are the values used.

    method "decisive" (the default), the original's loss with a hinge on the class's
      log-odds and a push of the mask to 0 or 1 (explainctl_worker.methods.decisive):
      loss(m) = l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + w_t * 4 * mean(m (1 - m))
                + mean_J max(0, logodds(f(J(x_m)))_c - logit(drop * p_0)),
      J over jitter_draws random shifts, w_t = binary_coeff * min(1, t / push_steps),
      p_0 the class's probability on x.
    method "original", after the original script:
      loss(m) = l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m))_c
      with x_m = up(m) * x + (1 - up(m)) * substrate(x) + N(0, noise_std^2).
    method "paper", Fong & Vedaldi (2017) as published: sums instead of means,
      loss(m) = l1_coeff * sum|1 - m| + tv_coeff * sum((dx^2 + dy^2)^(tv_beta/2))
                + softmax(f(jitter(Phi(x; m))))_c,
      Phi a blur whose sigma falls from blur_sigma (m = 0) to 0 (m = 1) over blur_levels.
    method "extremal", Fong, Patrick & Vedaldi (2019): for each area a in `areas`,
      max_p  score(p) - area_coeff * area_growth^t * mean((sort(p) - r_a)^2),
      p a smooth mask of area a (the preserved region), r_a = (1-a)N zeros then aN ones.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Method = param(
        DEFAULT_METHOD, f"the optimisation: {', '.join(METHOD_NAMES)}", flag=True
    )
    iterations: int = param(500, "most optimiser steps per mask", flag=True, ge=1, le=100_000)
    lr: float = param(0.1, "learning rate (Adam; SGD for extremal)", flag=True, gt=0)
    mask_size: int = param(
        28, "side of the low-resolution mask (extremal: image side / 7)", flag=True, ge=2, le=512
    )
    image_size: int | None = param(
        None,
        "side of the model input (none given: the model's own, else 224)",
        flag=True,
        ge=8,
        le=2048,
    )
    l1_coeff: float = param(0.01, "λ1, weight of the deleted area", flag=True, ge=0)
    tv_coeff: float = param(0.2, "λ2, weight of the total variation", flag=True, ge=0)
    tv_beta: float = param(3.0, "β, exponent of the total variation", ge=1)
    noise_std: float = param(0.2, "σ of the noise added to the input per step", flag=True, ge=0)
    substrate: Substrate = param(
        "average",
        "what deletion shows: average (of gaussian and median), gaussian, median",
        flag=True,
    )
    blur_kernel: int = param(11, "side of the gaussian blur's kernel (odd)", ge=1, le=101)
    blur_sigma: float = param(5.0, "σ of the blur (largest σ of the pyramid)", gt=0)
    median_kernel: int = param(11, "side of the median blur's kernel (odd)", ge=1, le=101)
    upsample: Upsample = param("bilinear", "mask upsampling: bilinear or nearest")
    seed: int = param(0, "seed of the noise: same inputs and seed, same mask", flag=True,
                      ge=0, le=2**63 - 1)  # fmt: skip
    early_stop: bool = param(
        True,
        "stop each mask once its block average moves no more than its noise",
        flag="--early-stop/--no-early-stop",
    )
    early_stop_window: int = param(50, "iterations per block of the stop rule", ge=10,
                                   multiple_of=10)  # fmt: skip
    early_stop_ratio: float = param(1.5, "drift allowed, in units of the block's flicker", ge=0)
    early_stop_tol: float = param(1e-3, "drift allowed in any case (mean absolute)", ge=0)
    jitter: int = param(0, "random shift of the input by up to this many px", ge=0, le=64)
    blur_levels: int | None = param(
        None, "levels of the blur pyramid", only=("paper", "extremal"), ge=2, le=32
    )
    areas: tuple[float, ...] | None = param(
        None,
        "areas of the preserved region, one mask each",
        flag="--area",
        only=("extremal",),
        min_length=1,
        max_length=16,
    )
    variant: Variant | None = param(None, "preserve, delete or dual", flag=True, only=("extremal",))
    area_coeff: float | None = param(None, "weight of the area penalty", only=("extremal",),
                                     gt=0)  # fmt: skip
    area_growth: float | None = param(
        None, "growth of the area weight per step", only=("extremal",), ge=1, le=1.1
    )
    momentum: float | None = param(None, "SGD momentum", only=("extremal",), ge=0, lt=1)
    drop: float | None = param(
        None,
        "the probability ratio p after / p before the mask must reach",
        only=("decisive",),
        gt=0,
        lt=1,
    )
    binary_coeff: float | None = param(
        None, "final weight of the push of mask values to 0 or 1", only=("decisive",), ge=0
    )
    push_steps: int | None = param(
        None,
        "steps over which the push grows from 0 to binary_coeff (at most iterations)",
        only=("decisive",),
        ge=1,
        le=100_000,
    )
    anneal_steps: int | None = param(
        None,
        "steps over which the learning rate falls to lr_final of lr, from the first step "
        "the class sits under its bar; the stop rule acts after them",
        only=("decisive",),
        ge=1,
        le=100_000,
    )
    lr_final: float | None = param(
        None, "the learning rate after anneal_steps, as a share of lr", only=("decisive",),
        gt=0, le=1,
    )  # fmt: skip
    jitter_draws: int | None = param(
        None,
        "jittered copies of the image per step; the class term is their mean",
        only=("decisive",),
        ge=1,
        le=16,
    )
    precision: Precision = param(
        "auto",
        "the model's passes: auto (bf16 on CUDA and on CPUs with AMX or AVX512-BF16), fp32, bf16",
        flag=True,
    )
    metrics: bool = param(
        False,
        "deletion and insertion AUC and p(keep) per item",
        flag="--metrics/--no-metrics",
    )
    metric_steps: int | None = param(None, "steps of the metric curves (default: image side)",
                                     ge=1)  # fmt: skip
    metric_batch: int = param(64, "most images per metric pass", ge=1, le=4096)
    stability: bool = param(
        False,
        "optimise every mask again under a second seed and report their agreement",
        flag="--stability/--no-stability",
    )
    stability_sample: float = param(
        0.0,
        "share of the items (chosen by name) measured as --stability does",
        flag=True,
        ge=0,
        le=1,
    )
    heatmap_scale: HeatmapScale = param(
        "item",
        "heatmap colours: item (0 to the item's strongest deletion) or absolute (0 to 1)",
        flag=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_method_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        name = data.get("method", DEFAULT_METHOD)
        if not isinstance(name, str) or name.strip().lower() not in _BY_NAME:
            return data  # the field validator reports it
        info = method_info(name)
        missing = {
            key: value(data) if callable(value) else value
            for key, value in info.defaults.items()
            if data.get(key) is None
        }
        return {**data, "method": info.name, **missing}

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
        if self.image_size is not None and self.mask_size > self.image_size:
            raise ValueError("mask_size cannot exceed image_size")
        for name, only in readers().items():
            if only is not None and self.method not in only and getattr(self, name) is not None:
                raise ValueError(f"{name}: applies only to method {' and '.join(only)}")
        info = method_info(self.method)
        if info.check is not None and (problem := info.check(self)) is not None:
            raise ValueError(problem)
        # Without image_size the worker checks both against the model's own size.
        known = self.image_size is not None and self.metric_steps is not None
        if known and self.metric_steps > self.image_size**2:
            raise ValueError("metric_steps: cannot exceed the number of pixels")
        return self


def _extra(name: str) -> dict:
    return ExplainParams.model_fields[name].json_schema_extra or {}  # type: ignore[return-value]


@cache
def readers() -> dict[str, tuple[str, ...] | None]:
    """parameter -> the methods that read it (None: every method)."""
    return {name: _extra(name)["only"] for name in ExplainParams.model_fields}


def flag_of(name: str) -> str | None:
    """The CLI option of parameter `name` (`--a/--no-a` for switches), None if it has none."""
    flag = _extra(name)["flag"]
    if flag is True:
        return "--" + name.replace("_", "-")
    return flag or None


def method_defaults(name: str) -> dict[str, Any]:
    """Every parameter's value under method `name` when nothing else is given (None for
    parameters the method does not read)."""
    return ExplainParams(method=name).model_dump(mode="json")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(_shown(v) for v in value)
    return "" if value is None else str(value)


def default_help(name: str) -> str:
    """`Default 500 (paper 300, extremal 800).`: the default of `name` under each method
    that reads it, the first method's value first."""
    only = readers()[name]
    if name == "method":
        return f"Default {DEFAULT_METHOD}."
    values = {m: method_defaults(m)[name] for m in METHOD_NAMES if only is None or m in only}
    first_method, first = next(iter(values.items()))
    others = [f"{m} {_shown(v)}" for m, v in values.items() if v != first]
    text = f"Default {_shown(first)}" if first is not None else "Default: none"
    if only is not None:
        text = f"{' and '.join(only)} only. " + text
    return text + (f" ({', '.join(others)})." if others else ".")


def markdown_parameters() -> str:
    """The README's parameter table: one row per parameter, its default per method."""
    head = "| parameter | flag | " + " | ".join(METHOD_NAMES) + " | meaning |"
    rows = [head, "|---" * (len(METHOD_NAMES) + 3) + "|"]
    defaults = {m: method_defaults(m) for m in METHOD_NAMES}
    for name, info in ExplainParams.model_fields.items():
        only = readers()[name]
        cells = [
            _shown(defaults[m][name]) if only is None or m in only else "–" for m in METHOD_NAMES
        ]
        flag = flag_of(name)
        shown_flag = f"`{flag.split('/')[0]}`" if flag else f"`--param {name}=`"
        rows.append(
            f"| `{name}` | {shown_flag} | " + " | ".join(cells) + f" | {info.description} |"
        )
    return "\n".join(rows)


def markdown_methods() -> str:
    """The README's method table."""
    rows = ["| method | what |", "|---|---|"]
    for m in METHODS:
        alias = f" (alias `{'`, `'.join(m.aliases)}`)" if m.aliases else ""
        rows.append(f"| `{m.name}`{alias} | {m.summary} |")
    return "\n".join(rows)
