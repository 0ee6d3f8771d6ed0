"""trimask.preprocess against the official ResizeLongestSide + Sam.preprocess."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint_factory  # noqa: F401  (installs the torchvision stand-in)
from segment_anything.modeling import Sam as OfficialSam
from segment_anything.utils.transforms import ResizeLongestSide
from trimask.preprocess import (
    apply_boxes,
    apply_coords,
    get_preprocess_shape,
    normalize_and_pad,
    preprocess,
    resize_longest_side,
)

SIZES = [(600, 800), (800, 600), (1024, 1024), (333, 1000), (1000, 333), (100, 150), (2048, 1536), (7, 1301)]


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def official_sam() -> OfficialSam:
    """An official Sam with stand-in parts: only preprocess (mean/std buffers, img_size) is used."""
    encoder = nn.Identity()
    encoder.img_size = 1024
    return OfficialSam(image_encoder=encoder, prompt_encoder=nn.Identity(), mask_decoder=nn.Identity())


def official_preprocess(image: np.ndarray, sam: OfficialSam) -> torch.Tensor:
    """What SamPredictor.set_image feeds the encoder."""
    resized = ResizeLongestSide(1024).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(x)


@pytest.mark.parametrize("h, w", SIZES + [(1, 1), (3, 4000), (1023, 1025)])
def test_preprocess_shape_equals_official(h, w):
    assert get_preprocess_shape(h, w) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


@pytest.mark.parametrize("h, w", SIZES)
def test_resize_equals_official_bit_for_bit(h, w):
    image = random_image(h, w)
    expected = ResizeLongestSide(1024).apply_image(image)
    actual = resize_longest_side(image)
    assert actual.dtype == np.uint8 and actual.shape == expected.shape
    assert np.array_equal(actual, expected)


@pytest.mark.parametrize("h, w", SIZES[:4])
def test_preprocess_equals_official_normalize_and_pad(h, w, official_sam):
    image = random_image(h, w, seed=h + w)
    expected = official_preprocess(image, official_sam)
    actual = preprocess(image)
    assert actual.shape == (1, 3, 1024, 1024) and actual.dtype == torch.float32
    assert torch.allclose(actual, expected, rtol=0, atol=1e-6)


def test_padding_is_zero_bottom_right_after_normalization():
    x = preprocess(np.full((500, 1000, 3), 255, dtype=np.uint8))
    assert torch.all(x[..., 512:, :] == 0)
    assert torch.all(x[..., :512, :] > 0)


def test_normalize_and_pad_takes_batches():
    batch = torch.full((2, 3, 100, 50), 128, dtype=torch.uint8)
    out = normalize_and_pad(batch)
    assert out.shape == (2, 3, 1024, 1024)
    assert torch.all(out[:, :, 100:, :] == 0) and torch.all(out[:, :, :, 50:] == 0)


@pytest.mark.parametrize("h, w", SIZES)
def test_coords_and_boxes_equal_official(h, w):
    coords = np.array([[0.0, 0.0], [w - 1, h - 1], [w / 3, h / 2]])
    boxes = np.array([[1.0, 2.0, w - 3.0, h - 4.0]])
    transform = ResizeLongestSide(1024)
    assert np.array_equal(apply_coords(coords, (h, w)), transform.apply_coords(coords, (h, w)))
    assert np.array_equal(apply_boxes(boxes, (h, w)), transform.apply_boxes(boxes, (h, w)))


def test_apply_coords_does_not_change_its_input():
    coords = np.array([[10, 20]], dtype=np.int64)
    out = apply_coords(coords, (512, 256))
    assert coords.tolist() == [[10, 20]] and out.tolist() == [[20.0, 40.0]]


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3))])
def test_resize_rejects_non_rgb_uint8(bad):
    with pytest.raises(ValueError):
        resize_longest_side(bad)
