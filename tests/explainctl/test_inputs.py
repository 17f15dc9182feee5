"""expand_inputs against real local files and directories and a real moto S3 server."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
import tracemalloc

import boto3
import pytest

from explainctl.inputs import InputItem, expand_inputs
from explainctl.spec.errors import InvalidInput


def uris(args, **kwargs) -> list[str]:
    return [item.uri for item in expand_inputs(args, **kwargs)]


def invalid(args, **kwargs) -> str:
    with pytest.raises(InvalidInput) as excinfo:
        list(expand_inputs(args, **kwargs))
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def touch(path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class CountingStdin(io.StringIO):
    """Counts lines taken, to show items are produced as lines are read, not after."""

    def __init__(self, text: str):
        super().__init__(text)
        self.taken = 0

    def __next__(self) -> str:
        line = super().__next__()
        self.taken += 1
        return line


# --------------------------------------------------------------------------- single inputs


def test_single_local_file_made_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    assert list(expand_inputs(["cat.jpg"])) == [InputItem(str(tmp_path / "cat.jpg"), None)]
    assert uris([f"file://{tmp_path}/cat.jpg"]) == [str(tmp_path / "cat.jpg")]


def test_single_file_of_any_extension_is_taken_as_given(tmp_path):
    # The user named it, so the image-extension filter does not apply.
    image = touch(tmp_path / "scan.raw")
    assert uris([str(image)]) == [str(image)]


def test_urls_and_s3_keys_are_not_checked(monkeypatch):
    # Nothing may be fetched for these: point S3 at nowhere to prove it.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert uris(["https://example.com/a.png", "S3://bucket/missing/x.JPG"]) == [
        "https://example.com/a.png",
        "s3://bucket/missing/x.JPG",
    ]


def test_missing_local_path(tmp_path):
    message = invalid([str(tmp_path / "nope.jpg")])
    assert "nope.jpg" in message and "no such file" in message


def test_argument_errors_come_before_any_item(tmp_path):
    good = touch(tmp_path / "a.jpg")
    # Raised by the call itself, so a typo late in the arguments queues nothing.
    with pytest.raises(InvalidInput, match="later.jpg"):
        expand_inputs([str(good), str(tmp_path / "later.jpg")])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["gs://bucket/a.jpg"], "unsupported URI scheme"),
        (["-", "-"], "more than once"),
        (["@"], "'@' must be followed"),
        ([""], "empty input"),
        (["@https://example.com/list.txt"], "local or on S3"),
        (["@s3://bucket/lists/"], "prefix, not a list file"),
    ],
)
def test_bad_arguments(args, fragment):
    assert fragment in invalid(args, stdin=io.StringIO(""))


def test_fifo_needs_at(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert f"use @{fifo}" in invalid([str(fifo)])


def test_string_instead_of_sequence():
    with pytest.raises(TypeError):
        expand_inputs("a.jpg")


# --------------------------------------------------------------------------- directories


def test_local_directory_recursive_sorted_images_only(tmp_path):
    root = tmp_path / "imgs"
    for name in ["b.png", "a.JPG", "sub/z.jpeg", "sub/deeper/c.webp", "a0/x.gif"]:
        touch(root / name)
    for name in ["notes.txt", "sub/readme.md", "sub/list.csv", "noext"]:
        touch(root / name)
    (root / "empty").mkdir()
    expected = ["a.JPG", "a0/x.gif", "b.png", "sub/deeper/c.webp", "sub/z.jpeg"]
    assert uris([str(root)]) == [str(root / n) for n in expected]
    assert all(item.target is None for item in expand_inputs([str(root)]))


def test_arguments_keep_their_order(tmp_path):
    one = touch(tmp_path / "z.jpg")
    two = touch(tmp_path / "d" / "a.jpg")
    assert uris([str(one), str(tmp_path / "d")]) == [str(one), str(two)]


# --------------------------------------------------------------------------- list files


def test_txt_list_with_comments_blanks_and_relative_paths(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    touch(lists / "list.txt").write_text(
        "# photos to explain\n"
        "\n"
        "a.jpg\n"
        "  sub/b.png  \r\n"
        "../up.jpg\n"
        "   # indented comment\n"
        "/abs/c.jpg\n"
        "file:///abs/d.jpg\n"
        "s3://bucket/e.jpg\n"
        "https://example.com/f.jpg\n"
    )
    # Relative entries follow the list, not the working directory.
    monkeypatch.chdir(tmp_path)
    items = list(expand_inputs(["lists/list.txt"]))
    assert [item.uri for item in items] == [
        str(lists / "a.jpg"),
        str(lists / "sub" / "b.png"),
        str(tmp_path / "up.jpg"),
        "/abs/c.jpg",
        "/abs/d.jpg",
        "s3://bucket/e.jpg",
        "https://example.com/f.jpg",
    ]
    assert all(item.target is None for item in items)


def test_list_entries_are_not_checked_or_expanded(tmp_path):
    # Existence is the workers' to report per item; a stat per line would not scale.
    (tmp_path / "dir").mkdir()
    touch(tmp_path / "l.lst").write_text("missing.jpg\n")
    touch(tmp_path / "l.uris").write_text("dir\n")
    assert uris([str(tmp_path / "l.lst"), str(tmp_path / "l.uris")]) == [
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "dir"),
    ]


def test_csv_list_with_uri_target_and_extra_columns(tmp_path):
    touch(tmp_path / "list.csv").write_bytes(
        "\ufeffid,URI , Target,notes\r\n"
        '1,a.jpg,207,"golden, retriever"\r\n'
        "# 2,skipped.jpg,1,x\r\n"
        "\r\n"
        "3,s3://bucket/b.jpg,,\r\n"
        '4,"c d.jpg", tabby cat ,"two\r\nlines"\r\n'
        "5,e.jpg\r\n"
        ",,,\r\n".encode()
    )
    assert list(expand_inputs([str(tmp_path / "list.csv")])) == [
        InputItem(str(tmp_path / "a.jpg"), "207"),
        InputItem("s3://bucket/b.jpg", None),
        InputItem(str(tmp_path / "c d.jpg"), "tabby cat"),
        InputItem(str(tmp_path / "e.jpg"), None),
    ]


def test_csv_label_column_is_the_items_ground_truth(tmp_path):
    touch(tmp_path / "list.csv").write_text("uri,label,target\na.jpg,tabby,\nb.jpg, 3 ,1\nc.jpg\n")
    assert list(expand_inputs([str(tmp_path / "list.csv")])) == [
        InputItem(str(tmp_path / "a.jpg"), None, "tabby"),
        InputItem(str(tmp_path / "b.jpg"), "1", "3"),
        InputItem(str(tmp_path / "c.jpg"), None, None),
    ]


def test_csv_header_detected_in_txt_and_stdin(tmp_path):
    touch(tmp_path / "l.txt").write_text("# header next\nuri\na.jpg\n")
    assert uris([str(tmp_path / "l.txt")]) == [str(tmp_path / "a.jpg")]
    stdin = io.StringIO("uri,target\ns3://b/a.jpg,top1\n")
    assert list(expand_inputs(["-"], stdin=stdin)) == [InputItem("s3://b/a.jpg", "top1")]


def test_csv_without_uri_column(tmp_path):
    touch(tmp_path / "list.csv").write_text("path,target\na.jpg,1\n")
    message = invalid([str(tmp_path / "list.csv")])
    assert "list.csv:1" in message and "no 'uri' column" in message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("uri,target\na.jpg,1\n,5\n", "list.csv:3: empty 'uri' value"),
    ],
)
def test_bad_csv_rows_name_the_line(tmp_path, body, fragment):
    touch(tmp_path / "list.csv").write_text(body)
    assert fragment in invalid([str(tmp_path / "list.csv")])


def test_unusable_entries_pass_through_for_the_worker_to_fail_alone(tmp_path):
    touch(tmp_path / "l.csv").write_text(
        "uri,target\nftp://host/a.jpg,\nfile://remote/x.jpg,\nb.jpg,-1\n"
    )
    assert list(expand_inputs([str(tmp_path / "l.csv")])) == [
        InputItem("ftp://host/a.jpg"),
        InputItem("file://remote/x.jpg"),
        InputItem(str(tmp_path / "b.jpg"), "-1"),
    ]


def test_non_utf8_list(tmp_path):
    touch(tmp_path / "l.txt", b"caf\xe9.jpg\n")
    assert "not UTF-8" in invalid([str(tmp_path / "l.txt")])


def test_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO("# from find\nx/a.jpg\n\ns3://bucket/b.png\n")
    touch(tmp_path / "c.jpg")
    assert uris(["-", "c.jpg"], stdin=stdin) == [
        str(tmp_path / "x" / "a.jpg"),
        "s3://bucket/b.png",
        str(tmp_path / "c.jpg"),
    ]


def test_at_file_form_reads_any_name(tmp_path):
    # Without "@", a .jpg-less name that is not a list suffix would be one image.
    touch(tmp_path / "inputs").write_text("a.jpg\nb.jpg\n")
    assert uris([f"@{tmp_path / 'inputs'}"]) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_at_fifo_is_streamed(tmp_path):
    # `submit @<(find ...)` hands over a pipe; it must be read, not stat'ed as a file.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w") as writer:
            writer.write("a.jpg\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert uris([f"@{fifo}"]) == [str(tmp_path / "a.jpg")]
    finally:
        writer.join(timeout=5)


def test_missing_list_files(tmp_path):
    assert "list file not found" in invalid([f"@{tmp_path / 'none.txt'}"])
    assert "no such file" in invalid([str(tmp_path / "none.txt")])
    assert "is a directory" in invalid([f"@{tmp_path}"])


# --------------------------------------------------------------------------- laziness


@pytest.fixture
def big_list(tmp_path):
    path = tmp_path / "big.txt"
    with open(path, "w") as handle:
        for i in range(100_000):
            handle.write(f"s3://bucket/audit/2024/batch-{i // 1000:03d}/image-{i:06d}.jpg\n")
    return path


def test_big_list_first_items_are_quick(big_list):
    start = time.perf_counter()
    first = list(itertools.islice(expand_inputs([str(big_list)]), 10))
    elapsed = time.perf_counter() - start
    assert [item.uri for item in first][-1] == "s3://bucket/audit/2024/batch-000/image-000009.jpg"
    # Reading all 100,000 lines takes about 0.25 s; ten items take well under 1 ms.
    assert elapsed < 0.05


def test_big_list_is_not_materialised(big_list):
    tracemalloc.start()
    try:
        count = sum(1 for _ in expand_inputs([str(big_list)]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    # A list of these items would hold > 15 MB; streaming holds a few buffers.
    assert peak < 2_000_000, peak


def test_stdin_is_consumed_as_items_are_taken():
    stdin = CountingStdin("".join(f"s3://b/{i}.jpg\n" for i in range(1000)))
    items = expand_inputs(["-"], stdin=stdin)
    assert stdin.taken == 0
    assert next(items).uri == "s3://b/0.jpg"
    assert stdin.taken == 1
    list(itertools.islice(items, 9))
    assert stdin.taken == 10


# --------------------------------------------------------------------------- S3


def s3_client():
    return boto3.session.Session().client("s3")


def put(bucket: str, key: str, body: bytes = b"x") -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=body)


def test_s3_prefix_expansion(s3_bucket):
    for key in ["imgs/b.png", "imgs/a.jpg", "imgs/sub/c.JPEG", "imgs/notes.txt", "imgs2/x.jpg"]:
        put(s3_bucket, key)
    expected = [f"s3://{s3_bucket}/imgs/{k}" for k in ["a.jpg", "b.png", "sub/c.JPEG"]]
    assert uris([f"s3://{s3_bucket}/imgs/"]) == expected
    # A name that is no object means the folder, not every key starting with it.
    assert uris([f"s3://{s3_bucket}/imgs"], s3_client=s3_client()) == expected
    assert len(uris([f"s3://{s3_bucket}"])) == 4


def test_s3_extensionless_object_is_one_item(s3_bucket):
    put(s3_bucket, "raw/frame0001")
    assert uris([f"s3://{s3_bucket}/raw/frame0001"]) == [f"s3://{s3_bucket}/raw/frame0001"]


def test_s3_list_file(s3_bucket):
    body = (
        "uri,target,notes\r\n"
        'a.jpg,3,"spans\r\ntwo lines"\r\n'
        "./sub/b.jpg,\r\n"
        "../top.jpg,cat\r\n"
        "/local/c.jpg,1\r\n"
        "s3://other/d.jpg,2\r\n"
    )
    put(s3_bucket, "lists/list.csv", body.encode())
    assert list(expand_inputs([f"@s3://{s3_bucket}/lists/list.csv"])) == [
        InputItem(f"s3://{s3_bucket}/lists/a.jpg", "3"),
        InputItem(f"s3://{s3_bucket}/lists/sub/b.jpg", None),
        InputItem(f"s3://{s3_bucket}/top.jpg", "cat"),
        InputItem("/local/c.jpg", "1"),
        InputItem("s3://other/d.jpg", "2"),
    ]


def test_s3_list_file_is_streamed(s3_bucket):
    body = "".join(f"img-{i:06d}.jpg\n" for i in range(20_000)).encode()
    put(s3_bucket, "big.txt", body)
    first = list(itertools.islice(expand_inputs([f"@s3://{s3_bucket}/big.txt"]), 3))
    assert [i.uri for i in first] == [f"s3://{s3_bucket}/img-{i:06d}.jpg" for i in range(3)]


def test_s3_list_errors(s3_bucket):
    assert "list file not found" in invalid([f"@s3://{s3_bucket}/missing.txt"])
    put(s3_bucket, "l.txt", b"../../x.jpg\n")
    assert "l.txt:1" in invalid([f"@s3://{s3_bucket}/l.txt"])
    put(s3_bucket, "l.csv", b"key\nx.jpg\n")
    assert "no 'uri' column" in invalid([f"@s3://{s3_bucket}/l.csv"])
