"""Second codes: the encoder's neighbour codes and the decoder's second marks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trimask.models.build import build_sam, construct_sam
from trimask.models.tiny_encoder import SECOND_MIN, SECOND_SCALE, neighbour_codes, to_work_size
from trimask.preprocess import preprocess
from trimask.training.code_pretrain import prepare_encoder
from trimask.training.decoder_start import (CODE, PATTERN, READ_BIAS, SECOND, SECOND_MARK, UP_CONSTANT, UP_FAR, UP_LOCAL,
                                            UP_SECOND, code_match_start, part_within_whole,
                                            pattern_gates, second_marks, subpart_locality)
from trimask.training.evaluate import center_point, postprocess
from trimask.training.pattern_pretrain import pattern_targets
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode, to_frame

from test_decoder_start import _iou
from test_patterns import _centre_oracle, _code_match_pair


def _pixels(*cells: tuple[int, int]) -> torch.Tensor:
    p = torch.zeros(16)
    for y, x in cells:
        p[4 * y + x] = 1.0
    return p


def test_neighbour_codes_take_the_code_of_the_side_the_outside_pixels_lie_on():
    codes = torch.arange(48 * 9, dtype=torch.float32).reshape(1, 48, 3, 3) + 1.0  # every code differs
    outside = torch.zeros(1, 48, 3, 3)
    outside[0, 0:16, 1, 1] = _pixels((0, 3), (1, 3), (2, 3), (3, 3))  # subpart: the right column
    outside[0, 16:32, 1, 1] = _pixels((0, 0), (0, 1), (1, 0))  # part: the top-left corner
    outside[0, 0:16, 0, 0] = _pixels((0, 0), (1, 0), (2, 0), (3, 0))  # the left column of a cell on the border
    outside[0, 16:32, 2, 2] = 0.4 * _pixels((3, 3))  # too little outside (below SECOND_MIN)
    assert 0.4 < SECOND_MIN
    second = neighbour_codes(codes, outside)
    assert torch.equal(second[0, 0:16, 1, 1], codes[0, 0:16, 1, 2])
    assert torch.equal(second[0, 16:32, 1, 1], codes[0, 16:32, 0, 0])
    assert not second[0, 0:16, 0, 0].any()  # its neighbour lies off the grid
    assert not second[0, 16:32, 2, 2].any()
    assert not second[0, 32:48].any()  # nothing outside at the whole level
    # Every other cell has nothing outside, or too little, or its neighbour off the grid: no second code.
    assert (second.abs().sum(1) > 0).nonzero().tolist() == [[0, 1, 1]]


def test_the_encoder_writes_second_codes_from_its_codes_and_patterns():
    torch.manual_seed(0)
    plain = construct_sam("tiny", encoder_kwargs={"pattern_offset": PATTERN[0][0]}).eval().image_encoder
    prepare_encoder(plain)
    with torch.no_grad():  # a head that calls every cell's right column outside
        plain.pattern.mix[-1].weight.zero_()
        plain.pattern.mix[-1].bias.copy_(torch.tensor([6.0 if k % 4 == 3 else -6.0 for k in range(16)] * 3))
    second = construct_sam("tiny", encoder_kwargs={"pattern_offset": PATTERN[0][0],
                                                   "second_offset": SECOND[0][0]}).eval().image_encoder
    second.load_state_dict(plain.state_dict())
    x = to_work_size(preprocess(generate_scene(5).image), 256)
    with torch.no_grad():
        a, b = plain.forward_work(x), second.forward_work(x)
    s0, s1 = SECOND[0][0], SECOND[2][-1] + 1
    others = [c for c in range(256) if not s0 <= c < s1]
    assert torch.equal(a[:, others], b[:, others])
    codes = a[:, CODE[0][0] : CODE[2][-1] + 1]
    want = SECOND_SCALE * neighbour_codes(codes, a[:, PATTERN[0][0] : PATTERN[2][-1] + 1])
    assert torch.allclose(b[:, s0:s1], want)
    # Each cell's second codes are its right neighbour's codes (none in the last column).
    assert torch.allclose(b[:, s0:s1, :, :-1], SECOND_SCALE * codes[..., 1:]) and not b[:, s0:s1, :, -1].any()
    with pytest.raises(ValueError, match="pattern head"):
        construct_sam("tiny", encoder_kwargs={"second_offset": SECOND[0][0]})


def _with_second_codes(emb: torch.Tensor, scene) -> torch.Tensor:
    """``emb`` with the scene's exact patterns and the second codes the encoder makes of them."""
    out = emb.clone()
    out[0, PATTERN[0][0] : PATTERN[2][-1] + 1] = torch.from_numpy(pattern_targets(scene)).reshape(48, 64, 64)
    codes = out[:, CODE[0][0] : CODE[2][-1] + 1]
    out[:, SECOND[0][0] : SECOND[2][-1] + 1] = SECOND_SCALE * neighbour_codes(codes, out[:, PATTERN[0][0] : PATTERN[2][-1] + 1])
    return out


def test_second_marks_add_the_pixels_a_clicked_region_has_in_cells_centred_elsewhere():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    code_match_start(sam)
    before, after, marks = {0: [], 1: []}, {0: [], 1: []}, []
    got = []
    hook = sam.mask_decoder.transformer.layers[1].register_forward_hook(lambda m, i, o: got.append(o[1]))
    for seed in range(10**9, 10**9 + 4):
        scene = generate_scene(seed)
        subs = [m for m in (scene.subpart_map == s for s in np.unique(scene.subpart_map) if s) if m.sum() >= 40]
        if not subs:
            continue
        parts = [scene.part_map == scene.part_map[m][0] for m in subs]
        pts = torch.tensor(np.stack([to_frame(np.array([center_point(m)]), (256, 256)) for m in subs]), dtype=torch.float32)
        lbl = torch.ones(len(subs), 1)
        second = _with_second_codes(_centre_oracle(scene), scene)
        patterns_only = second.clone()
        patterns_only[0, SECOND[0][0] : SECOND[2][-1] + 1] = 0.0
        with torch.no_grad():
            plain, _ = decode(sam, patterns_only, pts, lbl, None, None, True)
            sharp, _ = decode(sam, second, pts, lbl, None, None, True)
        marks.append(got[-1][:, :, list(SECOND_MARK)].abs().amax())  # the second layer's image side
        for level, targets in ((0, subs), (1, parts)):
            before[level] += [_iou(m, postprocess(plain, (256, 256))[n, level].numpy()) for n, m in enumerate(targets)]
            after[level] += [_iou(m, postprocess(sharp, (256, 256))[n, level].numpy()) for n, m in enumerate(targets)]
    hook.remove()
    assert len(before[0]) >= 8
    # Centre-cell codes and exact patterns miss a subpart's pixels in the cells centred on its part.
    assert np.mean(after[0]) > np.mean(before[0]) + 0.05 and np.mean(after[0]) > 0.85
    assert np.mean(after[1]) > np.mean(before[1]) + 0.01
    assert np.mean(np.array(after[0]) >= np.array(before[0]) - 0.01) > 0.9
    assert float(max(marks)) > 0.5  # the marks are made in the second layer


def test_the_subpart_candidate_stays_near_the_clicks():
    sam, ungated = _code_match_pair()
    with torch.no_grad():
        ungated.mask_decoder.output_upscaling[3].weight[UP_FAR[0], list(UP_LOCAL)] = 0.0
        ungated.mask_decoder.output_upscaling[3].weight[UP_FAR[1], list(UP_LOCAL)] = 0.0
    scene = generate_scene(10**9 + 1)
    sub = min((scene.subpart_map == s for s in np.unique(scene.subpart_map) if s), key=lambda m: abs(int(m.sum()) - 120))
    cy, cx = (int(round(v)) for v in center_point(sub)[::-1])
    emb = _with_second_codes(_centre_oracle(scene), scene)
    # A far patch of cells (20 cells away) with the clicked subpart's codes, as learned codes spill.
    code = emb[0, CODE[0][0] : CODE[0][-1] + 1, cy // 4, cx // 4].clone()
    py, px = (cy // 4 + 20) % 64, (cx // 4 + 20) % 64
    emb[0, CODE[0][0] : CODE[0][-1] + 1, py : py + 3, px : px + 3] = code[:, None, None]
    pts = torch.tensor(np.array([to_frame(np.array([center_point(sub)]), (256, 256))]), dtype=torch.float32)
    with torch.no_grad():
        near, _ = decode(sam, emb, pts, torch.ones(1, 1), None, None, True)
        both, _ = decode(ungated, emb, pts, torch.ones(1, 1), None, None, True)
    near, both = (postprocess(x, (256, 256))[0].numpy() for x in (near, both))
    patch = np.zeros((256, 256), bool)
    patch[4 * py : 4 * py + 12, 4 * px : 4 * px + 12] = True
    assert both[0][patch].mean() > 0.9 and not near[0][patch].any()  # the far copy: marked only without the gate
    # Near the click the gate keeps the subpart (a typical one: the locality's radius is 3 cells).
    assert _iou(near[0], sub) > _iou(both[0], sub) + 0.1
    assert _iou(near[0], sub) > _iou(both[0] & ~patch, sub) - 0.05 > 0.8
    assert np.array_equal(near[1:], both[1:])  # the part and whole candidates are not gated


def test_the_part_candidate_stays_within_the_clicked_whole():
    sam, alone = _code_match_pair()
    with torch.no_grad():  # the part candidate read alone, as before part_within_whole
        reader = alone.mask_decoder.output_hypernetworks_mlps[2].layers[-1].bias
        reader[[2, *UP_SECOND[2]]] = 0.0
        reader[UP_CONSTANT] = -READ_BIAS
    scene = next(s for s in map(generate_scene, range(10**9, 10**9 + 20)) if len(np.unique(s.whole_map)) >= 3)
    whole_ids = [w for w in np.unique(scene.whole_map) if w]
    clicked = scene.whole_map == whole_ids[0]
    part = scene.part_map == np.bincount(scene.part_map[clicked]).argmax()
    other = scene.whole_map == whole_ids[1]
    emb = _with_second_codes(_centre_oracle(scene), scene)
    # The clicked part's code written into every cell centred on another object, as learned codes spill.
    centres = torch.from_numpy(other[2::4, 2::4])
    cy, cx = (int(round(v)) for v in center_point(part)[::-1])
    emb[0, CODE[1][0] : CODE[1][-1] + 1, centres] = emb[0, CODE[1][0] : CODE[1][-1] + 1, cy // 4, cx // 4][:, None]
    pts = torch.tensor(np.array([to_frame(np.array([[cx, cy]]), (256, 256))]), dtype=torch.float32)
    assert part[cy, cx]
    with torch.no_grad():
        within, _ = decode(sam, emb, pts, torch.ones(1, 1), None, None, True)
        spilled, _ = decode(alone, emb, pts, torch.ones(1, 1), None, None, True)
    within, spilled = (postprocess(x, (256, 256))[0].numpy() for x in (within, spilled))
    assert spilled[1][other].mean() > 0.8 and within[1][other].mean() < 0.02  # the other object: only read alone
    assert _iou(within[1], part) > 0.9 > _iou(spilled[1], part) + 0.2
    assert np.array_equal(within[[0, 2]], spilled[[0, 2]])  # the subpart and whole candidates do not change


def test_laying_out_any_part_again_changes_no_other_weight():
    # e.g. the pattern stage of train-tiny sets the gates afresh on weights that have the locality
    sam, _ = _code_match_pair()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    for lay_out in (pattern_gates, second_marks, subpart_locality, part_within_whole):
        lay_out(sam)
        changed = [k for k, v in sam.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, (lay_out.__name__, changed)
