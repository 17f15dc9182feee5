"""Batched explanations: one entry point, `explain_batch`, for every method.

params.method picks the optimisation (methods/seed.py, paper.py, extremal.py); each
explains N images in one batch, one forward/backward per iteration, and gives every image
the mask it would get alone. With params.metrics the engine then scores each mask's
faithfulness (faithfulness.py: RISE deletion and insertion) in a few batched passes.

Masks everywhere follow one convention: m = 1 keeps a pixel, m = 0 deletes it, and the
saliency shown and ranked is 1 - m.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from explainctl.contracts import ExplainParams
from explainctl_worker import faithfulness
from explainctl_worker.mask import mask_area
from explainctl_worker.methods import RUNNERS
from explainctl_worker.methods.common import (
    CHECKPOINT_EVERY,  # noqa: F401 - part of this module's interface
    normalise,
    prepare,
    target_probability,
)

__all__ = ["CHECKPOINT_EVERY", "Explanation", "explain_batch", "target_probability"]


@dataclass
class Explanation:
    """Results for a batch of N images, on the CPU."""

    masks: torch.Tensor  # (N, 1, h, w) float32 in [0, 1]
    targets: torch.Tensor  # (N,) int64
    prob_before: torch.Tensor  # (N,) softmax of the target on the clean image
    prob_after: torch.Tensor  # (N,) on the image perturbed by the final mask, no noise
    mask_area: torch.Tensor  # (N,) mean(1 - m)
    iterations: torch.Tensor  # (N,) iterations each mask was optimised for
    substrate: torch.Tensor  # (N, C, H, W) pixel-space substrate, for rendering
    method: str = "seed"
    # (N, L, C, H, W) pixel-space blur pyramid, for methods whose perturbation varies
    # the blur with the mask (paper, extremal); None for the seed's single substrate.
    levels: torch.Tensor | None = None
    # (N, 1, H, W) the mask as the model saw it, at its input resolution; 1 - masks_full
    # is the saliency the metrics rank.
    masks_full: torch.Tensor | None = None
    # (N, A, h, w) one mask per area (extremal with several areas); masks is the first.
    area_masks: torch.Tensor | None = None
    # Faithfulness scores (N,), when params.metrics.
    deletion_auc: torch.Tensor | None = None
    deletion_auc_blur: torch.Tensor | None = None
    insertion_auc: torch.Tensor | None = None
    prob_keep: torch.Tensor | None = None


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return normalise(x, mean, std)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().float().cpu()


def explain_batch(
    model: nn.Module,
    images: torch.Tensor,
    params: ExplainParams,
    *,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    targets: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Explanation:
    """Optimise one mask per image with params.method.

    images: (N, C, H, W) in pixel space [0, 1], on the model's device.
    targets: (N,) class indices, -1 for an image's top-1 class; None for top-1 everywhere.
    progress: called with the number of iterations done, at checkpoints.
    """
    problem = prepare(model, images, mean, std, targets)
    result = RUNNERS[params.method](problem, params, progress)

    scores = None
    if params.metrics:
        scores = faithfulness.evaluate(
            model,
            problem.x,
            1 - result.masks_full.detach(),
            problem.targets,
            steps=params.metric_steps,
            max_batch=params.metric_batch,
        )

    final = result.masks.detach()
    return Explanation(
        masks=final.float().cpu(),
        targets=problem.targets.cpu(),
        prob_before=problem.prob_before.float().cpu(),
        prob_after=result.prob_after.float().cpu(),
        mask_area=mask_area(final).float().cpu(),
        iterations=result.iterations.cpu(),
        substrate=result.substrate.float().cpu(),
        method=params.method,
        levels=_cpu(result.levels),
        masks_full=_cpu(result.masks_full),
        area_masks=_cpu(result.area_masks),
        deletion_auc=_cpu(scores.deletion_auc) if scores else None,
        deletion_auc_blur=_cpu(scores.deletion_auc_blur) if scores else None,
        insertion_auc=_cpu(scores.insertion_auc) if scores else None,
        prob_keep=_cpu(scores.prob_keep) if scores else None,
    )
