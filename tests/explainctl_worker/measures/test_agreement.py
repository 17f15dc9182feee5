"""The client's numpy mask agreement (`explainctl compare`) and the worker's torch stability
are one definition: both must give the same numbers on the same masks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainctl.pages import agreement
from explainctl_worker.measures import diagnostics


def _masks(rng: np.random.Generator, kind: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    if kind == "ties":  # few distinct values: many pixels tied at the threshold
        a, b = np.round(a * 3) / 3, np.round(b * 4) / 4
    elif kind == "related":
        b = 0.7 * a + 0.3 * b
    elif kind == "binary":
        a, b = (a > 0.8).astype(np.float32), (b > 0.5).astype(np.float32)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("kind", ["uniform", "ties", "related", "binary"])
def test_numpy_agreement_matches_the_workers_stability_on_random_masks(kind):
    rng = np.random.default_rng(["uniform", "ties", "related", "binary"].index(kind))
    ious, ranks = [], []
    for size in [2, 3, 4, 7, 8, 9, 11, 16, 21, 28, 32, *rng.integers(2, 40, 20).tolist()]:
        a, b = _masks(rng, kind, int(size))
        torch_iou, torch_rank = diagnostics.stability(
            torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
        )
        iou, rank = agreement.mask_agreement(a, b)
        assert iou == pytest.approx(torch_iou.item(), abs=1e-6), (kind, size)
        if math.isnan(torch_rank.item()):
            assert rank is None, (kind, size)
        else:
            assert rank == pytest.approx(torch_rank.item(), abs=1e-6), (kind, size)
        ious.append(iou)
        ranks.append(rank)
    # The masks were not all alike: the comparison covered a spread of values.
    assert max(ious) - min(ious) > 0.1
    if kind == "related":
        assert min(r for r in ranks if r is not None) > 0.5


def test_a_constant_mask_has_no_rank_correlation_on_either_side():
    a = np.full((8, 8), 0.5, dtype=np.float32)
    b = np.random.default_rng(0).random((8, 8), dtype=np.float32)
    _, torch_rank = diagnostics.stability(torch.from_numpy(a)[None, None],
                                          torch.from_numpy(b)[None, None])  # fmt: skip
    assert math.isnan(torch_rank.item())
    assert agreement.mask_agreement(a, b)[1] is None
    # Every pixel ties at the threshold, so all are in: the IoU is |top of b| / all.
    saliency_a, saliency_b = 1 - torch.from_numpy(a)[None], 1 - torch.from_numpy(b)[None]
    expected = diagnostics.top_iou(saliency_a, saliency_b).item()
    assert agreement.mask_agreement(a, b)[0] == pytest.approx(expected)


def test_masks_of_different_sizes_are_resized_as_the_worker_upsamples():
    rng = np.random.default_rng(3)
    for small, large in [(4, 8), (28, 32), (7, 28), (5, 6)]:
        mask = rng.random((small, small), dtype=np.float32)
        expected = F.interpolate(torch.from_numpy(mask)[None, None], size=(large, large),
                                 mode="bilinear", align_corners=False)[0, 0].numpy()  # fmt: skip
        up, same = agreement.common_grid(mask, np.zeros((large, large), dtype=np.float32))
        assert up.shape == same.shape == (large, large)
        assert np.abs(up - expected).max() < 1e-5
        # A mask and its upsampled copy agree completely, whichever side is the small one.
        iou, rank = agreement.mask_agreement(expected, mask)
        assert iou == pytest.approx(1.0) and rank == pytest.approx(1.0)
