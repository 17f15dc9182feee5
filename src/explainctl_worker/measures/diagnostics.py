"""How far to trust one explanation: did its mask remove the evidence, how strongly, how
concentrated, and how stable under another draw of the noise.

Every function works on a batch, on the batch's device. Notation: x the image (N, C, H, W)
in pixel space [0, 1], x_m = Phi(x; M) the image as the final mask M (N, 1, H, W) perturbs
it (no noise, no jitter), s = 1 - M the saliency, c the target class.

    decisiveness   prob_ratio = p_c(x_m) / p_c(x);  class_changed = argmax f(x_m) != argmax f(x)
    strength       perturbation = mean |x_m - x| over pixels and channels, in [0, 1]: a mild
                   blur everywhere and a strong blur in one place have equal mask areas and
                   very different strengths, so both are reported
    compactness    share of sum(s) held by the most salient TOP_SHARE of the pixels: 1 when
                   all deletion sits in a tenth of the image, TOP_SHARE when it is uniform
    regions        connected regions (4-neighbourhood) of the deleted area {m < 1/2} on the
                   stored low-resolution mask
    stability      for two masks of one image under two noise seeds: IoU of their most
                   salient TOP_SHARE (pixels at or above each map's quantile) and Spearman's
                   rank correlation of their saliencies (ties take their average rank);
                   the benchmarks add the IoU of the two deleted regions {m < 1/2}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from explainctl.spec.trust import TOP_SHARE

# A saliency total below this (per pixel) means nothing was deleted: compactness is
# undefined there and reported as NaN (None in result.json), not as a flattering number.
EMPTY_SALIENCY = 1e-6
# A pixel of the stored mask below this is part of a deleted region.
DELETED_BELOW = 0.5


@dataclass
class Diagnostics:
    """Per item (N,), on the device."""

    prob_ratio: torch.Tensor
    class_changed: torch.Tensor  # bool
    perturbation: torch.Tensor
    compactness: torch.Tensor  # NaN where nothing was deleted
    regions: torch.Tensor  # int64


def decisiveness(
    prob_before: torch.Tensor,
    prob_after: torch.Tensor,
    top1_before: torch.Tensor,
    top1_after: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prob_ratio, class_changed), each (N,)."""
    return prob_after / prob_before.clamp_min(1e-12), top1_after != top1_before


def perturbation_strength(images: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """mean |x_m - x|: (N, C, H, W) pixel space, twice -> (N,)."""
    return (perturbed - images).abs().flatten(1).mean(dim=1)


def compactness(saliency: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """Share of the total saliency inside the most salient `share` of the pixels.

    saliency (N, 1, H, W) >= 0 -> (N,) in [share, 1], NaN where the saliency is ~0.
    """
    flat = saliency.flatten(1).clamp_min(0)
    k = max(1, round(share * flat.shape[1]))
    total = flat.sum(dim=1)
    top = flat.topk(k, dim=1).values.sum(dim=1)
    empty = total <= EMPTY_SALIENCY * flat.shape[1]
    return torch.where(empty, torch.full_like(total, float("nan")), top / total.clamp_min(1e-12))


def count_regions(masks: torch.Tensor, below: float = DELETED_BELOW) -> torch.Tensor:
    """Connected regions of {m < below}: masks (N, 1, h, w) -> (N,) int64.

    Label propagation on the device: every deleted pixel starts with its own label and
    takes the largest label among its 4 neighbours until nothing changes; each region
    then holds exactly one pixel whose label is its own index.
    """
    deleted = masks[:, 0] < below  # (N, h, w)
    n, h, w = deleted.shape
    ids = torch.arange(1, h * w + 1, device=masks.device).view(1, h, w).expand(n, h, w)
    labels = torch.where(deleted, ids, torch.zeros_like(ids))
    for _ in range(h * w):
        padded = torch.nn.functional.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack(
            [
                labels,
                padded[:, :-2, 1:-1],
                padded[:, 2:, 1:-1],
                padded[:, 1:-1, :-2],
                padded[:, 1:-1, 2:],
            ]
        ).amax(dim=0)
        grown = torch.where(deleted, neighbours, labels)
        if torch.equal(grown, labels):
            break
        labels = grown
    return ((labels == ids) & deleted).flatten(1).sum(dim=1)


def evaluate(
    images: torch.Tensor,
    perturbed: torch.Tensor,
    masks: torch.Tensor,
    masks_full: torch.Tensor,
    prob_before: torch.Tensor,
    prob_after: torch.Tensor,
    top1_before: torch.Tensor,
    top1_after: torch.Tensor,
) -> Diagnostics:
    """Every single-mask diagnostic of N items (stability needs two masks: `stability`).

    images, perturbed (N, C, H, W) pixel space; masks (N, 1, h, w) stored; masks_full
    (N, 1, H, W) as the model saw it; the rest (N,).
    """
    ratio, changed = decisiveness(prob_before, prob_after, top1_before, top1_after)
    return Diagnostics(
        prob_ratio=ratio,
        class_changed=changed,
        perturbation=perturbation_strength(images, perturbed),
        compactness=compactness(1 - masks_full),
        regions=count_regions(masks),
    )


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of every value within its row, 0-based, ties sharing their mean rank: (N, P)."""
    n, p = values.shape
    ordered, order = values.sort(dim=1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1 + torch.arange(n, device=values.device).view(-1, 1) * p
    position = torch.arange(p, device=values.device, dtype=values.dtype).expand(n, p)
    first = torch.full((n * p,), float(p), device=values.device, dtype=values.dtype)
    last = torch.full((n * p,), -1.0, device=values.device, dtype=values.dtype)
    first.scatter_reduce_(0, group.flatten(), position.flatten(), "amin")
    last.scatter_reduce_(0, group.flatten(), position.flatten(), "amax")
    mean_rank = ((first + last) / 2)[group]
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of two maps per row: (N, ...) twice -> (N,); NaN for a constant map."""
    ra, rb = _average_ranks(a.flatten(1).double()), _average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    denominator = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    rho = (ra * rb).sum(dim=1) / denominator
    return torch.where(denominator > 0, rho, torch.full_like(rho, float("nan"))).float()


def top_iou(a: torch.Tensor, b: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """IoU of the most salient `share` of two maps: (N, ...) twice -> (N,).

    Each map's set is every pixel at or above its (1 - share) quantile, so pixels tied at
    the threshold are all in or all out, whatever their order.
    """
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    top_a = fa >= fa.quantile(1 - share, dim=1, keepdim=True)
    top_b = fb >= fb.quantile(1 - share, dim=1, keepdim=True)
    union = (top_a | top_b).sum(dim=1)
    return (top_a & top_b).sum(dim=1) / union.clamp_min(1)


def deleted_iou(a: torch.Tensor, b: torch.Tensor, below: float = DELETED_BELOW) -> torch.Tensor:
    """IoU of the deleted regions {m < below} of two masks per item: (N, ...) twice -> (N,);
    1 where neither deletes anything (they agree)."""
    da, db = a.flatten(1) < below, b.flatten(1) < below
    union = (da | db).sum(dim=1)
    inter = (da & db).sum(dim=1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=a.dtype))


def stability(masks_full: torch.Tensor, twins_full: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(IoU of the top tenth, rank correlation) of the saliencies of two masks per item,
    (N, 1, H, W) twice -> two (N,)."""
    a, b = 1 - masks_full, 1 - twins_full
    return top_iou(a, b), rank_correlation(a, b)
