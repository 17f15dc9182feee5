"""Faithfulness of a saliency map: RISE deletion and insertion (Petsiuk et al. 2018).

Pixels are ranked by saliency, most salient first. Equal saliencies (a mask saturated at
1 over a region, a Grad-CAM map clipped at 0) are ordered by a fixed pseudo-random
permutation of the pixels, the same for every image and batch: the map says nothing about
their order, and raster order would delete flat regions top to bottom, a coherent
deletion that the zero substrate punishes and a random one it rewards (`ties="raster"`
gives that order for comparison). With P = H * W pixels and K
steps, step k replaces the first n_k = round(k * P / K) ranked pixels, all channels of a
pixel together, for k = 0..K, both ends included:

    deletion       x -> substrate  (zeros in normalised space, or the blurred image)
    insertion      blur(x) -> x

The curve is the target's softmax probability at each step, and the score its area on
[0, 1] (x-axis n_k / P) by the trapezoid rule: lower is better for deletion, higher for
insertion. The blur is a Gaussian with k = 11, sigma = 5, as in RISE. Deleting towards
zeros rewards scattered saliency (isolated grey pixels push the image out of
distribution fast), so the blurred substrate is reported beside it.

Every function takes normalised model inputs (N, C, H, W) and keeps its work on their
device: all (N * (K + 1)) images of the curves go through the model in slices of at most
`max_batch`, with no value read back to the host until the caller asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from explainctl_worker.methods.substrate import gaussian_blur

RISE_BLUR_KERNEL = 11
RISE_BLUR_SIGMA = 5.0

Ties = Literal["random", "raster"]


@dataclass
class Faithfulness:
    """Scores for N images, on their device; curves are (N, K + 1)."""

    deletion_auc: torch.Tensor  # (N,) towards zeros in normalised space
    deletion_auc_blur: torch.Tensor  # (N,) towards the blurred image
    insertion_auc: torch.Tensor  # (N,) from the blurred image
    prob_keep: torch.Tensor  # (N,) only the salient region kept, the rest blurred
    fractions: torch.Tensor  # (K + 1,) fraction of pixels replaced at each step
    deletion: torch.Tensor  # (N, K + 1)
    deletion_blur: torch.Tensor  # (N, K + 1)
    insertion: torch.Tensor  # (N, K + 1)


# Seed of the permutation that orders equal saliencies: fixed, so scores are reproducible.
TIE_SEED = 0


def tie_order(pixels: int, ties: Ties = "random", device=None) -> torch.Tensor:
    """The order in which equal saliencies are taken: (P,) pixel indices."""
    if ties == "raster":
        return torch.arange(pixels, device=device)
    generator = torch.Generator().manual_seed(TIE_SEED)
    return torch.randperm(pixels, generator=generator).to(device)


def pixel_ranks(saliency: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of every pixel, 0 = most salient: (N, [1,] H, W) -> (N, H * W) int64.

    Equal saliencies are ranked in the order of `order` (P,) (default: raster order):
    pixels are laid out in that order, then sorted stably by descending saliency.
    """
    flat = saliency.reshape(saliency.shape[0], -1)
    pixels = flat.shape[1]
    if order is None:
        order = torch.arange(pixels, device=flat.device)
    within = torch.sort(flat[:, order], dim=1, descending=True, stable=True).indices
    ranked = order[within]  # (N, P) pixel indices, most salient first
    ranks = torch.empty_like(ranked)
    positions = torch.arange(pixels, device=flat.device).expand_as(ranked)
    return ranks.scatter_(1, ranked, positions)


def step_counts(pixels: int, steps: int, device=None) -> torch.Tensor:
    """n_k = round(k * P / K) pixels replaced at step k = 0..K: (K + 1,) int64."""
    k = torch.arange(steps + 1, device=device, dtype=torch.long)
    return (k * pixels + steps // 2) // steps


def area_under_curve(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid rule: curve (N, K + 1) over x = fractions (K + 1,) in [0, 1] -> (N,)."""
    return torch.trapezoid(curve, fractions.to(curve.dtype), dim=-1)


def _probabilities(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(x).softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def replacement_curves(
    model: nn.Module,
    starts: torch.Tensor,
    ends: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    targets: torch.Tensor,
    max_batch: int = 64,
) -> torch.Tensor:
    """Target probability as ranked pixels move from `starts` to `ends`.

    starts, ends: (S, N, C, H, W), S curves of N images; ranks (N, H * W) from
    `pixel_ranks`; counts (K + 1,) from `step_counts`; targets (N,). At step k the pixels
    of rank < counts[k] come from `ends`, the others from `starts`. Returns (S, N, K + 1).
    """
    curves, n, c, h, w = starts.shape
    k1 = counts.shape[0]
    total = curves * n * k1
    device = starts.device
    out = torch.empty(total, device=device, dtype=starts.dtype)
    for first in range(0, total, max_batch):
        row = torch.arange(first, min(first + max_batch, total), device=device)
        curve, image, step = row // (n * k1), (row // k1) % n, row % k1
        replaced = (ranks[image] < counts[step].view(-1, 1)).view(-1, 1, h, w)
        batch = torch.where(replaced, ends[curve, image], starts[curve, image])
        out[first : first + row.shape[0]] = _probabilities(model, batch, targets[image])
    return out.view(curves, n, k1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    targets: torch.Tensor,
    steps: int | None = None,
    max_batch: int = 64,
    ties: Ties = "random",
) -> Faithfulness:
    """Deletion (both substrates), insertion and keep-only scores of saliency maps.

    x (N, C, H, W) normalised; saliency (N, 1, H, W), higher = more important (for a
    mask m, 1 - up(m)); targets (N,); steps K (default: the image's height, so each step
    moves one row's worth of pixels); ties: how equal saliencies are ordered (see the
    module's docstring). prob_keep reads saliency as a soft mask in [0, 1]:
    s * x + (1 - s) * blur(x).
    """
    model.eval()
    n, _, h, w = x.shape
    steps = steps or h
    blurred = gaussian_blur(x, RISE_BLUR_KERNEL, RISE_BLUR_SIGMA)
    ranks = pixel_ranks(saliency, tie_order(h * w, ties, device=x.device))
    counts = step_counts(h * w, steps, device=x.device)
    starts = torch.stack([x, x, blurred])
    ends = torch.stack([torch.zeros_like(x), blurred, x])
    curves = replacement_curves(model, starts, ends, ranks, counts, targets, max_batch)
    fractions = counts.to(x.dtype) / (h * w)
    aucs = area_under_curve(curves, fractions)

    keep = saliency.reshape(n, 1, h, w).clamp(0, 1)
    kept = keep * x + (1 - keep) * blurred
    prob_keep = torch.cat(
        [
            _probabilities(model, kept[i : i + max_batch], targets[i : i + max_batch])
            for i in range(0, n, max_batch)
        ]
    )
    return Faithfulness(
        deletion_auc=aucs[0],
        deletion_auc_blur=aucs[1],
        insertion_auc=aucs[2],
        prob_keep=prob_keep,
        fractions=fractions,
        deletion=curves[0],
        deletion_blur=curves[1],
        insertion=curves[2],
    )
