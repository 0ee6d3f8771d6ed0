"""Sub-cell patterns: the targets, the decoder's gates and the pattern head's training."""
from __future__ import annotations

import numpy as np
import torch

from trimask.models.build import build_sam, construct_sam
from trimask.models.tiny_encoder import to_work_size
from trimask.preprocess import preprocess
from trimask.training.code_pretrain import cell_labels, prepare_encoder
from trimask.training.decoder_start import CODE, OBJ, OBJECT_VALUE, PATTERN, UP_PATTERN, ZREF, code_match_start
from trimask.training.evaluate import center_point, postprocess
from trimask.training.pattern_pretrain import pattern_loss, pattern_targets, pretrain_patterns
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode, to_frame

from test_decoder_start import _iou


def test_pattern_targets_mark_the_pixels_outside_the_region_at_each_cells_centre():
    scene = generate_scene(10**9 + 7)
    targets = pattern_targets(scene)
    assert targets.shape == (3, 16, 64, 64)
    labels, _ = cell_labels(scene)
    rng = np.random.default_rng(0)
    maps = (None, scene.part_map, scene.whole_map)
    for i, j in rng.integers(0, 64, size=(200, 2)):
        block = scene.part_map[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel()
        assert np.array_equal(targets[1, :, i, j], block != labels[1].reshape(64, 64)[i, j])
        block = maps[2][4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel()
        assert np.array_equal(targets[2, :, i, j], block != labels[2].reshape(64, 64)[i, j])
    # Subparts: a part's pixels outside its subparts form one region of their own.
    sid = int(np.unique(scene.subpart_map)[1])
    ys, xs = np.nonzero(scene.subpart_map == sid)
    edge = [(y // 4, x // 4) for y, x in zip(ys, xs) if (scene.subpart_map[y // 4 * 4 : y // 4 * 4 + 4,
                                                                               x // 4 * 4 : x // 4 * 4 + 4] != sid).any()]
    assert edge and all(targets[0, :, i, j].any() for i, j in edge)
    assert 0.005 < targets.mean() < 0.1  # most cells hold one region


def test_the_padding_of_a_cropped_scene_is_one_region():
    scene = next(s for s in (generate_scene(k, varied_aspect=True) for k in range(50)) if s.image.shape[0] < 200)
    targets = pattern_targets(scene)
    rows = scene.image.shape[0] // 4 + 1  # cells entirely below the image
    assert not targets[:, :, rows:].any()


def _centre_oracle(scene, seed: int = 1) -> torch.Tensor:
    """What the encoder is trained to write: each cell has the codes (random, norm 4 per region and level)
    and objectness of the region at its centre pixel, and the exact patterns."""
    gen = torch.Generator().manual_seed(seed)
    sub = np.where(scene.subpart_map > 0, scene.subpart_map, scene.part_map + scene.subpart_map.max() + 1)
    on = torch.from_numpy(scene.whole_map[2::4, 2::4] > 0)
    out = torch.zeros(1, 256, 64, 64)
    for level, ids in enumerate((sub, scene.part_map, scene.whole_map)):
        table = torch.randn(int(ids.max()) + 1, 16, generator=gen)
        table = 4 * table / table.norm(dim=1, keepdim=True)
        codes = table[torch.from_numpy(ids[2::4, 2::4].astype(np.int64))] * on[..., None]
        out[0, list(CODE[level])] = codes.permute(2, 0, 1)
    out[0, OBJ] = OBJECT_VALUE * on.float()
    return out


def _code_match_pair():
    """Two decoders with the code-match start: one as it is, one to change and compare with it."""
    torch.manual_seed(0)
    pair = [build_sam("tiny", random_init=True).eval() for _ in range(2)]
    for sam in pair:
        code_match_start(sam)
    return pair


def test_the_gates_change_nothing_without_patterns_and_follow_subparts_with_them():
    sam, bare = _code_match_pair()
    with torch.no_grad():
        up1 = bare.mask_decoder.output_upscaling[0].weight
        for c in (c for level in PATTERN for c in level):  # no gates: the upscaling reads no pattern
            up1[c] = 0.0
        up1[ZREF, UP_PATTERN : UP_PATTERN + 24] = 0.0
    before, after = [], []
    for seed in range(10**9, 10**9 + 4):
        scene = generate_scene(seed)
        subs = [m for m in (scene.subpart_map == s for s in np.unique(scene.subpart_map) if s) if m.sum() >= 40]
        if not subs:
            continue
        pts = torch.tensor(np.stack([to_frame(np.array([center_point(m)]), (256, 256)) for m in subs]), dtype=torch.float32)
        lbl = torch.ones(len(subs), 1)
        emb = _centre_oracle(scene)
        with_patterns = emb.clone()
        with_patterns[0, PATTERN[0][0] : PATTERN[2][-1] + 1] = torch.from_numpy(pattern_targets(scene)).reshape(48, 64, 64)
        with torch.no_grad():
            plain, _ = decode(sam, emb, pts, lbl, None, None, True)
            ungated, _ = decode(bare, emb, pts, lbl, None, None, True)
            sharp, _ = decode(sam, with_patterns, pts, lbl, None, None, True)
        assert torch.allclose(plain, ungated, atol=1e-4)
        # Candidate 1, the subpart.
        before += [_iou(m, postprocess(plain, (256, 256))[n, 0].numpy()) for n, m in enumerate(subs)]
        after += [_iou(m, postprocess(sharp, (256, 256))[n, 0].numpy()) for n, m in enumerate(subs)]
    assert len(before) >= 8
    assert np.mean(after) > np.mean(before) + 0.05
    assert np.mean(np.array(after) >= np.array(before) - 0.01) > 0.8


def test_pattern_pretraining_learns_the_patterns_and_keeps_the_codes():
    torch.manual_seed(0)
    sam = construct_sam("tiny", encoder_kwargs={"pattern_offset": PATTERN[0][0]}).eval()
    encoder = sam.image_encoder
    prepare_encoder(encoder)  # the neck writes codes and objectness only, as after code pre-training
    scenes = [generate_scene(s) for s in range(4)]
    x = torch.cat([to_work_size(preprocess(s.image), 256) for s in scenes])
    targets = torch.from_numpy(np.stack([pattern_targets(s) for s in scenes]))

    def measure() -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            loss = float(pattern_loss(encoder.pattern(x, encoder.trunk(x)), targets))
            return loss, encoder.forward_work(x)

    start, before = measure()
    summary = pretrain_patterns(encoder, lambda i: scenes[i % 4], steps=60, batch=2, seed=0, log=lambda line: None)
    assert summary["steps"] == 60 and summary["scenes"] == 120
    end, after = measure()
    assert end < 0.6 * start
    others = [c for c in range(256) if not PATTERN[0][0] <= c <= PATTERN[2][-1]]
    assert torch.equal(before[:, others], after[:, others])  # the rest of the encoder is frozen
    patterns = after[:, PATTERN[0][0] : PATTERN[2][-1] + 1]
    assert float(patterns.min()) >= 0.0 and float(patterns.max()) <= 1.0
