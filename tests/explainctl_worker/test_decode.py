"""decode_image on ordinary and hostile inputs, every one of them built here in memory."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from explainctl.spec.errors import ItemError
from explainctl_worker.decode import ALLOWED_FORMATS, DecodeLimits, decode_image
from tests.support import hostile

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


def assert_close(actual, expected, tol: int = 0) -> None:
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)), (
        actual,
        expected,
    )


def error_code(data: bytes, limits: DecodeLimits | None = None) -> str:
    with pytest.raises(ItemError) as info:
        decode_image(data, limits or DecodeLimits())
    message = info.value.message
    assert message and "\n" not in message and "Traceback" not in message
    assert "BytesIO" not in message  # Pillow's repr of the in-memory file must not leak
    return info.value.code


def noise_rgb(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def huge_png_header(width: int = 50_000, height: int = 50_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    # One deflated scanline is enough for a well-formed file; the header is what matters.
    idat = zlib.compress(b"\x00" * (1 + 3 * width))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --- ordinary images ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_round_trips_exactly(fmt):
    src = noise_rgb()
    out = decode_image(encode(src, fmt))
    assert out.mode == "RGB"
    assert out.size == (64, 48)
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_baseline_jpeg():
    src = Image.new("RGB", (32, 16), (200, 100, 50))
    out = decode_image(encode(src, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert out.size == (32, 16)
    assert_close(pixel(out, (10, 8)), (200, 100, 50), tol=4)


def test_webp_lossy_and_lossless():
    src = Image.new("RGB", (24, 24), (10, 200, 30))
    lossless = decode_image(encode(src, "WEBP", lossless=True))
    assert lossless.mode == "RGB" and lossless.size == (24, 24)
    assert pixel(lossless, (5, 5)) == (10, 200, 30)
    lossy = decode_image(encode(src, "WEBP", quality=90))
    assert lossy.mode == "RGB" and lossy.size == (24, 24)
    assert_close(pixel(lossy, (12, 12)), (10, 200, 30), tol=8)


def test_result_is_a_plain_loaded_image():
    out = decode_image(encode(noise_rgb(), "PNG"))
    assert type(out) is Image.Image  # detached from the decoder's file object
    out.getpixel((0, 0))


# --- colour modes ---------------------------------------------------------------------------


def test_greyscale_l():
    src = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1)))
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB" and out.size == (16, 4)
    arr = np.asarray(out)
    assert np.array_equal(arr[..., 0], np.asarray(src))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_bilevel_mode_1():
    src = Image.new("1", (8, 8), 0)
    src.putpixel((3, 2), 1)
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB" and out.size == (8, 8)
    assert pixel(out, (3, 2)) == WHITE
    assert pixel(out, (0, 0)) == (0, 0, 0)


def test_16bit_png_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    src = Image.fromarray(np.tile(ramp, (3, 1)))
    assert src.mode == "I;16"
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (256, 3)
    row = np.asarray(out)[1, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 200  # a clipping conversion would leave about two levels
    assert abs(row[128] - 128) <= 1


def test_16bit_big_endian_tiff():
    values = np.array([[0, 257 * 100, 65535]], dtype=">u2")
    # Not convert("I;16B"): Pillow clips to 0..255 on the way, the very bug under test.
    src = Image.frombytes("I;16B", (3, 1), values.tobytes())
    assert src.mode == "I;16B"
    data = encode(src, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (3, 1)
    assert np.asarray(out)[0, :, 0].tolist() == [0, 100, 255]


def test_32bit_int_tiff_wide_range_is_stretched():
    values = np.array([[-1_000_000, 0, 1_000_000]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = decode_image(data)
    assert out.mode == "RGB"
    low, mid, high = np.asarray(out)[0, :, 0].tolist()
    assert (low, high) == (0, 255)
    assert abs(mid - 128) <= 1


def test_float_tiff_in_unit_range():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255]


def test_palette_png_with_transparency_becomes_white():
    src = Image.new("P", (4, 2), 0)
    src.putpalette([*RED, *GREEN] + [0] * (256 - 2) * 3)
    for x in range(2, 4):
        for y in range(2):
            src.putpixel((x, y), 1)
    data = encode(src, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (4, 2)
    assert pixel(out, (0, 0)) == WHITE  # index 0 (red) is the transparent one
    assert pixel(out, (3, 1)) == GREEN


def test_palette_png_without_transparency():
    src = Image.new("RGB", (6, 6), BLUE).quantize(4)
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB"
    assert pixel(out, (2, 2)) == BLUE


def test_rgba_composited_over_white():
    src = Image.new("RGBA", (3, 1))
    src.putpixel((0, 0), (0, 0, 0, 0))
    src.putpixel((1, 0), (255, 0, 0, 255))
    src.putpixel((2, 0), (0, 0, 0, 128))
    out = decode_image(encode(src, "PNG"))
    assert out.mode == "RGB" and out.size == (3, 1)
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == RED
    assert_close(pixel(out, (2, 0)), (127, 127, 127), tol=1)


def test_la_composited_over_white():
    src = Image.new("LA", (2, 1))
    src.putpixel((0, 0), (0, 0))
    src.putpixel((1, 0), (0, 255))
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == (0, 0, 0)


def test_rgb_png_with_colour_key_transparency():
    src = Image.new("RGB", (2, 1), RED)
    src.putpixel((1, 0), BLUE)
    out = decode_image(encode(src, "PNG", transparency=RED))
    assert pixel(out, (0, 0)) == WHITE
    assert pixel(out, (1, 0)) == BLUE


def test_cmyk_jpeg():
    src = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    data = encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (16, 16)
    assert_close(pixel(out, (8, 8)), (0, 255, 255), tol=6)


def test_exif_orientation_6_rotates():
    src = Image.new("RGB", (40, 20), RED)
    src.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display after rotating 90 degrees clockwise
    out = decode_image(encode(src, "JPEG", quality=95, exif=exif))
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    # Clockwise rotation brings the stored left half (red) to the top.
    assert_close(pixel(out, (10, 5)), RED, tol=12)
    assert_close(pixel(out, (10, 34)), BLUE, tol=12)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_animation_or_multipage_keeps_first_frame(fmt, params):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (8, 6)
    assert pixel(out, (4, 3)) == RED


# --- refusals ------------------------------------------------------------------------------


def test_empty():
    assert error_code(b"") == "empty"


def test_too_large_is_checked_before_decoding():
    data = encode(noise_rgb(), "PNG")
    assert error_code(data, DecodeLimits(max_bytes=len(data) - 1)) == "too-large"
    assert decode_image(data, DecodeLimits(max_bytes=len(data))).size == (64, 48)
    # Garbage over the limit is refused on its size, without being looked at.
    assert error_code(b"x" * 101, DecodeLimits(max_bytes=100)) == "too-large"


def test_small_max_pixels_refuses_a_normal_image():
    data = encode(noise_rgb(), "PNG")  # 64 x 48 = 3072 pixels
    assert error_code(data, DecodeLimits(max_pixels=3071)) == "too-many-pixels"
    assert decode_image(data, DecodeLimits(max_pixels=3072)).size == (64, 48)


def test_huge_header_fails_fast_and_small():
    data = huge_png_header()
    assert len(data) < 1000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        code = error_code(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == "too-many-pixels"
    assert time.perf_counter() - started < 1.0
    # tracemalloc sees Python allocations only, not Pillow's C buffers; the next test is the
    # one that proves no pixel buffer is ever requested.
    assert peak < 50 * 1024 * 1024


def test_huge_header_is_refused_before_load_without_pillow_global_limit(monkeypatch):
    # With Pillow's own bomb check switched off, only decode_image's header check stands
    # between this file and a 7.5 GB allocation; load() must never be reached.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    def forbidden_load(self):
        raise AssertionError("pixel data decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)
    with pytest.raises(ItemError) as info:
        decode_image(huge_png_header())
    assert info.value.code == "too-many-pixels"
    assert "50000x50000" in info.value.message


@pytest.mark.parametrize("pillow_limit", [3000, 1000])  # warning band, then error band
def test_pillow_bomb_warning_and_error_become_too_many_pixels(monkeypatch, pillow_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    data = encode(noise_rgb(), "PNG")  # 3072 pixels
    assert error_code(data, DecodeLimits(max_pixels=10**9)) == "too-many-pixels"


def test_global_pillow_and_warning_state_is_untouched():
    filters_before = list(warnings.filters)
    pillow_limit_before = Image.MAX_IMAGE_PIXELS
    decode_image(encode(noise_rgb(), "PNG"))
    error_code(huge_png_header())
    assert list(warnings.filters) == filters_before
    assert pillow_limit_before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "data",
    [
        b"hello, I am a text file named photo.jpg\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< >>\n%%EOF\n",
        b"BM but not a bitmap, just words",
    ],
    ids=["text", "svg", "pdf", "text-starting-with-BM"],
)
def test_not_an_image(data):
    assert error_code(data) == "unsupported-format"


def test_image_format_outside_the_allowed_list():
    data = encode(Image.new("RGB", (16, 16), RED), "ICO")
    assert Image.open(io.BytesIO(data)).format == "ICO"  # Pillow reads it, we do not
    assert "ICO" not in ALLOWED_FORMATS
    assert error_code(data) == "unsupported-format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_cut_in_half_is_corrupt(fmt):
    data = encode(noise_rgb(), fmt)
    assert error_code(data[: len(data) // 2]) == "corrupt"


def test_png_missing_its_end_is_corrupt():
    data = encode(noise_rgb(), "PNG")
    assert data.endswith(png_chunk(b"IEND", b""))
    assert error_code(data[:-12]) == "corrupt"


@pytest.mark.parametrize(
    "data",
    [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00", b"GIF89a\x01", b"RIFF\x00\x00\x00\x00WEBPVP8 "],
    ids=["png", "jpeg", "gif", "webp"],
)
def test_signature_without_a_header_is_corrupt(data):
    assert error_code(data) == "corrupt"


def test_png_with_bad_idat_crc_is_corrupt():
    data = bytearray(encode(noise_rgb(), "PNG"))
    at = data.find(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    data[at + 4 + length] ^= 0xFF  # first byte of the IDAT CRC
    assert error_code(bytes(data)) == "corrupt"


def test_jpeg_with_garbled_scan_data_never_escapes():
    data = bytearray(encode(noise_rgb(), "JPEG"))
    start = data.find(b"\xff\xda") + 20
    data[start : start + 200] = b"\xff\x00\xff\xd8" * 50
    try:
        out = decode_image(bytes(data))
    except ItemError as exc:
        assert exc.code == "corrupt"
    else:  # libjpeg may recover with damaged pixels; that is allowed, escaping is not
        assert out.mode == "RGB" and out.size == (64, 48)


def test_unexpected_pillow_exception_is_corrupt(monkeypatch):
    def explode(self, mode=None, *args, **kwargs):
        raise RuntimeError("codec exploded\nsecond line with /internal/path")

    monkeypatch.setattr(Image.Image, "convert", explode)
    with pytest.raises(ItemError) as info:
        decode_image(encode(noise_rgb(), "PNG"))
    assert info.value.code == "corrupt"
    assert "RuntimeError: codec exploded" in info.value.message
    assert "/internal/path" not in info.value.message


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_limits_must_be_positive_integers(field, bad):
    with pytest.raises(ValueError):
        DecodeLimits(**{field: bad})


@pytest.mark.parametrize("bomb", [hostile.tiff_bomb, hostile.gif_bomb, hostile.webp_bomb])
def test_header_bombs_of_every_format_are_refused_from_the_header(bomb):
    data = bomb()
    assert len(data) < 200
    with pytest.raises(ItemError) as caught:
        decode_image(data)
    assert caught.value.code == "too-many-pixels"


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    with pytest.raises(ItemError, match="3009 scans") as caught:
        decode_image(hostile.many_scan_jpeg())
    assert caught.value.code == "unsupported-format"
    assert decode_image(hostile.many_scan_jpeg(scans=20)).size == (256, 256)
