"""The mask m and the regularisers of the loss: the original script's and the 2017 paper's (Fong &
Vedaldi), and the 2019 extremal perturbations' area constraint and smooth masks.

m has shape (N, 1, h, w) with values in [0, 1]: 1 keeps a pixel, 0 replaces it with the
substrate. Every term returns one value per image, shape (N,), so that summing over the
batch leaves each image's gradient exactly what it would be alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from explainctl.spec.methods import Upsample


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


# --- The 2017 paper's terms (sums over the mask, isotropic TV) -------------------------


def l1_sum(m: torch.Tensor) -> torch.Tensor:
    """The paper's sparsity term sum|1 - m| over each mask, (N, 1, h, w) -> (N,)."""
    return (1 - m).abs().flatten(1).sum(dim=1)


# Keeps the gradient of z^(beta/2) finite at z = 0 when beta < 2; negligible otherwise.
_TV_EPS = 1e-12


def tv_iso_sum(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Isotropic TV_beta(m) = sum over u of (d_x m(u)^2 + d_y m(u)^2)^(beta/2), -> (N,).

    Differences are taken forward and summed on the (h-1, w-1) grid where both exist.
    """
    dx = m[:, :, :-1, 1:] - m[:, :, :-1, :-1]
    dy = m[:, :, 1:, :-1] - m[:, :, :-1, :-1]
    if dx.numel() == 0:
        return m.new_zeros(m.shape[0])
    return (dx.square() + dy.square() + _TV_EPS).pow(beta / 2).flatten(1).sum(dim=1)


# --- Extremal perturbations (Fong, Patrick & Vedaldi 2019) -----------------------------


def smooth_max_pool(p: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    """Smooth mask from coarse parameters: m(u) = smax_T over v of g(u - v) * p(v).

    p (N, 1, g, g) in [0, 1] -> (N, 1, g, g) in [0, 1]. g(d) = exp(-|d|^2 / 2 sigma^2) with
    g(0) = 1 (sigma in grid cells), and smax_T(z) = sum z e^(z/T) / sum e^(z/T) over the
    kernel's support (3 sigma): T -> 0 is max-pooling, T -> infinity the mean. A parameter
    can only raise its neighbours to a Gaussian profile, so no mask is sharper than g
    however the parameters move; evaluated on the grid and upsampled afterwards, which
    costs a (2R+1)^2 window per grid cell instead of per pixel.
    """
    radius = max(1, math.ceil(3 * sigma))
    size = 2 * radius + 1
    offsets = torch.arange(size, device=p.device, dtype=p.dtype) - radius
    g = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    n, _, h, w = p.shape
    # Replicated edges: with zeros outside, border cells would have fewer strong neighbours
    # diluting their smooth max than inner cells, and would start out ranked highest.
    padded = F.pad(p, (radius, radius, radius, radius), mode="replicate")
    windows = F.unfold(padded, size)  # (N, size*size, h*w)
    z = windows * g.flatten().view(1, -1, 1)
    weights = torch.softmax(z / temperature, dim=1)
    return (weights * z).sum(dim=1).view(n, 1, h, w)


def area_penalty(m: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """R_a(m) = mean((vecsort(m) - r_a)^2): m (N, 1, H, W), areas (N,) -> (N,).

    r_a holds (1 - a) * HW zeros then a * HW ones, so the penalty is zero exactly when a
    fraction a of the mask is 1 and the rest 0, wherever those pixels are.
    """
    flat = m.flatten(1)
    count = flat.shape[1]
    ones = torch.round(areas.to(flat.dtype) * count)
    ranks = torch.arange(count, device=flat.device, dtype=flat.dtype)
    reference = (ranks.view(1, -1) >= (count - ones).view(-1, 1)).to(flat.dtype)
    return (flat.sort(dim=1).values - reference).square().mean(dim=1)
