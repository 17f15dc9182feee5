"""Batched meaningful-perturbation optimisation (Fong & Vedaldi 2017, as the seed runs it).

For each image x (C, H, W) with target class c, find a low-resolution mask m in [0, 1]:

    min_m  l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m + eps))_c
    x_m = up(m) * x + (1 - up(m)) * s(x),    eps ~ N(0, noise_std^2) drawn every iteration

where s(x) is the blurred substrate and f the frozen classifier (normalised input).
N images share one forward/backward per iteration. Each image's loss depends only on
its own mask and Adam updates each element on its own, so an image's mask is the same
alone or in any batch: the noise is drawn once per iteration with shape (1, C, H, W)
from a generator seeded with `params.seed` and broadcast, so every image sees the noise
it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from explainctl.contracts import ExplainParams
from explainctl_worker.mask import blend, l1_term, mask_area, tv_term, upsample
from explainctl_worker.substrate import make_substrate

# Progress is reported (and early stop decided) every this many iterations; these are
# the only points where the loop may wait for the device.
CHECKPOINT_EVERY = 10


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


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def target_probability(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax(f(x))_c for each image: x (N, C, H, W), targets (N,) -> (N,)."""
    logits = model(x)
    return logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


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
    """Optimise one mask per image.

    images: (N, C, H, W) in pixel space [0, 1], on the model's device.
    targets: (N,) class indices, -1 for an image's top-1 class; None for top-1 everywhere.
    progress: called with the number of iterations done, at checkpoints.
    """
    # In training mode BatchNorm would use batch statistics and couple the images.
    model.eval()
    device = images.device
    n = images.shape[0]
    size = tuple(images.shape[-2:])
    x = _normalise(images, mean, std)
    substrate = make_substrate(images, params)
    s = _normalise(substrate, mean, std)
    idx = torch.arange(n, device=device)

    with torch.no_grad():
        logits = model(x)
        top1 = logits.argmax(dim=1)
        if targets is None:
            targets = top1
        targets = targets.to(device=device, dtype=torch.long)
        targets = torch.where(targets < 0, top1, targets)
        prob_before = logits.softmax(dim=1)[idx, targets]

    m = torch.ones(n, 1, params.mask_size, params.mask_size, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([m], lr=params.lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)

    active = torch.ones(n, dtype=torch.bool, device=device)
    iterations = torch.full((n,), params.iterations, dtype=torch.long, device=device)
    frozen = torch.empty_like(m)
    best = torch.full((n,), float("inf"), device=device)
    best_at_window_start = best.clone()

    for step in range(params.iterations):
        with torch.enable_grad():
            x_m = blend(x, s, upsample(m, size, params.upsample))
            if params.noise_std > 0:
                noise = torch.randn((1, *x.shape[1:]), generator=generator, device=device)
                x_m = x_m + params.noise_std * noise
            p = target_probability(model, x_m, targets)
            loss = params.l1_coeff * l1_term(m) + params.tv_coeff * tv_term(m, params.tv_beta) + p
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            m.clamp_(0, 1)
            if params.early_stop:
                m.copy_(torch.where(active.view(-1, 1, 1, 1), m, frozen))
                best = torch.minimum(best, loss.detach())

        done = step + 1
        if params.early_stop and done % params.early_stop_window == 0:
            with torch.no_grad():
                improved = best_at_window_start - best > params.early_stop_tol
                stopping = active & ~improved
                frozen = torch.where(stopping.view(-1, 1, 1, 1), m.detach(), frozen)
                iterations = torch.where(stopping, torch.full_like(iterations, done), iterations)
                active = active & improved
                best_at_window_start = best.clone()
            if not bool(active.any()):
                if progress:
                    progress(params.iterations)
                break
        if progress and (done % CHECKPOINT_EVERY == 0 or done == params.iterations):
            progress(done)

    with torch.no_grad():
        final = m.detach().clamp(0, 1)
        x_final = blend(x, s, upsample(final, size, params.upsample))
        prob_after = target_probability(model, x_final, targets)

    return Explanation(
        masks=final.float().cpu(),
        targets=targets.cpu(),
        prob_before=prob_before.float().cpu(),
        prob_after=prob_after.float().cpu(),
        mask_area=mask_area(final).float().cpu(),
        iterations=iterations.cpu(),
        substrate=substrate.float().cpu(),
    )
