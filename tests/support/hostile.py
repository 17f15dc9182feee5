"""Hostile images, small files that claim or cost far more than they are: header bombs in
each format workers read, and a progressive JPEG of thousands of scans."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def tiff_bomb(side: int = 50_000) -> bytes:
    """A TIFF whose one strip claims side × side 8-bit grey pixels, in 126 bytes."""
    data_at = 8 + 2 + 8 * 12 + 4
    entries = [  # (tag, type: 3 SHORT / 4 LONG, value)
        (256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, data_at), (278, 4, side), (279, 4, 16),
    ]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def gif_bomb() -> bytes:
    """A GIF whose screen and frame claim 65,535 × 65,535."""
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, format="GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    at = data.index(b"\x2c", 13)  # the image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def webp_bomb() -> bytes:
    """A WebP whose extended header (VP8X) claims the largest canvas, 16,384 × 16,384."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="WEBP")
    frame = buffer.getvalue()[12:]
    side = (16384 - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + side * 2 + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def many_scan_jpeg(scans: int = 3000, side: int = 256) -> bytes:
    """A progressive JPEG whose last scan repeats `scans` times: each one is another pass
    over the whole image for the decoder."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 120, np.uint8)).save(
        buffer, format="JPEG", progressive=True
    )
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * scans + b"\xff\xd9"
