"""The mask m and the regularisers of the loss, as in Fong & Vedaldi (2017).

m has shape (N, 1, h, w) with values in [0, 1]: 1 keeps a pixel, 0 replaces it with the
substrate. Every term returns one value per image, shape (N,), so that summing over the
batch leaves each image's gradient exactly what it would be alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from explainctl.contracts import Upsample


def l1_term(m: torch.Tensor) -> torch.Tensor:
    """Sparsity of the deletion: mean |1 - m| over each mask, (N, 1, h, w) -> (N,)."""
    return (1 - m).abs().flatten(1).mean(dim=1)


def tv_term(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Anisotropic total variation TV_beta(m) = mean|d_x m|^beta + mean|d_y m|^beta, -> (N,)."""
    dy = (m[:, :, 1:, :] - m[:, :, :-1, :]).abs().pow(beta).flatten(1)
    dx = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).flatten(1)
    # A mask one pixel high or wide has no differences along that axis: it adds nothing.
    return sum(d.mean(dim=1) if d.shape[1] else d.new_zeros(d.shape[0]) for d in (dx, dy))


def upsample(m: torch.Tensor, size: tuple[int, int], mode: Upsample = "bilinear") -> torch.Tensor:
    """Upsample masks (N, 1, h, w) to (N, 1, H, W)."""
    if mode == "nearest":
        return F.interpolate(m, size=size, mode="nearest")
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def blend(x: torch.Tensor, substrate: torch.Tensor, m_up: torch.Tensor) -> torch.Tensor:
    """Perturbed input m*x + (1 - m)*substrate; x, substrate (N, C, H, W), m_up (N, 1, H, W)."""
    return m_up * x + (1 - m_up) * substrate


def mask_area(m: torch.Tensor) -> torch.Tensor:
    """Fraction of each image deleted, mean(1 - m): (N, 1, h, w) -> (N,)."""
    return l1_term(m)
