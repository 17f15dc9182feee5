"""The Python API's torch side (explainctl_worker.notebook), called as a notebook does:
through `explainctl.load_model/explain/Attribution/explain_func`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import explainctl
from explainctl.spec.errors import InvalidInput
from explainctl.spec.results import SCORE_FIELDS
from tests.support import cli
from tests.support.models import HALF, evidence_image, tiny_classifier

TINY_SPEC = "tests.support.models:tiny_classifier"
SMALL = {"image_size": 32, "mask_size": 8, "iterations": 5}
NAMES = [f"class {n}" for n in range(10)]


@pytest.fixture(scope="module")
def model():
    return explainctl.load_model(TINY_SPEC, labels=NAMES, device="cpu")


def test_explain_takes_every_kind_of_image_and_a_bad_one_fails_alone(model, tmp_path):
    path = tmp_path / "evidence.png"
    Image.fromarray(evidence_image()).save(path)
    images = [
        str(path),
        Image.fromarray(evidence_image()),
        evidence_image(),  # (H, W, 3) uint8
        evidence_image()[:40].astype(np.float32) / 255,  # (40, 64, 3) float in [0, 1]
        np.zeros((4, 4, 7), dtype=np.uint8),  # not an image: fails alone
        torch.rand(3, 24, 48),  # (3, H, W) in [0, 1]
        str(tmp_path / "missing.png"),
    ]
    result = explainctl.explain(model, images, **SMALL)

    assert result.masks.shape == (7, 8, 8) and result.masks.dtype == np.float32
    assert [f.index for f in result.failed] == [4, 6]
    assert [f.error_code for f in result.failed] == ["unsupported-format", "not-found"]
    assert np.isnan(result.masks[[4, 6]]).all() and np.isfinite(result.masks[[0, 1, 2, 3, 5]]).all()
    sizes = [None if s is None else s.shape for s in result.saliency]
    assert sizes == [(64, 64), (64, 64), (64, 64), (40, 64), None, (24, 48), None]
    # The same pixels, from a file, a PIL image or an array, give the same mask.
    assert np.array_equal(result.masks[0], result.masks[1])
    assert np.array_equal(result.masks[0], result.masks[2])
    # The saliency is 1 - mask: high where the mask deleted.
    assert np.allclose(result.saliency[0].mean(), 1 - result.masks[0].mean(), atol=0.05)
    for prediction, outcome in zip(result.predictions, result.results, strict=True):
        assert (prediction is None) == (outcome is None)
        if prediction is not None:
            assert prediction.name == NAMES[prediction.index] and 0 < prediction.prob <= 1


def test_the_table_holds_every_result_field_and_the_predictions(model):
    normalised = np.full((8, 8, 3), -1.5, dtype=np.float32)  # not pixels: fails alone
    result = explainctl.explain(model, [evidence_image(), normalised], target=3, **SMALL)
    table = result.to_pandas()
    assert list(table["state"]) == ["done", "failed"]
    assert set(SCORE_FIELDS) <= set(table.columns)
    assert table.loc[0, "target_index"] == 3 and table.loc[0, "target_name"] == "class 3"
    assert table.loc[0, "top1_name"] == NAMES[table.loc[0, "top1_index"]]
    assert table.loc[1, "error_code"] == "unsupported-format"
    assert "[0, 1]" in table.loc[1, "error"]


def test_same_image_seed_and_parameters_give_the_cli_mask_and_files(model, tmp_path):
    paths = []
    for n in range(2):
        pixels = np.random.default_rng(n).integers(0, 256, (40 + 8 * n, 48, 3), dtype=np.uint8)
        paths.append(tmp_path / f"photo{n}.png")
        Image.fromarray(pixels).save(paths[-1])
    flags = ["--image-size", "32", "--mask-size", "8", "--iterations", "5", "--seed", "7"]
    done = cli.run("explain", *map(str, paths), "--out", str(tmp_path / "cli"),
                   "--model", TINY_SPEC, "--device", "cpu", *flags)  # fmt: skip
    assert done.returncode == 0, done.stderr

    result = explainctl.explain(TINY_SPEC, [str(p) for p in paths], device="cpu", seed=7, **SMALL)
    assert result.save(tmp_path / "api") == [str(tmp_path / "api" / f"photo{n}") for n in (0, 1)]
    for n in range(2):
        ours, theirs = tmp_path / "api" / f"photo{n}", tmp_path / "cli" / f"photo{n}"
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
        mask = np.load(theirs / "mask.npy")
        assert np.array_equal(np.load(ours / "mask.npy"), mask)
        assert np.array_equal(result.masks[n], mask)
        mine, cli_result = (json.loads((d / "result.json").read_text()) for d in (ours, theirs))
        for varying in ("seconds", "versions"):
            mine.pop(varying), cli_result.pop(varying)
        assert mine == cli_result


def test_a_bare_module_needs_its_normalisation_and_is_given_back_as_it_was():
    module = tiny_classifier().train()
    with pytest.raises(InvalidInput, match="mean= and std="):
        explainctl.explain(module, [evidence_image()], **SMALL)
    result = explainctl.explain(module, [evidence_image()], mean=HALF, std=HALF, **SMALL)
    assert result.results[0].model.endswith("TinyClassifier>")
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert all(p.grad is None for p in module.parameters())


def test_attribute_is_captum_shaped_on_the_inputs_device():
    inputs = torch.rand(2, 3, 32, 32)
    attribution = explainctl.Attribution(tiny_classifier(), mask_size=8, iterations=5)
    scores = attribution.attribute(inputs, target=torch.tensor([1, 4]))
    assert scores.shape == (2, 1, 32, 32) and scores.device == inputs.device
    assert scores.dtype == torch.float32 and scores.min() >= 0 and scores.max() <= 1
    with pytest.raises(InvalidInput, match=r"\(N, 3, H, W\)"):
        attribution.attribute(torch.rand(3, 32, 32))
    with pytest.raises(InvalidInput, match="1 targets given for 2 images"):
        attribution.attribute(inputs, target=[1])


def test_quantus_scores_the_masks_with_a_faithfulness_and_a_robustness_metric():
    import quantus

    torch.manual_seed(0)
    model = tiny_classifier().eval()
    x = torch.rand(2, 3, 16, 16).numpy()
    y = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    kwargs = {"mask_size": 4, "iterations": 3}
    a = explainctl.explain_func(model, x, y, **kwargs)
    assert a.shape == (2, 1, 16, 16) and a.dtype == np.float32

    data = {"model": model, "x_batch": x, "y_batch": y, "a_batch": None, "device": "cpu"}
    explainer = {"explain_func": explainctl.explain_func, "explain_func_kwargs": kwargs}
    quiet = {"disable_warnings": True, "display_progressbar": False}
    faithful = quantus.FaithfulnessCorrelation(
        nr_runs=3, subset_size=16, return_aggregate=False, **quiet
    )(**data, **explainer)
    robust = quantus.MaxSensitivity(nr_samples=2, **quiet)(**data, **explainer)
    assert len(faithful) == 2 and np.isfinite(faithful).all()
    assert len(robust) == 2 and np.isfinite(robust).all()
