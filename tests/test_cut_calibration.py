"""Where the tiny encoder's pattern head cuts: per checkpoint, and chosen for the weights at hand
(``trimask.training.cut_calibration``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trimask.models.build import build_sam, build_sam_and_extra
from trimask.models.tiny_encoder import PATTERN_CUT, with_patterns
from trimask.preprocess import preprocess
from trimask.training.cut_calibration import CUT_GRID, CUT_TOLERANCE, calibrate_cut
from trimask.training.decoder_start import PATTERN, SECOND
from trimask.training.pattern_pretrain import pattern_targets
from trimask.training.scenes import generate_scene
from trimask.training.trainer import save_checkpoint

from test_patterns import _centre_oracle


class _HeadLogits(torch.nn.Module):
    """An image encoder that writes each scene's exact codes, and patterns from given head logits cut at
    ``pattern_cut`` as the tiny encoder cuts them (then its second codes)."""

    def __init__(self, scenes, outside: float, inside: float) -> None:
        super().__init__()
        self.pattern = torch.nn.Identity()  # it has a head
        self.pattern_cut = PATTERN_CUT
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.items = []
        for s in scenes:
            targets = torch.from_numpy(pattern_targets(s)).reshape(1, 48, 64, 64)
            self.items.append((preprocess(s.image), _centre_oracle(s), targets * outside + (1 - targets) * inside))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, logits = next((e, lg) for image, e, lg in self.items if torch.equal(image, x))
        pattern = torch.tanh(0.5 * (logits - self.pattern_cut)).clamp(min=0.0)
        return with_patterns(base, pattern, PATTERN[0][0], SECOND[0][0])  # base holds no patterns: they are these


def _calibrated(outside: float, inside: float, count: int = 8):
    sam = build_sam("tiny").eval()  # the bundled decoder: pattern gates, second marks, locality
    scenes = [generate_scene(10**8 + 50 + i) for i in range(count)]
    sam.image_encoder = _HeadLogits(scenes, outside, inside)
    return sam, calibrate_cut(sam, scenes)


def test_a_head_that_calls_inside_pixels_outside_below_some_logit_gets_a_cut_above_it():
    # Inside pixels at logit 1.2: cuts up to 1 write them all as outside and switch the marks off.
    sam, result = _calibrated(outside=20.0, inside=1.2)
    mean = result["mean_iou"]
    assert result["cut"] == max(CUT_GRID)  # every cut above 1.2 writes the same: the highest is taken
    assert sam.image_encoder.pattern_cut == result["cut"]
    assert all(mean[str(c)] < mean[str(result["cut"])] - 0.1 for c in CUT_GRID if c < 1.2)
    assert result["iou"]["subpart"][str(result["cut"])] > 0.7
    assert result["clicks"] >= 8


def test_a_head_whose_outside_logits_are_low_gets_a_cut_below_them():
    # Outside pixels at logit 2.2: cuts of 2.5 and 3 write no pattern at all, lower cuts write them.
    _, result = _calibrated(outside=2.2, inside=-20.0)
    mean = result["mean_iou"]
    assert result["cut"] < 2.2
    assert mean[str(result["cut"])] > mean["3.0"] + 0.01
    best = max(mean.values())
    assert mean[str(result["cut"])] >= best - CUT_TOLERANCE - 1e-4
    assert all(mean[str(c)] < best - CUT_TOLERANCE + 1e-4 for c in CUT_GRID if c > result["cut"])


def test_an_encoder_without_a_pattern_head_or_scenes_without_a_subpart_is_an_error():
    sam = build_sam("tiny", random_init=True).eval()
    with pytest.raises(ValueError, match="no pattern head"):
        calibrate_cut(sam, [generate_scene(1)])
    bundled = build_sam("tiny").eval()
    cut = bundled.image_encoder.pattern_cut
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_cut(bundled, [])
    assert bundled.image_encoder.pattern_cut == cut  # left as it was


def test_the_cut_travels_with_the_checkpoint_and_changes_the_patterns_only(tmp_path):
    sam, extra = build_sam_and_extra("tiny")
    assert sam.image_encoder.pattern_cut == extra["encoder_kwargs"].get("pattern_cut", PATTERN_CUT)
    path = tmp_path / "cut.pt"
    save_checkpoint(sam, path, {**extra, "encoder_kwargs": {**extra["encoder_kwargs"], "pattern_cut": 0.25}})
    other = build_sam("tiny", path)
    assert other.image_encoder.pattern_cut == 0.25
    x = preprocess(generate_scene(10**8 + 3).image)
    with torch.no_grad():
        a, b = sam.image_encoder(x), other.image_encoder(x)
    o, s = PATTERN[0][0], SECOND[0][0]
    changed = (a - b).abs().amax(dim=(0, 2, 3)) > 1e-3
    assert changed[o : o + 48].any() and changed[s : s + 48].any()
    outside = np.r_[o : o + 48, s : s + 48]
    assert not changed[np.setdiff1d(np.arange(256), outside)].any()
    assert (b[:, o : o + 48] > 0).sum() > (a[:, o : o + 48] > 0).sum()  # a lower cut writes more pixels
