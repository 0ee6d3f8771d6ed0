"""Procedurally generated scenes with a whole > part > subpart hierarchy.

Each scene is deterministic by its seed. Objects (wholes) are random shapes
split into parts (Voronoi cells of the shape, each its own colour and
texture); parts carry small subparts (blobs of a strongly different colour).
Objects overlap and occlude each other; the masks are the *visible* regions.
The levels are made visually separable on purpose (a dark outline around a
whole most of the time, a different colour/texture per part, contrasting
subparts) so a small model can learn them within a CPU budget.

A quarter of the scenes are drawings: a flat background of any colour, flat-coloured objects of one
to three parts, no outline and no noise (diagrams, screenshots, clip art: a flat background must
not read as an object). With ``varied_aspect`` two scenes in five are cropped to a non-square
image, so the model sees the padding that ``trimask.preprocess`` adds to such images.

Label maps keep the hierarchy exact: a subpart id maps to its part, a part id
to its whole, so ``subpart ⊂ part ⊂ whole`` holds by construction.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

LEVELS = ("subpart", "part", "whole")


@dataclass(frozen=True)
class Scene:
    """One generated scene.

    image: ``H x W x 3`` uint8 RGB.
    whole_map / part_map / subpart_map: ``H x W`` int32 label maps of visible
    regions (0 = none). part ids and subpart ids are global within the scene.
    part_parent[p] is the whole id of part p; subpart_parent[s] the part id of
    subpart s (index 0 unused).
    """

    image: np.ndarray
    whole_map: np.ndarray
    part_map: np.ndarray
    subpart_map: np.ndarray
    part_parent: np.ndarray
    subpart_parent: np.ndarray

    def masks_at(self, y: int, x: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The (subpart, part, whole) bool masks containing pixel (y, x), or None on background.

        Where the pixel is in a part but no subpart, the smallest level is the part itself
        (the smallest valid segment containing the click).
        """
        w = int(self.whole_map[y, x])
        if w == 0:
            return None
        p = int(self.part_map[y, x])
        s = int(self.subpart_map[y, x])
        whole = self.whole_map == w
        part = self.part_map == p
        sub = self.subpart_map == s if s else part
        return sub, part, whole

    def subpart_ids(self) -> list[int]:
        """Ids of subparts that are visible (index into subpart_parent)."""
        ids = np.unique(self.subpart_map)
        return [int(i) for i in ids if i != 0]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _around(cy: float, cx: float, extent: float) -> tuple[slice, slice]:
    """The window of a grid within ``extent`` pixels of (cy, cx) (clipped at 0; slicing clips the far end)."""
    y0, x0 = max(0, int(np.floor(cy - extent))), max(0, int(np.floor(cx - extent)))
    return slice(y0, max(y0, int(np.ceil(cy + extent)) + 1)), slice(x0, max(x0, int(np.ceil(cx + extent)) + 1))


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """A random filled shape (ellipse, rounded rectangle or star-convex blob) around (cy, cx).

    Computed in the window that can hold it (no shape reaches beyond 1.42 r from its centre)."""
    win = _around(cy, cx, 1.5 * r + 1)
    out = np.zeros(yy.shape, bool)
    out[win] = _shape_in(rng, yy[win], xx[win], cy, cx, r)
    return out


def _shape_in(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    kind = rng.integers(3)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = -dx * np.sin(ang) + dy * np.cos(ang)
    a = r
    b = r * rng.uniform(0.5, 1.0)
    if kind == 0:
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 1:
        rr = min(a, b) * rng.uniform(0.1, 0.5)
        qu = np.maximum(np.abs(u) - (a - rr), 0)
        qv = np.maximum(np.abs(v) - (b - rr), 0)
        return qu**2 + qv**2 <= rr**2
    theta = np.arctan2(v, u)
    radius = np.full_like(theta, r * 0.8)
    for k in range(1, 4):
        radius += r * rng.uniform(0, 0.25 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, base: np.ndarray, amp: float,
             win: tuple[slice, slice] = (slice(None), slice(None))) -> np.ndarray:
    """``H x W x 3`` float fill: a base colour with stripes, checks or smooth noise on top (only the
    window ``win`` of the ``H x W`` grid of ``yy``, ``xx``; the random draws are the same)."""
    kind = rng.integers(4)
    h, w = yy.shape
    yy, xx = yy[win], xx[win]
    if kind == 0:
        pattern = np.zeros(yy.shape, np.float32)
    elif kind == 1:
        f = rng.uniform(0.15, 0.6)
        ang = rng.uniform(0, np.pi)
        pattern = np.sign(np.sin(f * (xx * np.cos(ang) + yy * np.sin(ang))))
    elif kind == 2:
        c = rng.integers(3, 8)
        pattern = ((xx // c + yy // c) % 2) * 2.0 - 1.0
    else:
        coarse = rng.standard_normal((h // 8 + 2, w // 8 + 2)).astype(np.float32)
        pattern = np.kron(coarse, np.ones((8, 8), np.float32))[:h, :w][win]
        pattern = np.clip(pattern, -1.5, 1.5) / 1.5
    out = base[None, None, :] + amp * pattern[..., None].astype(np.float32) * rng.uniform(0.5, 1.0, 3)[None, None, :]
    return out


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, flat: bool) -> np.ndarray:
    h, w = yy.shape
    if flat:
        colour = _hsv(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.15, 0.95))
        return np.broadcast_to(colour, (h, w, 3)).copy()
    c0 = _hsv(rng.uniform(), rng.uniform(0, 0.5), rng.uniform(0.3, 0.9))
    c1 = _hsv(rng.uniform(), rng.uniform(0, 0.5), rng.uniform(0.3, 0.9))
    ang = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(ang) + yy * np.sin(ang)) / max(h, w) + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return _texture(rng, yy, xx, np.zeros(3, np.float32), rng.uniform(0, 18)) + img


def _contrasting(colour: np.ndarray, against: np.ndarray) -> np.ndarray:
    """``colour``, inverted when it is too close to ``against`` to be seen on it."""
    return 255.0 - colour if np.abs(colour - against).sum() < 120 else colour


def generate_scene(seed: int, *, size: int = 256, max_objects: int = 4, varied_aspect: bool = False) -> Scene:
    """A deterministic scene for ``seed``: image and whole/part/subpart label maps (``size x size``;
    with ``varied_aspect``, two in five are cropped to 50-90 % of their height or width)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E1A]))
    flat = rng.uniform() < 0.25
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, yy, xx, flat)
    backdrop = image[0, 0].copy()
    whole_map = np.zeros((size, size), np.int32)
    part_map = np.zeros((size, size), np.int32)
    subpart_map = np.zeros((size, size), np.int32)
    part_parent = [0]
    subpart_parent = [0]
    n_obj = int(rng.integers(1, max_objects + 1))
    for wid in range(1, n_obj + 1):
        r = size * rng.uniform(0.12, 0.32)
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        shape = _shape_mask(rng, yy, xx, cy, cx, r)
        if shape.sum() < 200:
            continue
        # Parts: Voronoi cells of random seeds inside the shape.
        ys, xs = np.nonzero(shape)
        n_parts = int(rng.integers(1, 4)) if flat else int(rng.integers(2, 5))
        pick = rng.choice(len(ys), size=n_parts, replace=False)
        sy, sx = ys[pick].astype(np.float32), xs[pick].astype(np.float32)
        win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))  # the shape's box
        dist = (yy[win][..., None] - sy) ** 2 + (xx[win][..., None] - sx) ** 2
        cell = np.argmin(dist, axis=-1)
        hue0 = rng.uniform()
        fill = np.zeros((size, size, 3), np.float32)
        obj_part_ids = []
        for k in range(n_parts):
            region = np.zeros_like(shape)
            region[win] = in_box = shape[win] & (cell == k)
            hue = hue0 + k / n_parts + rng.uniform(-0.05, 0.05)
            base = _hsv(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
            if flat:
                fill[win][in_box] = _contrasting(base, backdrop)
            else:
                fill[win][in_box] = _texture(rng, yy, xx, base, rng.uniform(0, 25), win)[in_box]
            pid = len(part_parent)
            part_parent.append(wid)
            obj_part_ids.append((pid, region))
        # Paint the object over what is there (occlusion).
        image[shape] = fill[shape]
        whole_map[shape] = wid
        subpart_map[shape] = 0
        for pid, region in obj_part_ids:
            part_map[region] = pid
        # Subparts: contrasting blobs inside a part.
        for pid, region in obj_part_ids:
            for _ in range(int(rng.integers(0, 3))):
                pys, pxs = np.nonzero(region)
                if len(pys) < 80:
                    break
                i = int(rng.integers(len(pys)))
                rs = rng.uniform(3.5, max(4.0, min(14.0, np.sqrt(len(pys)) * 0.3)))
                blob = _shape_mask(rng, yy, xx, float(pys[i]), float(pxs[i]), rs) & region
                if blob.sum() < 25 or blob.sum() > 0.6 * region.sum():
                    continue
                sid = len(subpart_parent)
                subpart_parent.append(pid)
                col = _hsv(rng.uniform(), rng.uniform(0.3, 1.0), rng.choice([rng.uniform(0.1, 0.35), rng.uniform(0.8, 1.0)]))
                image[blob] = col
                subpart_map[blob] = sid
        if not flat and rng.uniform() < 0.7:  # dark outline: the whole's boundary is a strong cue
            edge = shape & ~_erode(shape)
            image[edge] = image[edge] * 0.25
    if not flat:
        image = image + rng.normal(0, rng.uniform(0, 6), image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if varied_aspect and rng.uniform() < 0.4:
        keep = int(size * rng.uniform(0.5, 0.9))
        cut = (slice(0, keep), slice(None)) if rng.uniform() < 0.5 else (slice(None), slice(0, keep))
        image, whole_map, part_map, subpart_map = (a[cut].copy() for a in (image, whole_map, part_map, subpart_map))
    return _prune(image, whole_map, part_map, subpart_map, np.array(part_parent), np.array(subpart_parent))


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


def _prune(image, whole_map, part_map, subpart_map, part_parent, subpart_parent) -> Scene:
    """Drop regions that occlusion left too small to be meaningful (relabelled as their parent)."""
    for sid in np.unique(subpart_map):
        if sid and (subpart_map == sid).sum() < 20:
            subpart_map[subpart_map == sid] = 0
    for pid in np.unique(part_map):
        if pid and (part_map == pid).sum() < 40:
            region = part_map == pid
            subpart_map[region] = 0
            # merge into a neighbouring visible part of the same whole if any, else drop the whole's pixel labels
            part_map[region] = 0
            whole_map[region] = 0
    for wid in np.unique(whole_map):
        if wid and (whole_map == wid).sum() < 150:
            region = whole_map == wid
            whole_map[region] = 0
            part_map[region] = 0
            subpart_map[region] = 0
    return Scene(image, whole_map, part_map, subpart_map, part_parent, subpart_parent)


# Seed ranges: training run ``s`` uses scene seeds ``s * TRAIN_SEED_STRIDE + i``; evaluation uses
# seeds from EVAL_SEED_BASE up, which no training run with s < 100 reaches.
TRAIN_SEED_STRIDE = 10_000_000
EVAL_SEED_BASE = 1_000_000_000
