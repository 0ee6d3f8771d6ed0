"""COCO RLE validation: what pycocotools would accept, checked before pycocotools sees it."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from trimask.errors import TrimaskError
from trimask.service import rle


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    mask = (rng.random((h, w)) > 0.7).astype(np.uint8)
    mask[rng.integers(h), rng.integers(w)] = 1
    return mask


def test_counts_string_parser_agrees_with_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        encoded = mask_util.encode(np.asfortranarray(_random_mask(rng, h, w)))
        runs = rle.decode_counts_string(encoded["counts"].decode(), h * w)
        back = mask_util.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        assert back["counts"] == encoded["counts"]
        assert sum(runs) == h * w


def test_compressed_and_uncompressed_counts_normalize_to_the_same_mask():
    rng = np.random.default_rng(1)
    mask = _random_mask(rng, 23, 31)
    compressed = mask_util.encode(np.asfortranarray(mask))["counts"].decode()
    runs = rle.decode_counts_string(compressed, mask.size)
    a = rle.normalize_rle({"size": [23, 31], "counts": compressed}, (23, 31))
    b = rle.normalize_rle({"size": [23, 31], "counts": runs}, (23, 31))
    assert a == b
    assert a.area == int(mask.sum())
    np.testing.assert_array_equal(rle.decode_mask(a.as_coco()), mask)
    ys, xs = np.nonzero(mask)
    assert a.bbox == [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_non_canonical_runs_with_zero_lengths_are_re_encoded_canonically():
    # 0 zeros, 2 ones, 0 zeros, 3 ones, 15 zeros == 5 ones then 15 zeros
    a = rle.normalize_rle({"size": [4, 5], "counts": [0, 2, 0, 3, 15]}, (4, 5))
    b = rle.normalize_rle({"size": [4, 5], "counts": [0, 5, 15]}, (4, 5))
    assert a.counts == b.counts and a.area == 5


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ({"size": [4, 5], "counts": [0, 5, 14]}, "cover 19 pixels"),
        ({"size": [4, 5], "counts": [0, 5, 16]}, "more pixels"),
        ({"size": [4, 5], "counts": [0, -5, 25]}, "negative"),
        ({"size": [4, 5], "counts": [0, 5.0, 15]}, "integers"),
        ({"size": [4, 5], "counts": [0, True, 19]}, "integers"),
        ({"size": [4, 5], "counts": [20]}, "empty"),
        ({"size": [4, 5], "counts": "0" * 3 + "\x7f"}, "invalid character"),
        ({"size": [4, 5], "counts": "o"}, "middle of a number"),
        ({"size": [4, 5], "counts": "oooooo?" * 50}, "more pixels"),  # huge runs: would overflow pycocotools' buffer
        ({"size": [4, 5], "counts": 7}, "string or a list"),
        ({"size": [4], "counts": "0"}, "two integers"),
        ({"size": [0, 5], "counts": []}, "not a valid image size"),
        ({"size": [100000, 100000], "counts": []}, "not a valid image size"),
        ({"size": ["4", 5], "counts": []}, "two integers"),
        ({"counts": [20]}, "two integers"),
        ({"size": [4, 5], "counts": [0, 5, 15], "extra": 1}, "unexpected keys"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_rle_is_refused_with_a_clear_message(segmentation, message):
    with pytest.raises(TrimaskError, match=message):
        rle.normalize_rle(segmentation)


def test_mask_of_another_size_than_the_image_is_refused():
    with pytest.raises(TrimaskError, match=r"\[4, 5\] does not match the image size \[5, 4\]"):
        rle.normalize_rle({"size": [4, 5], "counts": [0, 5, 15]}, (5, 4))


def test_negative_delta_in_a_counts_string_is_refused():
    # runs after the third are deltas from the run two back: a large negative delta
    # would make a negative run, which pycocotools would read as a huge unsigned one.
    runs = [1, 1, 10, 1]
    good = mask_util.frPyObjects({"size": [13, 1], "counts": runs}, 13, 1)["counts"].decode()
    bad = good[:-1] + "X"  # 'X' - 48 = 40 = 0b101000: more-bit set; then end mid-number
    with pytest.raises(TrimaskError):
        rle.normalize_rle({"size": [13, 1], "counts": bad})
    negative = good[:3] + chr(48 + 0x10 | 0)  # a final group with the sign bit: delta -16
    with pytest.raises(TrimaskError, match="negative|cover"):
        rle.normalize_rle({"size": [13, 1], "counts": negative})


def test_polygons_rasterize_like_pycocotools():
    polygons = [[2.0, 2.0, 20.0, 2.0, 20.0, 12.0, 2.0, 12.0]]
    got = rle.rle_from_polygons(polygons, 16, 24)
    expected = mask_util.merge(mask_util.frPyObjects(polygons, 16, 24))
    assert got.counts == expected["counts"].decode()
    with pytest.raises(TrimaskError, match="at least 3"):
        rle.rle_from_polygons([[1, 2, 3, 4]], 16, 24)
