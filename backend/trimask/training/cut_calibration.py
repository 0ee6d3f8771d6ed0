"""Choosing where the tiny encoder's pattern head cuts, for the weights at hand.

The pattern head (``trimask.training.pattern_pretrain``) gives, per cell, level and pixel, a logit that
the pixel lies outside the region at the cell's centre; the encoder writes a pixel as outside only above
``TinyImageEncoder.pattern_cut`` (below, the cell's mark stays there). Where to cut depends on everything
the decoder reads beside the patterns (the codes, the second codes, the thresholds): the default, 2, was
chosen when the head was first trained, before the code path learned from SAM's loss (stage 2e). This
stage sets the cut in ``CUT_GRID`` at which the first click's candidates fit their levels best: at clicks
on subparts (at their centres, as ``trimask eval`` clicks, the same clicks for every cut), the mean over
the three levels of each candidate's (token 1 / 2 / 3) mean IoU with its level's mask. Of the cuts within
``CUT_TOLERANCE`` of the best it takes the highest, the one that rewrites the fewest pixels.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from trimask.models.sam import Sam
from trimask.training.evaluate import clicked_scenes
from trimask.training.match_calibration import own_level_ious
from trimask.training.scenes import LEVELS, Scene

CUT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)  # logits; 2 is the default (p 0.88), 0 is p 0.5
CUT_TOLERANCE = 0.0005  # of the mean over levels: nearer the best than this is a tie, and ties go to the higher cut


@torch.no_grad()
def calibrate_cut(sam: Sam, scenes: Iterable[Scene], *, grid: tuple[float, ...] = CUT_GRID, seed: int = 0) -> dict:
    """Set ``sam.image_encoder.pattern_cut`` to the highest cut of ``grid`` whose first-click candidates fit
    their levels within ``CUT_TOLERANCE`` of the best cut's (mean over levels of each candidate's mean IoU,
    up to two subpart clicks per scene). Returns the cut, the clicks and each cut's per-level and mean IoU."""
    encoder = sam.image_encoder
    if getattr(encoder, "pattern", None) is None:
        raise ValueError("the encoder has no pattern head")
    scenes = list(scenes)
    before = encoder.pattern_cut
    totals = np.zeros((len(grid), 3))
    clicks = 0
    sam.eval()
    for g, cut in enumerate(grid):
        encoder.pattern_cut = float(cut)
        clicks = 0
        for inst, hw, emb in clicked_scenes(sam, scenes, np.random.default_rng(seed)):
            totals[g] += own_level_ious(sam, inst, hw, emb).sum(0)
            clicks += len(inst)
    if not clicks:
        encoder.pattern_cut = before
        raise ValueError("no scene had a subpart to click; nothing to calibrate on")
    per_level = totals / clicks
    mean = per_level.mean(1)
    near = np.flatnonzero(mean >= mean.max() - CUT_TOLERANCE)
    chosen = float(grid[int(max(near, key=lambda i: grid[i]))])
    encoder.pattern_cut = chosen
    return {"cut": chosen, "clicks": clicks, "mean_iou": {str(c): round(float(m), 4) for c, m in zip(grid, mean)},
            "iou": {name: {str(c): round(float(per_level[i, lv]), 4) for i, c in enumerate(grid)}
                    for lv, name in enumerate(LEVELS)}}
