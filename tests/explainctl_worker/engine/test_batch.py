# Exactness here is checked in fp32: bf16 kernels (precision "auto" on a CPU with bf16
# instructions) change with the batch size, and the optimisation amplifies that.

import torch
import torch.nn.functional as F

from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.batch import explain_batch
from explainctl_worker.methods.common import CHECKPOINT_EVERY
from tests.support.models import (
    DISTRACTOR_BOX,
    EVIDENCE_BOX,
    HALF,
    SIZE,
    evidence_batch,
    evidence_detector,
    tiny_classifier,
)


def _deleted(mask_up: torch.Tensor, box) -> float:
    top, bottom, left, right = box
    return float((1 - mask_up[top:bottom, left:right]).mean())


def test_mask_deletes_the_evidence_and_keeps_the_distractor():
    params = ExplainParams(
        precision="fp32", method="original", iterations=150, mask_size=16, image_size=SIZE
    )
    result = explain_batch(evidence_detector(), evidence_batch(), params, mean=HALF, std=HALF)
    assert result.scores["target_index"].tolist() == [0]
    assert result.scores["prob_before"][0] > 0.99
    assert result.scores["prob_after"][0] < 0.1
    mask_up = F.interpolate(result.masks, size=(SIZE, SIZE), mode="bilinear")[0, 0]
    assert _deleted(mask_up, EVIDENCE_BOX) > 0.8
    assert _deleted(mask_up, DISTRACTOR_BOX) < 0.1
    assert 0.05 < result.scores["mask_area"][0] < 0.6


def _random_images(n: int, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, size, size, generator=generator)


SMALL = ExplainParams(
    precision="fp32", method="original", iterations=25, mask_size=8, image_size=32
)


def test_an_image_gets_the_same_mask_alone_and_in_a_batch():
    model = tiny_classifier()
    images = _random_images(4)
    batch = explain_batch(model, images, SMALL)
    alone = explain_batch(model, images[2:3], SMALL)
    assert torch.allclose(batch.masks[2], alone.masks[0], atol=1e-5)
    assert torch.allclose(batch.scores["prob_after"][2], alone.scores["prob_after"][0], atol=1e-5)
    assert batch.masks.shape == (4, 1, 8, 8)
    assert batch.substrate.shape == (4, 3, 32, 32)


def test_same_seed_same_mask_and_other_seed_other_mask():
    model = tiny_classifier()
    images = _random_images(2)
    first = explain_batch(model, images, SMALL)
    again = explain_batch(model, images, SMALL)
    other = explain_batch(model, images, SMALL.model_copy(update={"seed": 1}))
    assert torch.equal(first.masks, again.masks)
    assert not torch.allclose(first.masks, other.masks)


def test_masks_stay_in_unit_interval_and_model_gets_no_gradients():
    model = tiny_classifier()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    result = explain_batch(model, _random_images(3), SMALL)
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert all(parameter.grad is None for parameter in model.parameters())
    assert result.scores["iterations"].tolist() == [25, 25, 25]


def test_explicit_targets_and_top1_placeholder():
    model = tiny_classifier()
    images = _random_images(2)
    with torch.no_grad():
        top1 = model((images - 0.485) / 0.229).argmax(dim=1)
    other = (top1[0] + 1) % 10
    result = explain_batch(model, images, SMALL, targets=torch.tensor([int(other), -1]))
    assert result.scores["target_index"].tolist() == [int(other), int(top1[1])]


def test_early_stop_stops_and_reports_fewer_iterations():
    params = ExplainParams(
        precision="fp32",
        method="original",
        iterations=200,
        mask_size=8,
        image_size=32,
        early_stop=True,
        early_stop_window=10,
        early_stop_tol=0.5,  # no block average moves that much
    )
    done = []
    result = explain_batch(tiny_classifier(), _random_images(2), params, progress=done.append)
    # The first block only sets the baseline; the second is compared with it.
    assert result.scores["iterations"].tolist() == [20, 20]
    assert result.scores["stop_reason"] == ["converged", "converged"]
    assert sum(done) == 2 * 200  # progress completes even when stopping early


def test_progress_reports_item_iterations_at_checkpoints():
    done = []
    result = explain_batch(tiny_classifier(), _random_images(2), SMALL, progress=done.append)
    # Two items, a checkpoint every 5 iterations: 5 + 5 + 5 + 5 + 5 iterations each.
    assert done == [2 * CHECKPOINT_EVERY] * (SMALL.iterations // CHECKPOINT_EVERY)
    assert result.scores["stop_reason"] == ["budget", "budget"]
