"""The substrate: what a deleted pixel is replaced with (a blurred copy of the image).

All functions take and return pixel-space images of shape (N, C, H, W) in [0, 1].
The substrate is computed once per batch, never inside the optimisation loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from explainctl.spec.methods import ExplainParams

# Median filtering unfolds k*k copies of the image; process this many images at a time
# so a batch of 64 at 224 px needs ~0.3 GB instead of ~5 GB.
_MEDIAN_IMAGES_PER_STEP = 4


def gaussian_kernel1d(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length `size`: shape (size,)."""
    offsets = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _reflect_pad(x: torch.Tensor, radius: int) -> torch.Tensor:
    # Reflection needs the image wider than the radius; tiny inputs replicate instead.
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    return F.pad(x, (radius, radius, radius, radius), mode=mode)


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders: (N, C, H, W) -> (N, C, H, W)."""
    if size == 1:
        return x.clone()
    channels = x.shape[1]
    k = gaussian_kernel1d(size, sigma, device=x.device, dtype=x.dtype)
    padded = _reflect_pad(x, size // 2)
    horizontal = F.conv2d(
        padded, k.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels
    )
    return F.conv2d(horizontal, k.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def median_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over a size x size window with reflected borders: (N, C, H, W) -> (N, C, H, W)."""
    if size == 1:
        return x.clone()
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for start in range(0, n, _MEDIAN_IMAGES_PER_STEP):
        part = x[start : start + _MEDIAN_IMAGES_PER_STEP]
        padded = _reflect_pad(part, size // 2)
        windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # (n, C, H, W, k, k)
        flat = windows.reshape(*windows.shape[:4], size * size)
        out[start : start + _MEDIAN_IMAGES_PER_STEP] = flat.median(dim=-1).values
    return out


def make_substrate(x: torch.Tensor, params: ExplainParams) -> torch.Tensor:
    """The perturbation target for each image, as `params.substrate` names it.

    `average` is the mean of the Gaussian and median blurs, as the original's README describes
    (its code used the median alone).
    """
    if params.substrate == "gaussian":
        return gaussian_blur(x, params.blur_kernel, params.blur_sigma)
    if params.substrate == "median":
        return median_blur(x, params.median_kernel)
    gaussian = gaussian_blur(x, params.blur_kernel, params.blur_sigma)
    return 0.5 * (gaussian + median_blur(x, params.median_kernel))


def pyramid_sigmas(sigma_max: float, levels: int) -> list[float]:
    """sigma_l = sigma_max * (1 - l / (L - 1)) for l = 0..L-1: from sigma_max down to 0."""
    return [sigma_max * (1 - level / (levels - 1)) for level in range(levels)]


def blur_pyramid(x: torch.Tensor, sigma_max: float, levels: int) -> torch.Tensor:
    """The image blurred at L strengths: (N, C, H, W) -> (N, L, C, H, W).

    Level 0 is the strongest blur (sigma_max), level L-1 the image itself. Each level uses
    a kernel of 2*ceil(3 sigma)+1 taps, wide enough that the truncation does not show.
    Computed once per batch: the optimisation only interpolates between levels.
    """
    out = []
    for sigma in pyramid_sigmas(sigma_max, levels):
        if sigma <= 0:
            out.append(x)
        else:
            out.append(gaussian_blur(x, 2 * math.ceil(3 * sigma) + 1, sigma))
    return torch.stack(out, dim=1)


def pyramid_blend(levels: torch.Tensor, m_up: torch.Tensor) -> torch.Tensor:
    """Blur whose strength varies with the mask, differentiable in the mask.

    levels (N, L, C, H, W) from `blur_pyramid`; m_up (N, 1, H, W) in [0, 1] -> (N, C, H, W).
    Each pixel sits at t = m * (L - 1) on the pyramid and is interpolated linearly between
    the two levels that bracket t: m = 1 is the image, m = 0 the strongest blur. With
    L = 2 this is m * x + (1 - m) * blur(x), the original method's blend.
    """
    n, count, c, h, w = levels.shape
    # No clamp on m itself: torch's clamp passes no gradient at its bounds, and masks
    # start exactly at 1. Masks are in [0, 1] already; the level index is clamped to
    # [0, L-2] so that m = 1 still interpolates (frac = 1) with a gradient downwards.
    t = m_up * (count - 1)
    low = t.detach().floor().clamp(0, count - 2).long()
    frac = t - low.to(t.dtype)
    index = low.unsqueeze(1).expand(n, 1, c, h, w)
    lower = levels.gather(1, index).squeeze(1)
    upper = levels.gather(1, index + 1).squeeze(1)
    return lower + frac * (upper - lower)
