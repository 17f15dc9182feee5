"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), written from the paper.

For each image x with target class c and each area a in params.areas, find the smooth
mask p (1 = the region that matters) of area a with the most effect on the class score
f_c (the logit):

    preserve:  max_p  f_c(Phi(x; p))
    delete:    max_p  -f_c(Phi(x; 1 - p))
    dual:      max_p  f_c(Phi(x; p)) - f_c(Phi(x; 1 - p))

each minus lambda_t * R_a(p), with R_a(p) = mean((vecsort(p) - r_a)^2) pulling the
sorted mask towards (1 - a)HW zeros then aHW ones, and lambda_t = area_coeff *
area_growth^t growing over the iterations t so the area constraint tightens as the
score settles. Phi is the blur pyramid of the 2017 paper (blur_levels levels, sigma up to
blur_sigma): Phi(x; p) keeps x where p = 1 and blurs it most where p = 0.

p is parametrised by a coarse grid pbar (mask_size^2 values, one per ~7 px) in [0, 1]:
p = up(smax_T g * pbar) (mask.smooth_max_pool, g a Gaussian of 3 cells), optimised by SGD
with momentum. Each (image, area) pair is a row of its own, with its own step count t.

Stored masks follow the project's convention, m = 1 kept, 0 deleted, with m = 1 - p:
saliency 1 - m is the preserved region p, the heatmap shows it, and perturbed.png and
prob_after show the image with p blurred away. With several areas, the primary mask is the
first area listed (a caller's order of preference); all are in `area_masks`.
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
    target_logit,
)
from explainctl_worker.methods.mask import area_penalty, smooth_max_pool, upsample
from explainctl_worker.methods.substrate import blur_pyramid, pyramid_blend

# Width of the smooth-max kernel g in grid cells, 21 px at 224 as in the reference
# setting: no feature of the mask is narrower than this Gaussian. One cell (7 px) was
# tried and let the optimisation preserve thin strips along edges on real photos.
SMOOTH_SIGMA = 3.0
# Temperature of the smooth max over values in [0, 1]: low enough that a lone parameter
# at 1 gives a mask of ~1, not diluted by the zeros around it.
SMAX_TEMPERATURE = 0.05
# Parameters start half-way, so every pixel can move either way from the first step.
INITIAL_VALUE = 0.5


def preserved_region(
    pbar: torch.Tensor, size: tuple[int, int], params: ExplainParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """p on the grid (B, 1, g, g) and at the model's resolution (B, 1, H, W)."""
    grid = smooth_max_pool(pbar, SMOOTH_SIGMA, SMAX_TEMPERATURE)
    # Interpolation stays within [0, 1]; a clamp here would stop gradients at the bounds.
    return grid, upsample(grid, size, params.upsample)


def rows_per_item(params: ExplainParams) -> int:
    """One row per (item, area): A independent problems sharing the forward passes."""
    return len(params.areas)


def sides(params: ExplainParams) -> tuple[bool, bool]:
    """(preserve, delete): which perturbations of each row the variant scores."""
    return params.variant in ("preserve", "dual"), params.variant in ("delete", "dual")


def passes_per_row(params: ExplainParams) -> int:
    """Model inputs per row and step: one per side the variant scores (dual: two)."""
    return sum(sides(params))


def start(problem: Problem, params: ExplainParams) -> tuple[torch.Tensor, Rows]:
    """pbar0 = 1/2 everywhere, (N * A, 1, g, g) for g = mask_size and A areas, item-major;
    per row the pyramid (pixel space and normalised), the target and the area."""
    count = rows_per_item(params)
    n = problem.x.shape[0]
    levels = blur_pyramid(problem.images, params.blur_sigma, params.blur_levels)
    areas = torch.tensor(params.areas, dtype=problem.x.dtype, device=problem.x.device)
    g = params.mask_size
    pbar0 = torch.full((n * count, 1, g, g), INITIAL_VALUE, device=problem.x.device)
    rows = Rows(
        {
            "levels": levels.repeat_interleave(count, dim=0),
            "levels_x": problem.normalise(levels).repeat_interleave(count, dim=0),
            "targets": problem.targets.repeat_interleave(count),
            "areas": areas.repeat(n),
        }
    )
    return pbar0, rows


def loss(model, pbar, rows: Rows, steps, params: ExplainParams, perturb: Perturb) -> Loss:
    """-reward(p) + area_coeff * area_growth^t * R_a(p) per row, t its step count, (R,)."""
    levels_x, targets = rows["levels_x"], rows["targets"]
    _, p = preserved_region(pbar, tuple(levels_x.shape[-2:]), params)
    preserve, delete = sides(params)
    inputs = []
    if preserve:
        inputs.append(pyramid_blend(levels_x, p))
    if delete:
        inputs.append(pyramid_blend(levels_x, 1 - p))
    scores = target_logit(model, perturb(torch.cat(inputs)), targets.repeat(len(inputs)))
    scores = scores.view(len(inputs), -1)
    reward = scores[0] if preserve else -scores[0]
    if preserve and delete:
        reward = reward - scores[1]
    weight = params.area_coeff * params.area_growth ** steps.to(pbar.dtype)
    return -reward + weight * area_penalty(p, rows["areas"]), None


def finish(problem: Problem, pbar, rows: Rows, params: ExplainParams) -> MethodResult:
    """Masks (N, 1, g, g) for the first area, area_masks (N, A, g, g) when A > 1; all
    stored as m = 1 - p."""
    count = rows_per_item(params)
    n, g, size = problem.x.shape[0], params.mask_size, problem.size
    grid, p = preserved_region(pbar.detach(), size, params)
    stored = (1 - grid).view(n, count, g, g)
    full = (1 - p).view(n, count, 1, *size)[:, 0]
    levels = rows["levels"][::count]
    return MethodResult(
        masks=stored[:, :1],
        masks_full=full,
        perturbed=pyramid_blend(problem.normalise(levels), full),
        substrate=levels[:, 0],
        levels=levels,
        area_masks=stored if count > 1 else None,
    )


RUNNER = Runner(
    start=start,
    loss=loss,
    finish=finish,
    optimizer="sgd",
    rows_per_item=rows_per_item,
    passes_per_row=passes_per_row,
)
