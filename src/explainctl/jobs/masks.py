"""A job's masks: one file per chunk attempt (contracts.chunk_masks_key), read a chunk at a
time.

Workers write the masks of the items a chunk attempt settled done into one .npz beside the
per-item artifacts (`encode`), and each done record names it (`mask_file`). A reader of
many masks (`results --parquet --masks`, `compare`, `export`) asks `MaskReader` for an
item's mask: the chunk's file is fetched once and kept while its neighbours are read;
records written before chunk files existed are read from their own mask.npy.
"""

from __future__ import annotations

import io
import math
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from explainctl.spec.contracts import MASK_NPY, MAX_PIXELS

Read = Callable[[str], bytes]

# A chunk file holds a chunk's masks: 16 items of 28x28 float32 are 50 KiB; 256 masks of
# 512x512 stay under this.
CHUNK_MAX_BYTES = 256 * 1024 * 1024
# A 28x28 float32 mask is 3 KiB; anything near this is not a mask.
MASK_MAX_BYTES = 16 * 1024 * 1024
# Chunk files held at once: enough for the few chunks concurrent readers are in.
_CACHED = 32


def read_mask_file(uri: str) -> bytes:
    """A mask.npy or a chunk's masks file from s3:// or disk, within its size cap."""
    from explainctl.io.sources import read_uri

    cap = CHUNK_MAX_BYTES if uri.endswith(".npz") else MASK_MAX_BYTES
    return read_uri(uri, max_bytes=cap)


def _npy_shape(stream) -> tuple[int, ...]:
    """The shape an .npy stream declares in its header, read before any of its data."""
    version = np.lib.format.read_magic(stream)
    header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, _ = header(stream)
    return shape


def load_mask(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A mask.npy's array; ValueError for anything that is not a plain numeric array of at
    most `max_pixels` values (checked from its header, before its data is read)."""
    try:
        shape = _npy_shape(io.BytesIO(data))
        if math.prod(shape) > max_pixels:
            raise ValueError(f"a mask of shape {shape}, above the limit of {max_pixels} values")
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, EOFError) as error:
        raise ValueError(f"not a .npy file ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise ValueError("not a numeric array")
    return array


def encode(masks: Mapping[int, np.ndarray]) -> bytes | None:
    """The chunk file of `masks` (item index -> its 2-D mask); None when they do not share
    one shape (then readers take each item's mask.npy)."""
    if not masks:
        return None
    indices = sorted(masks)
    arrays = [np.asarray(masks[i], dtype=np.float32) for i in indices]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
        return None
    buffer = io.BytesIO()
    np.savez(buffer, index=np.asarray(indices, dtype=np.int64), masks=np.stack(arrays))
    return buffer.getvalue()


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> dict[int, np.ndarray]:
    """A chunk file's masks by item index; ValueError for anything else. What it unpacks
    to is checked before it is unpacked: a small compressed file may declare gigabytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.infolist():
                if member.file_size > CHUNK_MAX_BYTES:
                    raise ValueError(f"{member.filename} unpacks to {member.file_size} bytes")
            with archive.open("masks.npy") as stream:
                shape = _npy_shape(stream)
        if len(shape) != 3 or math.prod(shape[1:]) > max_pixels:
            raise ValueError(f"masks of shape {shape}, above {max_pixels} values each")
        held = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(held, np.lib.npyio.NpzFile):
            raise ValueError("a single array")
        with held:
            indices, masks = held["index"], held["masks"]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"not a chunk masks file ({error_line(error)})") from None
    if masks.ndim != 3 or indices.shape != (masks.shape[0],) or masks.dtype.kind != "f":
        raise ValueError(f"not a chunk masks file (masks {masks.shape}, index {indices.shape})")
    return {int(i): masks[row] for row, i in enumerate(indices)}


class MaskReader:
    """Masks of a job's records through `read` (a URI's bytes), thread-safe: a chunk file
    is fetched once however many threads ask for its items at the same time."""

    def __init__(self, read: Read = read_mask_file, cached: int = _CACHED,
                 max_pixels: int = MAX_PIXELS):  # fmt: skip
        self.read = read
        self.max_pixels = max_pixels
        self.cached = cached
        self._files: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.fetched = 0  # objects read: what a chunk file saves

    def mask(self, record: Any) -> np.ndarray | None:
        """The mask of `record` (an ItemRecord, or anything with its `index`, `mask_file`
        and `artifacts` or `mask_uri`); None where it has none. Raises ValueError (or the
        read's own error) for a file that cannot be read."""
        if getattr(record, "mask_file", None):
            mask = self._chunk(record.mask_file).get(record.index)
            if mask is not None:
                return mask
        uri = getattr(record, "mask_uri", None) or getattr(record, "artifacts", {}).get(MASK_NPY)
        if not uri:
            return None
        self.fetched += 1
        return load_mask(self.read(uri), self.max_pixels)

    def _chunk(self, uri: str) -> dict[int, np.ndarray]:
        with self._lock:
            future = self._files.get(uri)
            owner = future is None
            if owner:
                future = self._files[uri] = Future()
                while len(self._files) > self.cached:
                    self._files.popitem(last=False)
            else:
                self._files.move_to_end(uri)
        if owner:
            try:
                self.fetched += 1
                future.set_result(decode(self.read(uri), self.max_pixels))
            except BaseException as error:
                future.set_exception(error)
        return future.result()


def error_line(error: Exception) -> str:
    """An error's first line, for a one-line note (its type where it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
