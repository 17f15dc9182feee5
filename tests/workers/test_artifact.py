import io
import json

import numpy as np
import pytest
from PIL import Image

from explainctl.contracts import ARTIFACT_FILES
from explainctl.item import ItemResult
from explainctl.methods import ExplainParams
from explainctl_worker.artifact import colormap, render, upsample_mask


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
        params=ExplainParams(),
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
    assert json.loads(files["result.json"])["target_index"] == 3
    assert ItemResult.model_validate_json(files["result.json"]).mask_area == pytest.approx(0.25)
