"""The substrate: what a deleted pixel is replaced with (a blurred copy of the image).

All functions take and return pixel-space images of shape (N, C, H, W) in [0, 1].
The substrate is computed once per batch, never inside the optimisation loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from explainctl.contracts import ExplainParams

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

    `average` is the mean of the Gaussian and median blurs, as the seed's README describes
    (its code used the median alone).
    """
    if params.substrate == "gaussian":
        return gaussian_blur(x, params.blur_kernel, params.blur_sigma)
    if params.substrate == "median":
        return median_blur(x, params.median_kernel)
    gaussian = gaussian_blur(x, params.blur_kernel, params.blur_sigma)
    return 0.5 * (gaussian + median_blur(x, params.median_kernel))
