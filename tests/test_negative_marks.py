"""Negative marks: each level's mark of the negative clicks alone, for token 0's fitted units."""
from __future__ import annotations

import numpy as np
import torch

from trimask.training.decoder_start import (UP1_CONSTANT, UP_BOX, UP_HIDDEN, UP_NEG, UP_NEGATIVE, has_negative_marks,
                                            match_gains, negative_marks, part_within_whole, pattern_gates,
                                            second_marks, set_match_gains, subpart_locality)
from trimask.training.evaluate import center_point
from trimask.training.scenes import generate_scene
from trimask.training.single_fit import NEGATIVE_PAIRS, SIGNED_PAIRS, _up2, collect, fit_single, signed_pairs
from trimask.training.trainer import decode, to_frame

from test_patterns import _centre_oracle, _code_match_pair
from test_read_calibration import SCENES, _model
from test_single_fit import STUBBORN


def _sibling_subparts():
    """A held-out scene, and in it a part with two subparts of at least 40 pixels each: (scene, part, a, b)."""
    for scene in map(generate_scene, range(10**9, 10**9 + 40)):
        for pid in (p for p in np.unique(scene.part_map) if p):
            part = scene.part_map == pid
            subs = [scene.subpart_map == s for s in np.unique(scene.subpart_map[part]) if s]
            subs = [m for m in subs if m.sum() >= 40]
            if len(subs) >= 2 and part.sum() > subs[0].sum() + subs[1].sum():
                return scene, part, subs[0], subs[1]
    raise AssertionError("no part with two subparts")


def _grid(sam, emb, clicks: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token 0's logits for ``clicks`` (each at its mask's centre, with its label) and the 2x grid it read."""
    seen: list[torch.Tensor] = []
    hook = sam.mask_decoder.output_upscaling[3].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    pts = torch.tensor(to_frame(np.array([center_point(m) for m, _ in clicks]), (256, 256))[None], dtype=torch.float32)
    try:
        with torch.no_grad():
            logits, _ = decode(sam, emb, pts, torch.tensor([[float(lb) for _, lb in clicks]]), None, None, False)
    finally:
        hook.remove()
    return logits[0, 0], seen[0][0]


def _on_grid(mask: np.ndarray, cell: int = 2) -> torch.Tensor:
    """The 2x grid's cells (128 x 128) whose ``cell`` x ``cell`` pixel block lies wholly in ``mask`` (256 x 256)."""
    n = 256 // cell
    inside = mask.reshape(n, cell, n, cell).all(axis=(1, 3))
    return torch.from_numpy(np.kron(inside, np.ones((cell // 2, cell // 2), dtype=bool)))


def test_negative_marks_tell_a_cell_both_clicks_match_from_one_no_click_matches():
    sam, plain = _code_match_pair()
    negative_marks(sam)
    assert has_negative_marks(sam) and not has_negative_marks(plain)
    scene, part, a, b = _sibling_subparts()
    emb = _centre_oracle(scene)
    rest = _on_grid(part & ~a & ~b)
    off = _on_grid(scene.whole_map == 0, cell=4)  # the embedding's cells wholly off every object
    # A positive click in subpart a, a negative one in its sibling b: the part's plain mark on the rest of the
    # part is near its value off every object (both clicks match there, no click matches here), far from a full
    # mark (the subpart's on a) ...
    logits, u = _grid(sam, emb, [(a, 1), (b, 0)])
    mark = [u[lv] - u[UP_NEGATIVE[lv]] for lv in range(3)]
    full = float(mark[0][_on_grid(a)].mean())
    assert full > 1.0 and abs(float(mark[1][rest].mean() - mark[1][off].mean())) < 0.3 * full
    # ... while the negative marks tell them apart: the part's and whole's on all of the part, the subpart's on b alone.
    neg = [u[UP_NEG[lv]] - u[UP_NEG[lv] + 1] for lv in range(3)]
    for lv in (1, 2):
        assert float(neg[lv][rest].mean()) > 0.3 > 0.03 > float(neg[lv][off].abs().max())
    assert float(neg[0][_on_grid(b)].mean()) > 0.3 > 0.1 > float(neg[0][_on_grid(a)].mean())
    assert float(neg[0][rest].abs().mean()) < 0.03
    # Nothing reads them yet: the answer is the plain decoder's.
    before, _ = _grid(plain, emb, [(a, 1), (b, 0)])
    assert float(((logits > 0) == (before > 0)).float().mean()) > 0.995
    # With positive clicks only they are 0, and every answer is the plain decoder's.
    logits, u = _grid(sam, emb, [(a, 1), (b, 1)])
    assert max(float((u[c] - u[c + 1]).abs().max()) for c in UP_NEG) < 1e-4
    before, _ = _grid(plain, emb, [(a, 1), (b, 1)])
    assert torch.allclose(logits, before, atol=1e-4)
    pts = torch.tensor(to_frame(np.array([center_point(a)]), (256, 256))[None], dtype=torch.float32)
    with torch.no_grad():
        three, iou = decode(sam, emb, pts, torch.ones(1, 1), None, None, True)
        three_before, iou_before = decode(plain, emb, pts, torch.ones(1, 1), None, None, True)
    assert torch.allclose(three, three_before, atol=1e-4) and torch.allclose(iou, iou_before, atol=1e-4)


def test_negative_marks_keep_the_match_thresholds_and_are_laid_out_again_unchanged():
    sam, _ = _code_match_pair()
    negative_marks(sam)
    i2t = sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token
    set_match_gains(sam, (1.2, 1.5, 1.9))
    assert match_gains(sam) == (1.2, 1.5, 1.9)
    # Each level's negative head has the sink of that level's second-code head (read the same way).
    for lv in range(3):
        assert torch.equal(i2t.q_proj.weight[16 * (5 + lv) + 15], i2t.q_proj.weight[16 * (1 + lv) + 15])
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    for lay_out in (pattern_gates, second_marks, subpart_locality, part_within_whole, negative_marks):
        lay_out(sam)
        changed = [k for k, v in sam.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, (lay_out.__name__, changed)


def test_the_fits_pairs_read_each_channel_once():
    sam, _ = _code_match_pair()
    negative_marks(sam)
    pairs = signed_pairs(sam)
    assert pairs == SIGNED_PAIRS + NEGATIVE_PAIRS
    # The 2x grid's channels: each read by one pair, none of them the box gate's fixed inputs.
    channels = [c for pair in pairs for c in pair]
    assert len(set(channels)) == len(channels) and not set(channels) & {UP_BOX, UP1_CONSTANT}


def test_the_single_fit_reads_the_negative_marks_only_where_they_are_laid_out():
    hidden = list(UP_HIDDEN)
    for laid_out in (False, True):
        sam = _model(STUBBORN)
        if laid_out:
            negative_marks(sam)
        assert signed_pairs(sam) == SIGNED_PAIRS + (NEGATIVE_PAIRS if laid_out else ())
        fit_single(sam, collect(sam, SCENES), steps=5, batch=4)
        w = _up2(sam).weight
        for pos, neg in NEGATIVE_PAIRS:
            assert bool(w[pos, hidden].abs().sum() > 0) == laid_out
            assert torch.equal(w[neg, hidden], -w[pos, hidden])
