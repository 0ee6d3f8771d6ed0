"""SAM's input preprocessing, numerically identical to the official pipeline.

The official ``ResizeLongestSide.apply_image`` resizes with PIL's bilinear filter (through
torchvision, which hands PIL images to PIL); ``Sam.preprocess`` then normalizes with SAM's pixel
mean/std and zero-pads bottom-right to 1024 x 1024. We call PIL directly and say so here.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

IMAGE_SIZE = 1024
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def get_preprocess_shape(h: int, w: int, long_side: int = IMAGE_SIZE) -> tuple[int, int]:
    """(newh, neww) with the longest side scaled to long_side, rounded half up as officially."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = IMAGE_SIZE) -> np.ndarray:
    """image: H x W x 3 uint8 -> newh x neww x 3 uint8, PIL bilinear (antialiased when shrinking)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    newh, neww = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))


def normalize_and_pad(resized: torch.Tensor, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """resized: B x 3 x h x w pixels (0..255, any dtype) -> B x 3 x image_size x image_size float32,
    normalized with SAM's mean/std, zero-padded bottom-right (padding is 0 after normalization)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=resized.device).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=resized.device).view(-1, 1, 1)
    x = (resized.to(torch.float32) - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, image_size - w, 0, image_size - h))


def preprocess(image: np.ndarray) -> torch.Tensor:
    """image: H x W x 3 uint8 RGB -> 1 x 3 x 1024 x 1024 float32, ready for the image encoder."""
    resized = resize_longest_side(image)
    return normalize_and_pad(torch.from_numpy(resized).permute(2, 0, 1)[None])


def apply_coords(coords: np.ndarray, orig_hw: tuple[int, int], long_side: int = IMAGE_SIZE) -> np.ndarray:
    """coords: ... x 2 (x, y) in original image pixels -> the same points in the resized (1024) frame, float64."""
    old_h, old_w = orig_hw
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out


def apply_boxes(boxes: np.ndarray, orig_hw: tuple[int, int], long_side: int = IMAGE_SIZE) -> np.ndarray:
    """boxes: B x 4 (x0, y0, x1, y1) in original pixels -> B x 4 in the resized frame."""
    return apply_coords(np.asarray(boxes).reshape(-1, 2, 2), orig_hw, long_side).reshape(-1, 4)
