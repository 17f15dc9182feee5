"""How far two masks of one image agree, in numpy, for the client (which never has torch).

The definitions are those of the worker's stability (explainctl_worker/measures/
diagnostics.py), on the saliency s = 1 - m of each mask; tests/explainctl_worker/measures/
test_agreement.py checks that both give the same numbers on random masks, so they cannot
drift apart:

    top_iou           IoU of the most salient TOP_SHARE of two maps: each map's set is every
                      pixel at or above its (1 - TOP_SHARE) quantile (linear interpolation),
                      so pixels tied at the threshold are all in
    rank_correlation  Spearman's rho: Pearson's correlation of the ranks, ties at their mean
                      rank; None for a constant map (no order to correlate)
"""

from __future__ import annotations

import math

import numpy as np

from explainctl.spec.trust import TOP_SHARE


def top_iou(a: np.ndarray, b: np.ndarray, share: float = TOP_SHARE) -> float:
    """IoU of the most salient `share` of two maps of one shape."""
    fa, fb = _flat(a).astype(np.float32), _flat(b).astype(np.float32)
    # float32 as on the worker, so the interpolated threshold rounds as there.
    top_a = fa >= np.quantile(fa, 1 - share)
    top_b = fb >= np.quantile(fb, 1 - share)
    union = int(np.count_nonzero(top_a | top_b))
    return int(np.count_nonzero(top_a & top_b)) / max(union, 1)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of a flat array, tied values sharing the mean of their positions."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:], ordered.size) - 1
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = ((first + last) / 2.0)[group]
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho of two maps of one shape; None when either is constant."""
    ra, rb = average_ranks(_flat(a).astype(np.float64)), average_ranks(_flat(b).astype(np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denominator <= 0:
        return None
    return float((ra * rb).sum()) / denominator


def resize_bilinear(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D mask resized bilinearly with half-pixel centres (torch's interpolate with
    align_corners=False, as the worker upsamples its masks), edges clamped."""
    source = np.asarray(mask, dtype=np.float64)

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
        position = np.clip(position, 0, None)
        low = np.minimum(position.astype(np.int64), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, position - low

    y0, y1, wy = axis(source.shape[0], height)
    x0, x1, wx = axis(source.shape[1], width)
    rows = source[y0] * (1 - wy)[:, None] + source[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


def common_grid(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two masks on one grid: the larger side of each axis (28 and 32 -> both 32), the
    smaller upsampled as the worker upsamples (`resize_bilinear`), so no mask loses detail."""
    a, b = _two_d(a), _two_d(b)
    height, width = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    if a.shape != (height, width):
        a = resize_bilinear(a, height, width)
    if b.shape != (height, width):
        b = resize_bilinear(b, height, width)
    return a, b


def mask_agreement(mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[float, float | None]:
    """(top_iou, rank_correlation) of the saliencies 1 - m of two masks (1 = kept) of one
    image, masks of different sizes brought to a common grid first."""
    a, b = common_grid(mask_a, mask_b)
    sa, sb = 1 - a.astype(np.float32), 1 - b.astype(np.float32)
    return top_iou(sa, sb), rank_correlation(sa, sb)


def _flat(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).reshape(-1)


def _two_d(mask: np.ndarray) -> np.ndarray:
    array = np.asarray(mask)
    # A mask saved as (1, h, w) or (1, 1, h, w) is still one mask.
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"a mask must be a 2-D array, not of shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("a mask holds NaN or infinite values")
    return array
