"""From items (sources and targets) to artifacts: decode, one batched optimisation, render.

Used by `explainctl explain` on local files and by the queue task on a chunk. A bad item
becomes a failed outcome with a code; it never stops the others.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import explainctl
from explainctl.contracts import ARTIFACT_FILES, ExplainParams, ItemResult, Target
from explainctl.errors import ExplainctlError, ItemError
from explainctl_worker.artifact import MASKS_NPY, render
from explainctl_worker.decode import DecodeLimits, decode_image
from explainctl_worker.engine import explain_batch
from explainctl_worker.model import LoadedModel, resolve_target


@dataclass
class ItemInput:
    name: str  # the item's folder name among the job's artifacts
    source: str  # where it came from (path or URI), recorded in result.json
    load: Callable[[], bytes]  # reads the encoded image; may raise ItemError
    target: Target = field(default_factory=Target)


@dataclass
class ItemOutcome:
    name: str
    source: str
    result: ItemResult | None = None
    files: dict[str, bytes] | None = None
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


def versions() -> dict[str, str]:
    import torchvision

    return {
        "explainctl": explainctl.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def num_classes(loaded: LoadedModel, image_size: int) -> int:
    """Output width of the model, found once by a forward pass on a blank image."""
    cache = loaded.__dict__.setdefault("_num_classes", {})
    if image_size not in cache:
        with torch.no_grad():
            blank = torch.zeros(1, 3, image_size, image_size, device=loaded.device)
            cache[image_size] = int(loaded.module(blank).shape[1])
    return cache[image_size]


def _prepare(item: ItemInput, loaded: LoadedModel, params: ExplainParams, limits: DecodeLimits):
    image = decode_image(item.load(), limits)
    try:
        target = resolve_target(
            item.target, loaded.categories, num_classes(loaded, params.image_size)
        )
    except ExplainctlError as error:
        raise ItemError("bad-target", str(error)) from None
    return image, -1 if target is None else target


def _to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def explain_chunk(
    items: Sequence[ItemInput],
    loaded: LoadedModel,
    params: ExplainParams,
    limits: DecodeLimits | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ItemOutcome]:
    """Explain `items` as one batch; outcomes come back in the order of `items`."""
    limits = limits or DecodeLimits()
    outcomes = [ItemOutcome(item.name, item.source) for item in items]
    ready: list[tuple[int, Image.Image, int]] = []
    for position, item in enumerate(items):
        try:
            image, target = _prepare(item, loaded, params, limits)
        except ItemError as error:
            outcomes[position].error_code, outcomes[position].error = error.code, error.message
            continue
        ready.append((position, image, target))
    if not ready:
        return outcomes

    started = time.perf_counter()
    batch = torch.stack([_to_tensor(image, params.image_size) for _, image, _ in ready])
    targets = torch.tensor([target for _, _, target in ready], dtype=torch.long)
    explanation = explain_batch(
        loaded.module,
        batch.to(loaded.device),
        params,
        mean=loaded.spec.mean,
        std=loaded.spec.std,
        targets=targets,
        progress=progress,
    )
    seconds = (time.perf_counter() - started) / len(ready)
    version_info = versions()

    def item_value(values: torch.Tensor | None, row: int) -> float | None:
        return None if values is None else float(values[row])

    for row, (position, image, _) in enumerate(ready):
        outcome = outcomes[position]
        target_index = int(explanation.targets[row])
        categories = loaded.categories
        area_masks = None if explanation.area_masks is None else explanation.area_masks[row].numpy()
        result = ItemResult(
            source=outcome.source,
            item=outcome.name,
            model=loaded.spec.name,
            target_index=target_index,
            target_name=categories[target_index]
            if categories and target_index < len(categories)
            else None,
            prob_before=float(explanation.prob_before[row]),
            prob_after=float(explanation.prob_after[row]),
            mask_area=float(explanation.mask_area[row]),
            iterations=int(explanation.iterations[row]),
            seconds=round(seconds, 4),
            image_width=image.width,
            image_height=image.height,
            params=params,
            versions=version_info,
            artifacts=[*ARTIFACT_FILES, *([MASKS_NPY] if area_masks is not None else [])],
            method=explanation.method,
            deletion_auc=item_value(explanation.deletion_auc, row),
            deletion_auc_blur=item_value(explanation.deletion_auc_blur, row),
            insertion_auc=item_value(explanation.insertion_auc, row),
            prob_keep=item_value(explanation.prob_keep, row),
        )
        try:
            outcome.files = render(
                image,
                explanation.masks[row, 0].numpy(),
                explanation.substrate[row].numpy(),
                result,
                params.upsample,
                # The paper blurs its upsampled mask: draw what the model saw.
                mask_full=explanation.masks_full[row, 0].numpy()
                if params.method == "paper"
                else None,
                levels=None if explanation.levels is None else explanation.levels[row].numpy(),
                area_masks=area_masks,
            )
        except (OSError, ValueError, MemoryError) as error:
            outcome.error_code, outcome.error = "render-error", f"cannot render: {error}"
            continue
        outcome.result = result
    return outcomes


def local_item_names(paths: Sequence[str]) -> list[str]:
    """Folder names for local files: the file stem, made safe and unique (`cat`, `cat-2`)."""
    names: list[str] = []
    seen: set[str] = set()
    for path in paths:
        stem = Path(path).stem or "image"
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "image"
        name, suffix = base, 2
        while name in seen:
            name, suffix = f"{base}-{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
    return names


def _read_local(path: str, limits: DecodeLimits) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            size = os.path.getsize(path)
            if size > limits.max_bytes:
                raise ItemError(
                    "too-large", f"{size} bytes is over the limit of {limits.max_bytes}"
                )
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ItemError("not-found", f"no such file: {path}") from None
        except IsADirectoryError:
            raise ItemError("is-a-directory", f"{path} is a directory") from None
        except PermissionError:
            raise ItemError("access-denied", f"permission denied: {path}") from None

    return load


def explain_paths(
    paths: Sequence[str],
    out_dir: str,
    loaded: LoadedModel,
    params: ExplainParams,
    *,
    target: Target | None = None,
    batch_size: int = 8,
    limits: DecodeLimits | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[ItemOutcome]:
    """Explain local image files in batches, writing OUT/<name>/ for each; yields outcomes.

    on_progress receives the number of image-iterations done since the last call.
    """
    limits = limits or DecodeLimits()
    names = local_item_names(paths)
    items = [
        ItemInput(name, os.path.abspath(path), _read_local(path, limits), target or Target())
        for name, path in zip(names, paths, strict=True)
    ]
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        reported = 0

        def progress(done: int, size: int = len(chunk)) -> None:
            nonlocal reported
            if on_progress:
                on_progress((done - reported) * size)
            reported = done

        outcomes = explain_chunk(chunk, loaded, params, limits, progress)
        if on_progress and reported < params.iterations:
            on_progress((params.iterations - reported) * len(chunk))
        for outcome in outcomes:
            if outcome.ok:
                folder = Path(out_dir) / outcome.name
                folder.mkdir(parents=True, exist_ok=True)
                for filename, data in outcome.files.items():
                    (folder / filename).write_bytes(data)
            yield outcome
