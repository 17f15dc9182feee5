import pytest
import torch

from explainctl_worker.mask import blend, l1_term, mask_area, tv_term, upsample


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
