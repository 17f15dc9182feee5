"""What every method shares: the prepared batch, the model's scores, the optimisation loop.

Batch independence is the invariant every method keeps: each image's loss depends only on
its own mask, the optimisers update each element on their own, and any randomness is
drawn once per iteration and shared by the whole batch, so an image's mask is the same
alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from explainctl.contracts import ExplainParams

# Progress is reported (and early stop decided) every this many iterations; these are
# the only points where the loop may wait for the device.
CHECKPOINT_EVERY = 10


@dataclass
class Problem:
    """A batch ready to explain: N images of shape (C, H, W) on the model's device."""

    model: nn.Module
    images: torch.Tensor  # (N, C, H, W) pixel space [0, 1]
    x: torch.Tensor  # (N, C, H, W) normalised, what the model reads
    targets: torch.Tensor  # (N,) int64, top-1 placeholders resolved
    prob_before: torch.Tensor  # (N,) softmax of the target on the clean image
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel space to model input, for (..., C, H, W)."""
        return normalise(pixels, self.mean, self.std)


@dataclass
class MethodResult:
    """What a method hands back to the engine, still on the device."""

    masks: torch.Tensor  # (N, 1, h, w) the stored mask: 1 = kept, 0 = deleted
    masks_full: torch.Tensor  # (N, 1, H, W) the mask as the model saw it
    prob_after: torch.Tensor  # (N,) target probability with the masked region perturbed
    iterations: torch.Tensor  # (N,)
    substrate: torch.Tensor  # (N, C, H, W) pixel space: what a fully deleted pixel becomes
    levels: torch.Tensor | None = None  # (N, L, C, H, W) pixel space blur pyramid
    area_masks: torch.Tensor | None = None  # (N, A, h, w) one stored mask per area


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean_t) / std_t


def target_probability(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(f(x))_c for each image: x (N, C, H, W), targets (N,) -> (N,)."""
    logits = model(x)
    return logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


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
    return Problem(model, images, x, targets, prob_before, tuple(mean), tuple(std))


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift the whole batch by one random (dy, dx) in [-J, J]^2, edges replicated.

    x (N, C, H, W) -> (N, C, H, W). The shift is drawn on x's device and applied by
    index_select, so no value travels to the host; one shift for the batch keeps images
    independent of their neighbours.
    """
    shift = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator, device=x.device)
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) - shift[0]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device) - shift[1]).clamp(0, w - 1)
    return x.index_select(2, rows).index_select(3, cols)


def perturb(x: torch.Tensor, params, generator: torch.Generator) -> torch.Tensor:
    """The per-iteration randomness every method shares: a jitter of up to `params.jitter`
    px, then noise N(0, noise_std^2) drawn once as (1, C, H, W) and broadcast, so each image
    sees what it would see alone. x (N, C, H, W) -> (N, C, H, W)."""
    if params.jitter:
        x = jitter(x, params.jitter, generator)
    if params.noise_std > 0:
        noise = torch.randn((1, *x.shape[1:]), generator=generator, device=x.device)
        x = x + params.noise_std * noise
    return x


def optimise(
    parameter: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_at: Callable[[int], torch.Tensor],
    params: ExplainParams,
    progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """Minimise the per-row loss `loss_at(step)` -> (B,) over `parameter` (B, ...).

    Sums the rows' losses (each row's gradient stays its own), clamps the parameter to
    [0, 1] after every step, and with params.early_stop freezes a row once its best loss
    has improved by no more than early_stop_tol over a window. Returns the iterations
    each row ran, (B,).
    """
    rows = parameter.shape[0]
    device = parameter.device
    view = (-1,) + (1,) * (parameter.dim() - 1)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    iterations = torch.full((rows,), params.iterations, dtype=torch.long, device=device)
    frozen = torch.empty_like(parameter)
    best = torch.full((rows,), float("inf"), device=device)
    best_at_window_start = best.clone()

    for step in range(params.iterations):
        with torch.enable_grad():
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            parameter.clamp_(0, 1)
            if params.early_stop:
                parameter.copy_(torch.where(active.view(view), parameter, frozen))
                best = torch.minimum(best, loss.detach())

        done = step + 1
        if params.early_stop and done % params.early_stop_window == 0:
            with torch.no_grad():
                improved = best_at_window_start - best > params.early_stop_tol
                stopping = active & ~improved
                frozen = torch.where(stopping.view(view), parameter.detach(), frozen)
                iterations = torch.where(stopping, torch.full_like(iterations, done), iterations)
                active = active & improved
                best_at_window_start = best.clone()
            if not bool(active.any()):
                if progress:
                    progress(params.iterations)
                break
        if progress and (done % CHECKPOINT_EVERY == 0 or done == params.iterations):
            progress(done)
    return iterations
