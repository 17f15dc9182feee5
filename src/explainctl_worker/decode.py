"""Turn untrusted image bytes into one 8-bit RGB picture, or a stable per-item error.

Every failure leaves as an `ItemError` whose `code` is one of: ``empty``, ``too-large``,
``too-many-pixels``, ``unsupported-format`` or ``corrupt``. The message is one line meant for
a user, so it carries no traceback and no path.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from explainctl.config import Settings
from explainctl.spec.contracts import INPUT_FORMATS, MAX_JPEG_SCANS, jpeg_scans
from explainctl.spec.errors import ItemError

ALLOWED_FORMATS: tuple[str, ...] = INPUT_FORMATS

# Modes whose samples do not fit in a byte; Pillow's own convert() clips them instead of
# rescaling, which turns any 16-bit photo into a near-white silhouette.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# BITMAPINFOHEADER sizes that real BMP files use; "BM" alone is too weak a signature to call
# a text file that happens to start with it a damaged BMP.
_BMP_INFO_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

_MAX_DETAIL_CHARS = 160


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one item may cost to decode (defaults: the settings' defaults)."""

    max_bytes: int = Settings.max_image_bytes
    max_pixels: int = Settings.max_pixels

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            # bool is an int subclass, and True as a limit is surely a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode `data` into a fully loaded RGB image with its EXIF orientation applied.

    Greyscale of any depth, palettes, CMYK and alpha (composited over white) all come out as
    8-bit RGB; of an animation, only the first frame is kept.
    """
    if len(data) == 0:
        raise ItemError("empty", "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ItemError(
            "too-large", f"the image is {len(data)} bytes, above the limit of {limits.max_bytes}"
        )
    try:
        # Local, not global: Image.MAX_IMAGE_PIXELS and the default warning filters belong to
        # whoever else uses Pillow in this process.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, limits)
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(
            "too-many-pixels",
            "the image has too many pixels (refused as a possible decompression bomb)",
        ) from exc
    except MemoryError:
        # Within the pixel limit, running out of memory says the worker is overloaded, not that
        # this item is broken, so it must not be recorded as a bad input.
        raise
    except Exception as exc:
        raise ItemError("corrupt", f"damaged or truncated image data ({_describe(exc)})") from exc


def _decode(data: bytes, limits: DecodeLimits) -> Image.Image:
    try:
        # open() parses only the header, so the size check below runs before any pixel data
        # is decompressed.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        # A damaged header surfaces as UnidentifiedImageError, or as whatever a plugin raised
        # after matching only a loose prefix (BMP takes any "BM..."), so the exception cannot
        # tell a cut-short upload from a foreign file; the signature can.
        if _has_allowed_signature(data):
            detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({_describe(exc)})"
            raise ItemError("corrupt", "damaged or truncated image header" + detail) from exc
        raise ItemError(
            "unsupported-format",
            "not a supported image; expected one of " + ", ".join(ALLOWED_FORMATS),
        ) from exc

    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ItemError("corrupt", f"the image header declares an empty size {width}x{height}")
        if width * height > limits.max_pixels:
            raise ItemError(
                "too-many-pixels",
                f"the image is {width}x{height} = {width * height} pixels, "
                f"above the limit of {limits.max_pixels}",
            )
        if img.format == "PNG":
            _verify_png(data)
        if img.format == "JPEG" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise ItemError(
                "unsupported-format",
                f"a JPEG of {scans} scans; at most {MAX_JPEG_SCANS} are decoded",
            )
        # load() raises on short data only while ImageFile.LOAD_TRUNCATED_IMAGES is False,
        # which is deliberately left at Pillow's default here.
        img.load()
        _apply_orientation(img)
        return _to_rgb(img)


def _verify_png(data: bytes) -> None:
    # Pillow skips the CRCs of IDAT chunks while decoding, so a bit-flipped PNG can decode to
    # garbage without complaint; verify() checks every chunk CRC without decompressing and
    # needs a freshly opened image.
    with Image.open(io.BytesIO(data), formats=("PNG",)) as probe:
        probe.verify()


def _apply_orientation(img: Image.Image) -> None:
    try:
        # In place: the returned copy would briefly double the peak memory of every image.
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception:
        # Unreadable EXIF is common in camera output whose pixels are fine; losing the
        # orientation is a smaller harm than rejecting the item.
        pass


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_GREY_MODES:
        return _wide_grey_to_rgb(img)
    if img.has_transparency_data:
        return _flatten_on_white(img.convert("RGBA"))
    # Also when already RGB: convert() then returns a plain copy detached from the file object.
    return img.convert("RGB")


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, (0, 0), rgba)
    return canvas


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    grey = _to_uint8(np.asarray(img), img.mode)
    return Image.fromarray(grey).convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        # Full-range mapping, rounded: 65535 / 257 == 255 exactly. Integer maths keeps the
        # temporary at 4 bytes a pixel instead of 8 for float64.
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)

    samples = values.astype(np.float32)
    finite = np.isfinite(samples)
    if not finite.any():
        return np.zeros(samples.shape, dtype=np.uint8)
    if not finite.all():
        samples = np.where(finite, samples, np.float32(0))
    lo = float(samples[finite].min())
    hi = float(samples[finite].max())

    # "I" and "F" do not say what range their numbers mean, so the conventional ranges are
    # tried first (8-bit values, 16-bit values in a 32-bit container, floats in 0..1) and
    # anything else is stretched min-to-max rather than clipped.
    if lo >= 0 and hi <= 1 and mode == "F":
        scaled = samples * 255
    elif lo >= 0 and hi <= 255:
        scaled = samples
    elif lo >= 0 and hi <= 65535 and mode == "I":
        scaled = samples / 257
    elif hi > lo:
        scaled = (samples - lo) * (255 / (hi - lo))
    else:
        scaled = np.full(samples.shape, min(max(lo, 0.0), 255.0), dtype=np.float32)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _has_allowed_signature(data: bytes) -> bool:
    head = data[:16]
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")):
        return True
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM":
        if len(data) < 18:
            return True
        return int.from_bytes(data[14:18], "little") in _BMP_INFO_HEADER_SIZES
    return False


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > _MAX_DETAIL_CHARS:
        first = first[: _MAX_DETAIL_CHARS - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {first}" if first else name
