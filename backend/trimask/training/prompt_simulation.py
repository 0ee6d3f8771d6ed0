"""Simulated interactive prompting, as in SAM's training and interactive evaluation.

Coordinates are (x, y) pixel positions in the mask's own frame; callers scale
them to the 1024 frame. Training samples clicks uniformly from the error region
of the previous prediction; evaluation uses the standard protocol (the centre
of the largest error region: the point farthest from that region's boundary).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def sample_point_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly random pixel (x, y) inside ``mask`` (``H x W`` bool, non-empty)."""
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def noisy_box(mask: np.ndarray, rng: np.random.Generator, *, noise: float = 0.1, max_px: float = 20.0) -> np.ndarray:
    """The mask's bounding box (x0, y0, x1, y1) with Gaussian noise of ``noise`` x side (at most ``max_px``)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    sx, sy = min(noise * w, max_px), min(noise * h, max_px)
    d = rng.normal(0, 1, 4) * np.array([sx, sy, sx, sy])
    d = np.clip(d, -np.array([sx, sy, sx, sy]) * 2, np.array([sx, sy, sx, sy]) * 2)
    box = np.array([x0, y0, x1, y1], np.float64) + d
    hgt, wid = mask.shape
    box[[0, 2]] = np.clip(box[[0, 2]], 0, wid - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, hgt - 1)
    if box[2] < box[0]:
        box[[0, 2]] = box[[2, 0]]
    if box[3] < box[1]:
        box[[1, 3]] = box[[3, 1]]
    return box


def sample_error_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[tuple[float, float], int] | None:
    """A click drawn uniformly from the error region of ``pred`` against ``gt`` (both ``H x W`` bool).

    Returns ((x, y), label): label 1 (foreground) in a false-negative pixel, 0 in a false positive;
    None when the prediction is exact.
    """
    err = pred != gt
    ys, xs = np.nonzero(err)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    y, x = int(ys[i]), int(xs[i])
    return (float(x), float(y)), int(gt[y, x])


def center_of_largest_error(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """Standard protocol click: the point of the largest error component farthest from its boundary.

    Returns ((x, y), label) with label 1 where the component is a false negative, 0 a false positive;
    None when the prediction is exact.
    """
    best = None
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        comps, n = ndimage.label(region)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())[1:]
        k = int(sizes.argmax()) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (int(sizes[k - 1]), comps == k, label)
    if best is None:
        return None
    _, comp, label = best
    # Pad so the image border counts as boundary too.
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return (float(x), float(y)), label
