"""Choosing the code-match decoder's match thresholds for the codes an encoder has learned.

The code loss (``trimask.training.code_pretrain``) pushes one region's dot products above 8 and the
rest below, but where a decoder should cut depends on how the learned codes spread: pushed hard,
a region's own dot products end far above 8 while the codes of its neighbours sit just above it,
so the start's threshold (``SINK_GAIN``) marks too much. This module measures, on training scenes,
which sink logit of each level's comparison head makes that level's candidate fit best, and sets it.

Each level's mean IoU rises slowly with the sink logit up to its best and then falls off a cliff
(the threshold passes the region's own dot products), and a few hundred clicks measure it to about
0.01, so a raw best often sits at the cliff's edge, where a held-out scene loses most. The choice is
therefore the loosest logit whose mean IoU is within ``TOLERANCE`` of the best. Measured on a full
run's codes (``trimask eval --scenes 20 --seed 7``, apart from the model card's scenes): the raw
best on 128 cropped training scenes, 2.0 / 1.833 / 1.833, scored wholes 0.700 and ranked-first
0.688; this rule on uncropped ones, 2.0 / 1.667 / 1.5, 0.747 and 0.759, subparts alike (0.383).
The calibration scenes are uncropped, like ``trimask eval``'s: on cropped ones, whose objects the
crop cuts smaller, the same codes' best whole threshold is stricter (1.833 against 1.5).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from trimask.models.sam import Sam
from trimask.training.decoder_start import set_match_gains
from trimask.training.evaluate import _iou, center_point, clicked_scenes, postprocess
from trimask.training.scenes import LEVELS, Scene
from trimask.training.trainer import decode, to_frame

# Sink logits tried, around the start's 1.33 (0.67 marks more cells, 2.67 far fewer).
MATCH_GAIN_GRID = tuple(round(2 / 3 + i / 6, 3) for i in range(13))
TOLERANCE = 0.01  # about what a few hundred clicks measure a level's mean IoU to


@torch.no_grad()
def calibrate_match(sam: Sam, scenes: Iterable[Scene], *, grid: tuple[float, ...] = MATCH_GAIN_GRID,
                    seed: int = 0) -> dict:
    """Set, per level, the loosest sink logit from ``grid`` (ascending) at which that level's multimask
    candidate (token 1 / 2 / 3) fits that level's mask within ``TOLERANCE`` of the best mean IoU over
    the grid, at clicks on subparts (at their centres, as ``trimask eval`` clicks, up to two per
    scene). Returns the gains chosen, the mean IoU at each gain and level, and the number of clicks."""
    rng = np.random.default_rng(seed)
    totals = np.zeros((len(grid), 3))
    clicks = 0
    sam.eval()
    for inst, hw, emb in clicked_scenes(sam, scenes, rng):
        for g, gain in enumerate(grid):
            set_match_gains(sam, (gain,) * 3)
            totals[g] += own_level_ious(sam, inst, hw, emb).sum(0)
        clicks += len(inst)
    if not clicks:
        raise ValueError("no scene had a subpart to click; nothing to calibrate on")
    mean = totals / clicks
    chosen = tuple(float(grid[loosest_near_best(mean[:, lv])]) for lv in range(3))
    set_match_gains(sam, chosen)
    return {"gains": list(chosen), "clicks": clicks,
            "iou": {name: {str(g): round(float(mean[i, lv]), 4) for i, g in enumerate(grid)}
                    for lv, name in enumerate(LEVELS)}}


def own_level_ious(sam: Sam, inst: list, hw: tuple[int, int], emb: torch.Tensor) -> np.ndarray:
    """``len(inst) x 3``: at a click at the centre of each instance's subpart (``clicked_scenes``'s), the IoU
    of multimask candidate 1 / 2 / 3 with the instance's subpart / part / whole."""
    device = emb.device
    pts = torch.tensor(np.stack([to_frame(np.array([center_point(s)]), hw) for s, _, _ in inst]),
                       dtype=torch.float32, device=device)
    lbl = torch.ones(len(inst), 1, device=device)
    cands = postprocess(decode(sam, emb, pts, lbl, None, None, True)[0].cpu(), hw).numpy()
    return np.array([[_iou(cands[n, lv], levels[lv]) for lv in range(3)] for n, levels in enumerate(inst)])


def loosest_near_best(curve: np.ndarray, tolerance: float = TOLERANCE) -> int:
    """The first index (on an ascending grid, the loosest threshold) whose value is within ``tolerance``
    of the curve's best."""
    return int(np.flatnonzero(curve >= curve.max() - tolerance)[0])
