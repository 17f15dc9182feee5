"""Storage against a real local directory and a real moto S3 server over HTTP."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import boto3
import pytest

from explainctl.io.s3 import S3Settings
from explainctl.io.sources import iter_images, read_uri
from explainctl.io.storage import LocalStorage, S3Storage, open_storage
from explainctl.io.uri import Location, parse_uri, safe_key
from explainctl.spec.errors import InvalidInput, ItemError
from tests.support.faults import LOSE_ANSWER, SLOW_DOWN, Answer

# Keeps failures against an unreachable endpoint quick; botocore's own retries are off so
# only our retry loop is being measured.
FAST_S3 = S3Settings(
    max_attempts=1,
    connect_timeout=1.0,
    read_timeout=5.0,
    retry_base_delay=0.1,
    retry_max_delay=0.5,
    retry_deadline=12.0,
)


def s3_client():
    return boto3.session.Session().client("s3")


def item_error(excinfo: pytest.ExceptionInfo[ItemError]) -> ItemError:
    error = excinfo.value
    assert "\n" not in error.message
    return error


# --------------------------------------------------------------------------- parse_uri


def test_parse_uri_s3():
    assert parse_uri("s3://bucket/a/b.jpg") == Location("s3", "bucket", "a/b.jpg")
    assert parse_uri("s3://bucket") == Location("s3", "bucket", "")
    assert parse_uri("S3://bucket/k") == Location("s3", "bucket", "k")


def test_parse_uri_local(tmp_path, monkeypatch):
    assert parse_uri("file:///abs/p%20q.png") == Location("file", None, "/abs/p q.png")
    assert parse_uri("file://localhost/abs/x") == Location("file", None, "/abs/x")
    assert parse_uri("/abs/x.png") == Location("file", None, "/abs/x.png")
    monkeypatch.chdir(tmp_path)
    assert parse_uri("rel/x.png") == Location("file", None, str(tmp_path / "rel" / "x.png"))


def test_parse_uri_http_keeps_url():
    url = "https://example.com/a.png?x=1"
    assert parse_uri(url) == Location("http", None, url)
    assert parse_uri("http://h/p").scheme == "http"


@pytest.mark.parametrize("uri", ["ftp://h/x", "gs://b/k", "hdfs://n/p", "data://x"])
def test_parse_uri_unsupported_scheme(uri):
    with pytest.raises(ItemError) as excinfo:
        parse_uri(uri)
    assert item_error(excinfo).code == "unsupported-scheme"


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "", "file://host/x", "http:///p"])
def test_parse_uri_bad(uri):
    with pytest.raises(ItemError) as excinfo:
        parse_uri(uri)
    assert item_error(excinfo).code == "bad-uri"


# --------------------------------------------------------------------------- safe_key


def test_safe_key_joins():
    assert safe_key("job", "item-1", "mask.png") == "job/item-1/mask.png"


@pytest.mark.parametrize(
    "parts",
    [
        (),
        ("",),
        (".",),
        ("..",),
        ("job", ".."),
        ("a/b",),
        ("../etc",),
        ("a\\b",),
        ("a\x00b",),
        ("/etc",),
        ("C:evil",),
        ("job", 3),
    ],
)
def test_safe_key_rejects(parts):
    with pytest.raises(InvalidInput):
        safe_key(*parts)


# --------------------------------------------------------------------------- local storage


def test_local_put_get_exists_list(tmp_path):
    root = tmp_path / "out"
    storage = open_storage(str(root))
    assert isinstance(storage, LocalStorage)

    uri = storage.put("job/b/mask.png", b"png")
    assert uri == str(root / "job" / "b" / "mask.png")
    assert os.path.isabs(uri)
    storage.put("job/a.json", b"{}", content_type="application/json")
    storage.put("job/b/result.json", b"r")
    storage.put("top.txt", b"t")

    assert storage.get("job/b/mask.png") == b"png"
    assert storage.exists("job/a.json")
    assert not storage.exists("job/missing")
    assert not storage.exists("job")
    assert storage.uri("job/a.json") == str(root / "job" / "a.json")
    # Same order S3 would give: "a.json" < "b/..." and byte order throughout.
    assert list(storage.list()) == ["job/a.json", "job/b/mask.png", "job/b/result.json", "top.txt"]
    assert list(storage.list("job/b/")) == ["job/b/mask.png", "job/b/result.json"]
    assert list(storage.list("job/b/m")) == ["job/b/mask.png"]
    assert list(storage.list("nothing/")) == []

    with pytest.raises(ItemError) as excinfo:
        storage.get("job/missing")
    assert item_error(excinfo).code == "not-found"


def test_local_put_is_atomic_overwrite_and_leaves_no_temp_files(tmp_path):
    storage = open_storage(str(tmp_path))
    storage.put("k/v.bin", b"old")
    storage.put("k/v.bin", b"new")
    assert storage.get("k/v.bin") == b"new"
    assert os.listdir(tmp_path / "k") == ["v.bin"]


def test_local_put_cannot_escape_root(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    storage = open_storage(str(root))
    for key in ("../x", "a/../../x", "/etc/x", "a//b", "a/./b", ""):
        with pytest.raises(InvalidInput):
            storage.put(key, b"x")

    # A symlinked directory inside the root must not become a way out.
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidInput):
        storage.put("link/x", b"x")
    with pytest.raises(InvalidInput):
        storage.put("link/new/x", b"x")
    assert list(outside.iterdir()) == []

    (outside / "secret").write_bytes(b"s")
    (root / "leak").symlink_to(outside / "secret")
    with pytest.raises(InvalidInput):
        storage.get("leak")
    with pytest.raises(InvalidInput):
        storage.get("link/secret")


def test_open_storage_rejects_bad_roots(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    for root in (str(tmp_path / "f"), "https://example.com/x", "ftp://h/x", "s3://"):
        with pytest.raises(InvalidInput):
            open_storage(root)


# --------------------------------------------------------------------------- S3 storage


def test_s3_put_get_exists_list(s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/runs/")
    assert isinstance(storage, S3Storage)

    uri = storage.put("job/a.png", b"img", content_type="image/png")
    assert uri == f"s3://{s3_bucket}/runs/job/a.png"
    storage.put("job/b/result.json", b"{}")
    s3_client().put_object(Bucket=s3_bucket, Key="elsewhere/x", Body=b"")

    assert storage.get("job/a.png") == b"img"
    head = s3_client().head_object(Bucket=s3_bucket, Key="runs/job/a.png")
    assert head["ContentType"] == "image/png"
    assert storage.exists("job/a.png")
    assert not storage.exists("job/none.png")
    assert storage.uri("job/a.png") == uri
    assert list(storage.list()) == ["job/a.png", "job/b/result.json"]
    assert list(storage.list("job/b/")) == ["job/b/result.json"]

    with pytest.raises(ItemError) as excinfo:
        storage.get("job/none.png")
    assert item_error(excinfo).code == "not-found"
    with pytest.raises(InvalidInput):
        storage.put("../escape", b"x")


def test_s3_storage_without_prefix(s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}")
    assert storage.put("a", b"1") == f"s3://{s3_bucket}/a"
    assert list(storage.list()) == ["a"]


def test_s3_list_paginates_lazily(s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/many")
    keys = [f"k{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: storage.put(k, b""), keys))

    pages = []
    storage.client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda **kw: pages.append(kw["parsed"]["KeyCount"])
    )
    listing = storage.list()
    assert next(listing) == "k00000"
    assert pages == [1000], "only the first page should have been fetched"
    assert ["k00000", *listing] == keys
    assert pages == [1000, 5]


def test_aws_endpoint_url_comes_from_environment(s3_server, s3_bucket, monkeypatch):
    storage = open_storage(f"s3://{s3_bucket}")
    assert storage.client.meta.endpoint_url == s3_server
    storage.put("x", b"1")
    assert read_uri(f"s3://{s3_bucket}/x", max_bytes=10) == b"1"

    # Pointing the variable elsewhere must redirect every client built afterwards.
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    redirected = open_storage(f"s3://{s3_bucket}", s3_settings=FAST_S3)
    assert redirected.client.meta.endpoint_url == dead
    with pytest.raises(ItemError) as excinfo:
        read_uri(
            f"s3://{s3_bucket}/x", max_bytes=10, s3_settings=replace(FAST_S3, retry_deadline=0.5)
        )
    assert item_error(excinfo).code == "storage-error"


# --------------------------------------------------------------------------- read_uri, local


def test_read_uri_local_ok_and_size_limit(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(b"x" * 10)
    assert read_uri(str(path), max_bytes=10) == b"x" * 10
    assert read_uri(f"file://{path}", max_bytes=10, allowed_roots=[str(tmp_path)]) == b"x" * 10
    with pytest.raises(ItemError) as excinfo:
        read_uri(str(path), max_bytes=9)
    assert item_error(excinfo).code == "too-large"
    with pytest.raises(InvalidInput):
        read_uri(str(path), max_bytes=-1)


def test_read_uri_local_not_found_and_directory(tmp_path):
    with pytest.raises(ItemError) as excinfo:
        read_uri(str(tmp_path / "missing.png"), max_bytes=10)
    assert item_error(excinfo).code == "not-found"
    with pytest.raises(ItemError) as excinfo:
        read_uri(str(tmp_path), max_bytes=10)
    assert item_error(excinfo).code == "is-a-directory"


def test_read_uri_outside_allowed_roots(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret.png").write_bytes(b"s")
    (allowed / "ok.png").write_bytes(b"ok")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (allowed / "dir").symlink_to(tmp_path, target_is_directory=True)
    # A sibling whose name merely starts with the root's name is not inside it.
    (tmp_path / "allowed2").mkdir()
    (tmp_path / "allowed2" / "x.png").write_bytes(b"x")

    roots = [str(allowed)]
    assert read_uri(str(allowed / "ok.png"), max_bytes=10, allowed_roots=roots) == b"ok"
    for uri in (
        f"{allowed}/../secret.png",
        str(allowed / "escape.png"),
        str(allowed / "dir" / "secret.png"),
        str(tmp_path / "allowed2" / "x.png"),
        f"{allowed}/../missing.png",
    ):
        with pytest.raises(ItemError) as excinfo:
            read_uri(uri, max_bytes=10, allowed_roots=roots)
        assert item_error(excinfo).code == "outside-allowed-roots", uri
    with pytest.raises(InvalidInput):
        read_uri(str(allowed / "ok.png"), max_bytes=10, allowed_roots=str(allowed))
    # No allowed_roots means no confinement.
    assert read_uri(str(allowed / "escape.png"), max_bytes=10) == b"s"


@pytest.mark.parametrize("uri", ["https://example.com/a.png", "gs://b/a.png"])
def test_read_uri_unsupported_scheme(uri):
    with pytest.raises(ItemError) as excinfo:
        read_uri(uri, max_bytes=10)
    assert item_error(excinfo).code == "unsupported-scheme"


# --------------------------------------------------------------------------- read_uri, S3


def test_read_uri_s3(s3_bucket):
    s3_client().put_object(Bucket=s3_bucket, Key="in/a.png", Body=b"y" * 100)
    assert read_uri(f"s3://{s3_bucket}/in/a.png", max_bytes=100) == b"y" * 100

    cases = {
        f"s3://{s3_bucket}/in/a.png": ("too-large", 99),
        f"s3://{s3_bucket}/in/missing.png": ("not-found", 100),
        f"s3://no-such-bucket-{s3_bucket}/a.png": ("not-found", 100),
        f"s3://{s3_bucket}/in/": ("is-a-directory", 100),
    }
    for uri, (code, max_bytes) in cases.items():
        with pytest.raises(ItemError) as excinfo:
            read_uri(uri, max_bytes=max_bytes)
        assert item_error(excinfo).code == code, uri


def set_moto_auth(endpoint: str, count: str) -> None:
    # moto's documented switch: after `count` more requests, every call is checked
    # against IAM ("inf" turns checking off again).
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        # urllib's default form content type would make the server parse the body away.
        headers={"Content-Type": "text/plain"},
    )
    # Its own opener, with no proxy: urlopen's shared one keeps whatever proxy variables
    # it first saw, and a test of offline model downloads sets them to a dead port.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(request, timeout=5):
        pass


def test_read_uri_s3_access_denied(s3_server, s3_bucket):
    s3_client().put_object(Bucket=s3_bucket, Key="private.png", Body=b"p")
    iam = boto3.session.Session().client("iam")
    user = f"nobody-{s3_bucket}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # A user with no policies at all: IAM denies every S3 action.
    denied = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    ).client("s3")

    set_moto_auth(s3_server, "0")
    try:
        with pytest.raises(ItemError) as excinfo:
            read_uri(f"s3://{s3_bucket}/private.png", max_bytes=10, s3_client=denied)
    finally:
        set_moto_auth(s3_server, "inf")
    error = item_error(excinfo)
    assert error.code == "access-denied"
    assert "AccessDenied" in error.message
    assert key["SecretAccessKey"] not in error.message
    assert key["AccessKeyId"] not in error.message


# --------------------------------------------------------------------------- iter_images


def test_iter_images_local(tmp_path):
    for name in ("b/2.PNG", "b/c/3.jpeg", "a.jpg", "b/notes.txt", "b.gif", "z/README", "b-1.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()

    found = iter_images(str(tmp_path))
    assert iter(found) is found, "must be a lazy iterator"
    expected = ["a.jpg", "b-1.webp", "b.gif", "b/2.PNG", "b/c/3.jpeg"]
    assert list(found) == [str(tmp_path / n) for n in expected]
    assert list(iter_images(f"file://{tmp_path}/b", extensions=(".png",))) == [
        str(tmp_path / "b" / "2.PNG")
    ]
    # A single file is taken as given, whatever its extension.
    assert list(iter_images(str(tmp_path / "b" / "notes.txt"))) == [str(tmp_path / "b/notes.txt")]
    assert list(iter_images(str(tmp_path / "empty"))) == []
    with pytest.raises(ItemError) as excinfo:
        list(iter_images(str(tmp_path / "missing")))
    assert item_error(excinfo).code == "not-found"


def test_iter_images_s3(s3_bucket):
    client = s3_client()
    for key in ("images/a.jpg", "images/sub/b.PNG", "images/sub/c.txt", "images/", "images2/x.jpg"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"")

    expected = [f"s3://{s3_bucket}/images/a.jpg", f"s3://{s3_bucket}/images/sub/b.PNG"]
    assert list(iter_images(f"s3://{s3_bucket}/images/")) == expected
    assert list(iter_images(f"s3://{s3_bucket}/images")) == expected
    assert list(iter_images(f"s3://{s3_bucket}/images2/x.jpg")) == [
        f"s3://{s3_bucket}/images2/x.jpg"
    ]
    assert list(iter_images(f"s3://{s3_bucket}/nothing/")) == []
    assert len(list(iter_images(f"s3://{s3_bucket}"))) == 3
    with pytest.raises(ItemError) as excinfo:
        list(iter_images(f"s3://missing-{s3_bucket}/"))
    assert item_error(excinfo).code == "not-found"


# --------------------------------------------------------------------------- put retries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_put_survives_endpoint_outage(s3_server, monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    flaky = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    flaky.start()
    bucket = f"flaky-{port}"
    s3_client().create_bucket(Bucket=bucket)
    storage = open_storage(f"s3://{bucket}/out", s3_settings=FAST_S3)
    flaky.stop()

    # moto keeps its state in-process, so the restarted server still has the bucket,
    # as a real S3 endpoint would after a network blip.
    restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    restart = threading.Timer(3.0, restarted.start)
    restart.start()
    try:
        started = time.monotonic()
        uri = storage.put("job/result.json", b"{}")
        elapsed = time.monotonic() - started
    finally:
        restart.join()
    try:
        assert uri == f"s3://{bucket}/out/job/result.json"
        assert elapsed > 2.0
        assert storage.get("job/result.json") == b"{}"
    finally:
        restarted.stop()


def test_put_gives_up_after_deadline(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    settings = S3Settings(
        max_attempts=1,
        connect_timeout=0.5,
        read_timeout=0.5,
        retry_base_delay=0.05,
        retry_max_delay=0.2,
        retry_deadline=1.0,
    )
    storage = open_storage(f"s3://{s3_bucket}", s3_settings=settings)
    started = time.monotonic()
    with pytest.raises(ItemError) as excinfo:
        storage.put("x", b"x")
    assert time.monotonic() - started < 5
    error = item_error(excinfo)
    assert error.code == "storage-error"
    assert "unreachable" in error.message
    assert "testing" not in error.message


def _blocks(total: int, size: int = 1 << 20):
    """`total` bytes of a repeating pattern, yielded in blocks, never held whole."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([sent // size % 251]) * n
        sent += n


def test_streamed_writes_and_line_reads_agree_with_get(tmp_path, s3_bucket):
    from explainctl.io.storage import PART_BYTES
    from explainctl.io.uri import key_uri

    lines = [f'{{"index": {i}}}\n'.encode() for i in range(1000)]
    for root in (str(tmp_path / "out"), f"s3://{s3_bucket}/stream"):
        storage = open_storage(root)
        uri = storage.put_stream("job/items.jsonl", iter(lines), "application/x-ndjson")
        assert uri == storage.uri("job/items.jsonl") == key_uri(root, "job/items.jsonl")
        assert list(storage.lines("job/items.jsonl")) == lines
        assert storage.get("job/items.jsonl") == b"".join(lines)
    # Larger than a part: a multipart upload of several parts, the same bytes back.
    storage = open_storage(f"s3://{s3_bucket}/stream")
    total = 2 * PART_BYTES + 12345
    storage.put_stream("big.bin", _blocks(total))
    data = storage.get("big.bin")
    assert len(data) == total and data == b"".join(_blocks(total))
    head = s3_client().head_object(Bucket=s3_bucket, Key="stream/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts


def test_a_failed_multipart_upload_is_aborted_and_leaves_nothing(s3_bucket):
    from explainctl.io.storage import PART_BYTES

    storage = open_storage(f"s3://{s3_bucket}/abort")

    def failing():
        yield from _blocks(PART_BYTES + 1)
        raise RuntimeError("the producer failed mid-stream")

    with pytest.raises(RuntimeError):
        storage.put_stream("half.bin", failing())
    assert not storage.exists("half.bin")
    uploads = s3_client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u for u in uploads if u["Key"] == "abort/half.bin"] == []


# --------------------------------------------------------------------------- S3 that bends

# botocore's own retries off, so every attempt reaches the proxy and only our loop repeats.
BENDING_S3 = dataclasses.replace(
    FAST_S3, retry_base_delay=0.05, retry_max_delay=0.2, retry_deadline=0.3, throttle_deadline=30.0
)


def through(proxy, monkeypatch, bucket: str, **settings) -> S3Storage:
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage = open_storage(f"s3://{bucket}/bend", s3_settings=replace(BENDING_S3, **settings))
    assert isinstance(storage, S3Storage)
    return storage


def first(n: int, action, where):
    """A fault: `action` for the first `n` requests `where` picks, then none."""
    seen = Counter()

    def fault(request):
        if where(request):
            seen["n"] += 1
            return action if seen["n"] <= n else None
        return None

    return fault


def test_writes_and_reads_are_repeated_while_s3_throttles_or_fails(
    s3_bucket, s3_proxy, monkeypatch
):
    storage = through(s3_proxy, monkeypatch, s3_bucket)
    s3_proxy.fault = first(3, SLOW_DOWN, lambda r: r.write)
    assert storage.put("a.json", b"{}") == f"s3://{s3_bucket}/bend/a.json"
    assert s3_proxy.counts["answered SlowDown"] == 3
    # A client that was throttled slows down for a while (botocore's adaptive mode): the
    # reads get one of their own so they are quick.
    storage = through(s3_proxy, monkeypatch, s3_bucket)
    for answer in (Answer(500, "InternalError"), Answer(503, "ServiceUnavailable")):
        s3_proxy.fault = first(2, answer, lambda r: not r.write)
        assert storage.get("a.json") == b"{}"
        s3_proxy.fault = first(2, answer, lambda r: not r.write)
        assert storage.exists("a.json")
        s3_proxy.fault = first(2, answer, lambda r: not r.write)
        assert list(storage.list()) == ["a.json"]
        s3_proxy.fault = first(2, answer, lambda r: not r.write)
        assert list(storage.lines("a.json")) == [b"{}"]
    assert s3_proxy.counts["answered InternalError"] == 8
    assert s3_proxy.counts["answered ServiceUnavailable"] == 8


def test_throttling_past_its_deadline_is_one_storage_error(s3_bucket, s3_proxy, monkeypatch):
    storage = through(s3_proxy, monkeypatch, s3_bucket, throttle_deadline=0.5)
    s3_proxy.fault = lambda request: SLOW_DOWN
    with pytest.raises(ItemError) as excinfo:
        storage.put("a.json", b"{}")
    error = item_error(excinfo)
    assert error.code == "storage-error"
    assert error.message.startswith(f"s3://{s3_bucket}/bend/a.json: S3 kept answering SlowDown")
    assert s3_proxy.counts["answered SlowDown"] >= 2


def test_errors_that_are_not_throttling_are_not_repeated(s3_bucket, s3_proxy, monkeypatch):
    storage = through(s3_proxy, monkeypatch, s3_bucket)
    s3_proxy.fault = lambda request: Answer(403, "AccessDenied")
    with pytest.raises(ItemError) as excinfo:
        storage.put("a.json", b"{}")
    assert item_error(excinfo).code == "access-denied"
    assert s3_proxy.counts["answered AccessDenied"] == 1


def _completions(request) -> bool:
    return request.method == "POST" and "uploadId=" in request.query


def test_multipart_completion_is_repeated_until_s3_has_completed_it(
    s3_bucket, s3_proxy, monkeypatch
):
    from explainctl.io.storage import PART_BYTES

    storage = through(s3_proxy, monkeypatch, s3_bucket)
    answers = iter([Answer(500, "InternalError"), Answer(200, "InternalError"), LOSE_ANSWER])
    # A 5xx; a 200 whose body is an error (S3 may answer so once it started completing);
    # S3 completes it but the answer is lost, so the repeat finds the upload gone.
    s3_proxy.fault = lambda request: next(answers, None) if _completions(request) else None
    total = PART_BYTES + 1234
    uri = storage.put_stream("big.bin", _blocks(total))
    assert uri == f"s3://{s3_bucket}/bend/big.bin"
    assert storage.get("big.bin") == b"".join(_blocks(total))
    assert s3_proxy.counts["answered InternalError"] == 2
    assert s3_proxy.counts["lost-answer"] == 1
    assert s3_client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_a_multipart_upload_that_cannot_complete_is_aborted(s3_bucket, s3_proxy, monkeypatch):
    from explainctl.io.storage import PART_BYTES

    storage = through(s3_proxy, monkeypatch, s3_bucket, throttle_deadline=1.0)
    failing = Answer(500, "InternalError")
    s3_proxy.fault = lambda request: failing if _completions(request) else None
    with pytest.raises(ItemError) as excinfo:
        storage.put_stream("big.bin", _blocks(PART_BYTES + 1))
    assert item_error(excinfo).code == "storage-error"
    s3_proxy.fault = None
    assert not storage.exists("big.bin")
    assert s3_client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
