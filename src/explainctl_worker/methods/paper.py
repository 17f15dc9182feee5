"""Meaningful perturbation as the 2017 paper defines it (Fong & Vedaldi, ICCV 2017).

For each image x (C, H, W) with target class c, find m in [0, 1]^(h x w) (1 = keep):

    min_m  lambda_1 * sum|1 - m| + lambda_2 * sum_u (d_x m(u)^2 + d_y m(u)^2)^(beta/2)
           + softmax(f(jitter(Phi(x; M))))_c,    M = blur(nearest_up(m))

Phi(x; M)(u) blurs pixel u with sigma = sigma_0 * (1 - M(u)): a pyramid of L blurred
copies sigma_0 > ... > sigma_{L-1} = 0 is computed once, and each pixel interpolates
between the two levels that bracket its mask value (differentiable in M). jitter shifts
the perturbed image by up to `params.jitter` px each iteration (from the item's own
generator, seeded with params.seed). lambda_1 = l1_coeff, lambda_2 = tv_coeff,
beta = tv_beta, sigma_0 = blur_sigma, L = blur_levels.
"""

from __future__ import annotations

import torch

from explainctl.spec.methods import ExplainParams
from explainctl_worker.methods.common import (
    Loss,
    MethodResult,
    Perturb,
    Problem,
    Rows,
    Runner,
    target_probability,
)
from explainctl_worker.methods.mask import l1_sum, tv_iso_sum, upsample
from explainctl_worker.methods.substrate import blur_pyramid, gaussian_blur, pyramid_blend

# The upsampled mask is blurred with a radius-5 kernel, as in the paper's code: it removes
# the blocks of the nearest-neighbour upsampling without a tunable parameter.
MASK_BLUR_KERNEL = 11
MASK_BLUR_SIGMA = 5.0


def full_mask(m: torch.Tensor, size: tuple[int, int], params: ExplainParams) -> torch.Tensor:
    """M = blur(up(m)): (N, 1, h, w) -> (N, 1, H, W) in [0, 1]."""
    return gaussian_blur(upsample(m, size, params.upsample), MASK_BLUR_KERNEL, MASK_BLUR_SIGMA)


def start(problem: Problem, params: ExplainParams) -> tuple[torch.Tensor, Rows]:
    """m0 = 1, (N, 1, s, s) for s = mask_size; per row the pyramid (N, L, C, H, W) in pixel
    space (for rendering) and normalised (what the model reads)."""
    levels = blur_pyramid(problem.images, params.blur_sigma, params.blur_levels)
    n = problem.x.shape[0]
    m0 = torch.ones(n, 1, params.mask_size, params.mask_size, device=problem.x.device)
    rows = Rows(
        {"levels": levels, "levels_x": problem.normalise(levels), "targets": problem.targets}
    )
    return m0, rows


def loss(model, m, rows: Rows, steps, params: ExplainParams, perturb: Perturb) -> Loss:
    """lambda_1 sum|1 - m| + lambda_2 TV_beta(m) + softmax(f(jitter(Phi(x; M))))_c, (R,)."""
    levels_x = rows["levels_x"]
    x_m = perturb(pyramid_blend(levels_x, full_mask(m, tuple(levels_x.shape[-2:]), params)))
    p = target_probability(model, x_m, rows["targets"])
    return params.l1_coeff * l1_sum(m) + params.tv_coeff * tv_iso_sum(m, params.tv_beta) + p, None


def finish(problem: Problem, m, rows: Rows, params: ExplainParams) -> MethodResult:
    """Masks (N, 1, s, s); masks_full (N, 1, H, W) is blur(up(m)), what the model saw."""
    final = m.detach().clamp(0, 1)
    full = full_mask(final, problem.size, params)
    return MethodResult(
        masks=final,
        masks_full=full,
        perturbed=pyramid_blend(rows["levels_x"], full),
        substrate=rows["levels"][:, 0],
        levels=rows["levels"],
    )


# The model saw blur(up(m)), not up(m): the artifacts draw that (Runner.full_resolution_mask).
RUNNER = Runner(start=start, loss=loss, finish=finish, optimizer="adam", full_resolution_mask=True)
