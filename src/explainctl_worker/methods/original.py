"""The original script's meaningful perturbation (Fong & Vedaldi 2017, as that script runs it).

For each image x (C, H, W) with target class c, find a low-resolution mask m in [0, 1]:

    min_m  l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m + eps))_c
    x_m = up(m) * x + (1 - up(m)) * s(x),    eps ~ N(0, noise_std^2) drawn every iteration

where s(x) is the blurred substrate and f the frozen classifier (normalised input). The
noise is drawn every iteration from the item's own generator, seeded with `params.seed`
(slot.ItemRandom), so every image sees the noise it would see alone.
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
from explainctl_worker.methods.mask import blend, l1_term, tv_term, upsample
from explainctl_worker.methods.substrate import make_substrate


def start(problem: Problem, params: ExplainParams) -> tuple[torch.Tensor, Rows]:
    """m0 = 1 (nothing deleted), (N, 1, s, s) for s = mask_size; per row the normalised
    image x and substrate s(x), and the pixel-space substrate for rendering."""
    substrate = make_substrate(problem.images, params)
    n = problem.x.shape[0]
    m0 = torch.ones(n, 1, params.mask_size, params.mask_size, device=problem.x.device)
    rows = Rows(
        {
            "x": problem.x,
            "s": problem.normalise(substrate),
            "substrate": substrate,
            "targets": problem.targets,
        }
    )
    return m0, rows


def loss(model, m, rows: Rows, steps, params: ExplainParams, perturb: Perturb) -> Loss:
    """l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + softmax(f(x_m + eps))_c, (R,)."""
    x = rows["x"]
    x_m = perturb(blend(x, rows["s"], upsample(m, tuple(x.shape[-2:]), params.upsample)))
    p = target_probability(model, x_m, rows["targets"])
    return params.l1_coeff * l1_term(m) + params.tv_coeff * tv_term(m, params.tv_beta) + p, None


def finish(problem: Problem, m, rows: Rows, params: ExplainParams) -> MethodResult:
    """The final masks (N, 1, s, s), upsampled as the model saw them, and x_m without
    noise."""
    final = m.detach().clamp(0, 1)
    full = upsample(final, problem.size, params.upsample)
    return MethodResult(
        masks=final,
        masks_full=full,
        perturbed=blend(rows["x"], rows["s"], full),
        substrate=rows["substrate"],
    )


RUNNER = Runner(start=start, loss=loss, finish=finish, optimizer="adam")
