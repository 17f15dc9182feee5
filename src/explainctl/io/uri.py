"""URIs and keys: parsing what a user or job names (`s3://`, `file://`, `http(s)://`, a
path) and joining storage keys that can never climb out of their root."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from explainctl.spec.contracts import is_source_id
from explainctl.spec.errors import InvalidInput, ItemError

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Location:
    """A parsed input or storage URI. For "file", `key` is an absolute path; for "http" the URL."""

    scheme: Literal["s3", "file", "http"]
    bucket: str | None
    key: str


def one_line(text: str, limit: int = 300) -> str:
    """`text` fit for a one-line message: URIs, keys and URLs come from users and remote
    headers, so no control characters, no line breaks, bounded."""
    flat = "".join(c if c.isprintable() else " " for c in str(text))
    flat = " ".join(flat.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def redacted(uri: str) -> str:
    """`uri` as it may be written down or shown: without the user info, query and fragment
    of a URL (presigned URLs and basic auth carry their secrets there), so
    `https://u:pw@host/a.png?X-Amz-Signature=...` becomes `https://host/a.png`. An S3 URI
    loses only user info: `?` and `#` in its key are part of the object's name. A plain
    path is left as it is. Records, manifests, result.json, pages, output and logs hold
    this form; only the chunk message carries the URI as given, for the worker's fetch."""
    if not isinstance(uri, str) or is_source_id(uri):
        return uri  # a dataset row's id is explainctl's own, and its `#row=` names the row
    match = _SCHEME_RE.match(uri)
    if match is None:
        return uri
    scheme, rest = uri[: match.end()], uri[match.end() :]
    if match.group(1).lower() != "s3":
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    authority, slash, path = rest.partition("/")
    # Bucket names and hosts never hold "@": whatever comes before the last one is user info.
    return f"{scheme}{authority.rpartition('@')[2]}{slash}{path}"


def parse_uri(text: str) -> Location:
    """Parse `s3://`, `file://`, `http(s)://` or a plain local path (made absolute)."""
    if not isinstance(text, str) or not text.strip():
        raise ItemError("bad-uri", "empty URI")
    if "\x00" in text:
        raise ItemError("bad-uri", f"URI contains a NUL byte: {one_line(repr(redacted(text)))}")
    match = _SCHEME_RE.match(text)
    if match is None:
        return Location("file", None, os.path.abspath(text))

    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ItemError("bad-uri", f"S3 URI without a bucket: {one_line(redacted(text))}")
        return Location("s3", bucket, key)
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ItemError("bad-uri", f"file URI with a remote host: {one_line(redacted(text))}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ItemError(
                "bad-uri", f"file URI without an absolute path: {one_line(redacted(text))}"
            )
        if "\x00" in path:
            raise ItemError("bad-uri", f"URI contains a NUL byte: {one_line(repr(redacted(text)))}")
        return Location("file", None, os.path.abspath(path))
    if scheme in ("http", "https"):
        if not urlsplit(text).netloc:
            raise ItemError("bad-uri", f"URL without a host: {one_line(redacted(text))}")
        return Location("http", None, text)
    raise ItemError(
        "unsupported-scheme",
        f"unsupported URI scheme {scheme!r} (use s3://, file://, http(s):// or a local path)",
    )


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


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidInput("storage key must be a non-empty string")
    for part in key.split("/"):
        _check_part(part)
    return key


def check_prefix(prefix: str) -> str:
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


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def within_roots(uri: str, roots: Sequence[str]) -> bool:
    """Whether storage at `uri` lies under one of `roots`: a directory (both resolved, so
    symlinks and `..` lead nowhere else) or `s3://bucket/prefix` (whole key segments, and
    none of them `.` or `..`, which some S3 servers fold away)."""
    location = parse_uri(uri)
    for root in roots:
        allowed = parse_uri(root)
        if allowed.scheme != location.scheme:
            continue
        if location.scheme == "file":
            if is_under(os.path.realpath(location.key), os.path.realpath(allowed.key)):
                return True
        elif location.scheme == "s3" and location.bucket == allowed.bucket:
            key, prefix = location.key.strip("/"), allowed.key.strip("/")
            if any(part in (".", "..") for part in key.split("/")):
                return False
            if not prefix or key == prefix or key.startswith(prefix + "/"):
                return True
    return False


def key_uri(root: str, key: str) -> str:
    """The URI that storage rooted at `root` gives `key` (what `Storage.uri` returns),
    derived without opening it: job records store no artifact URIs, only their names."""
    location = parse_uri(root)
    if location.scheme == "s3":
        prefix = location.key.strip("/")
        return s3_uri(location.bucket, f"{prefix}/{key}" if prefix else key)
    return os.path.join(location.key, *key.split("/"))
