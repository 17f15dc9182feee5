"""What every method shares: the prepared items, the model's scores, the runner contract.

A method is a `Runner`: `start` turns newly admitted items into rows of the parameter
(one per item, or one per item and area), `loss` gives each row's loss, `finish` turns
finished rows into stored masks. Whatever else sets a method apart (its optimiser, stop
rule, passes per row, which mask its artifacts draw) is an attribute of its Runner: the
engine never tests a method's name or variant. The slot engine (slot.py) owns the loop,
the optimiser and the randomness, so a row's loss may depend only on its own parameter,
its own precomputed tensors and its own step count: an item's mask is then the same
alone, in a full batch, or entering a slot that another item just left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from explainctl.spec.methods import ExplainParams

# Progress is reported, convergence decided and slots refilled every this many
# iterations of an item; these are the only points where the loop waits for the device.
# Every 10 cost the decisive default 6 steps per item, 14 % of its ~42 (benchmarks/README.md).
CHECKPOINT_EVERY = 5


@dataclass
class Problem:
    """N items ready to explain: images of shape (C, H, W) on the model's device."""

    model: nn.Module
    images: torch.Tensor  # (N, C, H, W) pixel space [0, 1]
    x: torch.Tensor  # (N, C, H, W) normalised, what the model reads
    targets: torch.Tensor  # (N,) int64, top-1 placeholders resolved
    prob_before: torch.Tensor  # (N,) softmax of the target on the clean image
    top1_before: torch.Tensor  # (N,) int64, the model's class for the clean image
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space to model input, for (..., C, H, W)."""
        return normalise(pixels, self.mean, self.std)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model input back to pixel space, for (..., C, H, W)."""
        shape = (-1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean

    def select(self, index: torch.Tensor) -> Problem:
        """The items at `index` (n,), in that order."""
        return replace(self, **{f: getattr(self, f).index_select(0, index) for f in _PER_ITEM})

    def extend(self, other: Problem) -> Problem:
        """These items followed by `other`'s."""
        return replace(
            self, **{f: torch.cat([getattr(self, f), getattr(other, f)]) for f in _PER_ITEM}
        )


_PER_ITEM = ("images", "x", "targets", "prob_before", "top1_before")


@dataclass
class MethodResult:
    """What a method hands back to the engine, still on the device."""

    masks: torch.Tensor  # (N, 1, h, w) the stored mask: 1 = kept, 0 = deleted
    masks_full: torch.Tensor  # (N, 1, H, W) the mask as the model saw it
    perturbed: torch.Tensor  # (N, C, H, W) normalised: x_m, the final mask's perturbation
    substrate: torch.Tensor  # (N, C, H, W) pixel space: what a fully deleted pixel becomes
    levels: torch.Tensor | None = None  # (N, L, C, H, W) pixel space blur pyramid
    area_masks: torch.Tensor | None = None  # (N, A, h, w) one stored mask per area


# Randomness for a batch of rows: x (k * R, C, H, W) -> (D * k * R, C, H, W), each row
# noised and jittered with its own item's draws (slot.ItemRandom); k blocks of R rows share
# them, and D = params.jitter_draws copies follow one another, each with its own shifts
# (D = 1 for every method but decisive).
Perturb = Callable[[torch.Tensor], torch.Tensor]
# What a loss hands back: each row's loss (R,), and for a hinge-shaped class term whether
# every row's class sat under its bar this step ((R,) bool; the Decision stop rule reads
# it), or None.
Loss = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Rows:
    """What a method keeps per row of its parameter: tensors whose first dimension is the
    row (R = items * rows_per_item), selected and concatenated with the parameter."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def select(self, index: torch.Tensor) -> Rows:
        return Rows({k: v.index_select(0, index) for k, v in self.tensors.items()})

    def extend(self, other: Rows) -> Rows:
        if not self.tensors:
            return other
        return Rows({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def extend_with(self, **tensors: torch.Tensor) -> Rows:
        """These rows with more tensors of the same rows."""
        return Rows({**self.tensors, **tensors})


# The optimisers a Runner may ask for (engine/optim.py implements them): Adam, Adam with
# one second moment per row, SGD with momentum.
Kind = Literal["adam", "adam-row", "sgd"]


@dataclass(frozen=True)
class Runner:
    """One explanation method, as the slot engine drives it.

    start(problem, params) -> (p0 (R, ...) the initial parameter, rows): R = n * rows_per_item
        for the problem's n items, item-major.
    loss(model, p, rows, steps, params, perturb) -> Loss: each row's loss (R,) at its own
        step count steps (R,); the engine minimises it (the sum over rows) with
        `optimizer`, its learning rate times `lr_scale`, clamping p to [0, 1] after every
        step.
    finish(problem, p, rows, params) -> MethodResult for the problem's items.
    """

    start: Callable[[Problem, ExplainParams], tuple[torch.Tensor, Rows]]
    loss: Callable[..., torch.Tensor]
    finish: Callable[[Problem, torch.Tensor, Rows, ExplainParams], MethodResult]
    optimizer: Kind = "adam"
    rows_per_item: Callable[[ExplainParams], int] = lambda params: 1
    # Each row's learning-rate factor from its step count and the step count at which its
    # class first sat under its bar (inf: not yet), (R,) twice -> (R,); None: constant.
    lr_scale: Callable[[torch.Tensor, torch.Tensor, ExplainParams], torch.Tensor | None] = (
        lambda steps, held_at, params: None
    )
    # The stop rule (convergence.py): "drift" (block averages against their flicker) or
    # "decision" (the hinge held and the deleted region stopped moving).
    stop: Literal["drift", "decision"] = "drift"
    # Perturbed copies of each row the loss scores per step, one model input each (extremal's
    # dual variant: the region preserved and deleted); slot.choose_slots counts them.
    passes_per_row: Callable[[ExplainParams], int] = lambda params: 1
    # Whether the heatmap and overlay draw masks_full, the mask at the model's resolution
    # as the model saw it, rather than the stored mask upsampled: for a method whose full
    # mask is more than an upsampling of the stored one (paper blurs it).
    full_resolution_mask: bool = False


def jitter_draws(params: ExplainParams) -> int:
    """Jittered copies of each row per step: params.jitter_draws where the method reads it."""
    return params.jitter_draws or 1 if params.jitter else 1


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean_t) / std_t


def target_probability(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(f(x))_c for each image: x (N, C, H, W), targets (N,) -> (N,)."""
    logits = model(x)
    return logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def target_log_odds(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log(p_c / (1 - p_c)) = f(x)_c - logsumexp over j != c of f(x)_j: (N, C, H, W), (N,) ->
    (N,). Unlike p_c or log p_c, its gradient does not vanish where the model is sure."""
    logits = model(x)
    own = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, targets.view(-1, 1), float("-inf")).logsumexp(dim=1)
    return own - others


def target_logit(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """f(x)_c, the class score before the softmax: (N, C, H, W), (N,) -> (N,)."""
    return model(x).gather(1, targets.view(-1, 1)).squeeze(1)


def prepare(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    targets: torch.Tensor | None,
) -> Problem:
    """Normalise the batch and resolve targets (-1 or None: the image's top-1 class)."""
    # In training mode BatchNorm would use batch statistics and couple the images.
    model.eval()
    device = images.device
    x = normalise(images, mean, std)
    idx = torch.arange(images.shape[0], device=device)
    with torch.no_grad():
        logits = model(x)
        top1 = logits.argmax(dim=1)
        if targets is None:
            targets = top1
        targets = targets.to(device=device, dtype=torch.long)
        targets = torch.where(targets < 0, top1, targets)
        prob_before = logits.softmax(dim=1)[idx, targets]
    return Problem(model, images, x, targets, prob_before, top1, tuple(mean), tuple(std))
