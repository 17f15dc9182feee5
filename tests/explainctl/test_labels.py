"""Labels files: one class name per line or a JSON list, refused with one line when wrong."""

import json

import pytest

from explainctl.labels import MAX_LABEL_CHARS, parse_labels, read_labels
from explainctl.spec.errors import InvalidInput


def test_one_name_per_line_and_json_lists_give_the_same_names():
    names = ["tabby cat", "golden retriever", "espresso"]
    assert parse_labels("tabby cat\n golden retriever \r\nespresso\n\n") == tuple(names)
    assert parse_labels(json.dumps(names)) == tuple(names)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no class names"),
        ("\n\n", "no class names"),
        ("cat\n\ndog\n", "class 1 has an empty name"),
        ('["cat", 3]', "list of strings"),
        ('["cat",', "not a JSON list"),
        ("x" * (MAX_LABEL_CHARS + 1), "over 200 chars"),
    ],
)
def test_a_bad_labels_file_is_refused_with_one_line(text, message):
    with pytest.raises(InvalidInput) as caught:
        parse_labels(text, where="labels.txt")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("labels.txt: ")


def test_reading_a_file_a_missing_file_and_a_binary_one(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffchat\nchien\n".encode())  # a BOM from a Windows editor
    assert read_labels(str(path)) == ("chat", "chien")
    assert read_labels(None) is None
    with pytest.raises(InvalidInput, match="cannot read the labels file: .*no such file"):
        read_labels(str(tmp_path / "missing.txt"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        read_labels(str(tmp_path / "binary.txt"))
