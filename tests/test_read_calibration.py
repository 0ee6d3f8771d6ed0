"""Choosing what the code-match decoder's single-mask output reads (``trimask.training.read_calibration``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.decoder_start import SINGLE_READ, code_match_start, set_single_read, single_read
from trimask.training.evaluate import (_iou, box_answers, click_answers, click_instances, clicked_scenes, first_answers,
                                       postprocess)
from trimask.training.read_calibration import MIN_GAIN, _token0, _upscaled, calibrate_reads
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode

from test_match_calibration import _leaky_embedding, _Lookup

SCENES = [generate_scene(10**8 + i) for i in (1, 2, 3)]


def _model(reads: dict[str, float] | None = None):
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    code_match_start(sam)
    sam.image_encoder = _Lookup(SCENES, [_leaky_embedding(s, 0.3) for s in SCENES])
    if reads:
        set_single_read(sam, reads)
    return sam


def test_token0_reads_are_set_and_read_back():
    sam = _model()
    assert single_read(sam) == pytest.approx(SINGLE_READ, abs=1e-4)
    other = {"subpart": 4.0, "part": 1.5, "whole": 0.5, "box": 2.5, "prev": 1.0, "bias": 1.0}
    set_single_read(sam, other)
    assert single_read(sam) == pytest.approx(other, abs=1e-4)
    with pytest.raises(ValueError, match="token 0 reads"):
        set_single_read(sam, {"part": 1.0})


@torch.no_grad()
def test_recombined_answers_are_the_decoders():
    # The search decodes the box and the second click once and recombines token 0's channels for every
    # setting; that must be what the decoder answers with those reads, mask input included.
    sam = _model({"subpart": 2.0, "part": 1.0, "whole": 1.0, "box": 3.0, "prev": 1.5, "bias": 1.0})
    scene = SCENES[1]
    hw = scene.image.shape[:2]
    targets = [lv for inst in click_instances(scene, 2, np.random.default_rng(0)) for lv in inst]
    emb = sam.image_encoder(preprocess(scene.image))
    first = first_answers(sam, emb, hw, targets)
    decoded = []
    keep = lambda click, pt, lb, prev: decoded.append(decode(sam, emb, pt, lb, None, prev, False)[0]) or decoded[-1]  # noqa: E731
    second = _upscaled(sam, lambda: click_answers(sam, emb, hw, targets, first, clicks=2, answer=keep))
    assert torch.allclose(_token0(sam, second), decoded[-1], atol=1e-4)
    assert (decoded[-1] > 0).any() and (decoded[-1] < 0).any()
    box = _upscaled(sam, lambda: box_answers(sam, emb, hw, targets, np.random.default_rng(0)))
    boxes = box_answers(sam, emb, hw, targets, np.random.default_rng(0))
    assert np.array_equal(postprocess(_token0(sam, box), hw)[:, 0].numpy(), boxes)


@torch.no_grad()
def test_calibration_repairs_a_token0_that_ignores_the_clicks():
    # Token 0 that holds on to the previous answer (prev 4) and barely reads the clicks' regions: a
    # corrective click changes nothing. The search must move the reads and answer better, and what
    # it reports must be what the plain protocol (every click decoded) measures with its choice.
    stubborn = {"subpart": 0.5, "part": 0.5, "whole": 0.5, "box": 2.0, "prev": 4.0, "bias": 1.0}
    sam = _model(stubborn)
    result = calibrate_reads(sam, SCENES, grid=(3.0,))
    assert result["start"] == pytest.approx(stubborn, abs=1e-4)
    assert single_read(sam) == pytest.approx(result["reads"], abs=1e-4)
    assert result["reads"] != result["start"]
    assert result["iou"]["mean"] > result["start_iou"]["mean"] + 0.05
    assert result["iou"]["click_5"] > result["start_iou"]["click_5"]
    assert result["targets"] >= 6
    # Every setting tried is recorded; none beat the choice by more than MIN_GAIN.
    tried = result["tried"]
    assert tried[0]["mean"] == pytest.approx(result["start_iou"]["mean"], abs=1e-4) and len(tried) >= 5
    assert max(t["mean"] for t in tried) <= result["iou"]["mean"] + MIN_GAIN + 1e-4
    rng = np.random.default_rng(0)
    ious = []
    for inst, hw, emb in clicked_scenes(sam, SCENES, rng):
        targets = [lv for i in inst for lv in i]
        boxes = box_answers(sam, emb, hw, targets, rng)
        clicks = click_answers(sam, emb, hw, targets, first_answers(sam, emb, hw, targets))
        ious += [_iou(m, t) for masks in clicks[1:] for m, t in zip(masks, targets)]
        ious += [_iou(m, t) for m, t in zip(boxes, targets)]
    # (Up to float rounding: a logit a hair from 0 can change sign, and with it a later click.)
    assert np.mean(ious) == pytest.approx(result["iou"]["mean"], abs=2e-3)


def test_scenes_without_a_subpart_to_click_are_an_error():
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_reads(_model(), [])
