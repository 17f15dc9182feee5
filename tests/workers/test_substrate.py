import pytest
import torch

from explainctl.contracts import ExplainParams
from explainctl_worker.substrate import (
    gaussian_blur,
    gaussian_kernel1d,
    make_substrate,
    median_blur,
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
    params = ExplainParams(image_size=24, mask_size=4)
    expected = 0.5 * (gaussian_blur(x, 11, 5.0) + median_blur(x, 11))
    assert torch.allclose(make_substrate(x, params), expected)
    gaussian_only = make_substrate(x, params.model_copy(update={"substrate": "gaussian"}))
    assert torch.allclose(gaussian_only, gaussian_blur(x, 11, 5.0))
