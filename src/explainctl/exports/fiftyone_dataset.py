"""A job as a FiftyOne dataset: `explainctl export JOB --to fiftyone`.

One sample per item, keyed `<job>:<index>` (the field `explainctl_key`), so exporting a job
again updates its samples in place (fields the auditor added, such as FiftyOne's
mistakenness, stay) and never adds a second copy; several jobs can share one dataset.
Each sample holds:

    filepath           the image: local inputs where they are; s3:// inputs and dataset
                       rows' staged images downloaded once to MEDIA/<job>/<item><ext>, since
                       open-source FiftyOne reads local media only; each read as the
                       client reads originals (its roots and caps, a staged image only
                       where it is the job's own)
    explained          fo.Classification of the explained class, confidence p before
    prediction         the model's top-1 class (`predicted_name` where the record has it;
                       else the explained class where that was the top-1)
    ground_truth       the item's label, where it has one (`label_name`, else the raw label)
    saliency           fo.Heatmap of 1 - mask (the mask's own grid; FiftyOne stretches it
                       over the image), range [0, top] on heatmap.png's scale
    every record field  scores, state, error, URIs, artifact URIs (explainctl.exports.table)
    tags               the item's trust flags, and `failed` / `cancelled`

fiftyone is imported only here, when an export runs; it does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from explainctl.exports.table import batches, row
from explainctl.io.uri import parse_uri
from explainctl.jobs.masks import MaskReader
from explainctl.spec.contracts import heatmap_top, is_source_id
from explainctl.spec.errors import ExplainctlError, MissingDependency
from explainctl.spec.results import ItemRecord

KEY_FIELD = "explainctl_key"
# Samples sent to the database at once.
BATCH = 256


@dataclass(frozen=True)
class Exported:
    dataset: str
    samples: int  # items of the job in the dataset
    downloaded: int  # images copied to the media folder by this export
    without_media: int  # items whose image could not be read (their filepath is missing)
    media: str


def _fiftyone():
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    try:
        import fiftyone
    except ImportError:
        raise MissingDependency(
            "export --to fiftyone needs FiftyOne (pip install 'explainctl[fiftyone]')"
        ) from None
    return fiftyone


def key(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"


class _Media:
    """Where each item's image is on this machine: a local input where it is, anything
    else (an `s3://` input, a dataset row's staged image) downloaded to `folder`, each read
    through `read` (the client's reader of originals: its roots and caps)."""

    def __init__(self, folder: Path, job_id: str, read: Callable[[str], bytes]):
        self.folder = folder / job_id
        self.read = read
        self.downloaded = 0
        self.missing = 0

    def path(self, record: ItemRecord) -> str:
        uri = record.staged or record.uri
        target = self.folder / f"{record.item}{_suffix(uri)}"
        try:
            location = parse_uri(uri) if not is_source_id(uri) else None
            local = location is not None and location.scheme in ("", "file")
            if local and Path(location.key).is_file():
                self.read(uri)  # allowed here, as a worker would read it
                return str(Path(location.key).resolve())
            if not target.is_file():
                data = self.read(uri)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(target.suffix + ".part")
                partial.write_bytes(data)
                partial.replace(target)
                self.downloaded += 1
        except ExplainctlError:
            self.missing += 1
        return str(target)


def _suffix(uri: str) -> str:
    tail = uri.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
    return Path(tail).suffix.lower()[:8]


def _classification(fo, name: str | None, index: int | None, confidence: float | None = None):
    if name is None and index is None:
        return None
    return fo.Classification(label=name if name is not None else str(index), confidence=confidence)


def sample(fo, record: ItemRecord, job_id: str, filepath: str, mask, scale: str):
    """The FiftyOne sample of one item (see the module's docstring)."""
    values = row(record)
    flags = values.pop("flags")
    fields = {name: value for name, value in values.items() if value is not None}
    fields.update({KEY_FIELD: key(job_id, record.index), "explainctl_job": job_id})
    tags = [*flags, *([record.state] if record.state in ("failed", "cancelled") else [])]
    explained = _classification(fo, record.target_name, record.target_index, record.prob_before)
    predicted_name = getattr(record, "predicted_name", None)
    predicted_index = getattr(record, "predicted_index", None)
    if predicted_name is not None or predicted_index is not None:
        prediction = _classification(fo, predicted_name, predicted_index)
    else:
        # Without the record's own top-1, the explained class is it where none was asked.
        prediction = explained if record.target in (None, "top1") else None
    truth = _classification(
        fo, getattr(record, "label_name", None) or getattr(record, "label", None),
        getattr(record, "label_index", None),
    )  # fmt: skip
    labels = {"explained": explained, "prediction": prediction, "ground_truth": truth}
    fields.update({name: label.copy() for name, label in labels.items() if label is not None})
    if mask is not None:
        saliency = 1.0 - mask.astype("float32")
        fields["saliency"] = fo.Heatmap(map=saliency, range=[0.0, heatmap_top(mask, scale)])
    return fo.Sample(filepath=filepath, tags=tags, **fields)


def export(
    job_id: str,
    records: Iterable[ItemRecord],
    dataset_name: str,
    media: str | os.PathLike,
    read_original: Callable[[str], bytes],
    heatmap_scale: str = "item",
    masks: MaskReader | None = None,
) -> Exported:
    """Create or extend the FiftyOne dataset `dataset_name` (persistent) with the job's
    items; images not on this machine go to `media`."""
    fo = _fiftyone()
    masks = masks or MaskReader()
    folder = Path(media).expanduser().resolve()
    where = _Media(folder, job_id, read_original)
    if dataset_name in fo.list_datasets():
        dataset = fo.load_dataset(dataset_name)
    else:
        dataset = fo.Dataset(dataset_name, persistent=True)
    count = 0
    for batch in batches(records, BATCH):
        samples = []
        for record in batch:
            mask = _mask(masks, record)
            samples.append(sample(fo, record, job_id, where.path(record), mask, heatmap_scale))
        if KEY_FIELD in dataset.get_field_schema():
            dataset.merge_samples(samples, key_field=KEY_FIELD, progress=False)
        else:
            dataset.add_samples(samples, progress=False)
            dataset.create_index(KEY_FIELD, unique=True)
        count += len(samples)
    return Exported(dataset_name, count, where.downloaded, where.missing, str(folder))


def _mask(masks: MaskReader, record: ItemRecord):
    if record.state != "done":
        return None
    try:
        mask = masks.mask(record)
    except (OSError, ValueError, ExplainctlError):
        return None
    while mask is not None and mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    return mask
