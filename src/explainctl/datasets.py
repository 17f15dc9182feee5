"""Datasets as inputs: parquet files, Hugging Face datasets (saved to disk or on the hub)
and webdataset tar shards, each row an item with its image, ground truth and target.

Rows are streamed (parquet record batches, the Arrow files of a saved dataset, the hub's
streaming mode, a tar read member by member), so a dataset of any length is never held.
An image held as bytes travels in `InputItem.data` under the row's source id, which the
client stages to the job's storage for the workers (client.Client._stage); an image held
as a path or URI becomes an ordinary input, read by the workers as any other.

pyarrow and datasets are imported inside the readers alone: `import explainctl` and a
plain submit of image files never load them (datasets may import torch).
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qs, quote

from explainctl.inputs import InputItem, list_entry
from explainctl.io.uri import one_line
from explainctl.spec.contracts import HF_HUB_PREFIX, source_id
from explainctl.spec.errors import InvalidInput, MissingDependency

__all__ = ["dataset_plan"]

PARQUET_SUFFIXES = (".parquet", ".pq")
TAR_SUFFIXES = (".tar",)
# A column with one of these names holds the image, unless `?image=COL` says which.
IMAGE_COLUMNS = ("image", "img", "path", "uri", "file")
OPTIONS = frozenset({"image", "label", "target", "id", "limit"})
# Members of a webdataset sample that hold its image, by extension.
WDS_IMAGES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_BATCH = 256


def dataset_plan(arg: str) -> Callable[[], Iterator[InputItem]] | None:
    """What expands `arg` if it names a dataset (checked now: a missing column or a bad
    option fails before anything is queued); None if it is no dataset."""
    if arg.startswith(HF_HUB_PREFIX):
        return _plan_hub(arg)
    path, options = _split_options(arg)
    if path is None:
        return None
    lower = path.lower()
    if os.path.isfile(path) and lower.endswith(PARQUET_SUFFIXES):
        return _plan_parquet(arg, os.path.abspath(path), options)
    if os.path.isfile(path) and lower.endswith(TAR_SUFFIXES):
        _check_options(arg, options, {"limit"})
        return functools.partial(_tar_items, arg, os.path.abspath(path), _limit(arg, options))
    if os.path.isdir(path) and _saved_dataset(path):
        return _plan_saved(arg, os.path.abspath(path), options)
    if options:
        raise InvalidInput(f"{one_line(arg)}: options (?...) apply to datasets only")
    return None


def _split_options(arg: str) -> tuple[str | None, dict[str, str]]:
    """(path, options) of `PATH[?k=v&...]`; (None, {}) if no such path exists."""
    if os.path.exists(arg):
        return arg, {}
    path, mark, query = arg.rpartition("?")
    if not mark or not os.path.exists(path):
        return None, {}
    return path, _options(arg, query)


def _options(arg: str, query: str) -> dict[str, str]:
    parsed = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parsed) - OPTIONS)
    if unknown:
        known = ", ".join(sorted(OPTIONS))
        raise InvalidInput(f"{one_line(arg)}: unknown option {unknown[0]!r} (known: {known})")
    return {key: values[-1] for key, values in parsed.items()}


def _check_options(arg: str, options: dict[str, str], allowed: set[str]) -> None:
    if extra := sorted(set(options) - allowed):
        raise InvalidInput(f"{one_line(arg)}: option {extra[0]!r} does not apply here")


def _limit(arg: str, options: dict[str, str]) -> int | None:
    text = options.get("limit")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"{one_line(arg)}: limit must be a whole number >= 1, not {text!r}")
    return int(text)


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingDependency(
            f"dataset inputs need {module.split('.')[0]} (pip install 'explainctl[data]')"
        ) from None


# --------------------------------------------------------------------------- columns


class _Columns:
    """Which column holds what, checked against the dataset's column names."""

    def __init__(self, arg: str, names: list[str], options: dict[str, str], image_hint=None):
        self.arg = arg
        lower = {name.lower(): name for name in names}

        def named(option: str, default: tuple[str, ...]) -> str | None:
            if option in options:
                if options[option] not in names:
                    found = ", ".join(names[:20])
                    raise InvalidInput(
                        f"{one_line(arg)}: no column {options[option]!r} for {option} "
                        f"(columns: {found})"
                    )
                return options[option]
            return next((lower[d] for d in default if d in lower), None)

        self.image = named("image", IMAGE_COLUMNS) or image_hint
        if self.image is None:
            raise InvalidInput(
                f"{one_line(arg)}: no image column (none of {', '.join(IMAGE_COLUMNS)}; "
                f"columns: {', '.join(names[:20])}): name it with ?image=COLUMN"
            )
        self.label = named("label", ("label",))
        self.target = named("target", ("target",))
        self.id = named("id", ())

    @property
    def wanted(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.image, self.label, self.target, self.id) if c))


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _row_item(columns: _Columns, row: dict, source: str, base: str) -> InputItem:
    """One row as an item: bytes to stage under its source id, or a path/URI to read."""
    label, target = _text(row.get(columns.label)), _text(row.get(columns.target))
    value = row.get(columns.image)
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value.strip():
        return list_entry(value.strip(), target, label, base)
    data = bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""
    return InputItem(source, target, label, data=data)


def _rows(batches: Iterable[dict[str, list]]) -> Iterator[dict]:
    for batch in batches:
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _items(
    columns: _Columns, rows: Iterable[dict], where: str, base: str, limit: int | None
) -> Iterator[InputItem]:
    for number, row in enumerate(rows):
        if limit is not None and number >= limit:
            return
        if columns.id is not None:
            fragment = f"id={quote(str(row.get(columns.id)), safe='')}"
        else:
            fragment = f"row={number}"
        yield _row_item(columns, row, source_id(where, fragment), base)


# --------------------------------------------------------------------------- parquet


def _plan_parquet(arg: str, path: str, options: dict[str, str]):
    pq = _require("pyarrow.parquet")
    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow's errors have no common base but Exception
        raise InvalidInput(f"{one_line(arg)}: not a readable parquet file: {error}") from None
    columns = _Columns(arg, list(schema.names), options)
    limit = _limit(arg, options)

    def expand() -> Iterator[InputItem]:
        with pq.ParquetFile(path) as handle:
            batches = (
                b.to_pydict()
                for b in handle.iter_batches(batch_size=_BATCH, columns=columns.wanted)
            )
            yield from _items(columns, _rows(batches), f"parquet:{path}", os.path.dirname(path),
                              limit)  # fmt: skip

    return expand


# --------------------------------------------------------------------------- Hugging Face


def _saved_dataset(path: str) -> bool:
    """A `save_to_disk` folder: one split (state.json) or a DatasetDict (dataset_dict.json)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def _splits(path: str) -> list[str]:
    """The split folders of a saved dataset: itself, or a DatasetDict's in its order."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return [path]
    with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as handle:
        return [os.path.join(path, split) for split in json.load(handle)["splits"]]


def _image_feature(features) -> str | None:
    datasets = _require("datasets")
    return next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)


def _undecoded(dataset, columns: _Columns):
    """The dataset with its image left encoded: the worker decodes it, under its limits."""
    datasets = _require("datasets")
    dataset = dataset.select_columns(columns.wanted)
    if isinstance(dataset.features.get(columns.image), datasets.Image):
        dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
    return dataset


def _plan_saved(arg: str, path: str, options: dict[str, str]):
    datasets = _require("datasets")
    splits = _splits(path)
    opened = []
    for split in splits:
        try:
            dataset = datasets.load_from_disk(split)
        except Exception as error:  # datasets raises many kinds for a damaged folder
            raise InvalidInput(f"{one_line(arg)}: not a readable saved dataset: {error}") from None
        features = dataset.features
        columns = _Columns(arg, list(features), options, _image_feature(features))
        opened.append((split, columns))
    limit = _limit(arg, options)

    def expand() -> Iterator[InputItem]:
        left = limit
        for split, columns in opened:
            # Memory-mapped Arrow files, read a batch at a time.
            dataset = _undecoded(datasets.load_from_disk(split), columns)
            rows = _rows(dataset.iter(batch_size=_BATCH))
            for item in _items(columns, rows, f"hf-disk:{split}", split, left):
                yield item
                if left is not None:
                    left -= 1
            if left == 0:
                return

    return expand


def parse_hub(arg: str) -> tuple[str, str | None, str, dict[str, str]]:
    """(ORG/NAME, CONFIG or None, SPLIT, options) of `hf://datasets/ORG/NAME[/CONFIG]/SPLIT`."""
    spec, _, query = arg[len(HF_HUB_PREFIX) :].partition("?")
    options = _options(arg, query) if query else {}
    parts = [p for p in spec.split("/") if p]
    if len(parts) not in (3, 4):
        raise InvalidInput(f"{one_line(arg)}: name a split: hf://datasets/ORG/NAME[/CONFIG]/SPLIT")
    name = "/".join(parts[:2])
    config = parts[2] if len(parts) == 4 else None
    return name, config, parts[-1], options


def _plan_hub(arg: str):
    name, config, split, options = parse_hub(arg)
    limit = _limit(arg, options)
    where = f"{HF_HUB_PREFIX}{name}/{config or 'default'}/{split}"

    def expand() -> Iterator[InputItem]:
        datasets = _require("datasets")
        try:
            dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as error:  # no such dataset, offline, gated: one line, whatever kind
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise InvalidInput(f"{one_line(arg)}: cannot open: {message}") from None
        yield from streamed_items(arg, dataset, where, options, limit)

    return expand


def streamed_items(arg: str, dataset, where: str, options: dict[str, str], limit: int | None):
    """The items of a streamed (iterable) dataset: the hub's, or any `load_dataset(...,
    streaming=True)`; its columns are checked when it opens."""
    features = dataset.features
    if features is None:
        raise InvalidInput(f"{one_line(arg)}: the dataset does not declare its columns")
    columns = _Columns(arg, list(features), options, _image_feature(features))
    rows = _undecoded(dataset, columns)
    return _items(columns, rows, where, os.getcwd(), limit)


# --------------------------------------------------------------------------- webdataset


def _tar_items(arg: str, path: str, limit: int | None) -> Iterator[InputItem]:
    """A webdataset shard, read as a stream: consecutive members sharing a key
    (`KEY.jpg`, `KEY.cls`, `KEY.json`) are one sample."""
    count = 0
    try:
        with tarfile.open(path, mode="r|*") as shard:
            for key, members in _samples(shard):
                if limit is not None and count >= limit:
                    return
                image = next((members[e] for e in WDS_IMAGES if e in members), None)
                if image is None:
                    continue  # a sample without an image (metadata only) is no item
                label = _text(members.get("cls", b"").decode("utf-8", "replace"))
                if label is None and "json" in members:
                    meta = json.loads(members["json"] or b"{}")
                    label = _text(meta.get("label")) if isinstance(meta, dict) else None
                count += 1
                yield InputItem(source_id(f"wds:{path}", f"key={quote(key, safe='')}"),
                                None, label, data=image)  # fmt: skip
    except (tarfile.TarError, json.JSONDecodeError, OSError) as error:
        raise InvalidInput(f"{one_line(arg)}: unreadable webdataset shard: {error}") from None


def _samples(shard: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, members = None, {}
    for member in shard:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        if not dot:
            continue
        name = f"{folder}/{stem}" if folder else stem
        if name != key and key is not None:
            yield key, members
            members = {}
        key = name
        handle = shard.extractfile(member)
        members[extension.lower()] = handle.read() if handle else b""
    if key is not None:
        yield key, members
