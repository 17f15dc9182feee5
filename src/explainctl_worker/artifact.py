"""Rendering one explanation into the files of its item (numpy and Pillow only).

Everything is drawn at the original image's resolution: the low-resolution mask is
upsampled to (H, W) and the substrate, already a blur, is resized up to it.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from explainctl.spec.contracts import (
    HEATMAP_PNG,
    MASK_NPY,
    MASK_PNG,
    MASKS_NPY,
    OVERLAY_PNG,
    PERTURBED_PNG,
    RESULT_JSON,
    THUMB_SIDE,
    THUMBS_WEBP,
)
from explainctl.spec.results import ItemResult

OVERLAY_ALPHA = 0.5
# Control points of a blue-cyan-yellow-red ramp (value, r, g, b).
_RAMP = np.array(
    [
        (0.00, 0.00, 0.00, 0.50),
        (0.15, 0.00, 0.00, 1.00),
        (0.40, 0.00, 1.00, 1.00),
        (0.60, 1.00, 1.00, 0.00),
        (0.85, 1.00, 0.00, 0.00),
        (1.00, 0.50, 0.00, 0.00),
    ]
)


def result_json(result: ItemResult) -> bytes:
    """result.json's bytes."""
    return (json.dumps(result.model_dump(mode="json"), indent=2) + "\n").encode()


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] of shape (H, W) to colours (H, W, 3) uint8; high = red."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _RAMP[:, 0], _RAMP[:, i]) for i in (1, 2, 3)]
    return (np.stack(channels, axis=-1) * 255 + 0.5).astype(np.uint8)


def upsample_mask(mask: np.ndarray, width: int, height: int, mode: str = "bilinear") -> np.ndarray:
    """(h, w) float mask -> (height, width) float32 in [0, 1]."""
    resample = Image.Resampling.NEAREST if mode == "nearest" else Image.Resampling.BILINEAR
    image = Image.fromarray(mask.astype(np.float32), mode="F").resize((width, height), resample)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return buffer.getvalue()


def thumbs(images: list[Image.Image], side: int = THUMB_SIDE) -> bytes:
    """thumbs.webp: `images` (of one size) each fitted into `side` px, side by side."""
    small = []
    for image in images:
        copy = image.copy()
        copy.thumbnail((side, side))
        small.append(copy)
    width, height = small[0].size
    strip = Image.new("RGB", (width * len(small), height))
    for n, image in enumerate(small):
        strip.paste(image, (n * width, 0))
    buffer = io.BytesIO()
    # The quality a report's own thumbnails have (explainctl.pages.report).
    strip.save(buffer, format="WEBP", quality=75)
    return buffer.getvalue()


def _resize(array_chw: np.ndarray, width: int, height: int) -> np.ndarray:
    """(3, S, S) in [0, 1] -> (height, width, 3) float32 through 8-bit, as the original did."""
    hwc = np.transpose(array_chw, (1, 2, 0)).astype(np.float32)
    small = Image.fromarray((np.clip(hwc, 0, 1) * 255 + 0.5).astype(np.uint8))
    big = small.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.float32) / 255.0


def _pyramid_perturbed(original: np.ndarray, levels: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Variable blur at full resolution: each pixel interpolates the two pyramid levels
    bracketing m * (L - 1); the last level is the original itself, not its resized copy.
    One level is resized at a time, so memory stays a few copies of the image."""
    count = levels.shape[0]
    t = m * (count - 1)
    out = np.zeros_like(original)
    height, width = m.shape
    for level in range(count):
        weight = np.clip(1.0 - np.abs(t - level), 0.0, 1.0)[..., None]
        if not weight.any():
            continue
        image = original if level == count - 1 else _resize(levels[level], width, height)
        out += weight * image
    return out


def render(
    image: Image.Image,
    mask: np.ndarray,
    substrate: np.ndarray,
    result: ItemResult,
    upsample_mode: str = "bilinear",
    *,
    mask_full: np.ndarray | None = None,
    levels: np.ndarray | None = None,
    area_masks: np.ndarray | None = None,
    top: float = 1.0,
) -> dict[str, bytes]:
    """All artifact files of one item, by file name.

    image: the decoded RGB original (W, H); mask: (h, w) in [0, 1], 1 = kept;
    substrate: (3, S, S) pixel-space substrate in [0, 1] the engine used.
    mask_full: (S, S) the mask as the model saw it, drawn instead of upsampling `mask`
    when the method's own upsampling is not plain interpolation (paper: blurred).
    levels: (L, 3, S, S) blur pyramid, for methods whose blur varies with the mask; then
    perturbed.png interpolates between levels instead of blending with `substrate`.
    area_masks: (A, h, w), written as masks.npy.
    top: the saliency drawn in the heatmap's top colour (`heatmap_top`); the overlay lays
    the heatmap over the image in proportion to saliency / top, so what the mask left
    alone stays visible as it is.
    """
    width, height = image.size
    original = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    if mask_full is not None:
        m = upsample_mask(mask_full, width, height, "bilinear")[..., None]  # (H, W, 1)
    else:
        m = upsample_mask(mask, width, height, upsample_mode)[..., None]

    shown = np.clip((1.0 - m) / top, 0.0, 1.0)  # (H, W, 1)
    heatmap = colormap(shown[..., 0])
    alpha = OVERLAY_ALPHA * shown
    overlay = (1 - alpha) * original + alpha * heatmap.astype(np.float32) / 255.0
    if levels is not None:
        perturbed = _pyramid_perturbed(original, levels, m[..., 0])
    else:
        blurred = _resize(substrate, width, height)
        perturbed = m * original + (1 - m) * blurred

    def to_u8(array: np.ndarray) -> np.ndarray:
        return (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)

    overlay_u8, perturbed_u8 = to_u8(overlay), to_u8(perturbed)
    files = {
        MASK_NPY: _npy(mask),
        MASK_PNG: _png(to_u8(m[..., 0])),
        HEATMAP_PNG: _png(heatmap),
        OVERLAY_PNG: _png(overlay_u8),
        PERTURBED_PNG: _png(perturbed_u8),
        THUMBS_WEBP: thumbs([image, Image.fromarray(overlay_u8), Image.fromarray(perturbed_u8)]),
        RESULT_JSON: result_json(result),
    }
    if area_masks is not None:
        files[MASKS_NPY] = _npy(area_masks)
    return files
