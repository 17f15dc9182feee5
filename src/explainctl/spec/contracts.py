"""Shapes both sides agree on: model specs, task payloads, storage layout, job states.

The client validates with these models before anything runs or is queued; the worker
reads the same models back. Method parameters are in explainctl.spec.methods.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from explainctl.spec.ids import JOB_ID_PATTERN
from explainctl.spec.methods import ExplainParams
from explainctl.spec.models import parse_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Files written for every explained item, in OUT/<item>/ (locally) or <prefix>/<job>/<item>/.
MASK_NPY = "mask.npy"
MASK_PNG = "mask.png"
HEATMAP_PNG = "heatmap.png"
OVERLAY_PNG = "overlay.png"
PERTURBED_PNG = "perturbed.png"
RESULT_JSON = "result.json"
# The gallery's images of the item, read by a report instead of decoding three full-size
# files: the original, the overlay and the perturbed image side by side (in that order),
# each fitted into THUMB_SIDE px, as one WebP. Items of older jobs have none.
THUMBS_WEBP = "thumbs.webp"
THUMB_SIDE = 120
THUMB_PARTS = ("original", "overlay", "perturbed")
ARTIFACT_FILES = (
    MASK_NPY, MASK_PNG, HEATMAP_PNG, OVERLAY_PNG, PERTURBED_PNG, THUMBS_WEBP, RESULT_JSON,
)  # fmt: skip
# Written beside mask.npy when a method returns several masks (extremal with several
# areas): (A, h, w) float32, one per area in the order of params.areas.
MASKS_NPY = "masks.npy"
# Every name an item's folder may hold: what readers of artifacts accept.
ARTIFACT_NAMES = frozenset((*ARTIFACT_FILES, MASKS_NPY))
# The image formats workers decode (Pillow's names), and the one they write: readers of a
# job's images (report, compare) open nothing else, whatever a file claims to be.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
ARTIFACT_FORMATS = ("PNG",)
MAX_PIXELS = 50_000_000  # the default cap on width × height of any image decoded
# A progressive JPEG is decoded once per scan over the whole image: a 40 kB file of 3,000
# scans takes seconds at 1024 × 1024, minutes at the pixel cap. Encoders write about ten;
# libjpeg's own tools suggest refusing a few hundred. Workers and the auditor's pages
# refuse more than this.
MAX_JPEG_SCANS = 100


def jpeg_scans(data: bytes) -> int:
    """The scans of an encoded JPEG: its start-of-scan markers (in entropy-coded data a
    0xff byte is always stuffed, so only markers match)."""
    return data.count(b"\xff\xda")


# On the item scale the heatmap's top colour is the item's strongest deletion, but never a
# saliency below this: a mask that deleted nothing strongly is not stretched into one that
# looks decisive, while one that deleted mildly everywhere does not look like nothing.
ITEM_SCALE_FLOOR = 0.25


def heatmap_top(mask, scale: str = "item") -> float:
    """The saliency 1 - m that heatmap.png draws in its top colour (a numpy mask): 1 on
    the absolute scale; on the item scale the item's strongest deletion, at least
    ITEM_SCALE_FLOOR. Declared here so that exports draw on the worker's scale."""
    if scale == "absolute":
        return 1.0
    return max(1.0 - float(mask.min()), ITEM_SCALE_FLOOR)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which classifier to explain and how its inputs are normalised.

    `name` is one of the forms explainctl.spec.models lists (`vgg19`, `timm:NAME`,
    `hf:ORG/NAME`, a local file or directory, `module:callable`). `mean` and `std` left
    out are the model's own (timm's data config, the Hugging Face image processor;
    ImageNet's for torchvision models and anything else).
    """

    name: str = "vgg19"
    weights: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("name")
    @classmethod
    def _known_form(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model name must not be empty")
        parse_model(value)
        return value.strip()

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        if value is not None and any(not (math.isfinite(s) and s > 0) for s in value):
            raise ValueError("std values must be positive")
        return value


# `--target label`: explain each item's ground-truth class rather than the prediction.
GROUND_TRUTH = "label"

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]


class ResolvedModel(_Strict):
    """What a worker made of a ModelSpec: where the model came from and how each image is
    prepared for it (the model's own configuration, with --mean/--std/--image-size over it).
    Recorded in every result.json and, by the job's first worker, in its record."""

    source: Literal["torchvision", "timm", "hf", "file", "callable", "module"]
    revision: str | None = None  # the Hub commit the weights came from, where known
    image_size: int = Field(224, ge=1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Interpolation = "bilinear"
    # Where the class names came from: the model's own, the job's --labels, or none.
    labels: Literal["model", "job"] | None = None


class Target(_Strict):
    """The class to explain: the top-1 class when every field is empty; the item's own
    ground truth (its dataset's label) with `ground_truth` (`--target label`)."""

    index: int | None = Field(None, ge=0)
    name: str | None = None
    ground_truth: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Target:
        if text is None or text.strip() == "" or text.strip().lower() == "top1":
            return cls()
        text = text.strip()
        if text.lower() == GROUND_TRUTH:
            return cls(ground_truth=True)
        if text.lstrip("-").isdigit():
            return cls(index=int(text))
        return cls(name=text)


# --- The queue: task names and payloads ------------------------------------------------

TASK_EXPLAIN_CHUNK = "explainctl.explain_chunk"

# The protocol of chunk messages and job records, raised whenever a reader of the last one
# would misread the next. A worker fails the items of a newer one as worker-incompatible
# (upgrade it, then `retry`), so they neither vanish nor loop; whatever a later protocol
# changes, it keeps what that failure needs: the `state` byte per item, `counts`,
# `errors` and lua/transition.lua. Jobs recorded with protocol 1 cannot be read by this
# one (their records were hashes): drain the queue before upgrading from it.
#   1  until 2026-12-06: a hash field per item for state, attempts and scores
#   2  state and attempts a byte per item, scores in storage (jobs/records.py), protocol
#      in messages and records; readers ignore fields they do not know
#   3  a model's own preprocessing: `mean`, `std` and `image_size` may be null (the
#      worker resolves them from the model), and messages carry a signature; records as 2
PROTOCOL = 3
# The oldest protocol whose records this one reads (3 changed messages, not records).
OLDEST_READABLE = 2


class ChunkItem(_Strict):
    index: int = Field(ge=0)
    uri: str
    target: str | None = None
    # Ground truth: the class the input's dataset names (raw text: an index or a name).
    label: str | None = None
    # A dataset row's image, staged by the client under the job (`inputs/<item>.<ext>`,
    # relative to `<output>/<job_id>/`): what the worker reads; `uri` is the row's source id.
    staged: str | None = Field(None, pattern=r"^inputs/[\w.-]+$")


class ChunkPayload(_Strict):
    """One queue message: a chunk of a job's items, which a worker explains in its
    device's slots (a batch refilled as items finish).

    Holds no credentials: workers reach storage with their own configuration. A field
    this version does not know is ignored: one that a reader must not ignore comes with
    a higher `protocol`.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    job_id: str = Field(pattern=f"^{JOB_ID_PATTERN.pattern}$")
    chunk: int = Field(ge=0)
    model: ModelSpec
    params: ExplainParams
    output: str
    items: list[ChunkItem]
    sent_at: float | None = None  # when the client queued it, for the queue-wait metric
    # How many workers in turn handed these items back, their environment failing
    # (errors.ENVIRONMENT_CODES); at EXPLAINCTL_MAX_HAND_BACKS they fail with the code.
    handed_back: int = Field(default=0, ge=0)
    protocol: int = Field(default=PROTOCOL, ge=1)

    def wire(self) -> dict:
        """The message as JSON (a chunk never handed back leaves `handed_back` out)."""
        return self.model_dump(mode="json", exclude=None if self.handed_back else {"handed_back"})


def sent_protocol(message: object) -> int:
    """The protocol a raw chunk message was sent with (1: sent before messages said)."""
    protocol = message.get("protocol", 1) if isinstance(message, dict) else 1
    return protocol if isinstance(protocol, int) and protocol >= 1 else 1


# --- Storage layout: <output>/<job_id>/... ---------------------------------------------

# Items per chunk (one queue message) unless `submit --chunk-size` says otherwise.
DEFAULT_CHUNK_SIZE = 16

JOB_JSON = "job.json"
ITEMS_JSONL = "items.jsonl"
REPORT_HTML = "report.html"


# What item_name gives: a reader checks names from a manifest anyone could edit against it.
# \w is what item_name keeps (str.isalnum, and _), so `café.jpg` passes and `../` does not.
ITEM_NAME = re.compile(r"\d{6,}-[\w-]+")


# Source ids of dataset rows (explainctl.datasets): `parquet:/data/test.parquet#row=42`,
# `hf-disk:/data/ds/test#row=42`, `hf://datasets/ORG/NAME/CONFIG/SPLIT#row=42`,
# `wds:/data/shard-000.tar#key=abc`; `#id=VALUE` where the rows have an id column.
HF_HUB_PREFIX = "hf://datasets/"
DATASET_SCHEMES = ("parquet:", "hf-disk:", HF_HUB_PREFIX, "wds:")


def source_id(where: str, fragment: str) -> str:
    return f"{where}#{fragment}"


def is_source_id(uri: str) -> bool:
    return uri.startswith(DATASET_SCHEMES) and "#" in uri


def item_name(index: int, uri: str) -> str:
    """Folder of an item among its job's artifacts: `000042-cat`, unique and path-safe (a
    dataset row's: its file or split, then its row, id or key: `000042-test-42`)."""
    fragment = ""
    if is_source_id(uri):
        uri, _, fragment = uri.rpartition("#")
        fragment = "-" + fragment.partition("=")[2]
    tail = uri.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    stem = (tail.rsplit(".", 1)[0] if "." in tail else tail) + fragment
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60].strip("_")
    return f"{index:06d}-{safe or 'image'}"


_SIGNATURES = (
    (b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"), (b"BM", "bmp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)  # fmt: skip


def image_kind(data: bytes) -> str:
    """The format of encoded image bytes, from their signature ("bin" if none is known):
    the extension a staged input is stored under."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), "bin")


def artifact_key(job_id: str, item: str, filename: str, attempt: int | None = None) -> str:
    """Where an item's file goes. A worker writes under the attempt it runs
    (`<job>/<item>/attempt-<n>/`), so two copies of a chunk never overwrite each other
    and the record, which names the attempt that settled the item, vouches for exactly
    the files that attempt wrote."""
    if attempt is None:
        return f"{job_id}/{item}/{filename}"
    return f"{job_id}/{item}/attempt-{attempt}/{filename}"


def job_key(job_id: str, filename: str) -> str:
    return f"{job_id}/{filename}"


def part_key(job_id: str, low: int, high: int, chunk: int, run: str) -> str:
    """Where one chunk attempt's records of done items go: `<job>/parts/<low>-<high>-...`,
    named by the lowest and highest index it holds, so a reader streams the job in index
    order from the listing alone."""
    return f"{job_id}/{PARTS}/{low:09d}-{high:09d}-{chunk:07d}-{run}.jsonl"


def part_span(key: str) -> tuple[int, int]:
    """(lowest, highest) index of the records in the part at `key` (part_key's name)."""
    low, high = key.rsplit("/", 1)[-1].split("-")[:2]
    return int(low), int(high)


PARTS = "parts"

# One file per chunk attempt with the masks of the items it settled done, written before
# its part (so a record that names it names a complete file): an .npz of `index` (N,)
# int64 and `masks` (N, h, w) float32, row i the mask.npy of item index[i]. Readers of
# many masks (results --parquet --masks, compare, export) fetch one object per chunk.
MASKS = "masks"
# Where a client stages a dataset row's image, under its job (ChunkItem.staged).
STAGED_INPUTS = "inputs"


def chunk_masks_key(job_id: str, low: int, high: int, chunk: int, run: str) -> str:
    """Where one chunk attempt's masks go: `<job>/masks/`, named as its part is."""
    return f"{job_id}/{MASKS}/{low:09d}-{high:09d}-{chunk:07d}-{run}.npz"


# --- Job records -----------------------------------------------------------------------

ItemState = Literal["queued", "running", "done", "failed", "cancelled"]
ITEM_STATES: tuple[str, ...] = get_args(ItemState)
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})  # an item never leaves these
# How Redis stores an item's state: one byte per item, its state's first letter.
STATE_CODES: dict[str, str] = {state: state[0] for state in ITEM_STATES}
# interrupted: its submit stopped (killed) before queueing every item; `submit --resume`.
JobState = Literal[
    "submitting",
    "interrupted",
    "queued",
    "running",
    "completed",
    "completed_with_failures",
    "cancelled",
]
FINISHED_JOB_STATES = frozenset({"completed", "completed_with_failures", "cancelled"})


class JobInfo(_Strict):
    """What a job was asked to do; fixed at submission (job.json holds it with the status).
    Fields a newer client adds are ignored, as in ChunkPayload."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    job_id: str
    created: float
    model: ModelSpec
    params: ExplainParams
    output: str
    queue: str
    chunk_size: int
    # Class names for the model's outputs (--labels, explainctl.labels): in place of the
    # model's own, by workers (targets by name, target_name) and so in every record.
    labels: tuple[str, ...] | None = None
