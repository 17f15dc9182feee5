"""Turn `explainctl submit INPUT...` arguments into a lazy stream of image URIs.

A job may name hundreds of thousands of images, so nothing here builds a list of them:
list files and stdin are read line by line, directories and S3 prefixes are listed one
directory or page at a time, and items are produced only as the caller asks for them.

The arguments themselves are checked when `expand_inputs` is called (a missing path, a
bad scheme, `-` twice), so a typo fails before anything is queued. Problems inside a list
file or listing can only be found while streaming, and surface then, naming the line.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from explainctl.io.s3 import S3Settings, make_s3_client, retry_s3, s3_errors
from explainctl.io.sources import DEFAULT_IMAGE_EXTENSIONS, iter_images
from explainctl.io.uri import Location, parse_uri
from explainctl.io.uri import one_line as _one_line
from explainctl.spec.errors import InvalidInput, ItemError

__all__ = ["LIST_EXTENSIONS", "InputItem", "expand_inputs", "list_entry"]

# A local file with one of these suffixes holds URIs rather than being an image itself.
LIST_EXTENSIONS = (".txt", ".csv", ".lst", ".uris")

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True, slots=True)
class InputItem:
    """One image to explain.

    `uri` is normalised: ``s3://bucket/key``, an absolute local path, or an http(s) URL.
    `target` is the raw text of a list file's ``target`` column (an index or a class
    name, checked with `Target.parse`), or None for "top-1". `label` is the item's ground
    truth as its list or dataset gives it (an index or a class name), or None. `data`
    holds a dataset row's encoded image (explainctl.datasets): `uri` is then the row's
    source id, and the client stages the bytes for the workers.
    """

    uri: str
    target: str | None = None
    label: str | None = None
    data: bytes | None = None


# Resolves an entry of a list file that has no scheme; gets (text, where-for-errors).
_Relative = Callable[[str, str], str]
_S3ClientFactory = Callable[[], Any]


def expand_inputs(
    args: Sequence[str],
    *,
    stdin: TextIO | None = None,
    s3_client: Any | None = None,
) -> Iterator[InputItem]:
    """Expand submit arguments into InputItems, lazily and in argument order.

    Each argument is ``-`` (URIs on stdin), ``@LIST`` or a local ``.txt/.csv/.lst/.uris``
    file (a list of URIs, local or ``@s3://``), a local directory or S3 prefix (its
    images, recursively, in key order), or a single image URI (not checked to exist).
    Raises `InvalidInput` for bad arguments at once, and for bad list contents or failed
    listings when the stream reaches them.
    """
    if isinstance(args, str):
        # A bare string would be expanded character by character.
        raise TypeError("expand_inputs takes a sequence of arguments, not a string")
    stream = stdin if stdin is not None else sys.stdin

    @functools.cache
    def client() -> Any:
        # Built only if some argument needs S3, and then shared by all of them.
        return s3_client if s3_client is not None else make_s3_client()

    sources: list[Callable[[], Iterator[InputItem]]] = []
    stdin_seen = False
    for arg in args:
        if arg == "-":
            if stdin_seen:
                raise InvalidInput("'-' (read URIs from stdin) given more than once")
            stdin_seen = True
            sources.append(functools.partial(_stdin_items, stream))
        else:
            sources.append(_plan(arg, client))
    return _chain(sources)


def _chain(sources: Iterable[Callable[[], Iterator[InputItem]]]) -> Iterator[InputItem]:
    # Each source opens its file or listing only when reached, so at most one is open.
    for source in sources:
        yield from source()


# --------------------------------------------------------------------------- arguments


def _parse_arg(arg: str, what: str = "input") -> Location:
    try:
        return parse_uri(arg)
    except ItemError as err:
        raise InvalidInput(f"{what} {_one_line(arg)}: {err.message}") from None


def _plan(arg: str, client: _S3ClientFactory) -> Callable[[], Iterator[InputItem]]:
    """Check one argument now and return what will expand it later."""
    if not isinstance(arg, str) or not arg.strip():
        raise InvalidInput(f"empty input argument: {arg!r}")
    if arg.startswith("@"):
        return _plan_list(arg, arg[1:], client)
    # Imported here: explainctl.datasets builds on this module's items.
    from explainctl.datasets import dataset_plan

    if (dataset := dataset_plan(arg)) is not None:
        return dataset

    location = _parse_arg(arg)
    if location.scheme == "http":
        return functools.partial(iter, (InputItem(location.key),))
    if location.scheme == "s3":
        key = location.key
        if key and not key.endswith("/") and key.lower().endswith(DEFAULT_IMAGE_EXTENSIONS):
            # Clearly one image: no request, so a missing object is the worker's to report.
            return functools.partial(iter, (InputItem(f"s3://{location.bucket}/{key}"),))
        # A prefix, or a name that may be a "folder" or an object: let the listing decide.
        return functools.partial(_listed_items, arg, f"s3://{location.bucket}/{key}", client)

    path = location.key
    if os.path.isdir(path):
        return functools.partial(_listed_items, arg, path, None)
    if os.path.isfile(path):
        if path.lower().endswith(LIST_EXTENSIONS):
            return functools.partial(_local_list_items, arg, path)
        return functools.partial(iter, (InputItem(path),))
    if os.path.exists(path):
        # A FIFO or device is no image; `<(command)` is a pipe, readable as a list with "@".
        raise InvalidInput(
            f"{_one_line(arg)}: not a regular file or directory "
            f"(use @{_one_line(arg)} to read URIs from it)"
        )
    raise InvalidInput(f"{_one_line(arg)}: no such file or directory")


def _plan_list(
    arg: str, target: str, client: _S3ClientFactory
) -> Callable[[], Iterator[InputItem]]:
    if not target.strip():
        raise InvalidInput("'@' must be followed by the path of a list file")
    location = _parse_arg(target, "list file")
    if location.scheme == "http":
        raise InvalidInput(f"{_one_line(arg)}: list files must be local or on S3")
    if location.scheme == "s3":
        if not location.key or location.key.endswith("/"):
            raise InvalidInput(f"{_one_line(arg)}: names an S3 prefix, not a list file")
        return functools.partial(_s3_list_items, arg, location, client)
    if os.path.isdir(location.key):
        raise InvalidInput(f"{_one_line(arg)}: is a directory, not a list file")
    if not os.path.exists(location.key):
        raise InvalidInput(f"{_one_line(arg)}: list file not found")
    return functools.partial(_local_list_items, arg, location.key)


# --------------------------------------------------------------------------- sources


def _listed_items(arg: str, uri: str, client: _S3ClientFactory | None) -> Iterator[InputItem]:
    try:
        for found in iter_images(uri, s3_client=client() if client else None):
            yield InputItem(found)
    except ItemError as err:
        # The argument as a whole cannot be expanded (denied, vanished, unreachable).
        raise InvalidInput(f"cannot expand {_one_line(arg)}: {err.message}") from None


def _stdin_items(stream: TextIO) -> Iterator[InputItem]:
    try:
        yield from _parse_list(stream, "-", _relative_to_cwd, require_csv=False)
    except UnicodeDecodeError:
        raise InvalidInput("-: stdin is not valid text in its encoding") from None


def _local_list_items(arg: str, path: str) -> Iterator[InputItem]:
    base = os.path.dirname(path)

    def relative(text: str, where: str) -> str:
        return os.path.join(base, text)

    require_csv = path.lower().endswith(".csv")
    try:
        # newline="" is what the csv module needs to see quoted line breaks intact.
        with open(path, encoding="utf-8", newline="") as handle:
            yield from _parse_list(handle, arg, relative, require_csv=require_csv)
    except UnicodeDecodeError:
        raise InvalidInput(f"{_one_line(arg)}: list file is not UTF-8 text") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InvalidInput(f"{_one_line(arg)}: cannot read list file: {reason}") from None


def _s3_list_items(arg: str, location: Location, client: _S3ClientFactory) -> Iterator[InputItem]:
    bucket, key = location.bucket, location.key
    assert bucket is not None
    uri = f"s3://{bucket}/{key}"
    base = key.rpartition("/")[0]

    def relative(text: str, where: str) -> str:
        return _s3_relative(bucket, base, text, where)

    try:
        with s3_errors(uri):
            response = retry_s3(lambda: client().get_object(Bucket=bucket, Key=key), uri,
                                S3Settings())  # fmt: skip
            # StreamingBody's own __enter__ hands back the raw urllib3 stream, which lacks
            # iter_lines; closing() keeps the wrapper and still drops the connection on exit.
            with contextlib.closing(response["Body"]) as body:
                # keepends keeps quoted line breaks inside CSV fields intact, as with files.
                lines = _decode_lines(body.iter_lines(keepends=True), arg)
                csv_list = key.lower().endswith(".csv")
                yield from _parse_list(lines, arg, relative, require_csv=csv_list)
    except ItemError as error:
        if error.code == "not-found":
            raise InvalidInput(f"{_one_line(arg)}: list file not found") from None
        raise InvalidInput(f"{_one_line(arg)}: cannot read list file: {error.message}") from None


def _decode_lines(raw: Iterable[bytes], arg: str) -> Iterator[str]:
    for number, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{_one_line(arg)}:{number}: not UTF-8 text") from None


def _relative_to_cwd(text: str, where: str) -> str:
    return text  # parse_uri makes it absolute against the working directory


def _s3_relative(bucket: str, base: str, text: str, where: str) -> str:
    """An entry of an S3 list without a scheme: relative to the list's "folder".

    An absolute path stays a local path; "." and ".." are resolved the way they would be
    beside a local list, since S3 would otherwise take them as literal key parts.
    """
    if text.startswith("/"):
        return text
    parts = base.split("/") if base else []
    for part in text.split("/"):
        if part == ".":
            continue
        if part == "..":
            if not parts:
                raise InvalidInput(f"{where}: {_one_line(text)} climbs above the bucket")
            parts.pop()
        else:
            parts.append(part)
    return f"s3://{bucket}/" + "/".join(parts)


# --------------------------------------------------------------------------- list files


def _is_skipped(text: str) -> bool:
    return not text or text.startswith("#")


def _parse_list(
    lines: Iterable[str], arg: str, relative: _Relative, *, require_csv: bool
) -> Iterator[InputItem]:
    """Items from the lines of a list: CSV with a `uri` header, or one URI per line."""
    name = _one_line(arg)
    numbered = enumerate(lines, 1)
    for number, line in numbered:
        if number == 1:
            # Spreadsheets often save a BOM, which would hide a leading "uri" header.
            line = line.removeprefix("\ufeff")
        if not _is_skipped(line.strip()):
            break
    else:
        return

    header = _header(line, f"{name}:{number}")
    if "uri" in header:
        rest = (text for _, text in numbered)
        yield from _csv_items(line, rest, header, number - 1, name, relative)
        return
    if require_csv:
        found = ", ".join(repr(h) for h in header[:10])
        raise InvalidInput(f"{name}:{number}: CSV header has no 'uri' column (found {found})")

    yield _item(line.strip(), None, f"{name}:{number}", relative)
    for number, line in numbered:
        text = line.strip()
        if not _is_skipped(text):
            yield _item(text, None, f"{name}:{number}", relative)


def _header(line: str, where: str) -> list[str]:
    try:
        cells = next(csv.reader([line]), [])
    except csv.Error as err:
        raise InvalidInput(f"{where}: unreadable CSV: {err}") from None
    return [cell.strip().lower() for cell in cells]


def _csv_items(
    first: str,
    rest: Iterator[str],
    header: list[str],
    offset: int,
    name: str,
    relative: _Relative,
) -> Iterator[InputItem]:
    uri_col = header.index("uri")
    target_col = header.index("target") if "target" in header else None
    label_col = header.index("label") if "label" in header else None
    reader = csv.reader(_prepend(first, rest))
    try:
        next(reader)  # the header
        for row in reader:
            # line_num is where the record ends; a quoted field may span several lines.
            where = f"{name}:{offset + reader.line_num}"
            if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                continue
            uri = row[uri_col].strip() if uri_col < len(row) else ""
            if not uri:
                raise InvalidInput(f"{where}: empty 'uri' value")
            target, label = _cell(row, target_col), _cell(row, label_col)
            yield _item(uri, target, where, relative, label)
    except csv.Error as err:
        raise InvalidInput(f"{name}:{offset + reader.line_num}: unreadable CSV: {err}") from None


def _cell(row: list[str], column: int | None) -> str | None:
    if column is None or column >= len(row):
        return None
    return row[column].strip() or None


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def list_entry(text: str, target: str | None, label: str | None, base: str) -> InputItem:
    """An image named in a list or a dataset's column: a URI, or a path relative to `base`."""
    return _item(text, target, text, lambda entry, where: os.path.join(base, entry), label)


def _item(
    text: str, target: str | None, where: str, relative: _Relative, label: str | None = None
) -> InputItem:
    """One entry of a list. An unusable URI or target is passed on as it is: the worker
    fails that item alone with its code, and one bad line cannot sink a long audit."""
    if not _SCHEME_RE.match(text):
        text = relative(text, where)
    try:
        location = parse_uri(text)
    except ItemError:
        return InputItem(text, target, label)
    uri = f"s3://{location.bucket}/{location.key}" if location.scheme == "s3" else location.key
    return InputItem(uri, target, label)
