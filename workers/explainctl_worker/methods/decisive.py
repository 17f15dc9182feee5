"""The smallest smooth deletion that makes the decision fall (a variant of the original
script's meaningful perturbation, measured in benchmarks/README.md).

For each image x (C, H, W) with target class c and p_0 = softmax(f(x))_c, find m in [0, 1]:

    min_m  l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + w_t * 4 * mean(m * (1 - m))
           + max(0, logodds(f(J(x_m)))_c - logit(drop * p_0))
    x_m = up(m) * x + (1 - up(m)) * s(x),   J a random shift by up to `jitter` px,
    w_t = binary_coeff * t / T
    logodds(z)_c = log(p_c / (1 - p_c)) = z_c - logsumexp_{j != c} z_j,  logit(q) = log(q / (1 - q))

Why each change from the original's loss:
- The class term is a hinge on the class's log-odds. softmax(.)_c is flat where the model
  is sure (its gradient p(1 - p) vanishes at p ~ 1, and log p's, 1 - p, with it), so a
  broad partial deletion that leaves p at 0.9 costs about as little as the small complete
  one that takes it to 0.01; the log-odds move one for one with the class's logit at any
  p. The hinge stops rewarding once p has fallen below `drop` of p_0: beyond that only the
  area and smoothness terms act, shrinking the mask back to the smallest deletion that
  still holds p under the bar.
- Jitter, not the original's input noise, keeps the mask from fitting single pixels: the
  bar is measured on the clean image, and under noise N(0, 0.2^2) the class's probability
  can already sit below it, so the hinge falls silent and the mask stays at 1 (on a real
  model, one photo in ten kept a mask of area 0). Jitter moves the image, not its statistics.
- 4 m (1 - m) is 1 at m = 1/2 and 0 at either end: it makes a half-deleted pixel cost
  something, so the mask commits to keep or delete. Its weight grows linearly over the
  budget of T = iterations steps (t is the row's own step count), so early steps explore.
"""

from __future__ import annotations

import torch

from explainctl.methods import ExplainParams
from explainctl_worker.mask import blend, l1_term, tv_term, upsample
from explainctl_worker.methods import original
from explainctl_worker.methods.common import Perturb, Rows, Runner, target_log_odds


def start(problem, params: ExplainParams) -> tuple[torch.Tensor, Rows]:
    """As the original (m0 = 1, the blurred substrate), with each row's p_0."""
    m0, rows = original.start(problem, params)
    return m0, Rows({**rows.tensors, "prob_before": problem.prob_before})


def binary_term(m: torch.Tensor) -> torch.Tensor:
    """4 * mean(m * (1 - m)) over each mask, (N, 1, h, w) -> (N,): 0 for a mask of 0s and
    1s, 1 for a mask of 1/2 everywhere."""
    return 4 * (m * (1 - m)).flatten(1).mean(dim=1)


def loss(model, m, rows: Rows, steps, params: ExplainParams, perturb: Perturb) -> torch.Tensor:
    """The loss in the module's docstring, one value per row (R,)."""
    x = rows["x"]
    x_m = perturb(blend(x, rows["s"], upsample(m, tuple(x.shape[-2:]), params.upsample)))
    odds = target_log_odds(model, x_m, rows["targets"])
    bar = torch.logit(params.drop * rows["prob_before"], eps=1e-12)
    weight = params.binary_coeff * (steps / params.iterations).clamp(max=1)
    return (
        params.l1_coeff * l1_term(m)
        + params.tv_coeff * tv_term(m, params.tv_beta)
        + weight * binary_term(m)
        + (odds - bar).clamp_min(0)
    )


RUNNER = Runner(start=start, loss=loss, finish=original.finish, optimizer="adam")
