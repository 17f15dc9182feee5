"""Explanations of a batch of images: `explain_batch`, the slot engine run over a tensor.

params.method picks the optimisation (methods/decisive.py, the default; original.py,
paper.py, extremal.py); the slot engine (slot.py) runs it with every image in a slot of
its own, so each image gets the mask it would get alone, and hands back every declared
score of each (Explanation.scores, by the names of explainctl.spec.results). With params.metrics
the engine also scores each mask's faithfulness (faithfulness.py: RISE deletion and
insertion) in a few batched passes.

Masks everywhere follow one convention: m = 1 keeps a pixel, m = 0 deletes it, and the
saliency shown and ranked is 1 - m.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from explainctl.spec.contracts import IMAGENET_MEAN, IMAGENET_STD
from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.slots import Entry, Explanation, run_slots


def explain_batch(
    model: nn.Module,
    images: torch.Tensor,
    params: ExplainParams,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    targets: torch.Tensor | None = None,
    slots: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Explanation:
    """Optimise one mask per image with params.method; results in the order of `images`.

    images: (N, C, H, W) in pixel space [0, 1], on the model's device.
    targets: (N,) class indices, -1 for an image's top-1 class; None for top-1 everywhere.
    slots: images in flight at once (default N: all of them).
    progress: called with the item-iterations done since its last call, at checkpoints.
    """
    n = images.shape[0]
    wanted = [-1] * n if targets is None else [int(t) for t in targets]
    entries = (Entry(i, images[i], wanted[i]) for i in range(n))
    done = dict(
        run_slots(
            model,
            entries,
            params,
            slots=slots or n,
            mean=mean,
            std=std,
            device=images.device,
            progress=progress,
        )
    )
    return Explanation.stack([done[i] for i in range(n)])
