"""The smallest smooth deletion that makes the decision fall (a variant of the original
script's meaningful perturbation, measured in benchmarks/README.md).

For each image x (C, H, W) with target class c and p_0 = softmax(f(x))_c, find m in [0, 1]:

    min_m  l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + w_t * 4 * mean(m * (1 - m))
           + 1/D * sum_d max(0, logodds(f(J_d(x_m)))_c - logit(drop * p_0))
    x_m = up(m) * x + (1 - up(m)) * s(x),   J_1..J_D random shifts by up to `jitter` px,
    w_t = binary_coeff * min(1, t / push_steps)
    logodds(z)_c = log(p_c / (1 - p_c)) = z_c - logsumexp_{j != c} z_j,  logit(q) = log(q / (1 - q))

with D = jitter_draws, by Adam with one second moment per mask (optim.py, adam-row) at a
learning rate lr until the class first sits under its bar (step t_c), falling linearly to
lr_final * lr over the next anneal_steps steps.

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
  something, so the mask commits to keep or delete.

Why it is cheap and steady (benchmarks/README.md, "A tenth of the compute"):
- Schedules of its own, not the budget's: the push reaches its weight in push_steps, and
  the learning rate anneals once the decision is made (t_c), so the mask settles on it;
  the stop rule (convergence.Decision) ends the item at the first checkpoint after
  t_c + anneal_steps where the class stayed under the bar and the deleted region stood
  still. `iterations` is only the budget for items that never get there.
- Which cells a run deleted was mostly chance: Adam moves every cell with a steady
  gradient sign at the full rate, however weak its evidence, and the jitter's gradient
  noise decides the rest. A second moment shared over the mask moves each cell in
  proportion to its gradient, and D jittered copies per step average the noise.

The stored mask keeps the optimised values and their boundary (m < 1/2 deleted); within
each side of it, cells are ordered by how deleted they were on average over the run (the
mean iterate), moved by at most ORDER_BAND: a cell deleted early and kept deleted ranks
before one deleted late, and a kept cell the optimisation tried to delete ranks before one
it never touched. Deletion and insertion curves and the top-10 % agreement read that
order, which a near-binary mask otherwise leaves to chance.
"""

from __future__ import annotations

import torch

from explainctl.spec.methods import ExplainParams
from explainctl_worker.methods import original
from explainctl_worker.methods.common import (
    Loss,
    MethodResult,
    Perturb,
    Problem,
    Rows,
    Runner,
    jitter_draws,
    target_log_odds,
)
from explainctl_worker.methods.mask import blend, l1_term, tv_term, upsample

# How far the order inside each side of the boundary may move a stored mask value.
ORDER_BAND = 0.01


def start(problem, params: ExplainParams) -> tuple[torch.Tensor, Rows]:
    """As the original (m0 = 1, the blurred substrate), with each row's bar logit(drop p_0)."""
    m0, rows = original.start(problem, params)
    bar = torch.logit(params.drop * problem.prob_before, eps=1e-12)
    return m0, Rows({**rows.tensors, "bar": bar})


def binary_term(m: torch.Tensor) -> torch.Tensor:
    """4 * mean(m * (1 - m)) over each mask, (N, 1, h, w) -> (N,): 0 for a mask of 0s and
    1s, 1 for a mask of 1/2 everywhere."""
    return 4 * (m * (1 - m)).flatten(1).mean(dim=1)


def push_weight(steps: torch.Tensor, params: ExplainParams) -> torch.Tensor:
    """w_t = binary_coeff * min(1, t / T_push) per row (R,), T_push = push_steps, or the
    budget where that is shorter (a short run still commits its mask)."""
    return params.binary_coeff * (steps / push_length(params)).clamp(max=1)


def push_length(params: ExplainParams) -> int:
    return min(params.push_steps, params.iterations)


def lr_scale(steps: torch.Tensor, held_at: torch.Tensor, params: ExplainParams) -> torch.Tensor:
    """1 until the row's class first sits under its bar (step held_at), then falling
    linearly to lr_final over anneal_steps, then lr_final: (R,) twice -> (R,)."""
    since = (steps + 1 - held_at).clamp_min(0)  # 0 while held_at is inf
    return (1 - since / params.anneal_steps).clamp(min=params.lr_final)


def loss(model, m, rows: Rows, steps, params: ExplainParams, perturb: Perturb) -> Loss:
    """The loss in the module's docstring, one value per row (R,), and whether every
    jittered copy's class sat under the bar."""
    x = rows["x"]
    x_m = perturb(blend(x, rows["s"], upsample(m, tuple(x.shape[-2:]), params.upsample)))
    draws = x_m.shape[0] // x.shape[0]
    odds = target_log_odds(model, x_m, rows["targets"].repeat(draws)).view(draws, -1)
    over = odds - rows["bar"]
    weight = push_weight(steps, params)
    value = (
        params.l1_coeff * l1_term(m)
        + params.tv_coeff * tv_term(m, params.tv_beta)
        + weight * binary_term(m)
        + over.clamp_min(0).mean(dim=0)
    )
    return value, (over < 0).all(dim=0).detach()


def ordered(m: torch.Tensor, mean: torch.Tensor, band: float = ORDER_BAND) -> torch.Tensor:
    """m (N, 1, h, w) with an order inside each side of its boundary, from the mean iterate
    `mean` (same shape): never across 1/2, by at most `band`.

    q(u) = the rank of mean(u) among the cells on u's side of the boundary, in [0, 1]
    (0: the most deleted on average);
    deleted (m < 1/2): min(m + band * q, 1/2 - eps);   kept: max(m - band * (1 - q), 1/2).
    """
    deleted = m < 0.5
    flat_deleted = deleted.flatten(1)
    # Every deleted cell sorts before every kept one (mean lies in [0, 1]).
    key = (mean + 2 * (~deleted).to(mean.dtype)).flatten(1)
    rank = key.argsort(dim=1).argsort(dim=1).to(m.dtype)
    count = flat_deleted.sum(dim=1, keepdim=True).to(m.dtype)
    cells = flat_deleted.shape[1]
    q = torch.where(
        flat_deleted,
        rank / (count - 1).clamp_min(1),
        (rank - count) / (cells - count - 1).clamp_min(1),
    ).view_as(m)
    below = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    return torch.where(
        deleted, (m + band * q).clamp(max=below), (m - band * (1 - q)).clamp(min=0.5)
    )


def finish(problem: Problem, m, rows: Rows, params: ExplainParams) -> MethodResult:
    """The optimised masks, ordered inside each side by the mean iterate (`ordered`)."""
    return original.finish(problem, ordered(m.detach().clamp(0, 1), rows["p_mean"]), rows, params)


RUNNER = Runner(
    start=start,
    loss=loss,
    finish=finish,
    optimizer="adam-row",
    lr_scale=lr_scale,
    stop="decision",
    # D jittered copies of each row go through the model at every step.
    passes_per_row=jitter_draws,
)
