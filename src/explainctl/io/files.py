"""The local-file boundary: the one place OSErrors about an input or artifact become
ItemErrors (`os_errors`), and the sorted walk that lists a directory as S3 lists keys."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from explainctl.io.uri import one_line
from explainctl.spec.errors import ItemError

# Temp files of in-flight local writes carry this suffix so listings can skip them.
TMP_SUFFIX = ".explainctl-tmp"
_READ_CHUNK = 1 << 20


def _local_error(err: OSError, path: str) -> ItemError:
    shown = one_line(path)
    if isinstance(err, FileNotFoundError | NotADirectoryError):
        return ItemError("not-found", f"{shown}: no such file")
    if isinstance(err, PermissionError):
        return ItemError("access-denied", f"{shown}: permission denied")
    if isinstance(err, IsADirectoryError):
        return ItemError("is-a-directory", f"{shown}: is a directory")
    return ItemError("storage-error", f"{shown}: {err.strerror or type(err).__name__}")


def walk_sorted(root: str, rel: str, prefix: str) -> Iterator[str]:
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
                elif entry.is_file() and not entry.name.endswith(TMP_SUFFIX):
                    entries.append((f"{rel}{entry.name}", False))
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        raise _local_error(err, directory) from err
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            if key.startswith(prefix) or prefix.startswith(key):
                yield from walk_sorted(root, key, prefix)
        elif key.startswith(prefix):
            yield key


@contextlib.contextmanager
def os_errors(path: str) -> Iterator[None]:
    """Translate an OSError inside the block into an ItemError about `path`."""
    try:
        yield
    except OSError as err:
        raise _local_error(err, path) from err


def read_at_most(read: Callable[[int], bytes], limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = read(min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
