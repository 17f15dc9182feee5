"""The stop rule on synthetic mask sequences: flicker stops, drift goes on."""

import torch

from explainctl.spec.methods import ExplainParams
from explainctl_worker.engine.convergence import Convergence, Decision

PARAMS = ExplainParams(
    method="original", early_stop_window=10, early_stop_ratio=1.5, early_stop_tol=1e-3
)


def _run(sequence, params=PARAMS, per_item=1) -> list[list[bool]]:
    """Feed iterates (steps, R, 1, h, w) one step at a time; the verdicts at each block end."""
    rule = Convergence(params)
    rule.add_rows(sequence[0])
    verdicts = []
    for step, p in enumerate(sequence, 1):
        rule.observe(p)
        if step % params.early_stop_window == 0:
            items = p.shape[0] // per_item
            verdicts.append(rule.check(p, [step] * items, per_item))
    return verdicts


def test_flicker_around_a_fixed_mask_converges_after_two_blocks():
    generator = torch.Generator().manual_seed(0)
    centre = torch.rand(1, 1, 8, 8, generator=generator)
    sequence = [
        (centre + 0.1 * torch.randn(1, 1, 8, 8, generator=generator)).clamp(0, 1) for _ in range(40)
    ]
    verdicts = _run(sequence)
    assert verdicts[0] == [False]  # the first block only sets the baseline
    assert verdicts[1] == [True]


def test_a_drifting_mask_goes_on_while_a_still_one_stops():
    """Row 0 shrinks steadily with little flicker; row 1 does not move at all."""
    steps = 40
    drifting = [torch.full((1, 1, 8, 8), 1 - 0.01 * t) for t in range(steps)]
    still = [torch.full((1, 1, 8, 8), 0.5)] * steps
    sequence = [torch.cat([d, s]) for d, s in zip(drifting, still, strict=True)]
    verdicts = _run(sequence)
    assert [v[0] for v in verdicts] == [False] * 4  # drift 0.1 per block, no flicker
    assert [v[1] for v in verdicts] == [False, True, True, True]  # within early_stop_tol


def test_an_item_of_several_rows_converges_only_when_all_have():
    steps = 20
    rows = [
        torch.cat([torch.full((1, 1, 4, 4), 0.5), torch.full((1, 1, 4, 4), 1 - 0.01 * t)])
        for t in range(steps)
    ]
    assert _run(rows, per_item=2) == [[False], [False]]


def test_rows_mid_block_keep_their_state():
    rule = Convergence(PARAMS)
    p = torch.full((2, 1, 4, 4), 0.5)
    rule.add_rows(p)
    for step in range(1, 21):
        rule.observe(p)
        if step == 10:
            # Row 1 entered 5 iterations later: its block is not over yet.
            assert rule.check(p, [10, 5], 1) == [False, False]
    assert rule.check(p, [20, 15], 1) == [True, False]


def test_off_means_never():
    params = PARAMS.model_copy(update={"early_stop": False})
    sequence = [torch.full((1, 1, 4, 4), 0.5)] * 30
    assert _run(sequence, params) == [[False]] * 3


DECIDING = ExplainParams(method="decisive", push_steps=10, anneal_steps=5)


def _decide(sequence, held, held_at=0.0, per_item=1, params=DECIDING):
    """Feed iterates and hinge states (steps, R) to the Decision rule, the class first
    under its bar at step `held_at`; its verdicts at every checkpoint (every 10 steps)."""
    rule = Decision(params)
    rule.add_rows(sequence[0])
    verdicts = []
    for step, (p, h) in enumerate(zip(sequence, held, strict=True), 1):
        rule.observe(p, h)
        if step % 10 == 0:
            since = torch.full((p.shape[0],), float(held_at))
            verdicts.append(rule.check(p, [step] * (p.shape[0] // per_item), per_item, since))
    return verdicts


def test_decision_waits_for_the_schedule_then_stops_a_still_mask_that_holds_the_class():
    still = torch.ones(1, 1, 8, 8)
    still[..., :2, :2] = 0.0  # a fixed deleted corner
    sequence = [still] * 40
    held = [torch.tensor([True])] * 40
    assert _decide(sequence, held) == [[True]] * 4  # past push_steps (10) from step 10
    # The class first under its bar at step 12: its annealing ends at 17, checked at 20.
    assert _decide(sequence, held, held_at=12) == [[False], [True], [True], [True]]
    # Never under its bar: never decided.
    never = _decide(sequence, held, held_at=float("inf"))
    assert never == [[False]] * 4


def test_decision_goes_on_while_the_region_moves_or_the_class_stays_over_its_bar():
    moving = [torch.ones(1, 1, 8, 8) for _ in range(30)]
    for t, mask in enumerate(moving):
        mask[..., : t // 5 + 1, :] = 0.0  # one more row of cells deleted every 5 steps
    held = [torch.tensor([True])] * 30
    assert _decide(moving, held) == [[False], [False], [False]]
    still = [torch.ones(1, 1, 8, 8)] * 30
    # Under the bar on only 4 of every 10 steps: the class is not removed.
    flicker = [torch.tensor([t % 10 < 4]) for t in range(30)]
    assert _decide(still, flicker) == [[False], [False], [False]]
    # On 6 of 10 (a hinge at rest on its bar): removed.
    resting = [torch.tensor([t % 10 < 6]) for t in range(30)]
    assert _decide(still, resting) == [[True], [True], [True]]


def test_decision_of_an_item_needs_all_its_rows():
    rows = torch.ones(2, 1, 4, 4)
    held = [torch.tensor([True, False])] * 20
    assert _decide([rows] * 20, held, per_item=2) == [[False], [False]]


def test_decision_off_means_never():
    params = DECIDING.model_copy(update={"early_stop": False})
    still = [torch.ones(1, 1, 4, 4)] * 20
    assert _decide(still, [torch.tensor([True])] * 20, params=params) == [[False], [False]]
