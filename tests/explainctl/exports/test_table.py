"""A job's table: columns derived from the record's declaration, parquet written in batches."""

import numpy as np
import pyarrow.parquet as pq

from explainctl.exports import table
from explainctl.jobs.masks import MaskReader, encode
from explainctl.spec.results import RESULT_COLUMNS, ItemRecord
from explainctl.spec.trust import FLAG_NAMES

SCORES = {"target_index": 3, "prob_before": 0.9, "prob_after": 0.5, "mask_area": 0.2,
          "iterations": 9, "seconds": 1.0, "prob_ratio": 0.55, "class_changed": False}  # fmt: skip


def _done(index: int, **fields) -> ItemRecord:
    return ItemRecord(index=index, uri=f"s3://b/{index}.png", item=f"{index:06d}-{index}",
                      state="done", **{**SCORES, **fields})  # fmt: skip


def _failed(index: int) -> ItemRecord:
    return ItemRecord(index=index, uri=f"s3://b/{index}.png", item=f"{index:06d}-{index}",
                      state="failed", error_code="corrupt", error="bad")  # fmt: skip


def test_every_declared_record_field_is_a_column_and_a_new_one_would_be_too():
    assert table.COLUMNS[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    others = set(ItemRecord.model_fields) - {"artifacts"}
    assert others <= set(table.COLUMNS)
    assert {"target", "attempts", "mask_file", "artifact_mask_npy", "flags"} <= set(table.COLUMNS)
    assert [f.name for f in table.schema()] == list(table.COLUMNS)


def test_a_row_carries_artifact_uris_and_the_flags_the_report_raises():
    row = table.row(_done(0, artifacts={"overlay.png": "s3://o/overlay.png"}))
    assert row["artifact_overlay_png"] == "s3://o/overlay.png" and row["artifact_mask_npy"] is None
    assert row["flags"] == ["not-removed"] and "not-removed" in FLAG_NAMES


def test_parquet_streams_batches_with_masks_where_items_have_them(tmp_path):
    # The first batch has no mask at all: the mask column's size comes from a later one.
    records = [_failed(0), _failed(1)]
    masks = {i: np.random.default_rng(i).random((3, 4)).astype(np.float32) for i in range(2, 7)}
    files = {"c.npz": encode(masks)}
    records += [_done(i, mask_file="c.npz") for i in range(2, 7)]
    path = str(tmp_path / "t.parquet")
    assert table.write_parquet(iter(records), path, MaskReader(files.__getitem__), batch=2) == 7
    read = pq.read_table(path)
    assert read.schema.field("mask").type.list_size == 12
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # one per batch of 2
    rows = read.to_pylist()
    assert [r["index"] for r in rows] == list(range(7))
    assert rows[0]["mask"] is None and rows[0]["error_code"] == "corrupt"
    for r in rows[2:]:
        mask = np.array(r["mask"], np.float32).reshape(r["mask_height"], r["mask_width"])
        assert np.array_equal(mask, masks[r["index"]])


def test_without_masks_the_table_has_no_mask_columns(tmp_path):
    path = str(tmp_path / "t.parquet")
    assert table.write_parquet([_done(0)], path) == 1
    assert pq.read_table(path).column_names == list(table.COLUMNS)
