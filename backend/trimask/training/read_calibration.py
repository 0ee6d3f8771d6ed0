"""Choosing what token 0, the single-mask output, reads, for the codes an encoder has learned.

Token 0 answers every corrective click and every box. In the code-match layout its logit is a
weighted sum (``decoder_start.SINGLE_READ``): the previous answer, the three levels' marks of the
clicks and the box mark, minus a bias. The start's weights were set by hand on perfect codes, where a
positive click adding its whole part costs nothing; learned codes spill and miss, so how much of a
clicked part to add and how firmly to keep the previous answer depend on them.

This module measures, on uncropped training scenes, the standard protocol that ``trimask eval``
runs (a first click at the centre of each level's mask answered by the candidate the IoU head ranks
first, then clicks at the centre of the largest error region with the previous logits as the mask
input; and a tight box alone), and chooses the weights by coordinate search: each weight in turn
takes the value of ``READ_GRID`` whose answers score the highest mean IoU over every answer token 0
gives (clicks 2 to 5 and the box, for every level of every clicked instance), the others held; a
value replaces the current one only when it gains more than ``MIN_GAIN``. The bias stays: only the
sign of the sum makes a mask, so scaling every weight alike changes nothing.

The decoder's transformer costs most of the time, and the hypernetworks of the layout read
constants, so token 0's logits are a fixed combination of the upscaled channels
``SINGLE_READ_CHANNELS``: the box's and the second click's (whose prompts do not depend on the
weights) are decoded once and recombined for every setting; clicks 3 to 5 are decoded per setting.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from trimask.models.sam import Sam
from trimask.training.decoder_start import SINGLE_READ_CHANNELS, clear_hidden_units, set_single_read, single_read
from trimask.training.evaluate import _iou, box_answers, click_answers, clicked_scenes, first_answers, postprocess
from trimask.training.scenes import Scene
from trimask.training.trainer import decode

READ_GRID = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # in units of a full mark (the bias is 1)
SEARCHED = ("prev", "part", "whole", "subpart", "box")  # the previous answer first: the marks are read against it
MIN_GAIN = 0.003  # mean IoU a new value must gain to replace the current one
CLICKS = 5


@torch.no_grad()
def calibrate_reads(sam: Sam, scenes: Iterable[Scene], *, grid: tuple[float, ...] = READ_GRID, passes: int = 1,
                    seed: int = 0, progress: Callable[[int], None] | None = None) -> dict:
    """Set token 0's reads (``decoder_start.set_single_read``) to the coordinate search's choice on
    ``scenes`` (up to two clicked instances each, as ``trimask eval`` picks them). Returns the reads
    before and after, the mean IoU of token 0's answers with each (per answer too: clicks 2..5, box),
    the number of targets and of settings measured, and every setting tried with its mean IoU.
    ``progress(1)`` follows each scene, then each setting of the clicks' reads measured. Hidden units fitted
    to token 0 (``trimask.training.single_fit``) are removed first: the search is over the linear rule."""
    progress = progress or (lambda n: None)
    sam.eval()
    clear_hidden_units(sam)  # the search is over the linear rule (a fitted one is fitted again after it)
    rng = np.random.default_rng(seed)
    cases = []
    for inst, hw, emb in clicked_scenes(sam, scenes, rng):
        targets = [levels[lv] for levels in inst for lv in range(3)]
        first = first_answers(sam, emb, hw, targets)  # multimask: token 0 plays no part
        box = _upscaled(sam, lambda: box_answers(sam, emb, hw, targets, rng))
        second = _upscaled(sam, lambda: click_answers(sam, emb, hw, targets, first, clicks=2))
        cases.append((emb, hw, targets, first, box, second))
        progress(1)
    if not cases:
        raise ValueError("no scene had a subpart to click; nothing to calibrate on")
    clicks: dict[tuple, dict[str, list[float]]] = {}  # by the reads the clicks use (all but the box)
    boxes: dict[float, list[float]] = {}
    tried: list[dict] = []

    def measure(reads: dict[str, float]) -> dict[str, float]:
        set_single_read(sam, reads)
        key = tuple(v for k, v in sorted(reads.items()) if k != "box")
        if key not in clicks:
            clicks[key] = _click_ious(sam, cases)
            progress(1)
        if reads["box"] not in boxes:
            boxes[reads["box"]] = [_iou(m, t) for c in cases for m, t in zip(_masks(sam, c[4], c[1]), c[2])]
        per = {**clicks[key], "box": boxes[reads["box"]]}
        out = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
        out["mean"] = float(np.mean([x for v in per.values() for x in v]))
        tried.append({**reads, "mean": round(out["mean"], 4)})
        return out

    start = single_read(sam)
    reads, start_iou = dict(start), measure(start)
    best = start_iou
    for _ in range(passes):
        moved = False
        for name in SEARCHED:
            for value in grid:
                trial = {**reads, name: value}
                got = measure(trial)
                if got["mean"] > best["mean"] + MIN_GAIN:
                    reads, best, moved = trial, got, True
        if not moved:
            break
    set_single_read(sam, reads)
    return {"reads": reads, "start": start, "iou": best, "start_iou": start_iou,
            "targets": sum(len(c[2]) for c in cases), "settings": len(clicks) + len(boxes) - 1, "tried": tried}


def _upscaled(sam: Sam, run) -> torch.Tensor:
    """The channels token 0 reads of the upscaled embedding of the last decode ``run()`` makes."""
    got = []
    hook = sam.mask_decoder.output_upscaling.register_forward_hook(
        lambda m, i, o: got.append(o[:, list(SINGLE_READ_CHANNELS)].clone()))
    try:
        run()
    finally:
        hook.remove()
    return got[-1]


def _token0(sam: Sam, upscaled: torch.Tensor) -> torch.Tensor:
    """Token 0's logits (``N x 1 x 256 x 256``) from ``_upscaled`` channels, as the decoder makes them:
    the layout's hypernetwork gives token 0 a constant (its last layer's bias)."""
    reader = sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias[list(SINGLE_READ_CHANNELS)]
    return torch.einsum("c,nchw->nhw", reader, upscaled)[:, None]


def _masks(sam: Sam, upscaled: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    return postprocess(_token0(sam, upscaled).cpu(), hw)[:, 0].numpy()


def _click_ious(sam: Sam, cases: list) -> dict[str, list[float]]:
    """IoUs of token 0's answers after clicks 2..5 on the cached ``cases`` (the second click recombined)."""
    per: dict[str, list[float]] = {f"click_{c}": [] for c in range(2, CLICKS + 1)}
    for emb, hw, targets, first, _, second in cases:
        answer = lambda click, pt, lb, prev: (_token0(sam, second) if click == 2  # noqa: E731
                                              else decode(sam, emb, pt, lb, None, prev, False)[0])
        for click, masks in enumerate(click_answers(sam, emb, hw, targets, first, CLICKS, answer)[1:], 2):
            per[f"click_{click}"].extend(_iou(m, t) for m, t in zip(masks, targets))
    return per

