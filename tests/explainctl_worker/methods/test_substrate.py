import pytest
import torch

from explainctl.spec.methods import ExplainParams
from explainctl_worker.methods.mask import blend
from explainctl_worker.methods.substrate import (
    blur_pyramid,
    gaussian_blur,
    gaussian_kernel1d,
    make_substrate,
    median_blur,
    pyramid_blend,
    pyramid_sigmas,
)


def test_gaussian_kernel_is_normalised_and_symmetric():
    k = gaussian_kernel1d(11, 5.0)
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(k, k.flip(0))
    assert k.argmax().item() == 5


def test_blurs_keep_a_constant_image():
    x = torch.full((2, 3, 20, 20), 0.25)
    assert torch.allclose(gaussian_blur(x, 11, 5.0), x, atol=1e-6)
    assert torch.allclose(median_blur(x, 11), x)


def test_gaussian_blur_flattens_a_checkerboard():
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((ys + xs) % 2).float().expand(1, 3, 32, 32)
    blurred = gaussian_blur(checker, 11, 5.0)
    assert blurred.shape == checker.shape
    assert (blurred[..., 8:24, 8:24] - 0.5).abs().max() < 0.02


def test_median_blur_removes_impulses_that_gaussian_only_spreads():
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    assert median_blur(x, 3).abs().max() == 0
    assert gaussian_blur(x, 3, 1.0).max() > 0


def test_median_blur_matches_a_direct_median():
    x = torch.rand(5, 2, 9, 9)  # more images than one median step, to cover the chunking
    out = median_blur(x, 3)
    direct = x[3, 1, 3:6, 4:7].flatten().median()
    assert out[3, 1, 4, 5] == direct


def test_average_substrate_is_mean_of_the_two_blurs():
    x = torch.rand(1, 3, 24, 24)
    params = ExplainParams(method="original", image_size=24, mask_size=4)
    expected = 0.5 * (gaussian_blur(x, 11, 5.0) + median_blur(x, 11))
    assert torch.allclose(make_substrate(x, params), expected)
    gaussian_only = make_substrate(x, params.model_copy(update={"substrate": "gaussian"}))
    assert torch.allclose(gaussian_only, gaussian_blur(x, 11, 5.0))


def test_pyramid_runs_from_the_strongest_blur_to_the_image():
    assert pyramid_sigmas(20.0, 5) == pytest.approx([20.0, 15.0, 10.0, 5.0, 0.0])
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    levels = blur_pyramid(x, 6.0, 4)
    assert levels.shape == (2, 4, 3, 40, 40)
    assert torch.equal(levels[:, -1], x)
    assert torch.allclose(levels[:, 0], gaussian_blur(x, 37, 6.0))
    # Stronger blur, less detail.
    spread = [float(levels[:, i].std()) for i in range(4)]
    assert spread == sorted(spread)


def test_pyramid_blend_interpolates_between_bracketing_levels():
    levels = torch.arange(5.0).view(1, 5, 1, 1, 1).expand(1, 5, 3, 2, 2).contiguous()
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.3]]]])  # t = 4m: 0, 4, 2, 1.2
    out = pyramid_blend(levels, m)
    assert out[0, 0].flatten().tolist() == pytest.approx([0.0, 4.0, 2.0, 1.2])


def test_two_level_pyramid_is_the_seed_blend():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    s = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    m = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(pyramid_blend(torch.stack([s, x], dim=1), m), blend(x, s, m), atol=1e-6)


def test_pyramid_blend_has_a_gradient_at_a_fully_kept_mask():
    levels = torch.stack([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)], dim=1)
    m = torch.ones(1, 1, 4, 4, requires_grad=True)
    pyramid_blend(levels, m).sum().backward()
    assert torch.all(m.grad > 0)  # the seed's masks start at 1: they must be able to move
