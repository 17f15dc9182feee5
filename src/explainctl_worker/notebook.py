"""The Python API's torch side (explainctl.api validates and forwards here): models held
in a notebook, images in memory, and the same pipeline as `explainctl explain`
(explain.explain_items), so the same image, seed and parameters give the same mask.

In-memory images enter the pipeline as PNG bytes (lossless for 8-bit pixels), so they are
decoded, capped and resized exactly as files are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from explainctl.api import frame
from explainctl.io.sources import SourcePolicy, read_source
from explainctl.spec.contracts import MASK_NPY, ModelSpec, Target
from explainctl.spec.errors import InvalidInput, ItemError
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import SCORE_FIELDS, ItemResult
from explainctl.spec.trust import flags
from explainctl_worker.artifact import upsample_mask
from explainctl_worker.decode import DecodeLimits, decode_image
from explainctl_worker.explain import ItemInput, ItemOutcome, _to_tensor, explain_items
from explainctl_worker.local_files import local_item_names, write_outcome
from explainctl_worker.model import LoadedModel, ModelCache, pick_device

__all__ = ["LoadedModel", "ExplainResult", "Prediction", "Failure"]

# The table's columns: the item, its state, every documented result field and the trust
# flags (as a job's table, explainctl.exports.table), the model's own top-1 prediction, then
# the failure.
TABLE_COLUMNS: tuple[str, ...] = (
    "index", "item", "source", "state", *SCORE_FIELDS, "flags",
    "top1_index", "top1_name", "top1_prob", "error_code", "error",
)  # fmt: skip
# Images per forward pass when the predictions are taken.
PREDICT_BATCH = 16


def load_model(spec: ModelSpec, labels: Sequence[str] | None, device: str | None) -> LoadedModel:
    return ModelCache(capacity=1).get(spec, pick_device(device)).with_labels(labels)


def placed(loaded: LoadedModel, device: str | None) -> LoadedModel:
    """`loaded` on `device` (None: where it is)."""
    if device is None or pick_device(device) == loaded.device:
        return loaded
    moved = wrap_module(loaded.module, loaded.spec, loaded.categories, device)
    # The model's own preprocessing (a hub model's mean, std, size) travels with it.
    return dataclasses.replace(moved, resolved=loaded.resolved)


def wrap_module(
    module: nn.Module, spec: ModelSpec, labels: Sequence[str] | None, device: str | None
) -> LoadedModel:
    """A module the caller holds, as the pipeline takes it. It stays on its own device
    unless `device` names another (then it is moved there, as `.to()` does)."""
    if device is None:
        first = next(module.parameters(), None)
        where = first.device if first is not None else torch.device("cpu")
    else:
        where = pick_device(device)
        module.to(where)
    return LoadedModel(module, spec, where, list(labels) if labels else None)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients while the masks are optimised, then the module
    as it was: a notebook's model may be in training between calls."""
    modes = [(part, part.training) for part in module.modules()]
    wanted = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for parameter, _ in wanted:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for part, training in modes:
            part.training = training
        for parameter, flag in wanted:
            parameter.requires_grad_(flag)


# --- Images in ------------------------------------------------------------------------


@dataclass
class _Image:
    """One input of `explain`: a path, or pixels to encode."""

    value: Any
    clip: bool = False

    @property
    def path(self) -> str | None:
        return os.fspath(self.value) if isinstance(self.value, str | os.PathLike) else None


def as_images(images: Any, clip: bool = False) -> list[_Image]:
    """The inputs of one call: a single image or a sequence, a tensor or 4-D array batch
    split into its images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [_Image(image, clip) for image in images.detach().cpu()]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [_Image(image, clip) for image in images]
    if isinstance(images, str | os.PathLike | Image.Image | np.ndarray | torch.Tensor):
        return [_Image(images, clip)]
    return [_Image(image, clip) for image in images]


def _pixels(value: Any, clip: bool) -> Image.Image:
    """An in-memory image as an RGB PIL image; ItemError for what is not one."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 3 or value.shape[0] not in (1, 3):
            raise ItemError(
                "unsupported-format", f"a tensor image is (3, H, W), not {tuple(value.shape)}"
            )
        value = value.detach().cpu().float().permute(1, 2, 0).numpy()
    if not isinstance(value, np.ndarray):
        raise ItemError("unsupported-format", f"not an image: {type(value).__name__}")
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    if value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[-1] not in (3, 4)):
        raise ItemError(
            "unsupported-format", f"an array image is (H, W, 3), not {tuple(value.shape)}"
        )
    if value.dtype != np.uint8:
        if not np.issubdtype(value.dtype, np.floating):
            raise ItemError(
                "unsupported-format", f"pixels are uint8 (0-255) or float (0-1), not {value.dtype}"
            )
        if clip:
            value = np.clip(value, 0.0, 1.0)
        elif not np.isfinite(value).all() or value.min() < 0 or value.max() > 1:
            raise ItemError("unsupported-format", "float pixels must lie in [0, 1] (unnormalised)")
        value = np.round(value * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(value))


def _encoded(value: Any, clip: bool) -> bytes:
    buffer = io.BytesIO()
    _pixels(value, clip).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _items(images: list[_Image], targets: list[Target], limits: DecodeLimits) -> list[ItemInput]:
    policy = SourcePolicy(max_bytes=limits.max_bytes)  # the user's own files: no roots
    names = local_item_names([image.path or f"image-{i}" for i, image in enumerate(images)])
    items = []
    for i, (name, image, target) in enumerate(zip(names, images, targets, strict=True)):
        if image.path is not None:
            path = image.path
            items.append(
                ItemInput(
                    name, os.path.abspath(path), lambda p=path: read_source(p, policy), target
                )
            )
        else:
            load = lambda v=image.value, c=image.clip: _encoded(v, c)  # noqa: E731
            items.append(ItemInput(name, f"<image {i}>", load, target))
    return items


# --- Results out ----------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The model's own top-1 class for an image as the mask's optimisation saw it."""

    index: int
    name: str | None
    prob: float  # its softmax probability


@dataclass(frozen=True)
class Failure:
    index: int  # position among the inputs
    item: str
    source: str
    error_code: str  # one of explainctl.spec.errors' codes
    error: str


class ExplainResult:
    """What `explainctl.explain` returns, one entry per input image, in input order.

    Attributes:
        results: each image's ItemResult (result.json: every score, its provenance), or
            None where it failed.
        masks: (N, h, w) float32, h = w = mask_size: the optimised mask, 1 = pixel kept,
            0 = deleted (blurred away); NaN rows for images that failed.
        saliency: N arrays (H_i, W_i) at each image's own size: 1 - mask, upsampled as the
            heatmap draws it (1 = the evidence the model needed); None where it failed.
        predictions: N Prediction (the model's top-1 index, name, probability), or None.
        failed: the Failure of each image that failed, with its error code.
    """

    def __init__(
        self,
        outcomes: list[ItemOutcome],
        predictions: list[Prediction | None],
        params: ExplainParams,
    ):
        self.outcomes = outcomes
        self.params = params
        self.predictions = predictions
        self.results: list[ItemResult | None] = [o.result for o in outcomes]
        side = params.mask_size
        self.masks = np.full((len(outcomes), side, side), np.nan, dtype=np.float32)
        self.saliency: list[np.ndarray | None] = []
        for i, outcome in enumerate(outcomes):
            if not outcome.ok:
                self.saliency.append(None)
                continue
            mask = np.load(io.BytesIO(outcome.files[MASK_NPY]))
            self.masks[i] = mask
            size = outcome.result.image_width, outcome.result.image_height
            self.saliency.append(1.0 - upsample_mask(mask, *size, params.upsample))
        self.failed = [
            Failure(i, o.name, o.source, o.error_code, o.error)
            for i, o in enumerate(outcomes)
            if not o.ok
        ]

    def __len__(self) -> int:
        return len(self.outcomes)

    def __repr__(self) -> str:
        return (
            f"<ExplainResult: {len(self) - len(self.failed)} explained, {len(self.failed)} failed>"
        )

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, (outcome, prediction) in enumerate(
            zip(self.outcomes, self.predictions, strict=True)
        ):
            row: dict[str, Any] = {
                "index": i,
                "item": outcome.name,
                "source": outcome.source,
                "state": "done" if outcome.ok else "failed",
                "error_code": outcome.error_code,
                "error": outcome.error,
            }
            row.update(outcome.result.scores() if outcome.ok else dict.fromkeys(SCORE_FIELDS))
            row["flags"] = flags(outcome.result) if outcome.ok else []
            if prediction is not None:
                row.update(
                    top1_index=prediction.index,
                    top1_name=prediction.name,
                    top1_prob=prediction.prob,
                )
            rows.append(row)
        return rows

    def table(self):
        """One row per image (TABLE_COLUMNS): its state, every documented result field,
        the model's top-1 prediction and any error; a pandas DataFrame, else pyarrow."""
        return frame(self.rows(), TABLE_COLUMNS)

    def to_pandas(self):
        """The table as a pandas DataFrame."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise InvalidInput("to_pandas() needs pandas (pip install pandas)") from None
        return self.table()

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write DIR/<item>/ for each explained image: the files `explainctl explain
        --out DIR` writes. Returns the folders written."""
        written = []
        for outcome in self.outcomes:
            if outcome.ok:
                write_outcome(os.fspath(directory), outcome)
                written.append(str(Path(directory) / outcome.name))
        return written


def _predict(
    items: list[ItemInput],
    outcomes: list[ItemOutcome],
    loaded: LoadedModel,
    params: ExplainParams,
    limits: DecodeLimits,
) -> list[Prediction | None]:
    """The model's top-1 class of each explained image, prepared as the engine fed it."""
    predictions: list[Prediction | None] = [None] * len(items)
    done = [i for i, outcome in enumerate(outcomes) if outcome.ok]
    params, resolved = loaded.prepare(params)
    mean = torch.tensor(resolved.mean, device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(resolved.std, device=loaded.device).view(1, 3, 1, 1)
    categories = loaded.categories
    for start in range(0, len(done), PREDICT_BATCH):
        part = done[start : start + PREDICT_BATCH]
        batch = torch.stack(
            [
                _to_tensor(
                    decode_image(items[i].load(), limits),
                    params.image_size,
                    resolved.interpolation,
                )
                for i in part
            ]
        )
        with torch.no_grad():
            logits = loaded.module((batch.to(loaded.device) - mean) / std)
            probs = logits.float().softmax(dim=1)
            top, index = probs.max(dim=1)
        for i, p, k in zip(part, top.tolist(), index.tolist(), strict=True):
            name = categories[k] if categories and k < len(categories) else None
            predictions[i] = Prediction(k, name, p)
    return predictions


def explain(
    loaded: LoadedModel,
    images: list[_Image],
    targets: Target | list[Target],
    params: ExplainParams,
    *,
    batch_size: int | None = None,
    limits: DecodeLimits | None = None,
) -> ExplainResult:
    limits = limits or DecodeLimits()
    if isinstance(targets, Target):
        targets = [targets] * len(images)
    items = _items(images, targets, limits)
    with _frozen(loaded.module):
        outcomes = explain_items(items, loaded, params, limits, slots=batch_size)
        predictions = _predict(items, outcomes, loaded, params, limits)
    return ExplainResult(outcomes, predictions, params)


def attribute(
    loaded: LoadedModel,
    inputs: torch.Tensor | np.ndarray,
    targets: Target | list[Target],
    params: ExplainParams,
    *,
    batch_size: int | None = None,
    clip: bool = False,
) -> torch.Tensor | np.ndarray:
    """(N, 1, H, W) saliency of (N, 3, H, W) inputs in [0, 1], of the inputs' kind (a
    tensor on their device, or a numpy array). Any image that fails fails the call."""
    if (
        not isinstance(inputs, torch.Tensor | np.ndarray)
        or inputs.ndim != 4
        or inputs.shape[1] != 3
    ):
        shape = tuple(getattr(inputs, "shape", ()))
        raise InvalidInput(f"inputs are a batch (N, 3, H, W), got {shape or type(inputs).__name__}")
    as_tensor = isinstance(inputs, torch.Tensor)
    batch = inputs.detach().cpu() if as_tensor else torch.from_numpy(np.asarray(inputs))
    images = [_Image(image.float(), clip) for image in batch]
    result = explain(loaded, images, targets, params, batch_size=batch_size)
    if result.failed:
        first = result.failed[0]
        raise InvalidInput(f"input {first.index} failed: {first.error} [{first.error_code}]")
    saliency = np.stack(result.saliency)[:, None].astype(np.float32)
    if not as_tensor:
        return saliency
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    return torch.from_numpy(saliency).to(device=inputs.device, dtype=dtype)
