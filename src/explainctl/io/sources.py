"""Sources: reading one input image (a local file, an S3 object or an http(s) URL) with
the size cap, allowed roots and SSRF policy, and listing the images under a directory or
prefix. Workers and `explainctl explain` read every input through `read_source`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from explainctl.io.fetch import HttpPolicy, fetch_http
from explainctl.io.files import os_errors, read_at_most, walk_sorted
from explainctl.io.s3 import (
    S3Settings,
    default_s3_client,
    is_not_found,
    retry_s3,
    s3_errors,
    s3_keys,
)
from explainctl.io.uri import Location, is_under, one_line, parse_uri, s3_uri
from explainctl.spec.errors import InvalidInput, ItemError

DEFAULT_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SourcePolicy:
    """What a reader may read: at most `max_bytes`; local files only under
    `allowed_roots` (None: anywhere); http(s) as `http` allows (off by default)."""

    max_bytes: int
    allowed_roots: Sequence[str] | None = None
    http: HttpPolicy = field(default_factory=HttpPolicy)


def read_source(uri: str, policy: SourcePolicy, *, s3_client: Any | None = None) -> bytes:
    """The bytes of one input, whatever its scheme, never more than policy.max_bytes."""
    if uri.startswith(("http://", "https://")):
        return fetch_http(uri, max_bytes=policy.max_bytes, policy=policy.http)
    return read_uri(
        uri, max_bytes=policy.max_bytes, allowed_roots=policy.allowed_roots, s3_client=s3_client
    )


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
        if is_under(real, os.path.realpath(location.key)):
            return
    raise ItemError("outside-allowed-roots", f"{one_line(path)}: outside the allowed input roots")


def _read_local(path: str, max_bytes: int, allowed_roots: Sequence[str] | None) -> bytes:
    # Everything after this point works on the resolved path, so what was checked against
    # the allowed roots is exactly what gets opened (symlinks and ".." included).
    real = os.path.realpath(path)
    if allowed_roots is not None:
        _check_allowed(real, path, allowed_roots)
    with os_errors(path):
        info = os.stat(real)
        if stat.S_ISDIR(info.st_mode):
            raise ItemError("is-a-directory", f"{one_line(path)}: is a directory")
        if not stat.S_ISREG(info.st_mode):
            # FIFOs and devices could block or never end.
            raise ItemError("storage-error", f"{one_line(path)}: not a regular file")
        if info.st_size > max_bytes:
            raise ItemError(
                "too-large", f"{one_line(path)}: {info.st_size} bytes exceeds {max_bytes}"
            )
        with open(real, "rb") as handle:
            data = read_at_most(handle.read, max_bytes + 1)
    if len(data) > max_bytes:
        raise ItemError("too-large", f"{one_line(path)}: larger than {max_bytes} bytes")
    return data


def _read_s3(location: Location, max_bytes: int, client: Any, settings: S3Settings) -> bytes:
    assert location.bucket is not None
    uri = s3_uri(location.bucket, location.key)
    if not location.key or location.key.endswith("/"):
        raise ItemError("is-a-directory", f"{one_line(uri)}: is a prefix, not an object")

    def read() -> bytes:
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        # Closing the body without draining it drops the connection, so an oversized
        # object costs no more than the bytes already buffered.
        with response["Body"] as body:
            size = response.get("ContentLength")
            if size is not None and size > max_bytes:
                raise ItemError("too-large", f"{one_line(uri)}: {size} bytes exceeds {max_bytes}")
            return read_at_most(body.read, max_bytes + 1)

    with s3_errors(uri):
        data = retry_s3(read, uri, settings)
    if len(data) > max_bytes:
        raise ItemError("too-large", f"{one_line(uri)}: larger than {max_bytes} bytes")
    return data


def read_uri(
    uri: str,
    *,
    max_bytes: int,
    allowed_roots: Sequence[str] | None = None,
    s3_client: Any | None = None,
    s3_settings: S3Settings | None = None,
) -> bytes:
    """Read an input from `s3://` or a local path / `file://`, never more than max_bytes.

    `allowed_roots` confines local reads to those directories (after resolving symlinks
    and ".."); S3 reads are governed by IAM instead. `s3_client` defaults to a shared one;
    `s3_settings` (its retry deadlines) to S3Settings().
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InvalidInput(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    location = parse_uri(uri)
    if location.scheme == "http":
        raise ItemError("unsupported-scheme", "http(s) inputs are not read through storage")
    if location.scheme == "s3":
        client = s3_client or default_s3_client()
        return _read_s3(location, max_bytes, client, s3_settings or S3Settings())
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
        yield from _iter_s3_images(location, wanted, s3_client or default_s3_client())
    else:
        yield from _iter_local_images(location.key, wanted)


def _iter_local_images(path: str, wanted: tuple[str, ...]) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    if not os.path.isdir(path):
        raise ItemError("not-found", f"{one_line(path)}: no such file or directory")
    for key in walk_sorted(path, "", ""):
        if key.lower().endswith(wanted):
            yield os.path.join(path, *key.split("/"))


def _iter_s3_images(location: Location, wanted: tuple[str, ...], client: Any) -> Iterator[str]:
    bucket, key = location.bucket, location.key
    assert bucket is not None
    # "s3://b/images" means the folder images/, not every key starting with "images"
    # (that would also match images2/...); only if the folder is empty is it one object.
    prefix = key if not key or key.endswith("/") else key + "/"
    with s3_errors(s3_uri(bucket, key)):
        found = False
        for name in s3_keys(client, bucket, prefix):
            found = True
            if name.lower().endswith(wanted):
                yield s3_uri(bucket, name)
        if found or prefix == key:
            return
        try:
            retry_s3(lambda: client.head_object(Bucket=bucket, Key=key), s3_uri(bucket, key),
                     S3Settings())  # fmt: skip
        except ClientError as err:
            if is_not_found(err):
                return
            raise
        yield s3_uri(bucket, key)
