"""A job's records as one table: `results --parquet`, `Job.results()`, `Job.to_parquet()`.

The columns are derived from the record's declaration (explainctl.spec.results), so a
field declared there reaches every table without an edit here:

    RESULT_COLUMNS         index, uri, item, state, every result field, error_code, error
    the record's others    target, attempts, attempt, mask_file, and whatever it gains
    artifact_<file>        the URI of each artifact file (`artifact_mask_npy`, ...)
    flags                  the trust flags the item raises (explainctl.spec.trust)
    mask, mask_height,     with masks: the mask (1 = kept) as fixed_size_list<float32> of
    mask_width             height * width, row-major; null where the item has none

Parquet is written in record batches of BATCH rows, so a job of any size takes the memory
of one batch (and of the rows before its first mask, whose size the mask column needs).
pyarrow is imported only when a table is made.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Union, get_args, get_origin

from explainctl.jobs.masks import MaskReader
from explainctl.spec.contracts import ARTIFACT_FILES, MASKS_NPY
from explainctl.spec.errors import InvalidInput, MissingDependency
from explainctl.spec.results import RESULT_COLUMNS, ItemRecord
from explainctl.spec.trust import flags

# Rows per record batch: a few MiB with masks of 28x28.
BATCH = 4096
ARTIFACTS: tuple[str, ...] = (*ARTIFACT_FILES, MASKS_NPY)
MASK_COLUMNS = ("mask", "mask_height", "mask_width")


def artifact_column(filename: str) -> str:
    return "artifact_" + filename.replace(".", "_")


# Every column but the masks', in order: the declared record, its artifacts, its flags.
COLUMNS: tuple[str, ...] = (
    *RESULT_COLUMNS,
    *(n for n in ItemRecord.model_fields if n not in RESULT_COLUMNS and n != "artifacts"),
    *(artifact_column(f) for f in ARTIFACTS),
    "flags",
)


def row(record: ItemRecord) -> dict[str, Any]:
    """One record as the table's row (COLUMNS)."""
    values = record.model_dump()
    artifacts = values.pop("artifacts") or {}
    values.update({artifact_column(f): artifacts.get(f) for f in ARTIFACTS})
    values["flags"] = flags(record)
    return values


def rows(records: Iterable[ItemRecord]) -> Iterator[dict[str, Any]]:
    return (row(record) for record in records)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependency("parquet needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _arrow_type(pa, annotation: Any):
    """The arrow type of a declared field's annotation (its None stripped)."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal or annotation is str:
        return pa.string()
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64()}[annotation]


def schema(mask_shape: tuple[int, int] | None = None):
    """The table's arrow schema; with the mask columns for masks of `mask_shape`."""
    pa = _pyarrow()
    fields = ItemRecord.model_fields
    columns = [
        pa.field(name, _arrow_type(pa, fields[name].annotation))
        for name in COLUMNS
        if name in fields
    ]
    columns += [pa.field(artifact_column(f), pa.string()) for f in ARTIFACTS]
    columns.append(pa.field("flags", pa.list_(pa.string())))
    if mask_shape is not None:
        height, width = mask_shape
        columns += [
            pa.field("mask", pa.list_(pa.float32(), height * width)),
            pa.field("mask_height", pa.int32()),
            pa.field("mask_width", pa.int32()),
        ]
    return pa.schema(columns)


def write_parquet(
    records: Iterable[ItemRecord], path: str, masks: MaskReader | None = None, batch: int = BATCH
) -> int:
    """Write the records' table to the parquet file `path`, with each item's mask when
    `masks` reads them; returns the rows written."""
    pa = _pyarrow()
    writer = None
    shape: tuple[int, int] | None = None
    waiting: list[tuple[list[dict], list]] = []  # batches read before the first mask
    written = 0
    plain = schema()
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="masks") if masks else None

    def write(batch_rows: list[dict], batch_masks: list) -> None:
        nonlocal writer, written
        if writer is None:
            writer = pa.parquet.ParquetWriter(path, schema(shape if masks else None))
        table = pa.RecordBatch.from_pylist(batch_rows, schema=plain)
        if masks:
            table = _with_masks(pa, table, batch_masks, shape)
        writer.write_batch(table)
        written += len(batch_rows)

    try:
        for chunk in batches(records, batch):
            batch_rows = [row(r) for r in chunk]
            batch_masks = list(pool.map(_mask_of(masks), chunk)) if pool else []
            if masks and shape is None:
                shape = next((m.shape for m in batch_masks if m is not None), None)
                if shape is None:
                    waiting.append((batch_rows, batch_masks))
                    continue
            for held in waiting:
                write(*held)
            waiting.clear()
            write(batch_rows, batch_masks)
        shape = shape or (1, 1)  # no mask at all (arrow needs a size): every cell null
        for held in waiting:
            write(*held)
        if writer is None:
            write([], [])
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if writer is not None:
            writer.close()
    return written


def _with_masks(pa, table, batch_masks: list, shape: tuple[int, int]):
    """`table` with the mask columns of `batch_masks` (None: a null cell)."""
    import numpy as np

    size = shape[0] * shape[1]
    values = np.zeros((len(batch_masks), size), dtype=np.float32)
    absent = np.ones(len(batch_masks), dtype=bool)
    for i, mask in enumerate(batch_masks):
        if mask is None:
            continue
        if tuple(mask.shape) != tuple(shape):
            raise InvalidInput(
                f"masks of one job differ in shape ({tuple(mask.shape)} and {tuple(shape)}): "
                "write the table without --masks"
            )
        values[i], absent[i] = mask.reshape(-1), False
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), size, mask=pa.array(absent)
    )
    heights = pa.array([None if a else shape[0] for a in absent.tolist()], pa.int32())
    widths = pa.array([None if a else shape[1] for a in absent.tolist()], pa.int32())
    return (
        table.append_column("mask", column)
        .append_column("mask_height", heights)
        .append_column("mask_width", widths)
    )


def _mask_of(masks: MaskReader | None):
    def read(record: ItemRecord):
        if record.state != "done":
            return None
        try:
            mask = masks.mask(record)
        except (OSError, ValueError):
            return None  # an unreadable mask is a null cell, not a lost table
        while mask is not None and mask.ndim > 2 and mask.shape[0] == 1:
            mask = mask[0]
        return mask

    return read


def batches(records: Iterable[ItemRecord], size: int) -> Iterator[list[ItemRecord]]:
    batch: list[ItemRecord] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
