import pytest
import torch
from torch import nn

from explainctl_worker.measures.faithfulness import (
    area_under_curve,
    evaluate,
    pixel_ranks,
    replacement_curves,
    step_counts,
    tie_order,
)
from tests.support.models import (
    DISTRACTOR_BOX,
    EVIDENCE_BOX,
    SIZE,
    evidence_detector,
    evidence_image,
)


class KeptFraction(nn.Module):
    """p(class 0) = the fraction of pixels with |x| > 0.5 in every channel.

    On a +-1 image that is the fraction of original pixels still there: zeros and a blur
    of +-1 noise (|blur| << 0.5) both count as removed, so every curve is linear in the
    fraction replaced, whatever the order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = (x.abs() > 0.5).all(dim=1).flatten(1).float().mean(dim=1)
        eps = 1e-6
        return torch.stack([torch.log(kept + eps), torch.log(1 - kept + eps)], dim=1)


def _noise_images(n: int, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 2, (n, 1, size, size), generator=generator).float().mul(2).sub(1)


def test_step_counts_include_both_ends_and_round():
    counts = step_counts(4096, 64)
    assert counts.shape == (65,)
    assert counts[0] == 0 and counts[-1] == 4096
    assert torch.all(counts[1:] - counts[:-1] == 64)
    uneven = step_counts(10, 4)
    assert uneven.tolist() == [0, 3, 5, 8, 10]  # round(k * 10 / 4), halves up


def test_trapezoid_on_known_curves():
    x = torch.linspace(0, 1, 5)
    curves = torch.stack([1 - x, torch.ones(5), torch.tensor([1.0, 0, 0, 0, 0])])
    assert area_under_curve(curves, x).tolist() == pytest.approx([0.5, 1.0, 0.125])
    # Unequal steps are weighted by their width.
    assert area_under_curve(
        torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0, 0.9, 1.0])
    ).item() == (pytest.approx(0.95))


def test_ranks_put_the_most_salient_first():
    saliency = torch.tensor([[[0.2, 0.9], [0.5, 0.1]]])
    assert pixel_ranks(saliency).tolist() == [[2, 0, 1, 3]]


def test_ties_follow_the_given_order():
    flat = torch.tensor([[[0.9, 0.9], [0.1, 0.9]]])
    assert pixel_ranks(flat).tolist() == [[0, 1, 3, 2]]  # raster order by default
    order = torch.tensor([3, 2, 1, 0])
    assert pixel_ranks(flat, order).tolist() == [[2, 1, 3, 0]]


def test_random_tie_order_is_a_fixed_permutation():
    first, again = tie_order(100), tie_order(100)
    assert torch.equal(first, again)
    assert sorted(first.tolist()) == list(range(100))
    assert not torch.equal(first, torch.arange(100))
    assert torch.equal(tie_order(100, "raster"), torch.arange(100))


def test_linear_model_gives_half_for_every_curve_and_any_order():
    x = _noise_images(2)
    saliency = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    scores = evaluate(KeptFraction(), x, saliency, torch.zeros(2, dtype=torch.long), steps=16)
    assert scores.deletion_auc.tolist() == pytest.approx([0.5, 0.5], abs=1e-4)
    assert scores.deletion_auc_blur.tolist() == pytest.approx([0.5, 0.5], abs=1e-3)
    assert scores.insertion_auc.tolist() == pytest.approx([0.5, 0.5], abs=1e-3)
    # Both ends are recorded: the clean image first, the fully replaced one last.
    assert scores.deletion.shape == (2, 17)
    assert scores.deletion[:, 0].tolist() == pytest.approx([1, 1], abs=1e-4)
    assert scores.deletion[:, -1].tolist() == pytest.approx([0, 0], abs=1e-4)
    assert scores.insertion[:, 0].tolist() == pytest.approx([0, 0], abs=1e-4)
    assert scores.fractions[0] == 0 and scores.fractions[-1] == 1


def test_curves_replace_pixels_in_rank_order():
    start = torch.ones(1, 1, 1, 2, 2)
    end = torch.full((1, 1, 1, 2, 2), -1.0)
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.extend(x.flatten(1).tolist())
            return torch.zeros(x.shape[0], 2)

    ranks = pixel_ranks(torch.tensor([[[0.1, 0.9], [0.5, 0.0]]]))
    replacement_curves(Record(), start, end, ranks, step_counts(4, 4), torch.zeros(1).long())
    assert seen == [
        [1, 1, 1, 1],
        [1, -1, 1, 1],
        [1, -1, -1, 1],
        [-1, -1, -1, 1],
        [-1, -1, -1, -1],
    ]


def _evidence() -> torch.Tensor:
    pixels = torch.from_numpy(evidence_image()).permute(2, 0, 1).float().div(255)[None]
    return (pixels - 0.5) / 0.5


def _box_map(box) -> torch.Tensor:
    top, bottom, left, right = box
    saliency = torch.zeros(1, 1, SIZE, SIZE)
    saliency[..., top:bottom, left:right] = 1.0
    return saliency


def test_the_evidence_map_beats_the_distractor_map():
    model, x, target = evidence_detector(), _evidence(), torch.zeros(1, dtype=torch.long)
    good = evaluate(model, x, _box_map(EVIDENCE_BOX), target, steps=32)
    bad = evaluate(model, x, _box_map(DISTRACTOR_BOX), target, steps=32)
    assert good.deletion_auc < 0.2 < 0.5 < bad.deletion_auc
    assert good.deletion_auc_blur < bad.deletion_auc_blur
    assert good.insertion_auc > bad.insertion_auc
    assert good.prob_keep > 0.9 > 0.1 > bad.prob_keep


def test_scores_do_not_depend_on_batch_or_slice_size():
    model = evidence_detector()
    x = torch.cat([_evidence(), _evidence().flip(-1), _evidence() * 0.5])
    saliency = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([0, 1, 0])
    whole = evaluate(model, x, saliency, targets, steps=16, max_batch=1000)
    sliced = evaluate(model, x, saliency, targets, steps=16, max_batch=7)
    alone = evaluate(model, x[1:2], saliency[1:2], targets[1:2], steps=16, max_batch=5)
    assert torch.allclose(whole.deletion, sliced.deletion, atol=1e-6)
    assert torch.allclose(whole.insertion[1], alone.insertion[0], atol=1e-6)
    assert torch.allclose(whole.prob_keep[1], alone.prob_keep[0], atol=1e-6)
