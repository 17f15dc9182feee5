"""The stop rule on synthetic mask sequences: flicker stops, drift goes on."""

import torch

from explainctl.methods import ExplainParams
from explainctl_worker.convergence import Convergence

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
            verdicts.append(rule.check([step] * items, per_item))
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
            assert rule.check([10, 5], 1) == [False, False]
    assert rule.check([20, 15], 1) == [True, False]


def test_off_means_never():
    params = PARAMS.model_copy(update={"early_stop": False})
    sequence = [torch.full((1, 1, 4, 4), 0.5)] * 30
    assert _run(sequence, params) == [[False]] * 3
