"""Where images come from and artifacts go: S3 (`s3://bucket/prefix`) or a local directory.

Every failure tied to one input or artifact is an `ItemError` with a stable code
(`not-found`, `access-denied`, `too-large`, `outside-allowed-roots`, `is-a-directory`,
`unsupported-scheme`, `bad-uri`, `storage-error`) and a one-line message that never
carries credentials. Bad keys or roots given by the caller are `InvalidInput`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from explainctl.errors import InvalidInput, ItemError

__all__ = [
    "DEFAULT_IMAGE_EXTENSIONS",
    "LocalStorage",
    "Location",
    "S3Settings",
    "S3Storage",
    "Storage",
    "iter_images",
    "open_storage",
    "parse_uri",
    "read_uri",
    "safe_key",
]

DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# Temp files of in-flight local writes carry this suffix so listings can skip them.
_TMP_SUFFIX = ".explainctl-tmp"
_READ_CHUNK = 1 << 20

# Only failures to reach the endpoint are retried by our own loop: the request never
# completed, so repeating an idempotent PUT is safe. HTTP-level errors (5xx, throttling)
# are already retried by botocore's "standard" mode.
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)

T = TypeVar("T")


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class Location:
    """A parsed input or storage URI. For "file", `key` is an absolute path; for "http" the URL."""

    scheme: Literal["s3", "file", "http"]
    bucket: str | None
    key: str


def _one_line(text: str, limit: int = 300) -> str:
    # Paths and keys may hold newlines; messages must stay one line and bounded.
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def parse_uri(text: str) -> Location:
    """Parse `s3://`, `file://`, `http(s)://` or a plain local path (made absolute)."""
    if not isinstance(text, str) or not text.strip():
        raise ItemError("bad-uri", "empty URI")
    if "\x00" in text:
        raise ItemError("bad-uri", f"URI contains a NUL byte: {_one_line(repr(text))}")
    match = _SCHEME_RE.match(text)
    if match is None:
        return Location("file", None, os.path.abspath(text))

    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ItemError("bad-uri", f"S3 URI without a bucket: {_one_line(text)}")
        return Location("s3", bucket, key)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ItemError("bad-uri", f"file URI with a remote host: {_one_line(text)}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ItemError("bad-uri", f"file URI without an absolute path: {_one_line(text)}")
        if "\x00" in path:
            raise ItemError("bad-uri", f"URI contains a NUL byte: {_one_line(repr(text))}")
        return Location("file", None, os.path.abspath(path))
    if scheme in ("http", "https"):
        if not urlsplit(text).netloc:
            raise ItemError("bad-uri", f"URL without a host: {_one_line(text)}")
        return Location("http", None, text)
    raise ItemError(
        "unsupported-scheme",
        f"unsupported URI scheme {scheme!r} (use s3://, file://, http(s):// or a local path)",
    )


# --------------------------------------------------------------------------- keys


def _check_part(part: object) -> str:
    if not isinstance(part, str):
        raise InvalidInput(f"storage key part must be a string, got {type(part).__name__}")
    if part in ("", ".", ".."):
        raise InvalidInput(f"invalid storage key part {part!r}")
    if "/" in part or "\\" in part or "\x00" in part:
        raise InvalidInput(f"storage key part may not contain '/', '\\' or NUL: {part!r}")
    # A drive prefix would make the part absolute if the key ever lands on Windows.
    if os.path.isabs(part) or _DRIVE_RE.match(part):
        raise InvalidInput(f"storage key part may not be an absolute path: {part!r}")
    return part


def safe_key(*parts: str) -> str:
    """Join key parts with "/", refusing anything that could step outside the storage root."""
    if not parts:
        raise InvalidInput("storage key needs at least one part")
    return "/".join(_check_part(p) for p in parts)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidInput("storage key must be a non-empty string")
    for part in key.split("/"):
        _check_part(part)
    return key


def _check_prefix(prefix: str) -> str:
    """A listing prefix may end in "/" or in a partial name, but may not climb."""
    if not isinstance(prefix, str):
        raise InvalidInput("storage list prefix must be a string")
    if not prefix:
        return prefix
    parts = prefix.split("/")
    if parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        _check_part(part)
    return prefix


# --------------------------------------------------------------------------- S3 client


@dataclass(frozen=True)
class S3Settings:
    """Timeouts and retries for S3. `put_retry_*` drive our own loop around uploads."""

    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    put_retry_attempts: int = 8
    put_retry_base_delay: float = 0.5
    put_retry_max_delay: float = 8.0
    put_retry_deadline: float = 30.0


def make_s3_client(settings: S3Settings | None = None) -> Any:
    """A fresh S3 client; credentials and AWS_ENDPOINT_URL come from boto3's usual chain."""
    settings = settings or S3Settings()
    config = Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
    )
    # A private Session per client: sessions are not thread-safe, clients are.
    return boto3.session.Session().client("s3", config=config)


_default_client_lock = threading.Lock()
_default_client: tuple[tuple[Any, ...], Any] | None = None


def _default_s3_client() -> Any:
    # Building a client costs tens of milliseconds, too much per image, so read_uri shares
    # one. It is rebuilt after a fork (clients must not cross processes) or when the
    # environment that selects the endpoint or profile changes.
    global _default_client
    env_key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_PROFILE"),
    )
    with _default_client_lock:
        if _default_client is None or _default_client[0] != env_key:
            _default_client = (env_key, make_s3_client())
        return _default_client[1]


def _s3_error(err: Exception, what: str) -> ItemError:
    """Map a boto3/botocore failure to an ItemError without echoing the service's text."""
    what = _one_line(what)
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES or status == 404:
            return ItemError("not-found", f"{what}: not found ({code or status})")
        if code in _DENIED_CODES or status == 403:
            return ItemError("access-denied", f"{what}: access denied ({code or status})")
        return ItemError("storage-error", f"{what}: S3 error {code or status}")
    if isinstance(err, _CREDENTIAL_ERRORS):
        return ItemError("access-denied", f"{what}: no usable AWS credentials")
    if isinstance(err, BotoCoreError):
        # botocore's own messages name the endpoint or the problem, never a secret.
        return ItemError("storage-error", f"{what}: {type(err).__name__}: {_one_line(str(err))}")
    return ItemError("storage-error", f"{what}: {type(err).__name__}")


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _s3_keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    """Keys under a prefix in key order, one page (<= 1000 keys) fetched at a time."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            yield obj["Key"]


# --------------------------------------------------------------------------- storage


@runtime_checkable
class Storage(Protocol):
    """Artifacts under one root; keys are "/"-separated and relative to it."""

    root: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def uri(self, key: str) -> str: ...


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LocalStorage:
    """A directory; writes are atomic and never land outside it, even through symlinks."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        _check_key(key)
        path = os.path.join(self.root, *key.split("/"))
        # realpath of the root too: the root itself may legitimately be a symlink.
        if not _is_under(os.path.realpath(path), os.path.realpath(self.root)):
            raise InvalidInput(f"storage key escapes the storage root: {_one_line(key)}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            # Checked again once the directories exist, in case one appeared as a symlink.
            self._path(key)
            tmp = os.path.join(
                parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
            )
            # os.open with 0o666 lets the umask decide the final mode, unlike mkstemp's 0600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except PermissionError as err:
            raise ItemError("access-denied", f"{_one_line(path)}: permission denied") from err
        except IsADirectoryError as err:
            raise ItemError("is-a-directory", f"{_one_line(path)}: is a directory") from err
        except OSError as err:
            raise ItemError(
                "storage-error", f"{_one_line(path)}: {err.strerror or type(err).__name__}"
            ) from err
        return path

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise _local_error(err, path) from err

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        _check_prefix(prefix)
        return _walk_sorted(self.root, "", prefix)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"


class S3Storage:
    """A bucket and prefix; uploads ride out an endpoint that is briefly unreachable."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        settings: S3Settings | None = None,
        client: Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            _check_key(self.prefix)
        self.root = _s3_uri(bucket, self.prefix)
        self.settings = settings or S3Settings()
        self.client = client if client is not None else make_s3_client(self.settings)
        self._sleep = sleep

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return _s3_uri(self.bucket, self._full(_check_key(key)))

    def _retry_connection(self, operation: Callable[[], T], what: str) -> T:
        s = self.settings
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except _CONNECTION_ERRORS as err:
                remaining = s.put_retry_deadline - (time.monotonic() - started)
                if attempt >= s.put_retry_attempts or remaining <= 0:
                    raise ItemError(
                        "storage-error",
                        f"{_one_line(what)}: S3 endpoint unreachable after {attempt} attempts "
                        f"({type(err).__name__})",
                    ) from err
                # Exponential backoff with "equal jitter": never shorter than half the step,
                # so a few attempts still span an outage of several seconds.
                step = min(s.put_retry_max_delay, s.put_retry_base_delay * 2 ** (attempt - 1))
                self._sleep(min(remaining, random.uniform(step / 2, step)))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        full = self._full(_check_key(key))
        uri = _s3_uri(self.bucket, full)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        try:
            self._retry_connection(lambda: self.client.put_object(**kwargs), uri)
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(err, uri) from err
        return uri

    def get(self, key: str) -> bytes:
        full = self._full(_check_key(key))
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(err, _s3_uri(self.bucket, full)) from err

    def exists(self, key: str) -> bool:
        full = self._full(_check_key(key))
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as err:
            if _s3_error(err, "").code == "not-found":
                return False
            raise _s3_error(err, _s3_uri(self.bucket, full)) from err
        except BotoCoreError as err:
            raise _s3_error(err, _s3_uri(self.bucket, full)) from err
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        _check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            for key in _s3_keys(self.client, self.bucket, base + prefix):
                yield key[len(base) :]
        except (ClientError, BotoCoreError) as err:
            raise _s3_error(err, _s3_uri(self.bucket, base + prefix)) from err

    def __repr__(self) -> str:
        return f"S3Storage({self.root!r})"


def open_storage(root: str, *, s3_settings: S3Settings | None = None) -> Storage:
    """Storage for `s3://bucket[/prefix]` or a local directory (created on first write)."""
    try:
        location = parse_uri(root)
    except ItemError as err:
        raise InvalidInput(f"invalid storage root: {err.message}") from None
    if location.scheme == "s3":
        assert location.bucket is not None
        try:
            return S3Storage(location.bucket, location.key, settings=s3_settings)
        except InvalidInput as err:
            raise InvalidInput(f"invalid storage root {_one_line(root)}: {err}") from None
    if location.scheme == "file":
        if os.path.exists(location.key) and not os.path.isdir(location.key):
            raise InvalidInput(f"storage root is not a directory: {_one_line(location.key)}")
        return LocalStorage(location.key)
    raise InvalidInput("storage root must be s3://bucket/prefix or a local directory")


# --------------------------------------------------------------------------- local files


def _local_error(err: OSError, path: str) -> ItemError:
    shown = _one_line(path)
    if isinstance(err, FileNotFoundError | NotADirectoryError):
        return ItemError("not-found", f"{shown}: no such file")
    if isinstance(err, PermissionError):
        return ItemError("access-denied", f"{shown}: permission denied")
    if isinstance(err, IsADirectoryError):
        return ItemError("is-a-directory", f"{shown}: is a directory")
    return ItemError("storage-error", f"{shown}: {err.strerror or type(err).__name__}")


def _walk_sorted(root: str, rel: str, prefix: str) -> Iterator[str]:
    """Files under root as "/"-keys in the byte order S3 would list them, one dir at a time.

    `rel` is the directory being read, relative to root, with a trailing "/" ("" for root).
    A directory sorts as "name/", which puts its whole subtree exactly where S3 would put
    its keys. Directory symlinks are not followed, so loops cannot occur.
    """
    directory = os.path.join(root, *rel.split("/")[:-1]) if rel else root
    entries: list[tuple[str, bool]] = []
    try:
        with os.scandir(directory) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    entries.append((f"{rel}{entry.name}/", True))
                elif entry.is_file() and not entry.name.endswith(_TMP_SUFFIX):
                    entries.append((f"{rel}{entry.name}", False))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        raise _local_error(err, directory) from err
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            if key.startswith(prefix) or prefix.startswith(key):
                yield from _walk_sorted(root, key, prefix)
        elif key.startswith(prefix):
            yield key


# --------------------------------------------------------------------------- inputs


def _check_allowed(real: str, path: str, allowed_roots: Sequence[str]) -> None:
    if isinstance(allowed_roots, str):
        # A bare string would be iterated character by character, allowing "/".
        raise InvalidInput("allowed_roots must be a sequence of directories, not a string")
    for root in allowed_roots:
        try:
            location = parse_uri(root)
        except ItemError as err:
            raise InvalidInput(f"invalid allowed root: {err.message}") from None
        if location.scheme != "file":
            continue
        if _is_under(real, os.path.realpath(location.key)):
            return
    raise ItemError("outside-allowed-roots", f"{_one_line(path)}: outside the allowed input roots")


def _read_local(path: str, max_bytes: int, allowed_roots: Sequence[str] | None) -> bytes:
    # Everything after this point works on the resolved path, so what was checked against
    # the allowed roots is exactly what gets opened (symlinks and ".." included).
    real = os.path.realpath(path)
    if allowed_roots is not None:
        _check_allowed(real, path, allowed_roots)
    try:
        info = os.stat(real)
        if stat.S_ISDIR(info.st_mode):
            raise ItemError("is-a-directory", f"{_one_line(path)}: is a directory")
        if not stat.S_ISREG(info.st_mode):
            # FIFOs and devices could block or never end.
            raise ItemError("storage-error", f"{_one_line(path)}: not a regular file")
        if info.st_size > max_bytes:
            raise ItemError(
                "too-large", f"{_one_line(path)}: {info.st_size} bytes exceeds {max_bytes}"
            )
        with open(real, "rb") as handle:
            data = _read_at_most(handle.read, max_bytes + 1)
    except OSError as err:
        raise _local_error(err, path) from err
    if len(data) > max_bytes:
        raise ItemError("too-large", f"{_one_line(path)}: larger than {max_bytes} bytes")
    return data


def _read_at_most(read: Callable[[int], bytes], limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_s3(location: Location, max_bytes: int, client: Any) -> bytes:
    assert location.bucket is not None
    uri = _s3_uri(location.bucket, location.key)
    if not location.key or location.key.endswith("/"):
        raise ItemError("is-a-directory", f"{_one_line(uri)}: is a prefix, not an object")
    try:
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        # Closing the body without draining it drops the connection, so an oversized
        # object costs no more than the bytes already buffered.
        with response["Body"] as body:
            size = response.get("ContentLength")
            if size is not None and size > max_bytes:
                raise ItemError("too-large", f"{_one_line(uri)}: {size} bytes exceeds {max_bytes}")
            data = _read_at_most(body.read, max_bytes + 1)
    except (ClientError, BotoCoreError) as err:
        raise _s3_error(err, uri) from err
    if len(data) > max_bytes:
        raise ItemError("too-large", f"{_one_line(uri)}: larger than {max_bytes} bytes")
    return data


def read_uri(
    uri: str,
    *,
    max_bytes: int,
    allowed_roots: Sequence[str] | None = None,
    s3_client: Any | None = None,
) -> bytes:
    """Read an input from `s3://` or a local path / `file://`, never more than max_bytes.

    `allowed_roots` confines local reads to those directories (after resolving symlinks
    and ".."); S3 reads are governed by IAM instead. `s3_client` defaults to a shared one.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InvalidInput(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    location = parse_uri(uri)
    if location.scheme == "http":
        raise ItemError("unsupported-scheme", "http(s) inputs are not read through storage")
    if location.scheme == "s3":
        return _read_s3(location, max_bytes, s3_client or _default_s3_client())
    return _read_local(location.key, max_bytes, allowed_roots)


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def iter_images(
    uri: str,
    extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS,
    *,
    s3_client: Any | None = None,
) -> Iterator[str]:
    """Image URIs under a local directory or S3 prefix, recursively, in key order.

    A URI naming one file or object (or an http(s) URL) is yielded as given: the caller
    asked for it explicitly, so the extension filter does not apply. A missing local path
    is `not-found`; an S3 prefix with nothing under it simply yields nothing.
    """
    wanted = _normalise_extensions(extensions)
    location = parse_uri(uri)
    if location.scheme == "http":
        yield location.key
    elif location.scheme == "s3":
        yield from _iter_s3_images(location, wanted, s3_client or _default_s3_client())
    else:
        yield from _iter_local_images(location.key, wanted)


def _iter_local_images(path: str, wanted: tuple[str, ...]) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    if not os.path.isdir(path):
        raise ItemError("not-found", f"{_one_line(path)}: no such file or directory")
    for key in _walk_sorted(path, "", ""):
        if key.lower().endswith(wanted):
            yield os.path.join(path, *key.split("/"))


def _iter_s3_images(location: Location, wanted: tuple[str, ...], client: Any) -> Iterator[str]:
    bucket, key = location.bucket, location.key
    assert bucket is not None
    # "s3://b/images" means the folder images/, not every key starting with "images"
    # (that would also match images2/...); only if the folder is empty is it one object.
    prefix = key if not key or key.endswith("/") else key + "/"
    try:
        found = False
        for name in _s3_keys(client, bucket, prefix):
            found = True
            if name.lower().endswith(wanted):
                yield _s3_uri(bucket, name)
        if found or prefix == key:
            return
        try:
            client.head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if _s3_error(err, "").code == "not-found":
                return
            raise
        yield _s3_uri(bucket, key)
    except (ClientError, BotoCoreError) as err:
        raise _s3_error(err, _s3_uri(bucket, key)) from err
