"""The seed's meaningful perturbation (Fong & Vedaldi 2017, as the seed script runs it).

For each image x (C, H, W) with target class c, find a low-resolution mask m in [0, 1]:

    min_m  l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m + eps))_c
    x_m = up(m) * x + (1 - up(m)) * s(x),    eps ~ N(0, noise_std^2) drawn every iteration

where s(x) is the blurred substrate and f the frozen classifier (normalised input). The
noise is drawn once per iteration with shape (1, C, H, W) from a generator seeded with
`params.seed` and broadcast, so every image sees the noise it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from explainctl.contracts import ExplainParams
from explainctl_worker.mask import blend, l1_term, tv_term, upsample
from explainctl_worker.methods.common import (
    MethodResult,
    Problem,
    optimise,
    perturb,
    target_probability,
)
from explainctl_worker.substrate import make_substrate


def run(
    problem: Problem, params: ExplainParams, progress: Callable[[int], None] | None
) -> MethodResult:
    """The seed's optimisation for N images (N, C, H, W): masks (N, 1, s, s), s = mask_size,
    and the blended substrate (N, C, H, W) for rendering."""
    device = problem.x.device
    n = problem.x.shape[0]
    size = problem.size
    x, targets, model = problem.x, problem.targets, problem.model
    substrate = make_substrate(problem.images, params)
    s = problem.normalise(substrate)

    m = torch.ones(n, 1, params.mask_size, params.mask_size, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([m], lr=params.lr)
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)

    def loss_at(step: int) -> torch.Tensor:
        x_m = perturb(blend(x, s, upsample(m, size, params.upsample)), params, generator)
        p = target_probability(model, x_m, targets)
        return params.l1_coeff * l1_term(m) + params.tv_coeff * tv_term(m, params.tv_beta) + p

    iterations = optimise(m, optimizer, loss_at, params, progress)

    with torch.no_grad():
        final = m.detach().clamp(0, 1)
        full = upsample(final, size, params.upsample)
        prob_after = target_probability(model, blend(x, s, full), targets)
    return MethodResult(
        masks=final,
        masks_full=full,
        prob_after=prob_after,
        iterations=iterations,
        substrate=substrate,
    )
