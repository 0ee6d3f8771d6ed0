"""COCO run-length encoding: validation and normalization of masks sent by clients.

A COCO RLE is ``{"size": [h, w], "counts": ...}`` describing an h x w binary mask
in column-major (Fortran) order as alternating runs of 0s and 1s, starting with 0s.
``counts`` is either the uncompressed list of run lengths or pycocotools' compact
string (LEB128-like, 6 bits a character, deltas from the run two back).

pycocotools decodes without bounds checks: a string whose runs sum past h*w makes
its C code write past the mask buffer. So every mask from outside is parsed and
checked here first, and only then handed to pycocotools, which computes the
canonical compressed string, the area and the bbox.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from trimask.errors import TrimaskError

# Characters of the compact string are chr(48 + 6-bit group).
_CHAR_MIN, _CHAR_MAX = 48, 48 + 63
# Masks larger than this many pixels are refused (a 16k x 16k image).
MAX_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class NormalizedRle:
    """A validated mask: canonical compressed counts plus what COCO derives from it.

    ``bbox`` is ``[x, y, width, height]`` in pixels, as pycocotools' ``toBbox``.
    """

    height: int
    width: int
    counts: str
    area: int
    bbox: list[float]

    def as_coco(self) -> dict[str, Any]:
        """The COCO segmentation object: ``{"size": [h, w], "counts": str}``."""
        return {"size": [self.height, self.width], "counts": self.counts}


def decode_counts_string(counts: str, limit: int) -> list[int]:
    """Parse pycocotools' compact counts string into run lengths.

    Stops with a ``TrimaskError`` as soon as the runs sum past ``limit``, so a
    hostile string costs at most one pass and never an out-of-bounds write.
    """
    runs: list[int] = []
    total = 0
    value = 0
    shift = 0
    for ch in counts:
        code = ord(ch)
        if code < _CHAR_MIN or code > _CHAR_MAX:
            raise TrimaskError(f"the RLE counts string has an invalid character {ch!r}.")
        c = code - _CHAR_MIN
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue  # more 5-bit groups follow
        if c & 0x10:
            value |= -1 << shift  # sign-extend the last group
        if len(runs) > 2:
            value += runs[-2]  # runs after the third are stored as deltas
        if value < 0:
            raise TrimaskError("the RLE counts string decodes to a negative run length.")
        runs.append(value)
        total += value
        if total > limit:
            raise TrimaskError("the RLE runs cover more pixels than the mask's size.")
        value = 0
        shift = 0
    if shift:
        raise TrimaskError("the RLE counts string ends in the middle of a number.")
    return runs


def canonical_runs(runs: list[int]) -> list[int]:
    """Merge runs separated by zero-length ones, so equal masks get equal counts.

    ``[0, 2, 0, 3, 15]`` (2 ones, no zeros, 3 ones, 15 zeros) becomes ``[0, 5, 15]``.
    The first run always counts zeros, so it may be 0.
    """
    out: list[int] = []
    for i, length in enumerate(runs):
        if length == 0:
            continue
        value = i % 2
        if out and (len(out) - 1) % 2 == value:
            out[-1] += length
        elif not out and value == 1:
            out.extend([0, length])
        else:
            out.append(length)
    return out or [0]


def _validate_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise TrimaskError('the segmentation "size" must be a list of two integers [height, width].')
    h, w = size
    if h < 1 or w < 1 or h * w > MAX_PIXELS:
        raise TrimaskError(f"the segmentation size {size} is not a valid image size.")
    return h, w


def _validate_run_list(counts: list[Any], limit: int) -> list[int]:
    runs: list[int] = []
    total = 0
    for v in counts:
        if not isinstance(v, int) or isinstance(v, bool):
            raise TrimaskError("the RLE counts list must hold only integers.")
        if v < 0:
            raise TrimaskError("the RLE counts list holds a negative run length.")
        total += v
        if total > limit:
            raise TrimaskError("the RLE runs cover more pixels than the mask's size.")
        runs.append(v)
    return runs


def normalize_rle(segmentation: Any, expected_hw: tuple[int, int] | None = None) -> NormalizedRle:
    """Validate a COCO RLE from outside and return its canonical form.

    Args:
        segmentation: ``{"size": [h, w], "counts": str | list[int]}``.
        expected_hw: the image's (height, width) after EXIF orientation; the
            mask must have exactly this size.

    Raises:
        TrimaskError: naming what is wrong (shape, characters, runs, size, empty mask).
    """
    if not isinstance(segmentation, dict):
        raise TrimaskError('"segmentation" must be an object {"size": [h, w], "counts": ...}.')
    unknown = set(segmentation) - {"size", "counts"}
    if unknown:
        raise TrimaskError(f'"segmentation" has unexpected keys: {", ".join(sorted(unknown))}.')
    h, w = _validate_size(segmentation.get("size"))
    if expected_hw is not None and (h, w) != tuple(expected_hw):
        raise TrimaskError(
            f"the mask size [{h}, {w}] does not match the image size [{expected_hw[0]}, {expected_hw[1]}]."
        )
    counts = segmentation.get("counts")
    n = h * w
    if isinstance(counts, str):
        runs = decode_counts_string(counts, n)
    elif isinstance(counts, list):
        runs = _validate_run_list(counts, n)
    else:
        raise TrimaskError('the segmentation "counts" must be a string or a list of integers.')
    if sum(runs) != n:
        raise TrimaskError(f"the RLE runs cover {sum(runs)} pixels but the mask has {n} ({h} x {w}).")
    # Safe now: the runs sum to exactly h*w. Re-encode for a canonical string.
    rle = mask_util.frPyObjects({"size": [h, w], "counts": canonical_runs(runs)}, h, w)
    area = int(mask_util.area(rle))
    if area == 0:
        raise TrimaskError("the mask is empty: it has no foreground pixels.")
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    return NormalizedRle(height=h, width=w, counts=rle["counts"].decode("ascii"), area=area, bbox=bbox)


def rle_from_polygons(polygons: list[list[float]], height: int, width: int) -> NormalizedRle:
    """Rasterize COCO polygons (``[[x0, y0, x1, y1, ...], ...]``) into one canonical RLE."""
    if not isinstance(polygons, list) or not polygons:
        raise TrimaskError("a polygon segmentation must be a non-empty list of coordinate lists.")
    for poly in polygons:
        if (
            not isinstance(poly, list)
            or len(poly) < 6
            or len(poly) % 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in poly)
        ):
            raise TrimaskError("each polygon must be a list of at least 3 finite x, y pairs.")
    rles = mask_util.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    rle = mask_util.merge(rles)
    counts = rle["counts"].decode("ascii")
    return normalize_rle({"size": [height, width], "counts": counts}, (height, width))


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a H x W boolean/uint8 mask as a COCO RLE with a str ``counts``."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(segmentation: dict[str, Any]) -> np.ndarray:
    """Decode a validated COCO RLE into a H x W uint8 mask (0/1)."""
    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    if isinstance(counts, list):
        h, w = segmentation["size"]
        rle = mask_util.frPyObjects(rle, h, w)
    return mask_util.decode(rle)
