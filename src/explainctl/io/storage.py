"""Artifact storage: put, get and list the files of jobs under one root, an S3 bucket and
prefix (`s3://bucket/prefix`) or a local directory. Inputs are read by explainctl.io.sources.

Failures tied to one artifact are ItemErrors (translated in explainctl.io.s3 and
explainctl.io.files); bad keys or roots given by the caller are `InvalidInput`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from botocore.exceptions import ClientError

from explainctl.io.files import TMP_SUFFIX, os_errors, walk_sorted
from explainctl.io.s3 import (
    S3Settings,
    is_not_found,
    make_s3_client,
    multipart_etag,
    retry_s3,
    s3_errors,
    s3_keys,
)
from explainctl.io.uri import check_key, check_prefix, is_under, one_line, parse_uri, s3_uri
from explainctl.spec.errors import InvalidInput, ItemError


@runtime_checkable
class Storage(Protocol):
    """Artifacts under one root; keys are "/"-separated and relative to it. A new backend
    is a class with these methods and a scheme in `open_storage`; its foreign errors are
    translated into domain errors (explainctl.spec.errors) once, as files.os_errors and
    s3.s3_errors do for the two here.
    """

    root: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Write `data` at `key` whole or not at all; returns its URI."""
        ...

    def put_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> str:
        """Write the concatenated `chunks` at `key` without holding them all; returns its
        URI."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes at `key`."""
        ...

    def lines(self, key: str) -> Iterator[bytes]:
        """The lines at `key`, streamed, each with its newline."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under `prefix`, relative to the root."""
        ...

    def uri(self, key: str) -> str:
        """Where `key` lives, as readers name it (`s3://...` or an absolute path)."""
        ...


class LocalStorage:
    """A directory; writes are atomic and never land outside it, even through symlinks."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        check_key(key)
        path = os.path.join(self.root, *key.split("/"))
        # realpath of the root too: the root itself may legitimately be a symlink.
        if not is_under(os.path.realpath(path), os.path.realpath(self.root)):
            raise InvalidInput(f"storage key escapes the storage root: {one_line(key)}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self.put_stream(key, (data,), content_type)

    def put_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> str:
        """Write `chunks` to `key` as one file that appears whole or not at all."""
        path = self._path(key)
        parent = os.path.dirname(path)
        with os_errors(path):
            os.makedirs(parent, exist_ok=True)
            # Checked again once the directories exist, in case one appeared as a symlink.
            self._path(key)
            tmp = os.path.join(
                parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}{TMP_SUFFIX}"
            )
            # os.open with 0o666 lets the umask decide the final mode, unlike mkstemp's 0600.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as handle:
                    for chunk in chunks:
                        handle.write(chunk)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return path

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with os_errors(path), open(path, "rb") as handle:
            return handle.read()

    def lines(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        with os_errors(path), open(path, "rb") as handle:
            yield from handle

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return walk_sorted(self.root, "", prefix)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"


# Parts of a multipart upload: S3 wants at least 5 MiB each but the last.
PART_BYTES = 8 * 1024 * 1024


def _parts(head: bytearray, rest: Iterator[bytes]) -> Iterator[bytes]:
    """`head` then `rest` cut into PART_BYTES parts, the last one shorter."""
    buffer = head
    for chunk in rest:
        buffer += chunk
        while len(buffer) >= PART_BYTES:
            yield bytes(buffer[:PART_BYTES])
            del buffer[:PART_BYTES]
    while len(buffer) >= PART_BYTES:
        yield bytes(buffer[:PART_BYTES])
        del buffer[:PART_BYTES]
    if buffer:
        yield bytes(buffer)


class S3Storage:
    """A bucket and prefix. Every call that is safe to repeat (whole-object PUT, a part,
    completing an upload, GET, HEAD, LIST) rides out a throttling or unreachable S3 up to
    its settings' deadlines (s3.retry_s3). Starting a multipart upload is not: it is
    repeated only when S3 surely did not start one."""

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
            check_key(self.prefix)
        self.root = s3_uri(bucket, self.prefix)
        self.settings = settings or S3Settings()
        self.client = client if client is not None else make_s3_client(self.settings)
        self._sleep = sleep

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, operation: Callable[[], Any], uri: str, idempotent: bool = True) -> Any:
        return retry_s3(operation, uri, self.settings, self._sleep, idempotent=idempotent)

    def uri(self, key: str) -> str:
        return s3_uri(self.bucket, self._full(check_key(key)))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        full = self._full(check_key(key))
        uri = s3_uri(self.bucket, full)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        with s3_errors(uri):
            self._retry(lambda: self.client.put_object(**kwargs), uri)
        return uri

    def put_stream(self, key: str, chunks: Iterable[bytes], content_type: str | None = None) -> str:
        """Upload `chunks` in constant memory: one PUT when they fit in one part, else a
        multipart upload of PART_BYTES parts, aborted if anything fails (an abort S3 does
        not take is left to the bucket's lifecycle rule, deploy/README.md)."""
        full = self._full(check_key(key))
        uri = s3_uri(self.bucket, full)
        buffer = bytearray()
        stream = iter(chunks)
        for chunk in stream:
            buffer += chunk
            if len(buffer) >= PART_BYTES:
                break
        else:
            return self.put(key, bytes(buffer), content_type)
        extra = {"ContentType": content_type} if content_type else {}
        with s3_errors(uri):
            # A repeat after a lost answer would leave an upload nobody completes or aborts
            # but the lifecycle rule; botocore's own retries may, and the rule covers them.
            upload = self._retry(
                lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=full, **extra),
                uri,
                idempotent=False,
            )
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, body in enumerate(_parts(buffer, stream), start=1):
                with s3_errors(uri):
                    done = self._retry(
                        lambda body=body, number=number: self.client.upload_part(
                            Bucket=self.bucket, Key=full, UploadId=upload_id,
                            PartNumber=number, Body=body,
                        ),
                        uri,
                    )  # fmt: skip
                parts.append({"ETag": done["ETag"], "PartNumber": number})
            with s3_errors(uri):
                self._complete(full, upload_id, parts, uri)
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise
        return uri

    def _complete(self, full: str, upload_id: str, parts: list[dict], uri: str) -> None:
        """Complete the upload, again as long as S3 fails it (a 5xx, or a 200 whose body
        is an error, which botocore turns into a 500): the upload ID stays valid until it
        is completed or aborted."""
        try:
            self._retry(
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
                uri,
            )  # fmt: skip
        except ClientError as err:
            # A completion S3 carried out but whose answer was lost, then repeated, is
            # answered NoSuchUpload: the object is ours if it has the ETag our parts make.
            if err.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            if not self._completed(full, parts, uri):
                raise ItemError(
                    "storage-error", f"{one_line(uri)}: the multipart upload was gone before "
                    "it completed",
                ) from err  # fmt: skip

    def _completed(self, full: str, parts: list[dict], uri: str) -> bool:
        try:
            expected = multipart_etag([part["ETag"] for part in parts])
        except ValueError:
            return False
        try:
            head = self._retry(lambda: self.client.head_object(Bucket=self.bucket, Key=full), uri)
        except ClientError as err:
            if is_not_found(err):
                return False
            raise
        return head.get("ETag") == expected

    def get(self, key: str) -> bytes:
        full = self._full(check_key(key))
        uri = s3_uri(self.bucket, full)
        with s3_errors(uri):
            # Read whole inside the loop: a body cut off midway is fetched again.
            return self._retry(lambda: self._read_whole(full), uri)

    def _read_whole(self, full: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=full)
        with response["Body"] as body:
            return body.read()

    def lines(self, key: str) -> Iterator[bytes]:
        full = self._full(check_key(key))
        uri = s3_uri(self.bucket, full)
        with s3_errors(uri):
            # Only the request is repeated: lines already yielded cannot be taken back.
            response = self._retry(
                lambda: self.client.get_object(Bucket=self.bucket, Key=full), uri
            )
            with contextlib.closing(response["Body"]) as body:
                yield from body.iter_lines(keepends=True)

    def exists(self, key: str) -> bool:
        full = self._full(check_key(key))
        uri = s3_uri(self.bucket, full)
        with s3_errors(uri):
            try:
                self._retry(lambda: self.client.head_object(Bucket=self.bucket, Key=full), uri)
            except ClientError as err:
                if is_not_found(err):
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        with s3_errors(s3_uri(self.bucket, base + prefix)):
            for key in s3_keys(self.client, self.bucket, base + prefix, self.settings):
                yield key[len(base) :]

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
            raise InvalidInput(f"invalid storage root {one_line(root)}: {err}") from None
    if location.scheme == "file":
        if os.path.exists(location.key) and not os.path.isdir(location.key):
            raise InvalidInput(f"storage root is not a directory: {one_line(location.key)}")
        return LocalStorage(location.key)
    raise InvalidInput("storage root must be s3://bucket/prefix or a local directory")
