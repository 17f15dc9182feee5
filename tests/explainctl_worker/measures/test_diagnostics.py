"""Diagnostics of an explanation: the pure measures, then the known-evidence model (a
mask confined to the evidence is compact, a uniform mild blur is not, two seeds agree)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from explainctl.spec.contracts import ModelSpec
from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.explain import measures_stability
from explainctl_worker.local_files import explain_paths
from explainctl_worker.measures import diagnostics
from explainctl_worker.methods.substrate import blur_pyramid, pyramid_blend
from explainctl_worker.model import LoadedModel
from tests.support.models import (
    EVIDENCE_BOX,
    HALF,
    SIZE,
    evidence_batch,
    evidence_detector,
    evidence_image,
)


def _box_saliency(box, size: int = 40) -> torch.Tensor:
    s = torch.zeros(1, 1, size, size)
    top, bottom, left, right = box
    s[..., top:bottom, left:right] = 1.0
    return s


def test_compactness_is_one_when_all_saliency_is_in_a_tenth_and_a_tenth_when_uniform():
    confined = _box_saliency((0, 4, 0, 40))  # 160 of 1,600 pixels
    uniform = torch.full((1, 1, 40, 40), 0.3)
    nothing = torch.zeros(1, 1, 40, 40)
    values = diagnostics.compactness(torch.cat([confined, uniform, nothing]))
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(0.1)
    assert math.isnan(values[2])  # nothing deleted: undefined, never a flattering 1


def test_regions_counts_four_connected_deleted_areas():
    masks = torch.ones(4, 1, 8, 8)
    masks[1, :, 1:3, 1:3] = 0  # one blob
    masks[2, :, 1:3, 1:3] = 0
    masks[2, :, 5:7, 1:7] = 0.2  # and a second, apart
    masks[3, :, 0, 0] = masks[3, :, 1, 1] = 0  # touching only at a corner: two
    masks[3, :, 4:8, 4] = masks[3, :, 7, 4:8] = 0  # an L: one
    assert diagnostics.count_regions(masks).tolist() == [0, 1, 2, 3]


def test_rank_correlation_and_iou_of_identical_reversed_and_disjoint_maps():
    a = torch.arange(100.0).view(1, 1, 10, 10)
    assert diagnostics.rank_correlation(a, a).item() == pytest.approx(1.0)
    assert diagnostics.rank_correlation(a, -a).item() == pytest.approx(-1.0)
    assert diagnostics.top_iou(a, a).item() == pytest.approx(1.0)
    assert diagnostics.top_iou(a, a.flip(-1).flip(-2)).item() == 0.0


def test_rank_correlation_gives_ties_their_average_rank():
    # Spearman with average ranks: x = (1, 2, 2, 3) ranks (0, 1.5, 1.5, 3).
    x = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rx = np.array([0, 1.5, 1.5, 3]) - 1.5
    ry = np.array([0, 1, 2, 3]) - 1.5
    expected = (rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum())
    assert diagnostics.rank_correlation(x, y).item() == pytest.approx(expected, abs=1e-6)


def _diagnose(model, images, masks_full, levels):
    """Diagnostics of a given full-resolution mask under the paper's pyramid."""
    x = (images - 0.5) / 0.5
    perturbed = pyramid_blend(levels, masks_full)
    with torch.no_grad():
        before = model(x).softmax(1)
        after = model((perturbed - 0.5) / 0.5).softmax(1)
    return diagnostics.evaluate(
        images, perturbed, masks_full, masks_full,
        before[:, 0], after[:, 0], before.argmax(1), after.argmax(1),
    )  # fmt: skip


def test_a_mask_on_the_evidence_is_compact_and_a_uniform_mild_blur_is_not():
    model, images = evidence_detector(), evidence_batch()
    levels = blur_pyramid(images, 10.0, 8)
    on_evidence = 1 - _box_saliency(EVIDENCE_BOX, SIZE)  # the evidence box fully blurred
    mild = torch.full((1, 1, SIZE, SIZE), 0.75)  # a quarter of the blur, everywhere
    strong, weak = (_diagnose(model, images, m, levels) for m in (on_evidence, mild))
    assert strong.prob_ratio.item() < 0.1 and strong.class_changed.item()
    # The box is 1/8 of the image: its most salient tenth holds 0.1 / 0.125 of the total.
    assert strong.compactness.item() == pytest.approx(0.8, abs=0.01) and strong.regions.item() == 1
    assert weak.compactness.item() == pytest.approx(0.1, abs=1e-3)
    assert weak.regions.item() == 0  # nothing is deleted past half
    # Both delete evidence and both have a mask area of about 1/8 to 1/4; what sets the
    # uniform blur apart is that it changes the whole image.
    assert weak.perturbation.item() > strong.perturbation.item()


def test_the_original_methods_mask_on_known_evidence_is_decisive_and_one_region():
    params = ExplainParams(method="original", iterations=150, mask_size=16, image_size=SIZE)
    result = explain_batch(evidence_detector(), evidence_batch(), params, mean=HALF, std=HALF)
    assert result.scores["prob_ratio"][0] < 0.1 and bool(result.scores["class_changed"][0])
    assert int(result.scores["regions"][0]) == 1
    # Twice uniform (0.1), and no more: its deletion spills well past the box (issue 13).
    assert 0.2 < result.scores["compactness"][0] < 0.5


def _evidence_file(tmp_path):
    path = tmp_path / "evidence.png"
    Image.fromarray(evidence_image()).save(path)
    return str(path)


def _loaded() -> LoadedModel:
    spec = ModelSpec(name="tests.support.models:evidence_detector", mean=HALF, std=HALF)
    return LoadedModel(evidence_detector(), spec, torch.device("cpu"), None)


def test_two_seeds_on_a_well_posed_problem_agree(tmp_path):
    params = ExplainParams(
        method="original", iterations=100, mask_size=16, image_size=SIZE, stability=True
    )
    (outcome,) = explain_paths([_evidence_file(tmp_path)], str(tmp_path / "out"), _loaded(),
                               params)  # fmt: skip
    assert outcome.ok, outcome.error
    stored = json.loads((tmp_path / "out" / "evidence" / "result.json").read_text())
    assert stored["stability_iou"] > 0.6 and stored["stability_rank"] > 0.8
    assert stored["stability_iou"] == outcome.result.stability_iou


def test_stability_sample_chooses_items_by_name_and_skips_methods_without_randomness():
    names = [f"{i:06d}-photo" for i in range(2000)]
    half = ExplainParams(method="original", stability_sample=0.5)
    chosen = [n for n in names if measures_stability(half, n)]
    assert 800 < len(chosen) < 1200
    assert chosen == [n for n in names if measures_stability(half, n)]  # the same each time
    assert not any(measures_stability(ExplainParams(method="original"), n) for n in names)
    extremal = ExplainParams(method="extremal", stability=True)
    assert not measures_stability(extremal, names[0])  # it would repeat itself exactly
