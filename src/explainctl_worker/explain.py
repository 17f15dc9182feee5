"""From items (sources and targets) to artifacts: decode ahead, optimise in slots, render.

Used by the queue task on a chunk and by `explainctl explain` on local files (local_files.py).
A bad item becomes a failed outcome with a code; it never stops the others.
"""

from __future__ import annotations

import platform
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import explainctl
from explainctl.spec.contracts import (
    ARTIFACT_FILES,
    MASKS_NPY,
    ResolvedModel,
    Target,
    heatmap_top,
)
from explainctl.spec.errors import ENVIRONMENT_CODES, ExplainctlError, ItemError
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemResult
from explainctl_worker.artifact import render
from explainctl_worker.decode import DecodeLimits, decode_image
from explainctl_worker.engine.slots import Entry, Explanation, choose_slots, run_slots
from explainctl_worker.measures import diagnostics
from explainctl_worker.methods import RUNNERS
from explainctl_worker.model import LoadedModel, resolve_label, resolve_target


@dataclass
class ItemInput:
    name: str  # the item's folder name among the job's artifacts
    source: str  # where it came from (path or URI), recorded in result.json
    load: Callable[[], bytes]  # reads the encoded image; may raise ItemError
    target: Target = field(default_factory=Target)
    # Ground truth: the class the input's dataset names (an index or a class name), or None.
    label: str | None = None
    # Called as the item's turn comes, before its read: False skips it (another copy of
    # its chunk settled it); may raise ItemError. A job worker counts the attempt here, so
    # a worker that dies is charged only for the items it had begun.
    start: Callable[[], bool] | None = None


@dataclass
class ItemOutcome:
    name: str
    source: str
    result: ItemResult | None = None
    files: dict[str, bytes] | None = None
    artifacts: dict[str, str] | None = None  # filename -> URI, once stored
    error_code: str | None = None
    error: str | None = None
    # The failure was the worker's environment, not the item's (errors.ENVIRONMENT_CODES,
    # or anything that failed while its artifacts were written).
    environment: bool = False
    # Never started: the chunk stopped admitting items (`admit_until`); it goes back.
    deferred: bool = False
    # Not run: its `start` said another copy of its chunk had settled it.
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def environment_failure(self) -> bool:
        return not self.ok and (self.environment or self.error_code in ENVIRONMENT_CODES)


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
            _wanted(item), loaded.categories, num_classes(loaded, params.image_size)
        )
    except ExplainctlError as error:
        raise ItemError("bad-target", str(error)) from None
    label = resolve_label(item.label, loaded.categories, num_classes(loaded, params.image_size))
    return image, -1 if target is None else target, label


def _wanted(item: ItemInput) -> Target:
    """The class the item asks for: `--target label` means its ground truth's."""
    if not item.target.ground_truth:
        return item.target
    if item.label is None:
        raise ItemError("bad-target", "--target label, but the item has no ground-truth label")
    try:
        truth = Target.parse(item.label)
    except ValueError:
        truth = Target()
    if truth.index is None and truth.name is None:
        raise ItemError("bad-target", f"its label {item.label!r} names no class")
    return truth


def _to_tensor(image: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling[interpolation.upper()])
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class Timings:
    """Where a run of `explain_items` spent its wall time, in seconds.

    The device is idle while the loop waits for a decoded item or for the last renders;
    decode, render and deliver run in background threads beside the optimisation.
    """

    wall: float = 0.0
    waiting: float = 0.0  # the optimisation loop blocked on decoding, or on the last renders
    decode: float = 0.0  # summed over items: read + decode + resize
    render: float = 0.0  # summed over items: artifacts drawn and encoded
    deliver: float = 0.0  # summed over items: stored or written
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def idle_fraction(self) -> float:
        return self.waiting / self.wall if self.wall else 0.0

    def count(self, name: str, seconds: float) -> None:
        """Add to one of the sums, from any thread."""
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)


# Threads beside the optimisation: reading and decoding ahead, rendering and storing.
# Two each keep a slow read or upload from stalling the others, without taking the cores
# the device loop needs on a CPU worker.
HOST_THREADS = 2


class _Inline:
    """An executor that runs each call at once, in the caller's thread: host work without
    overlap (host_threads=0), the baseline the overlap is measured against."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # handed to the caller by future.result()
            future.set_exception(error)
        return future


def _executor(threads: int, name: str):
    return ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else _Inline()


def explain_items(
    items: Sequence[ItemInput],
    loaded: LoadedModel,
    params: ExplainParams,
    limits: DecodeLimits | None = None,
    *,
    slots: int | None = None,
    deliver: Callable[[ItemOutcome], None] | None = None,
    progress: Callable[[int], None] | None = None,
    timings: Timings | None = None,
    host_threads: int = HOST_THREADS,
    admit_until: float | None = None,
) -> list[ItemOutcome]:
    """Explain `items`: read and decode ahead in background threads while the device
    optimises in slots, then render each finished item and hand it to `deliver`, in
    background threads too.

    Args:
        items: each a name, a URI, a reader of its bytes and its target class.
        loaded: the model, its device, normalisation and class names.
        params: the method and its parameters; images are resized to params.image_size
            square (the model's own size where it is None) with the model's own
            resampling, (1, 3, S, S) in [0, 1] per item before the slots.
        limits: bounds on one image's bytes and pixels (default: the settings' defaults).
        slots: items in flight on the device (default: slots.choose_slots).
        deliver: stores or writes an outcome; it may set the outcome's error, and the item
            has then failed.
        progress: receives the item-iterations done since its last call.
        timings: where the wall time of each stage is added up (benchmarks).
        host_threads: threads for each of decoding and rendering; 0 runs both in line
            with the loop (no overlap).
        admit_until: a time.monotonic() after which no further item starts (the first
            always does, so a chunk always makes progress); those left are `deferred`.

    Returns:
        One ItemOutcome per item, in the order of `items`: its result (every declared
        score) and files, or its error code and one-line message. A bad item never stops
        the others.
    """
    limits = limits or DecodeLimits()
    if not items:
        return []
    params, resolved = loaded.prepare(params)
    slots = min(slots, len(items)) if slots else None
    slots = slots or choose_slots(loaded.module, params, loaded.device, len(items))
    outcomes = [ItemOutcome(item.name, item.source) for item in items]
    spent = timings or Timings()
    started = time.perf_counter()
    images: dict[int, Image.Image] = {}
    labels: dict[int, int | None] = {}  # each item's ground truth as a class index

    def decode(position: int):
        began = time.perf_counter()
        try:
            if items[position].start is not None and not items[position].start():
                outcomes[position].skipped = True
                return position, None, None, None
            image, target, labels[position] = _prepare(items[position], loaded, params, limits)
            tensor = _to_tensor(image, params.image_size, resolved.interpolation)
            return position, image, target, tensor
        except ItemError as error:
            outcomes[position].error_code, outcomes[position].error = error.code, error.message
            return position, None, None, None
        finally:
            spent.count("decode", time.perf_counter() - began)

    def submit(executor, fn, *args) -> Future:
        # In line (host_threads=0) the work itself runs here, and the device waits for it.
        began = time.perf_counter()
        future = executor.submit(fn, *args)
        spent.waiting += time.perf_counter() - began
        return future

    twins = {i for i, item in enumerate(items) if measures_stability(params, item.name)}
    if twins and progress:
        # The progress total counts each item's budget once; twins make the same work twice.
        progress = _scaled(progress, len(items), len(items) + len(twins))

    def entries(decoder) -> Iterator[Entry]:
        # Keep up to `slots` items decoded ahead of the loop: a refill never waits for a read.
        ahead = deque(submit(decoder, decode, i) for i in range(min(slots, len(items))))
        following = len(ahead)
        started = 0
        while ahead:
            if started and admit_until is not None and time.monotonic() >= admit_until:
                for outcome in outcomes[following - len(ahead) :]:
                    outcome.deferred = True
                return
            began = time.perf_counter()
            position, image, target, tensor = ahead.popleft().result()
            spent.waiting += time.perf_counter() - began
            if following < len(items):
                ahead.append(submit(decoder, decode, following))
                following += 1
            if image is not None:
                images[position] = image
                started += 1
                yield Entry((position, 0), tensor, target)
                if position in twins:
                    yield Entry((position, 1), tensor, target, seed=twin_seed(params.seed))
            elif progress:
                progress(params.iterations)  # a failed item is done with: credit its budget

    def finish(position: int, explanation: Explanation) -> None:
        began = time.perf_counter()
        outcome = outcomes[position]
        image = images.pop(position)
        label = labels.pop(position, None)
        _render(outcome, image, explanation, loaded, params, resolved, version_info, label)
        rendered = time.perf_counter()
        spent.count("render", rendered - began)
        if deliver and outcome.ok:
            deliver(outcome)
            spent.count("deliver", time.perf_counter() - rendered)

    version_info = versions()
    num_classes(loaded, params.image_size)  # once, before the decode threads need it
    with (
        _executor(host_threads, "decode") as decoder,
        _executor(host_threads, "render") as renderer,
    ):
        stream = run_slots(
            loaded.module,
            entries(decoder),
            params,
            slots=slots,
            mean=resolved.mean,
            std=resolved.std,
            device=loaded.device,
            progress=progress,
        )
        pending = [
            submit(renderer, finish, position, explanation)
            for position, explanation in _with_twins(stream, twins)
        ]
        began = time.perf_counter()
        for future in pending:
            future.result()
        spent.waiting += time.perf_counter() - began
    spent.wall += time.perf_counter() - started
    return outcomes


def measures_stability(params: ExplainParams, name: str) -> bool:
    """Whether item `name` is optimised twice: every item with params.stability, else a
    share params.stability_sample of them chosen by a hash of the name (so a rerun measures
    the same items). A method that draws nothing at random would repeat itself exactly:
    none of its items is measured."""
    if params.noise_std == 0 and params.jitter == 0:
        return False
    if params.stability:
        return True
    return zlib.crc32(name.encode()) < params.stability_sample * 2**32


def twin_seed(seed: int) -> int:
    """The second seed of a stability measurement."""
    return (seed + 1) % 2**63


def _scaled(progress: Callable[[int], None], total: int, work: int) -> Callable[[int], None]:
    owed = 0.0

    def report(done: int) -> None:
        nonlocal owed
        owed += done * total / work
        whole = int(owed)
        owed -= whole
        if whole:
            progress(whole)

    return report


def _with_twins(
    stream: Iterator[tuple[tuple[int, int], Explanation]], twins: set[int]
) -> Iterator[tuple[int, Explanation]]:
    """(position, explanation) per item from the slots' ((position, copy), explanation):
    an item with a twin comes once both copies are done, carrying their agreement."""
    waiting: dict[int, tuple[int, Explanation]] = {}
    for (position, copy), explanation in stream:
        if position not in twins:
            yield position, explanation
            continue
        if position not in waiting:
            waiting[position] = (copy, explanation)
            continue
        other_copy, other = waiting.pop(position)
        first, second = (other, explanation) if other_copy == 0 else (explanation, other)
        iou, rank = diagnostics.stability(first.masks_full, second.masks_full)
        first.scores["stability_iou"], first.scores["stability_rank"] = iou, rank
        first.scores["seconds"] = first.scores["seconds"] + second.scores["seconds"]
        yield position, first


def _render(
    outcome: ItemOutcome,
    image: Image.Image,
    explanation: Explanation,
    loaded: LoadedModel,
    params: ExplainParams,
    resolved: ResolvedModel,
    version_info: dict[str, str],
    label: int | None = None,
) -> None:
    """result.json and the artifacts of one explained item, into `outcome`: its scores as
    the engine produced them (by their declared names), the classes named where the model
    has categories, its ground truth `label` (a class index, or None) against the model's
    prediction, and where they came from."""
    scores = explanation.item_scores()
    categories = loaded.categories

    def name(index: int | None) -> str | None:
        return (
            categories[index]
            if categories and index is not None and index < len(categories)
            else None
        )

    scores["target_name"] = scores["target_name"] or name(scores["target_index"])
    scores["predicted_name"] = name(scores["predicted_index"])
    if label is not None:
        scores["label_index"], scores["label_name"] = label, name(label)
        scores["correct"] = scores["predicted_index"] == label
    scores["seconds"] = round(scores["seconds"], 4)
    area_masks = None if explanation.area_masks is None else explanation.area_masks[0].numpy()

    # Draw what the model saw where that is more than the stored mask upsampled.
    full = RUNNERS[params.method].full_resolution_mask
    mask_full = explanation.masks_full[0, 0].numpy() if full else None
    mask = explanation.masks[0, 0].numpy()
    top = heatmap_top(mask if mask_full is None else mask_full, params.heatmap_scale)

    result = ItemResult(
        **scores,
        source=outcome.source,
        item=outcome.name,
        model=loaded.spec.name,
        resolved_model=resolved,
        heatmap_max=round(top, 4),
        image_width=image.width,
        image_height=image.height,
        params=params,
        versions=version_info,
        artifacts=[*ARTIFACT_FILES, *([MASKS_NPY] if area_masks is not None else [])],
    )
    try:
        outcome.files = render(
            image,
            mask,
            explanation.substrate[0].numpy(),
            result,
            params.upsample,
            mask_full=mask_full,
            levels=None if explanation.levels is None else explanation.levels[0].numpy(),
            area_masks=area_masks,
            top=top,
        )
    except (OSError, ValueError, MemoryError) as error:
        outcome.error_code, outcome.error = "render-error", f"cannot render: {error}"
        return
    outcome.result = result
