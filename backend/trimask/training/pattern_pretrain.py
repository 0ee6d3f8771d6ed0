"""Training the tiny encoder's pattern head: which of a cell's 4 x 4 pixels lie outside its own region.

The code-match decoder marks whole cells of the 64 x 64 grid; a subpart a few cells wide loses most of
its area to the cells it shares with its neighbours. With ``pattern_offset`` the tiny encoder also
writes, per cell and level, whether each of the cell's 16 pixels of the decoder's 256 x 256 grid lies
outside the region at the cell's centre (``cell_labels``'s region), and the decoder
(``decoder_start.pattern_gates``) switches that level's mark off there. This module trains the head
alone, the rest of the encoder frozen, so the codes stay bit for bit what they were: a binary
cross-entropy per pixel in which, for each level, the cells that hold two regions and the cells that
hold one weigh half each (most cells hold one, and those are easy). A calibrated plain mean was tried:
8 minutes of it found half the outside pixels (precision 0.81) where this loss finds nine in ten
(precision 0.74), and held-out subparts rose by 0.03 against 0.05.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trimask.training.code_pretrain import GRID, clipped_step, scheduled_batches
from trimask.training.scenes import Scene

SUB = 4  # pixels of the decoder's 256 x 256 grid along a cell's side


def pattern_targets(scene: Scene, grid: int = GRID) -> np.ndarray:
    """``3 x 16 x grid x grid`` (subpart, part, whole; the cell's pixels row by row): 1 where the pixel's
    region differs from the region at the cell's centre pixel, 0 where it is the same.

    The grid covers the padded square frame (padding is background); a pixel of a part without subparts
    has that part as its subpart, as in ``code_pretrain.cell_labels``.
    """
    h, w = scene.part_map.shape
    side = grid * SUB
    idx = ((np.arange(side) + 0.5) * max(h, w) / side).astype(int)
    rows, cols = idx[idx < h], idx[idx < w]
    sub = np.where(scene.subpart_map > 0, scene.subpart_map, scene.part_map + int(scene.subpart_map.max()) + 1)
    sub = np.where(scene.whole_map > 0, sub, 0)
    out = np.zeros((3, 16, grid, grid), np.float32)
    for lv, labels in enumerate((sub, scene.part_map, scene.whole_map)):
        frame = np.zeros((side, side), np.int64)
        frame[: len(rows), : len(cols)] = labels[np.ix_(rows, cols)]
        blocks = frame.reshape(grid, SUB, grid, SUB).transpose(1, 3, 0, 2).reshape(16, grid, grid)
        out[lv] = blocks != blocks[2 * SUB + 2]  # the centre pixel: row 2, column 2 of the cell
    return out


def pattern_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``B x 48 x g x g`` logits against ``B x 3 x 16 x g x g`` targets: per scene and level, the mean
    cross-entropy over the cells that hold two regions and over the cells that hold one, half each (most
    cells hold one, and those are easy); the mean over scenes and levels."""
    logits = logits.reshape(targets.shape)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(2)  # B x 3 x g x g
    mixed = (targets.amax(2) > 0).float()
    loss = 0.0
    for weight in (mixed, 1.0 - mixed):
        loss = loss + 0.5 * (ce * weight).flatten(2).sum(2) / weight.flatten(2).sum(2).clamp(min=1.0)
    return loss.mean()


def pattern_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per level, the fraction of pixels of cells holding two regions that the head gets right."""
    pred = logits.reshape(targets.shape) > 0
    mixed = targets.amax(2, keepdim=True).expand_as(targets) > 0
    right = (pred == (targets > 0)) & mixed
    return [float(right[:, lv].sum() / mixed[:, lv].sum().clamp(min=1)) for lv in range(3)]


def pretrain_patterns(
    encoder: torch.nn.Module,
    scenes: Callable[[int], Scene],
    *,
    steps: int,
    seed: int = 0,
    lr: float = 2e-3,
    batch: int = 4,
    workers: int = 0,
    max_seconds: float | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Train ``encoder.pattern`` (in place) on ``scenes(i)``, ``batch`` scenes a step, the rest of the encoder
    frozen. AdamW, 50 warm-up steps, cosine decay to 5 % over the steps or ``max_seconds``, whichever ends
    first. Returns steps, scenes, seconds, the smoothed loss and the last steps' accuracy on mixed cells."""
    if getattr(encoder, "pattern", None) is None:
        raise ValueError("the encoder has no pattern head (build it with pattern_offset)")
    if batch < 1 or workers < 0:
        raise ValueError("batch must be 1 or more and workers 0 or more")
    torch.manual_seed(seed)
    head = encoder.pattern
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=True)
    encoder.eval()
    head.train()
    start, ema, done, accuracy = time.time(), None, 0, [0.0, 0.0, 0.0]
    for step, x, batch_scenes in scheduled_batches(opt, lr, scenes, encoder, steps=steps, batch=batch, workers=workers,
                                                   max_seconds=max_seconds):
        targets = torch.from_numpy(np.stack([pattern_targets(s) for s in batch_scenes])).to(x.device)
        with torch.no_grad():
            features = encoder.trunk(x)
        logits = head(x, features)
        ema = clipped_step(opt, params, pattern_loss(logits, targets), ema)
        done = step + 1
        if progress:
            progress(1)
        if step % 20 == 0:
            accuracy = pattern_accuracy(logits.detach(), targets)
            log(f"patterns step {step} t={time.time() - start:.0f}s loss={ema:.3f} mixed-cell accuracy "
                + " / ".join(f"{a:.3f}" for a in accuracy))
    head.eval()
    return {"steps": done, "scenes": done * batch, "batch": batch, "seconds": time.time() - start, "loss": ema,
            "mixed_cell_accuracy": accuracy}
