"""Bad and hostile input through the whole pipeline: every bad item fails on its own with a
code and one line, the worker stays up, the good items finish; no pickle is ever run and
no secret is ever written anywhere."""

import csv
import io
import json
import struct
import uuid
import zlib
from urllib.parse import parse_qs, urlsplit

import boto3
import numpy as np
import pytest
import redis
from botocore.config import Config
from PIL import Image

from explainctl.config import Settings
from explainctl.jobs.queue import make_app
from explainctl.jobs.store import JobStore
from explainctl.spec.contracts import TASK_EXPLAIN_CHUNK
from tests.support import cli, hostile
from tests.support.reliability import audit
from tests.support.services import RedisServer

pytestmark = pytest.mark.reliability

TINY = ["--model", "tests.support.models:tiny_classifier", "--image-size", "32", "--mask-size", "4",
        "--iterations", "5"]  # fmt: skip


def _png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\0" * 64)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data
    idat += struct.pack(">I", zlib.crc32(b"IDAT" + data))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + end


ODD_KEYS = ["odd keys/a space.png", "odd keys/one+two.png", "odd keys/100%.png",
            "odd keys/tag#1.png", "odd keys/what?.png", "odd keys/東京 ünï.png"]  # fmt: skip


def _inputs(folder, bucket: str) -> tuple[list[tuple[str, str]], dict[str, str | None]]:
    """(uri, target) rows and the expected outcome of each: an error code, or None = done."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    files = {
        "good.png": _png(rgb),
        "empty.png": b"",
        "text.jpg": b"just some text, not a picture",
        "truncated.png": _png(rgb)[:150],
        "bomb.png": _bomb_png(),
        "big.png": _png(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)),
        "grey.png": _png(rgb[..., 0]),
        "alpha.png": _png(np.dstack([rgb, rgb[..., :1]])),
        "sixteen.png": _png((rng.integers(0, 65535, (40, 40))).astype(np.uint16)),
    }
    jpeg = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(jpeg, format="JPEG")
    files["cmyk.jpg"] = jpeg.getvalue()
    files["truncated.jpg"] = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    gif = io.BytesIO()
    frames = [Image.new("RGB", (30, 30), c) for c in ("red", "green", "blue")]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = gif.getvalue()
    files["bomb.tif"] = hostile.tiff_bomb()
    files["bomb.gif"] = hostile.gif_bomb()
    files["bomb.webp"] = hostile.webp_bomb()
    files["scans.jpg"] = hostile.many_scan_jpeg()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder.parent / "outside.png").write_bytes(files["good.png"])

    expected = {
        "good.png": None, "grey.png": None, "alpha.png": None, "sixteen.png": None,
        "cmyk.jpg": None, "animated.gif": None,  # explained: the first frame
        "empty.png": "empty", "text.jpg": "unsupported-format", "truncated.png": "corrupt",
        "truncated.jpg": "corrupt", "bomb.png": "too-many-pixels", "big.png": "too-large",
        "bomb.tif": "too-many-pixels", "bomb.gif": "too-many-pixels",
        "bomb.webp": "too-many-pixels", "scans.jpg": "unsupported-format",
    }  # fmt: skip
    rows = [(str(folder / name), "") for name in expected]
    rows += [
        (str(folder / "missing.png"), ""),
        (f"s3://{bucket}/missing.png", ""),
        ("ftp://example.com/a.png", ""),
        ("file:///etc/passwd", ""),
        (f"{folder}/../outside.png", ""),
        ("http://169.254.169.254/latest/meta-data/", ""),
        ("http://127.0.0.1:6379/", ""),
        ("http://localhost:6379/x.png", ""),  # a hostname that resolves to loopback
        (str(folder / "good.png"), "5000"),  # class out of range for a 10-class model
    ]
    expected.update({
        "missing.png": "not-found", f"s3://{bucket}/missing.png": "not-found",
        "ftp://example.com/a.png": "unsupported-scheme",
        "passwd": "outside-allowed-roots",  # file:///etc/passwd
        "outside.png": "outside-allowed-roots",  # allowed/../outside.png
        "http://169.254.169.254/latest/meta-data/": "blocked-address",
        "http://127.0.0.1:6379/": "blocked-address",
        "http://localhost:6379/x.png": "blocked-address",
        "target-5000": "bad-target",
    })  # fmt: skip
    # S3 keys that need care in a URL: spaces, "+", "%", "#", "?" and letters beyond ASCII;
    # each is the object's name, read and explained.
    s3 = boto3.session.Session().client("s3")
    for key in ODD_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=files["good.png"])
        rows.append((f"s3://{bucket}/{key}", ""))
        expected[f"s3://{bucket}/{key}"] = None
    return rows, expected


def test_every_bad_input_fails_alone(tmp_path, s3_bucket, start_workers, worker_env):
    folder = tmp_path / "allowed"
    folder.mkdir()
    rows, expected = _inputs(folder, s3_bucket)
    listing = tmp_path / "inputs.csv"
    listing.write_text("uri,target\n" + "".join(f"{u},{t}\n" for u, t in rows))
    (worker,) = start_workers(
        1, EXPLAINCTL_ALLOWED_ROOTS=str(folder), EXPLAINCTL_ALLOW_HTTP="1",
        EXPLAINCTL_MAX_IMAGE_BYTES=str(1024 * 1024),
    )  # fmt: skip
    done = cli.run("submit", str(listing), "--chunk-size", "8", "--json", "--wait", *TINY,
                   timeout=300, **worker_env)  # fmt: skip
    assert done.returncode == 1, done.stderr
    store = JobStore.connect(worker_env["EXPLAINCTL_BROKER_URL"])
    job = json.loads(done.stdout)["job_id"]
    seen, failed = {}, set()
    for record in store.entries(job):
        key = "target-5000" if record.target == "5000" else record.uri
        key = key if key in expected else record.uri.rsplit("/", 1)[-1]
        seen[key] = record.error_code
        if record.state == "failed":
            failed.add(record.index)
            assert record.error and "\n" not in record.error and "Traceback" not in record.error
        else:
            assert record.state == "done"
    assert seen == expected
    assert worker.process.poll() is None  # the worker stayed up through all of it
    row = audit(store, job, f"bad and hostile inputs ({len(rows)} kinds)", [u for u, _ in rows],
                expected_failed=failed)  # fmt: skip
    assert row.lost == 0

    # Names in other scripts, with spaces and accents, through the same worker: explained,
    # downloaded under item folders that keep their letters, nothing lost.
    unicode = tmp_path / "allowed" / "unicode"
    unicode.mkdir()
    names = ["café.jpg", "東京 夜景.png", "Ünïcödé name (2).png", "naïve-ß.png"]
    for name in names:
        Image.open(io.BytesIO(_png(np.full((24, 24, 3), 90, np.uint8)))).save(unicode / name)
    done = cli.run("submit", str(unicode), "--json", "--wait", *TINY, timeout=300, **worker_env)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)["job_id"]
    got = cli.run("download", job, str(tmp_path / "got"), **worker_env)
    assert got.returncode == 0, got.stderr
    folders = sorted(p.name for p in (tmp_path / "got").iterdir() if p.is_dir())
    assert (
        len(folders) == 4
        and any("東京" in f for f in folders)
        and any("café" in f for f in folders)
    )
    row = audit(store, job, "file names in other scripts (café, 東京 夜景, …)", unicode)
    assert (row.done, row.lost) == (4, 0)


def test_pickled_messages_are_refused(tmp_path, start_workers, worker_env):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (worker,) = start_workers(1)
    app = make_app(Settings.load(broker_url=worker_env["EXPLAINCTL_BROKER_URL"]))
    app.send_task(TASK_EXPLAIN_CHUNK, args=[Exploit()], queue=worker_env["EXPLAINCTL_QUEUE"],
                  serializer="pickle")  # fmt: skip
    (tmp_path / "in").mkdir()
    Image.new("RGB", (20, 20), "white").save(tmp_path / "in" / "a.png")
    done = cli.run("submit", str(tmp_path / "in"), "--wait", "--json", *TINY, **worker_env)
    assert json.loads(done.stdout)["state"] == "completed"  # the worker went on
    assert not marker.exists()
    assert "ContentDisallowed" in worker.log() or "disallowed" in worker.log().lower()


def test_crafted_payloads_cannot_write_outside_their_job(tmp_path, start_workers, worker_env):
    (worker,) = start_workers(1)
    app = make_app(Settings.load(broker_url=worker_env["EXPLAINCTL_BROKER_URL"]))
    payload = {
        "job_id": "../../escaped", "chunk": 0,
        "model": {"name": "tests.support.models:tiny_classifier"},
        "params": {"iterations": 1}, "output": str(tmp_path / "out"),
        "items": [{"index": 0, "uri": "/etc/hostname"}],
    }  # fmt: skip
    app.send_task(TASK_EXPLAIN_CHUNK, args=[payload], queue=worker_env["EXPLAINCTL_QUEUE"])
    (tmp_path / "in").mkdir()
    Image.new("RGB", (20, 20), "white").save(tmp_path / "in" / "a.png")
    done = cli.run("submit", str(tmp_path / "in"), "--wait", "--json", *TINY, **worker_env)
    assert json.loads(done.stdout)["state"] == "completed"
    assert "dropping a malformed chunk message" in worker.log()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_secrets_never_leave_the_environment(tmp_path, s3_bucket, start_workers, worker_env):
    redis_secret = f"redis-{uuid.uuid4().hex}"
    aws_secret = f"aws-{uuid.uuid4().hex}"
    server = RedisServer(tmp_path / "redis", password=redis_secret).start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url,
           "AWS_SECRET_ACCESS_KEY": aws_secret}  # fmt: skip
    try:
        (tmp_path / "in").mkdir()
        for n in range(3):
            Image.new("RGB", (20, 20), (n * 60, 20, 90)).save(tmp_path / "in" / f"{n}.png")
        (tmp_path / "in" / "bad.png").write_bytes(b"nope")
        # A presigned URL and one with user info: their tokens travel in the chunk message
        # only. The S3 server is on loopback, so the worker refuses to fetch it: the item
        # fails, and its record and error are written down all the same.
        s3 = boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))
        s3.put_object(
            Bucket=s3_bucket, Key="shared/cat.png", Body=_png(np.zeros((9, 9, 3), np.uint8))
        )
        presigned = s3.generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": "shared/cat.png"}, ExpiresIn=600
        )
        signature = parse_qs(urlsplit(presigned).query)["X-Amz-Signature"][0]
        basic = f"https://auditor:{aws_secret}@images.example.com/dog.png"
        inputs = [str(p) for p in sorted((tmp_path / "in").iterdir())] + [presigned, basic]
        listing = tmp_path / "inputs.csv"
        listing.write_text("uri,target\n" + "".join(f"{u},\n" for u in inputs))
        # Class names that would be formulas in a spreadsheet: `results --csv` defuses them.
        labels = tmp_path / "labels.txt"
        labels.write_text("".join(f'=HYPERLINK("http://evil.example/{n}","c{n}")\n'
                                  for n in range(10)))  # fmt: skip
        (worker,) = start_workers(1, EXPLAINCTL_ALLOW_HTTP="1", **env)
        output = f"s3://{s3_bucket}/audit"
        done = cli.run("submit", str(listing), "--output", output, "--wait", "--json",
                       "--labels", str(labels), *TINY, **env)  # fmt: skip
        job = json.loads(done.stdout)["job_id"]
        written = [done.stdout, done.stderr, worker.log()]
        for command in (["results", job, "--json"], ["status", job, "--json"],
                        ["results", job, "--csv"], ["jobs"]):  # fmt: skip
            ran = cli.run(*command, **env)
            written += [ran.stdout, ran.stderr]
        table = list(csv.reader(io.StringIO(cli.run("results", job, "--csv", **env).stdout)))
        cells = [cell for row in table[1:] for cell in row]
        assert any(cell.startswith("'=HYPERLINK(") for cell in cells)
        assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for cell in cells)
        cli.run("report", job, "--out", str(tmp_path / "report.html"), **env)
        written.append((tmp_path / "report.html").read_text())
        for entry in s3.list_objects_v2(Bucket=s3_bucket, Prefix="audit/")["Contents"]:
            written.append(s3.get_object(Bucket=s3_bucket, Key=entry["Key"])["Body"].read()
                           .decode("latin-1"))  # fmt: skip
        client = redis.Redis.from_url(server.url)
        for key in client.scan_iter("*"):  # job records and queued messages
            written.append(repr(client.dump(key)))
        assert len(written) > 20
        assert any(f"http://{urlsplit(presigned).netloc}/{s3_bucket}/shared/cat.png" in text
                   for text in written)  # fmt: skip  # the redacted form is what is kept
        for text in written:
            assert redis_secret not in text and aws_secret not in text
            assert signature not in text and "X-Amz-Signature" not in text
    finally:
        server.stop()


def test_tls_redis_with_a_password(tmp_path, start_workers, worker_env):
    server = RedisServer(tmp_path / "redis", password="s3cret-pass", tls=True).start()
    env = {**worker_env, "EXPLAINCTL_BROKER_URL": server.url}
    try:
        plain = redis.Redis(port=server.port, password="s3cret-pass", socket_connect_timeout=1)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # the port speaks TLS only
        (tmp_path / "in").mkdir()
        Image.new("RGB", (20, 20), "white").save(tmp_path / "in" / "a.png")
        start_workers(1, **env)
        done = cli.run("submit", str(tmp_path / "in"), "--wait", "--json", *TINY, **env)
        assert json.loads(done.stdout)["state"] == "completed", done.stderr
    finally:
        server.stop()
