"""Edge snapping: a mask's edges moved onto the image's colour edges by a guided filter.

The embedded tiny model marks 4 x 4-pixel cells of the decoder's 256 x 256 mask frame, so a small
region's edge can be a pixel or two off (most of its subparts' errors, MODEL_CARD.md). The guided
filter (He, Sun and Tang, "Guided Image Filtering", with the subsampled form of "Fast Guided Filter")
fits, in every window of the low-res frame, the mask's probability as a linear function of the
image's colour, then evaluates the averaged fits at the output's own pixels, so the edge follows the
image's colour edge at full resolution.

- the guide: the image averaged down to the valid part of the low-res frame (``area_resize``, the
  frame's ``newH x newW`` = ``get_preprocess_shape(h, w, 256)``), colours in [0, 1];
- the input: the sigmoid of the decoder's low-res logits there;
- windows of ``2r + 1`` cells clipped at the border (means over the pixels inside), ``eps`` the
  regularizer (a colour step much below ``sqrt(eps)`` is smoothed over);
- the answer: the averaged coefficients resized bilinearly (align_corners=False) to the output's size
  and applied to the image at that size; inside where the result is above 0.5.

The browser's ``frontend/src/edge_snap.ts`` computes the same numbers (its tests compare them with this
module's on fixtures); ``trimask eval`` measures the answers with it when the page snaps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trimask.preprocess import get_preprocess_shape

LOW_RES = 256
RADIUS = 5
EPS = 1e-3


def area_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``H x W x C`` -> ``out_h x out_w x C`` float64, each output the mean of the input pixels in its
    bin ``[floor(i * H / out_h), ceil((i + 1) * H / out_h))`` (torch's adaptive average pooling)."""
    img = np.asarray(image, np.float64)
    h, w = img.shape[:2]
    ys = [(i * h // out_h, -(-(i + 1) * h // out_h)) for i in range(out_h)]
    xs = [(j * w // out_w, -(-(j + 1) * w // out_w)) for j in range(out_w)]
    cols = np.stack([img[:, a:b].mean(axis=1) for a, b in xs], axis=1)
    return np.stack([cols[a:b].mean(axis=0) for a, b in ys], axis=0)


def box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean of ``a`` (``H x W [x C]``) over the ``(2r + 1)``-square window around each pixel, clipped to
    the array (divided by the pixels inside)."""
    h, w = a.shape[:2]
    s = np.zeros((h + 1, w + 1) + a.shape[2:])
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    total = s[y1][:, x1] - s[y0][:, x1] - s[y1][:, x0] + s[y0][:, x0]
    count = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).astype(np.float64)
    return total / count.reshape(count.shape + (1,) * (a.ndim - 2))


def _rgb(image: np.ndarray) -> np.ndarray:
    """An ``H x W``, ``H x W x 1``, ``H x W x 3`` or ``H x W x 4`` image as ``H x W x 3`` (grey repeated, alpha dropped),
    as a canvas's RGBA pixels give it in the browser."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


@dataclass(frozen=True)
class Guide:
    """What the filter needs of one image, made once for all its answers (the browser's ``makeGuide``):
    its colours in [0, 1] on the frame's valid ``newH x newW``, their window means and the inverses of
    their windows' colour covariances + eps I."""

    colours: np.ndarray
    mean: np.ndarray
    inverse: np.ndarray
    r: int
    eps: float


def guide_for(image: np.ndarray, r: int = RADIUS, eps: float = EPS) -> Guide:
    """The guide of an ``H x W [x C]`` uint8 image."""
    h, w = image.shape[:2]
    nh, nw = get_preprocess_shape(h, w, LOW_RES)
    colours = area_resize(_rgb(image), nh, nw) / 255.0
    mean = box_mean(colours, r)
    var = box_mean(colours[..., :, None] * colours[..., None, :], r) - mean[..., :, None] * mean[..., None, :]
    return Guide(colours, mean, np.linalg.inv(var + eps * np.eye(3)), r, eps)


def coefficients(low_res: np.ndarray, guide: Guide) -> tuple[np.ndarray, np.ndarray]:
    """The guided filter's averaged coefficients on the guide's grid: ``A`` (``h x w x 3``) and ``B``
    (``h x w``) with the snapped probability ``A . colour + B``. ``low_res``: the decoder's ``256 x 256``
    logits (its valid part is the guide's size)."""
    h, w = guide.colours.shape[:2]
    p = 1.0 / (1.0 + np.exp(-np.asarray(low_res, np.float64)[:h, :w]))
    mean_p = box_mean(p, guide.r)
    cov_ip = box_mean(guide.colours * p[..., None], guide.r) - guide.mean * mean_p[..., None]
    a = np.einsum("...ij,...j->...i", guide.inverse, cov_ip)
    b = mean_p - (a * guide.mean).sum(-1)
    return box_mean(a, guide.r), box_mean(b, guide.r)


def _bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize ``h x w [x C]`` to ``out_h x out_w`` like ``F.interpolate(bilinear, align_corners=False)``."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    ylo, yhi, wy = axis(a.shape[0], out_h)
    xlo, xhi, wx = axis(a.shape[1], out_w)
    if a.ndim == 3:
        wy, wx = wy[:, None], wx[:, None]
    rows = a[ylo] * (1 - wy)[:, None] + a[yhi] * wy[:, None]
    return rows[:, xlo] * (1 - wx) + rows[:, xhi] * wx


def snap(low_res: np.ndarray, image: np.ndarray, guide: Guide | None = None, out_hw: tuple[int, int] | None = None,
         r: int = RADIUS, eps: float = EPS) -> np.ndarray:
    """The decoder's ``256 x 256`` logits of one answer -> its edge-snapped mask (bool) at the image's
    resolution, or at ``out_hw`` (``image`` then at that size already). ``guide``: ``guide_for`` of the
    full image (computed when not given)."""
    if guide is None or (guide.r, guide.eps) != (r, eps):
        guide = guide_for(image, r, eps)
    a, b = coefficients(low_res, guide)
    h, w = out_hw or image.shape[:2]
    colour = _rgb(image).astype(np.float64) / 255.0
    return (_bilinear(a, h, w) * colour).sum(-1) + _bilinear(b, h, w) > 0.5
