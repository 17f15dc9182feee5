import math

import pytest
import torch

from explainctl_worker.methods.mask import (
    area_penalty,
    blend,
    l1_sum,
    l1_term,
    mask_area,
    smooth_max_pool,
    tv_iso_sum,
    tv_term,
    upsample,
)


def test_l1_term_is_mean_deleted_fraction():
    m = torch.ones(2, 1, 4, 4)
    m[1, :, :2, :] = 0  # half of the second mask deleted
    assert l1_term(m).tolist() == pytest.approx([0.0, 0.5])
    assert mask_area(m).tolist() == pytest.approx([0.0, 0.5])


def test_tv_term_of_a_step_edge():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    assert tv_term(m, beta=3.0).item() == pytest.approx(4 / 12)
    assert tv_term(torch.full((1, 1, 5, 5), 0.3), beta=3.0).item() == 0.0


def test_tv_term_uses_beta_power():
    m = torch.zeros(1, 1, 1, 2)
    m[..., 1] = 0.5
    assert tv_term(m, beta=3.0).item() == pytest.approx(0.125)
    assert tv_term(m, beta=2.0).item() == pytest.approx(0.25)


def test_terms_are_per_image():
    a = torch.rand(1, 1, 6, 6)
    b = torch.rand(1, 1, 6, 6)
    both = torch.cat([a, b])
    assert torch.allclose(tv_term(both, 3.0)[1], tv_term(b, 3.0)[0])
    assert torch.allclose(l1_term(both)[0], l1_term(a)[0])


def test_upsample_shapes_and_modes():
    m = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    nearest = upsample(m, (4, 4), "nearest")
    assert nearest.shape == (1, 1, 4, 4)
    assert nearest[0, 0, 0, :2].tolist() == [0.0, 0.0]
    bilinear = upsample(m, (4, 4), "bilinear")
    assert bilinear.min() >= 0 and bilinear.max() <= 1
    assert 0 < bilinear[0, 0, 1, 1].item() < 1  # interpolated between the corners


def test_blend_keeps_where_mask_is_one_and_replaces_where_zero():
    x = torch.full((1, 3, 2, 2), 5.0)
    s = torch.full((1, 3, 2, 2), -1.0)
    m = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]])
    out = blend(x, s, m)
    assert out[0, :, 0, 0].tolist() == [5.0] * 3
    assert out[0, :, 0, 1].tolist() == [-1.0] * 3
    assert out[0, :, 1, 0].tolist() == [2.0] * 3


# --- The 2017 paper's sums and the 2019 extremal terms ---------------------------------


def test_l1_sum_counts_deleted_mass():
    m = torch.ones(2, 1, 4, 4)
    m[1, :, :2, :] = 0.5
    assert l1_sum(m).tolist() == pytest.approx([0.0, 4.0])


def test_tv_iso_sum_of_a_step_edge_and_a_corner():
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 1.0  # 3 rows of the (3, 3) difference grid cross the edge
    assert tv_iso_sum(edge, 3.0).item() == pytest.approx(3.0, abs=1e-4)
    corner = torch.zeros(1, 1, 2, 2)
    corner[..., 0, 0] = 1.0  # dx = dy = -1 at the one grid point: (1 + 1)^(3/2)
    assert tv_iso_sum(corner, 3.0).item() == pytest.approx(2**1.5, abs=1e-4)
    assert tv_iso_sum(torch.full((1, 1, 5, 5), 0.3), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_tv_iso_sum_has_finite_gradients_for_small_beta():
    m = torch.full((1, 1, 3, 3), 0.5, requires_grad=True)
    tv_iso_sum(m, 1.0).sum().backward()
    assert torch.isfinite(m.grad).all()


def test_smooth_max_pool_keeps_constants_and_spreads_a_peak_as_a_gaussian():
    ones = smooth_max_pool(torch.ones(1, 1, 7, 7), sigma=1.0, temperature=0.05)
    assert ones.min() > 0.99 and ones.max() <= 1.0 + 1e-6
    assert smooth_max_pool(torch.zeros(1, 1, 7, 7), 1.0, 0.05).abs().max() < 1e-6
    p = torch.zeros(1, 1, 9, 9, requires_grad=True)
    with torch.no_grad():
        p[0, 0, 4, 4] = 1.0
    out = smooth_max_pool(p, 1.0, 0.05)
    row = out[0, 0, 4, 4:].detach()
    assert row[0] > 0.95
    assert torch.all(row[1:] < row[:-1])  # falls off with distance
    assert row[1] == pytest.approx(math.exp(-0.5), abs=0.05)
    assert row[3] < 0.05
    out.sum().backward()
    assert p.grad[0, 0, 4, 4] > 0


def test_smooth_max_pool_is_per_image():
    p = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    both = smooth_max_pool(p, 1.0, 0.05)
    assert torch.allclose(both[2], smooth_max_pool(p[2:], 1.0, 0.05)[0])


def test_area_penalty_is_zero_exactly_at_a_binary_mask_of_the_area():
    m = torch.zeros(2, 1, 4, 4)
    m[0, :, :1, :] = 1.0  # a quarter
    m[1] = 1.0
    penalty = area_penalty(m, torch.tensor([0.25, 0.25]))
    assert penalty.tolist() == pytest.approx([0.0, 0.75])
    # Where the kept pixels are does not matter.
    moved = torch.zeros(1, 1, 4, 4)
    moved[..., :, 3] = 1.0
    assert area_penalty(moved, torch.tensor([0.25])).item() == pytest.approx(0.0)
