"""Datasets as inputs: parquet files, saved and streamed Hugging Face datasets and
webdataset shards, expanded into items with source ids, labels and targets (offline)."""

import re
import subprocess
import sys

import pytest

from explainctl.datasets import parse_hub, streamed_items
from explainctl.inputs import InputItem, expand_inputs
from explainctl.spec.contracts import item_name
from explainctl.spec.errors import InvalidInput
from tests.support import datasets as built


def test_parquet_rows_become_items_with_source_ids_labels_and_targets(tmp_path):
    path = built.parquet(tmp_path / "test.parquet", 3, target=["tabby", None, "2"])
    items = list(expand_inputs([str(path)]))
    assert [i.uri for i in items] == [f"parquet:{path}#row={n}" for n in range(3)]
    assert [(i.label, i.target) for i in items] == [("0", "tabby"), ("1", None), ("0", "2")]
    assert items[1].data == built.png(1)
    assert item_name(2, items[2].uri) == "000002-test-2"


def test_parquet_options_choose_columns_ids_and_a_limit(tmp_path):
    keys = ["k/1", "k2", "k3", "k4", "k5"]
    truth = ["a", "b", "c", "d", "e"]
    path = built.parquet(tmp_path / "t.parquet", 5, pic=[built.png(9)] * 5, truth=truth, key=keys)
    items = list(expand_inputs([f"{path}?image=pic&label=truth&id=key&limit=2"]))
    assert [(i.uri, i.label, i.data) for i in items] == [
        (f"parquet:{path}#id=k%2F1", "a", built.png(9)),
        (f"parquet:{path}#id=k2", "b", built.png(9)),
    ]


def test_a_column_of_paths_gives_ordinary_inputs(tmp_path):
    path = built.parquet(tmp_path / "p.parquet", 2, image=["a.png", "s3://b/c.jpg"])
    assert list(expand_inputs([str(path)])) == [
        InputItem(str(tmp_path / "a.png"), None, "0"),
        InputItem("s3://b/c.jpg", None, "1"),
    ]


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("?image=nope", "no column 'nope' for image (columns: image, label, other)"),
        ("?label=nope", "no column 'nope' for label"),
        ("?colour=red", "unknown option 'colour'"),
        ("?limit=0", "limit must be a whole number >= 1"),
    ],
)
def test_bad_options_fail_in_one_line_before_anything_is_read(tmp_path, suffix, message):
    path = built.parquet(tmp_path / "t.parquet", 1, other=[1])
    with pytest.raises(InvalidInput, match=re.escape(message)) as caught:
        expand_inputs([str(path) + suffix])
    assert "\n" not in str(caught.value)


def test_a_parquet_file_without_an_image_column_says_how_to_name_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "t.parquet")
    with pytest.raises(InvalidInput, match=r"no image column .*\?image=COLUMN"):
        expand_inputs([str(tmp_path / "t.parquet")])


def test_a_saved_dataset_all_splits_or_one_keeps_class_indices(tmp_path):
    root = built.saved_dataset(tmp_path / "pets", n=3)
    items = list(expand_inputs([str(root)]))
    train = [f"hf-disk:{root}/train#row={n}" for n in range(3)]
    assert [i.uri for i in items] == [*train, f"hf-disk:{root}/test#row=0"]
    assert [i.label for i in items] == ["0", "1", "0", "0"]
    assert items[1].data == built.png(1)  # the image column is found by its Image feature
    one = list(expand_inputs([f"{root}/train?limit=2"]))
    assert [i.uri for i in one] == [f"hf-disk:{root}/train#row={n}" for n in range(2)]
    assert list(expand_inputs([f"{root}?limit=3"]))[-1].uri == f"hf-disk:{root}/train#row=2"


def test_a_streamed_dataset_reads_as_the_hub_form_does(tmp_path):
    """The hub's rows come through `streamed_items`, as a local streamed dataset's do."""
    import datasets

    path = built.parquet(tmp_path / "t.parquet", 3)
    stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    where = "hf://datasets/org/name/default/train"
    items = list(streamed_items("arg", stream, where, {"label": "label"}, 2))
    assert [(i.uri, i.label, i.data) for i in items] == [
        (f"{where}#row={n}", str(n % 2), built.png(n)) for n in range(2)
    ]
    with pytest.raises(InvalidInput, match="no column 'x' for image"):
        streamed_items("arg", stream, where, {"image": "x"}, None)


def test_hub_names_are_parsed_and_checked():
    assert parse_hub("hf://datasets/org/name/test?label=fine&limit=5") == (
        "org/name", None, "test", {"label": "fine", "limit": "5"})  # fmt: skip
    assert parse_hub("hf://datasets/org/name/cfg/validation")[:3] == (
        "org/name",
        "cfg",
        "validation",
    )
    with pytest.raises(InvalidInput, match="name a split"):
        expand_inputs(["hf://datasets/org/name"])
    with pytest.raises(InvalidInput, match="unknown option 'split'"):
        expand_inputs(["hf://datasets/org/name/test?split=x"])


def test_webdataset_shards_group_members_by_key(tmp_path):
    shard = built.shard(tmp_path / "shard-000.tar",
                        {"a": (built.png(0), "3"), "b": (built.png(1), None)})  # fmt: skip
    items = list(expand_inputs([str(shard)]))
    assert [(i.uri, i.label, i.data) for i in items] == [
        (f"wds:{shard}#key=a", "3", built.png(0)),
        (f"wds:{shard}#key=b", None, built.png(1)),
    ]
    assert item_name(0, items[0].uri) == "000000-shard-000-a"
    assert len(list(expand_inputs([f"{shard}?limit=1"]))) == 1


def test_plain_inputs_never_load_the_dataset_libraries(tmp_path):
    (tmp_path / "a.png").write_bytes(built.png(0))
    code = (
        "import sys; from explainctl.inputs import expand_inputs; "
        f"list(expand_inputs([{str(tmp_path)!r}])); "
        "print(sorted(m for m in ('pyarrow', 'datasets', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
