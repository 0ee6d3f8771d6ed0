"""Choosing the code-match decoder's match thresholds for learned codes (``trimask.training.match_calibration``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.decoder_start import CODE, OBJ, OBJECT_VALUE, SINK_GAIN, code_match_start, match_gains
from trimask.training.match_calibration import MATCH_GAIN_GRID, TOLERANCE, calibrate_match, loosest_near_best
from trimask.training.scenes import generate_scene


def _leaky_embedding(scene, leak: float, seed: int = 1) -> torch.Tensor:
    """Codes like a learned encoder's: each subpart's code is its own random vector plus ``leak`` times
    its part's, so sibling subparts come out close (dot product 16 leak^2) but still below their own."""
    gen = torch.Generator().manual_seed(seed)
    sub = np.where(scene.subpart_map > 0, scene.subpart_map, scene.part_map + scene.subpart_map.max() + 1)
    obj = torch.from_numpy(scene.whole_map > 0)
    out = torch.zeros(256, *scene.whole_map.shape)
    tables = []
    for ids in (sub, scene.part_map, scene.whole_map):
        table = torch.randn(int(ids.max()) + 1, 16, generator=gen)
        tables.append(4 * table / table.norm(dim=1, keepdim=True))
    maps = [torch.from_numpy(m.astype(np.int64)) for m in (sub, scene.part_map, scene.whole_map)]
    codes = [tables[lv][maps[lv]] for lv in range(3)]  # H x W x 16
    codes[0] = codes[0] * 1.25 + leak * codes[1]
    for lv in range(3):
        out[list(CODE[lv])] = (codes[lv] * obj[..., None]).permute(2, 0, 1)
    out[OBJ] = OBJECT_VALUE * obj.float()
    return F.adaptive_avg_pool2d(out[None], 64)


class _Lookup(torch.nn.Module):
    """An image encoder that answers each scene's image with the embedding made for that scene."""

    def __init__(self, scenes, embeddings: list[torch.Tensor]) -> None:
        super().__init__()
        self.pairs = [(preprocess(s.image), e) for s, e in zip(scenes, embeddings)]
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(e for image, e in self.pairs if torch.equal(image, x))


def _calibrated(leak: float, count: int = 6):
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    code_match_start(sam)
    scenes = [generate_scene(10**8 + i) for i in range(count)]
    sam.image_encoder = _Lookup(scenes, [_leaky_embedding(s, leak) for s in scenes])
    return sam, calibrate_match(sam, scenes)


def test_close_sibling_codes_raise_the_subpart_threshold_and_fit_subparts_better():
    sam, result = _calibrated(leak=0.7)
    gains = result["gains"]
    assert match_gains(sam) == pytest.approx(tuple(gains), abs=1e-3)
    sub = result["iou"]["subpart"]
    assert gains[0] > SINK_GAIN
    start = min(MATCH_GAIN_GRID, key=lambda g: abs(g - SINK_GAIN))
    # (by less than without the subpart locality, which already switches off far siblings)
    assert sub[str(gains[0])] > sub[str(start)] + 0.04
    assert result["clicks"] >= 4


def test_calibration_picks_the_loosest_threshold_near_the_best_at_every_level():
    _, result = _calibrated(leak=0.0)
    for lv, name in enumerate(("subpart", "part", "whole")):
        table = result["iou"][name]
        best = max(table.values())
        chosen = result["gains"][lv]
        assert table[str(chosen)] >= best - TOLERANCE - 1e-4
        assert all(table[str(g)] < best - TOLERANCE + 1e-4 for g in MATCH_GAIN_GRID if g < chosen)
    assert result["iou"]["whole"][str(result["gains"][2])] > 0.8


def test_the_choice_stays_off_the_edge_of_the_cliff():
    # A level whose IoU peaks just before it collapses (the threshold passing the region's own codes):
    # the raw best is the last logit before the fall; the choice is the looser one measured as good.
    curve = np.array([0.50, 0.60, 0.615, 0.62, 0.20])
    assert loosest_near_best(curve, tolerance=0.0) == 3
    assert loosest_near_best(curve, tolerance=0.01) == 2
    assert loosest_near_best(curve, tolerance=0.05) == 1


def test_scenes_without_a_subpart_to_click_are_an_error():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    code_match_start(sam)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_match(sam, [])
