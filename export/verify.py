"""Checks of an exported decoder: prompts, ONNX feeds, the PyTorch reference, agreement.

Used by the parity tests and by ``bench/decoder.py``; nothing here is needed
to serve the decoder.

Prompts are in image pixels (as the annotator's clicks); ``decoder_inputs``
maps them to the decoder's 1024 frame the way SAM's ``ResizeLongestSide``
does and adds the padding point when there is no box.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

LOW_RES = 256
INPUT_SIZE = 1024


@dataclass
class Prompt:
    """One decoder call in image pixels.

    points: N x 2 (x, y); labels: N (1 foreground, 0 background); box: (x0, y0, x1, y1) or None;
    mask_input: 1 x 1 x 256 x 256 logits (a previous low_res_masks token) or None.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    box: tuple[float, float, float, float] | None = None
    mask_input: np.ndarray | None = None


def resized_hw(orig_hw: tuple[int, int], long_side: int = INPUT_SIZE) -> tuple[int, int]:
    """(H, W) -> (h, w) with the longest side ``long_side``, rounded as SAM does (at least 1)."""
    h, w = orig_hw
    scale = long_side / max(h, w)
    return max(1, int(np.floor(h * scale + 0.5))), max(1, int(np.floor(w * scale + 0.5)))


def to_input_frame(xy: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """... x 2 (x, y) image pixels -> the 1024 frame (SAM's ``apply_coords``)."""
    h, w = orig_hw
    new_h, new_w = resized_hw(orig_hw)
    out = np.asarray(xy, np.float32).copy()
    out[..., 0] *= new_w / w
    out[..., 1] *= new_h / h
    return out


def decoder_inputs(prompt: Prompt, orig_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """-> point_coords f32 [1, N', 2] (1024 frame) and point_labels f32 [1, N'].

    Points first, then the box as two corners labelled 2 and 3; without a box a
    (0, 0) point labelled -1 is appended (SAM's padding).
    """
    coords = [to_input_frame(prompt.points.reshape(-1, 2), orig_hw)]
    labels = [np.asarray(prompt.labels, np.float32).reshape(-1)]
    if prompt.box is not None:
        coords.append(to_input_frame(np.asarray(prompt.box, np.float32).reshape(2, 2), orig_hw))
        labels.append(np.array([2.0, 3.0], np.float32))
    else:
        coords.append(np.zeros((1, 2), np.float32))
        labels.append(np.array([-1.0], np.float32))
    return np.concatenate(coords)[None].astype(np.float32), np.concatenate(labels)[None].astype(np.float32)


def onnx_feeds(embedding: np.ndarray, prompt: Prompt, orig_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """The decoder.onnx inputs for one prompt on an image of size orig_hw (H, W)."""
    coords, labels = decoder_inputs(prompt, orig_hw)
    has_mask = prompt.mask_input is not None
    mask = prompt.mask_input if has_mask else np.zeros((1, 1, LOW_RES, LOW_RES), np.float32)
    return {
        "image_embeddings": np.ascontiguousarray(embedding, dtype=np.float32),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": np.asarray(mask, np.float32),
        "has_mask_input": np.array([1.0 if has_mask else 0.0], np.float32),
        "orig_im_size": np.array(orig_hw, np.float32),
    }


@torch.no_grad()
def torch_reference(
    sam: torch.nn.Module, embedding: np.ndarray, prompt: Prompt, orig_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch decoder through the model's own prompt encoder (points, boxes and
    masks passed separately, as SamPredictor does) -> (iou [1, 4], low_res logits [1, 4, 256, 256])."""
    points = None
    if len(prompt.labels):
        coords = torch.from_numpy(to_input_frame(prompt.points.reshape(-1, 2), orig_hw))[None]
        points = (coords, torch.from_numpy(np.asarray(prompt.labels, np.float32))[None])
    boxes = None
    if prompt.box is not None:
        box = to_input_frame(np.asarray(prompt.box, np.float32).reshape(2, 2), orig_hw).reshape(1, 4)
        boxes = torch.from_numpy(box)
    masks = None if prompt.mask_input is None else torch.from_numpy(np.asarray(prompt.mask_input, np.float32))
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    low_res, iou = sam.mask_decoder.predict_masks(
        image_embeddings=torch.from_numpy(np.asarray(embedding, np.float32)),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )
    return iou.numpy(), low_res.numpy()


def full_resolution_masks(low_res: np.ndarray, orig_hw: tuple[int, int]) -> np.ndarray:
    """SAM's postprocessing: [1, T, 256, 256] logits -> bool [T, H, W] (the accepted masks)."""
    logits = torch.from_numpy(np.asarray(low_res, np.float32))
    up = torch.nn.functional.interpolate(logits, (INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    h, w = resized_hw(orig_hw)
    up = up[..., :h, :w]
    up = torch.nn.functional.interpolate(up, tuple(orig_hw), mode="bilinear", align_corners=False)
    return (up[0] > 0).numpy()


def random_prompt(rng: np.random.Generator, orig_hw: tuple[int, int], kind: str | None = None) -> Prompt:
    """A plausible click sequence: one point, several points, a box, or a box with points."""
    h, w = orig_hw
    kind = kind or str(rng.choice(["point", "points", "box", "box+points"], p=[0.4, 0.3, 0.15, 0.15]))

    def points(count: int) -> tuple[np.ndarray, np.ndarray]:
        xy = rng.uniform([0, 0], [w, h], size=(count, 2)).astype(np.float32)
        labels = np.ones(count, np.float32)
        labels[1:] = rng.integers(0, 2, count - 1)
        return xy, labels

    if kind == "point":
        xy, labels = points(1)
        return Prompt(xy, labels)
    if kind == "points":
        return Prompt(*points(int(rng.integers(2, 6))))
    x0, x1 = np.sort(rng.uniform(0, w, 2))
    y0, y1 = np.sort(rng.uniform(0, h, 2))
    box = (float(x0), float(y0), float(x1) + 1, float(y1) + 1)
    if kind == "box":
        return Prompt(box=box)
    return Prompt(*points(int(rng.integers(1, 3))), box=box)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def agreement(
    session_a,
    session_b,
    embeddings: list[np.ndarray],
    orig_hw: tuple[int, int],
    prompts_per_embedding: int,
    seed: int = 0,
) -> dict[str, float]:
    """Compare two decoder sessions (e.g. fp32 and quantized) over random prompts.

    For each prompt and each of the 4 tokens: IoU of the thresholded masks in the
    image's valid 256-frame region, and the absolute difference of the predicted IoU.
    Returns mean / median / 5th percentile / min of the mask IoUs, the share of
    tokens with IoU >= 0.9, and the mean / max predicted-IoU difference.
    """
    rng = np.random.default_rng(seed)
    h, w = resized_hw(orig_hw, LOW_RES)
    ious: list[float] = []
    score_diffs: list[float] = []
    for embedding in embeddings:
        for _ in range(prompts_per_embedding):
            feeds = onnx_feeds(embedding, random_prompt(rng, orig_hw), orig_hw)
            score_a, low_a = session_a.run(["iou_predictions", "low_res_masks"], feeds)
            score_b, low_b = session_b.run(["iou_predictions", "low_res_masks"], feeds)
            for token in range(low_a.shape[1]):
                ious.append(mask_iou(low_a[0, token, :h, :w] > 0, low_b[0, token, :h, :w] > 0))
            score_diffs.extend(np.abs(score_a - score_b).ravel().tolist())
    values = np.array(ious)
    return {
        "masks": float(len(values)),
        "iou_mean": float(values.mean()),
        "iou_median": float(np.median(values)),
        "iou_p5": float(np.percentile(values, 5)),
        "iou_min": float(values.min()),
        "share_iou_ge_0.9": float((values >= 0.9).mean()),
        "score_diff_mean": float(np.mean(score_diffs)),
        "score_diff_max": float(np.max(score_diffs)),
    }
