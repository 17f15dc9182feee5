import io
import json

import numpy as np
import pytest
from PIL import Image

from explainctl.spec.contracts import ARTIFACT_FILES, ITEM_SCALE_FLOOR, THUMB_SIDE, heatmap_top
from explainctl.spec.methods import ExplainParams
from explainctl.spec.results import ItemResult
from explainctl_worker.artifact import (
    colormap,
    render,
    thumbs,
    upsample_mask,
)


def _result() -> ItemResult:
    return ItemResult(
        source="/tmp/x.png",
        item="x",
        model="m",
        target_index=3,
        target_name=None,
        prob_before=0.9,
        prob_after=0.1,
        mask_area=0.25,
        iterations=5,
        seconds=0.5,
        image_width=40,
        image_height=20,
        params=ExplainParams(method="original"),
        versions={"torch": "x"},
    )


def test_colormap_runs_from_blue_to_red():
    colours = colormap(np.array([[0.0, 1.0]]))
    low, high = colours[0, 0], colours[0, 1]
    assert colours.dtype == np.uint8 and colours.shape == (1, 2, 3)
    assert low[2] > low[0] and high[0] > high[2]


def test_upsample_mask_to_original_size():
    mask = np.zeros((4, 4), np.float32)
    mask[:, 2:] = 1
    up = upsample_mask(mask, width=40, height=20)
    assert up.shape == (20, 40)
    assert up[:, :15].max() < 0.01 and up[:, 25:].min() > 0.99


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_render_writes_every_artifact_at_original_resolution():
    original = np.zeros((20, 40, 3), np.uint8)
    original[..., 0] = 200
    mask = np.ones((4, 4), np.float32)
    mask[:, :2] = 0  # left half deleted
    substrate = np.zeros((3, 8, 8), np.float32)
    substrate[2] = 1.0  # pure blue substrate
    files = render(Image.fromarray(original), mask, substrate, _result(), "nearest")
    assert sorted(files) == sorted(ARTIFACT_FILES)
    assert np.load(io.BytesIO(files["mask.npy"])).dtype == np.float32
    assert np.array_equal(np.load(io.BytesIO(files["mask.npy"])), mask)
    for name in ("mask.png", "heatmap.png", "overlay.png", "perturbed.png"):
        assert _decode(files[name]).shape[:2] == (20, 40), name
    perturbed = _decode(files["perturbed.png"])
    assert perturbed[10, 35].tolist() == [200, 0, 0]  # kept: the original
    assert perturbed[10, 2].tolist() == [0, 0, 255]  # deleted: the substrate
    heat = _decode(files["heatmap.png"])
    assert heat[10, 2, 0] > heat[10, 2, 2]  # deleted = salient = red
    # The gallery's thumbnails: original, overlay, perturbed side by side, in one WebP.
    with Image.open(io.BytesIO(files["thumbs.webp"])) as strip:
        assert strip.format == "WEBP" and strip.size == (3 * 40, 20)  # small: not enlarged
        parts = np.asarray(strip.convert("RGB"), dtype=int).reshape(20, 3, 40, 3)
    overlay = _decode(files["overlay.png"])
    for part, full in enumerate((original, overlay, perturbed)):
        assert np.abs(parts[:, part] - full).mean() < 8, part  # lossy, but the same picture
    assert json.loads(files["result.json"])["target_index"] == 3
    assert ItemResult.model_validate_json(files["result.json"]).mask_area == pytest.approx(0.25)


def test_the_thumbnails_fit_the_gallerys_side_whatever_the_image():
    image = Image.fromarray(np.zeros((300, 640, 3), np.uint8))
    with Image.open(io.BytesIO(thumbs([image, image, image]))) as strip:
        assert strip.size == (3 * THUMB_SIDE, 56)  # 640x300 fitted into 120: 120x56


def _heat(mask: np.ndarray, scale: str) -> tuple[float, np.ndarray, np.ndarray]:
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    top = heatmap_top(mask, scale)
    files = render(image, mask, np.zeros((3, 16, 16)), _result(), top=top)
    decode = lambda name: np.asarray(Image.open(io.BytesIO(files[name])), dtype=np.int16)  # noqa: E731
    return top, decode("heatmap.png"), decode("overlay.png")


def test_item_scale_shows_a_mild_deletion_everywhere_and_absolute_hides_it():
    mild = np.full((4, 4), 0.6)  # 40 % of the blur, everywhere
    mild[0, 0] = 0.55
    top, heat, _ = _heat(mild, "item")
    assert top == pytest.approx(0.45)
    assert heat[..., 0].mean() > 200  # red to yellow over the whole image: it did act
    top, heat, _ = _heat(mild, "absolute")
    assert top == 1.0 and heat[..., 0].mean() < 100  # the same mask, drawn against 1


def test_item_scale_never_stretches_a_weak_deletion_into_a_strong_one():
    weak = np.ones((4, 4))
    weak[1:3, 1:3] = 0.95
    top, heat, overlay = _heat(weak, "item")
    assert top == ITEM_SCALE_FLOOR
    assert heat[..., 0].max() == 0  # no red anywhere: 0.05 of 0.25 stays blue
    # What the mask left alone is the photo itself in the overlay.
    assert (overlay[0, 0] == 128).all()
