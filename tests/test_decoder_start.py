"""The code-match start of SAM's decoder and the encoder's region-code pre-training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.code_pretrain import cell_labels, prepare_encoder, pretrain_codes, region_code_loss
from trimask.training.decoder_start import (AREA, CODE, CODE_CHANNELS, CODE_DIM, COMPARED, FETCH_FREQUENCIES, OBJ,
                                           OBJECT_VALUE, STRENGTH, STRENGTH_OBJECT, ZREF, code_match_start)
from trimask.training.evaluate import center_point, postprocess
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode, to_frame


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _oracle_embedding(scene, seed: int = 1) -> torch.Tensor:
    """What the encoder is meant to write: a random 16-d vector of norm 4 per region and level, and objectness."""
    gen = torch.Generator().manual_seed(seed)
    sub = np.where(scene.subpart_map > 0, scene.subpart_map, scene.part_map + scene.subpart_map.max() + 1)
    out = torch.zeros(256, *scene.whole_map.shape)
    for level, ids in enumerate((sub, scene.part_map, scene.whole_map)):
        table = torch.randn(int(ids.max()) + 1, 16, generator=gen)
        table = 4 * table / table.norm(dim=1, keepdim=True)
        table[0] = 0  # background
        codes = table[torch.from_numpy(ids.astype(np.int64))] * torch.from_numpy(scene.whole_map > 0)[..., None]
        out[list(CODE[level])] = codes.permute(2, 0, 1)
    out[OBJ] = OBJECT_VALUE * torch.from_numpy(scene.whole_map > 0).float()
    return F.adaptive_avg_pool2d(out[None], 64)


def _part_clicks(scene, count: int) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float]]]:
    """The largest parts whose whole is strictly larger, with a click at each part's centre."""
    found = []
    for pid in np.unique(scene.part_map):
        if pid == 0:
            continue
        part = scene.part_map == pid
        whole = scene.whole_map == scene.part_parent[pid]
        if part.sum() >= 300 and whole.sum() > part.sum() * 1.3:
            found.append((part.sum(), part, whole))
    found.sort(key=lambda t: -t[0])
    return [(p, w, center_point(p)) for _, p, w in found[:count]]


def _answers(sam, emb, clicks, multimask=True, labels=None, box=None, mask_input=None) -> np.ndarray:
    """Masks at image resolution for clicks (one list of (x, y) per prompt; positive unless ``labels``
    says otherwise), a box (x0, y0, x1, y1) and a previous mask (bool, image resolution)."""
    pts = lbl = boxes = prev = None
    if clicks is not None:
        pts = torch.tensor(np.stack([to_frame(np.array(c), (256, 256)) for c in clicks]), dtype=torch.float32)
        lbl = torch.ones(pts.shape[:2]) if labels is None else torch.tensor(labels, dtype=torch.float32)
    if box is not None:
        boxes = torch.tensor(to_frame(np.array(box, dtype=float).reshape(2, 2), (256, 256)).reshape(1, 4), dtype=torch.float32)
    if mask_input is not None:  # the scenes are 256 x 256: the low-res grid is the image's
        prev = torch.where(torch.from_numpy(mask_input), 10.0, -10.0)[None, None]
    with torch.no_grad():
        logits, _ = decode(sam, emb, pts, lbl, boxes, prev, multimask)
    return postprocess(logits, (256, 256)).numpy()


def _start_and_scene(start: bool = True):
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    if start:
        code_match_start(sam)
    scene = generate_scene(10**9 + 7)
    return sam, scene, _oracle_embedding(scene)


def test_the_fetch_frequencies_peak_only_at_the_click():
    freqs = np.array(FETCH_FREQUENCIES)
    centres = (np.arange(64) + 0.5) / 64 * 2 - 1
    cells = np.stack(np.meshgrid(centres, centres), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    for _ in range(50):
        click = rng.uniform(-1, 1, 2)
        kernel = np.cos(2 * np.pi * (cells - click) @ freqs).sum(1)
        dist = np.abs(cells - click).max(1) * 32  # in cells
        assert kernel[dist < 1.0].max() - kernel[dist >= 1.5].max() > 1.4


def test_code_match_start_answers_part_and_whole_from_region_codes():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    scene = generate_scene(10**9 + 7)
    clicks = _part_clicks(scene, 3)
    assert len(clicks) == 3
    emb = _oracle_embedding(scene)
    before = _answers(sam, emb, [[c] for _, _, c in clicks])
    code_match_start(sam)
    after = _answers(sam, emb, [[c] for _, _, c in clicks])
    for n, (part, whole, _) in enumerate(clicks):
        assert _iou(after[n, 1], part) > 0.7  # candidate 2: the part
        assert _iou(after[n, 2], whole) > 0.8  # candidate 3: the whole
        # Random weights answer neither.
        assert max(_iou(before[n, k], part) for k in range(3)) < 0.5
        assert max(_iou(before[n, k], whole) for k in range(3)) < 0.5


def test_each_positive_click_adds_its_object_to_the_single_mask_answer():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True).eval()
    code_match_start(sam)
    scene = generate_scene(10**9 + 7)
    wholes = [scene.whole_map == w for w in np.unique(scene.whole_map) if w]
    wholes = sorted(wholes, key=lambda m: -m.sum())[:2]
    first, second = center_point(wholes[0]), center_point(wholes[1])
    emb = _oracle_embedding(scene)
    one = _answers(sam, emb, [[first]], multimask=False)[0, 0]
    both = _answers(sam, emb, [[first, second]], multimask=False)[0, 0]
    assert _iou(one, wholes[0]) > 0.8
    assert _iou(both, wholes[0] | wholes[1]) > 0.8


def test_a_box_alone_answers_the_objects_inside_it():
    for start in (False, True):
        sam, scene, emb = _start_and_scene(start)
        for wid in [w for w in np.unique(scene.whole_map) if w][:3]:
            whole = scene.whole_map == wid
            ys, xs = np.nonzero(whole)
            box = (xs.min(), ys.min(), xs.max(), ys.max())
            answer = _answers(sam, emb, None, multimask=False, box=box)[0, 0]
            inside = np.zeros_like(whole)
            inside[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
            expected = inside & (scene.whole_map > 0)  # the box's objects, occluders included
            if start:
                assert _iou(answer, expected) > 0.8, wid
            else:  # random weights answer something else
                assert _iou(answer, expected) < 0.5, wid


def _unit_at(scene, xy) -> np.ndarray:
    """The smallest region at a pixel: its subpart, or its part's area outside any subpart."""
    x, y = int(xy[0]), int(xy[1])
    sid = scene.subpart_map[y, x]
    if sid:
        return scene.subpart_map == sid
    return (scene.part_map == scene.part_map[y, x]) & (scene.subpart_map == 0)


def test_the_mask_input_alone_comes_back_and_clicks_edit_it():
    sam, scene, emb = _start_and_scene()
    # A large part with a subpart, so that the part is more than the clicked region.
    part, whole, at = next(c for c in _part_clicks(scene, 6) if (c[0] & ~_unit_at(scene, c[2])).sum() >= 50)
    # Only the previous answer: the decoder returns it.
    back = _answers(sam, emb, None, multimask=False, mask_input=whole)[0, 0]
    assert _iou(back, whole) > 0.9
    # The whole as the previous answer, a negative click on another part of it: the clicked
    # subpart-sized region leaves, the rest stays.
    pid = scene.part_map[int(at[1]), int(at[0])]
    other = max((scene.part_map == q for q in np.unique(scene.part_map[whole]) if q not in (0, pid)), key=np.sum)
    spot = center_point(other)
    unit = _unit_at(scene, spot)
    cut = _answers(sam, emb, [[at, spot]], multimask=False, labels=[[1, 0]], mask_input=whole)[0, 0]
    assert _iou(cut, whole & ~unit) > 0.8
    assert (cut & unit).sum() < 0.2 * unit.sum()
    # The click's own region as the previous answer and a second positive click on the part
    # outside it: the part.
    start = _unit_at(scene, at)
    elsewhere = center_point(part & ~start)
    grown = _answers(sam, emb, [[at, elsewhere]], multimask=False, mask_input=start)[0, 0]
    assert _iou(grown, part) > 0.7
    assert _iou(grown, whole) < 0.7


def test_the_iou_token_learns_how_large_each_answer_is():
    sam, scene, emb = _start_and_scene()
    seen = {}
    sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o[0]))
    wholes = sorted((scene.whole_map == w for w in np.unique(scene.whole_map) if w), key=np.sum)
    feature = []
    for whole in [*wholes, None]:
        at = center_point(whole) if whole is not None else center_point(scene.whole_map == 0)  # None: the background
        _answers(sam, emb, [[at]])
        feature.append(float(seen["tokens"][0, 0, AREA[2]]))  # the IoU token's whole-mark mean
    assert feature[:-1] == sorted(feature[:-1])  # grows with the whole's area
    assert feature[-1] < 0.5 * feature[0]  # a click on the background marks nothing


def test_the_iou_token_sees_how_strongly_each_candidate_matches_and_the_masks_stay():
    sam, scene, emb = _start_and_scene()
    clicks = [[c] for _, _, c in _part_clicks(scene, 3)]
    seen = {}
    sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o[0]))

    def strengths(embedding):
        masks = _answers(sam, embedding, clicks)
        tokens = seen["tokens"]
        return masks, (tokens[:, 0, list(STRENGTH[:3])] - tokens[:, 0, ZREF, None]).clone()  # ZREF: the norm's shift

    masks, strong = strengths(emb)
    weaker = emb.clone()
    weaker[:, list(CODE_CHANNELS)] *= 0.8  # the same regions; every cell matches its click's code less
    _, weak = strengths(weaker)
    assert bool((weak < strong - 0.1).all())
    # The masks do not depend on what the IoU token gathers.
    final = sam.mask_decoder.transformer.final_attn_token_to_image
    with torch.no_grad():
        final.out_proj.weight[list(STRENGTH + STRENGTH_OBJECT)] = 0.0
    unheard, silent = strengths(emb)
    assert np.array_equal(unheard, masks)
    assert float(silent.abs().max()) < 1e-3 < float(strong.min())


def test_region_code_loss_separates_regions_and_the_other_channels_stay_silent():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    encoder = sam.image_encoder
    prepare_encoder(encoder)
    scenes = [generate_scene(s) for s in range(4)]
    rng = np.random.default_rng(0)

    def stats(name: str) -> float:
        with torch.no_grad():
            return float(np.mean([region_code_loss(encoder(preprocess(s.image)), s, rng)[1][name] for s in scenes]))

    start, start_objectness = stats("gap_part"), stats("objectness")
    summary = pretrain_codes(encoder, lambda i: scenes[i % 4], steps=40, seed=0, log=lambda line: None)
    assert summary["steps"] == 40
    assert stats("gap_part") > start + 4.0
    assert stats("objectness") < 0.5 * start_objectness  # objectness is learned beside the codes
    with torch.no_grad():
        emb = encoder(preprocess(scenes[0].image))
    other = [c for c in range(256) if c not in {*CODE_CHANNELS, OBJ}]
    assert torch.count_nonzero(emb[0, other]) == 0
    assert emb[0, list(CODE_CHANNELS)].abs().mean() > 0.1


def test_region_code_loss_on_the_compared_channels_ignores_the_sinks_channel():
    """With ``dims=COMPARED`` the loss spans the code channels the comparison heads read: what a code holds
    in its 16th channel (the head's sink slot) changes the 16-channel loss and not that one."""
    scene = generate_scene(2)
    emb = torch.zeros(1, 256, 64, 64)
    emb[0, list(CODE_CHANNELS)] = torch.randn(len(CODE_CHANNELS), 64, 64, generator=torch.Generator().manual_seed(0))
    moved = emb.clone()
    sink_slot = [CODE[lv][COMPARED] for lv in range(3)]
    moved[0, sink_slot] += 5.0 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))

    def loss(e: torch.Tensor, dims: int) -> float:
        return float(region_code_loss(e, scene, np.random.default_rng(0), dims=dims)[0])

    assert COMPARED == CODE_DIM - 1
    assert loss(moved, COMPARED) == loss(emb, COMPARED)
    assert abs(loss(moved, CODE_DIM) - loss(emb, CODE_DIM)) > 0.01
    assert loss(emb, CODE_DIM) == float(region_code_loss(emb, scene, np.random.default_rng(0))[0])  # the default: 16


def test_code_pretraining_in_batches_made_by_workers_is_the_run_made_here():
    """``batch`` scenes a step, in scene order, whoever makes them: two worker processes give the very
    weights the training process gives alone."""
    import functools

    from trimask.commands.train import _code_scene

    def run(batch: int, workers: int, steps: int) -> tuple[dict, dict]:
        torch.manual_seed(0)
        encoder = build_sam("tiny", random_init=True).image_encoder
        prepare_encoder(encoder)
        summary = pretrain_codes(encoder, functools.partial(_code_scene, 7_000), steps=steps, batch=batch,
                                 workers=workers, seed=3, log=lambda line: None)
        return summary, {k: v.clone() for k, v in encoder.state_dict().items()}

    here, here_weights = run(2, 0, 3)
    workers, workers_weights = run(2, 2, 3)
    assert here["steps"] == workers["steps"] == 3 and here["scenes"] == workers["scenes"] == 6
    assert all(torch.equal(here_weights[k], workers_weights[k]) for k in here_weights)
    single, single_weights = run(1, 0, 3)
    assert single["scenes"] == 3 and single["batch"] == 1
    assert any(not torch.equal(single_weights[k], here_weights[k]) for k in here_weights)
    # The scenes are drawn in order, each once.
    seen: list[int] = []

    def scenes(i: int):
        seen.append(i)
        return generate_scene(7_000 + i, varied_aspect=True)

    torch.manual_seed(0)
    encoder = build_sam("tiny", random_init=True).image_encoder
    prepare_encoder(encoder)
    pretrain_codes(encoder, scenes, steps=2, batch=2, seed=3, log=lambda line: None)
    assert seen == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="batch"):
        pretrain_codes(encoder, scenes, steps=1, batch=0, log=lambda line: None)


def _cell_code_embedding(scene, seed: int = 0) -> torch.Tensor:
    """Perfect codes at the cell centres (a random 16-d vector of norm 4 per region and level) and objectness."""
    labels, on_object = cell_labels(scene)
    gen = torch.Generator().manual_seed(seed)
    emb = torch.zeros(1, 256, 64 * 64)
    for level in range(3):
        table = torch.randn(int(labels[level].max()) + 1, 16, generator=gen)
        table = 4 * table / table.norm(dim=1, keepdim=True)
        emb[0, list(CODE[level])] = (table[torch.from_numpy(labels[level])] * torch.from_numpy(on_object)[:, None]).T
    emb[0, OBJ] = OBJECT_VALUE * torch.from_numpy(on_object).float()
    return emb.view(1, 256, 64, 64)


def test_a_small_subpart_weighs_in_the_code_loss():
    """Anchors are drawn region by region and the other regions of an anchor's part are negatives of
    their own, so a subpart of a dozen cells whose codes merge with its part's raises the loss by 0.38
    (averaged over all cell pairs, as the loss once was, by 0.004)."""
    scene = generate_scene(10**9 + 3)
    labels, on_object = cell_labels(scene)
    emb = _cell_code_embedding(scene)
    real = [r for r in np.unique(labels[0][on_object]) if r <= scene.subpart_map.max()]
    sizes = {r: int((labels[0] == r).sum()) for r in real}
    small = min(sizes, key=sizes.get)
    cells = labels[0] == small
    rest = np.flatnonzero((labels[1] == labels[1][cells][0]) & ~cells)[0]
    merged = emb.clone().view(1, 256, -1)
    codes = merged[0, list(CODE[0])]
    codes[:, cells] = codes[:, rest][:, None]
    merged[0, list(CODE[0])] = codes

    def loss(e: torch.Tensor) -> float:
        rng = np.random.default_rng(0)
        return float(np.mean([float(region_code_loss(e.view(1, 256, 64, 64), scene, rng)[0]) for _ in range(8)]))

    perfect = loss(emb)
    assert sizes[small] <= 12  # a few cells of the 64 x 64 grid
    assert loss(merged) > perfect + 0.15


def test_half_the_anchors_are_drawn_region_by_region():
    from trimask.training.code_pretrain import _anchors

    regions = np.array([1] * 1000 + [2] * 10 + [3] * 10)
    cells = np.arange(2000, 3020)
    counts = []
    for seed in range(20):
        pick = _anchors(regions, cells, np.random.default_rng(seed), 64)
        assert len(set(pick)) == 64 and set(pick) <= set(cells)
        counts.append(np.isin(pick, cells[1000:]).sum())
    # Drawn by cell, the two small regions would get 64 * 20 / 1020 = 1.3 anchors; here about a third.
    assert 14 <= np.mean(counts) <= 28


def test_cell_labels_give_the_smallest_region_at_each_cell():
    scene = generate_scene(3)
    labels, on_object = cell_labels(scene)
    assert labels.shape == (3, 64 * 64)
    y, x = 4 * 20 + 2, 4 * 30 + 2
    assert on_object[20 * 64 + 30] == (scene.whole_map[y, x] > 0)
    assert labels[1, 20 * 64 + 30] == scene.part_map[y, x]
    # A cell in a part without subparts has a subpart label of its own, not shared with real subparts.
    no_sub = (scene.subpart_map[2::4, 2::4].ravel() == 0) & on_object
    assert not set(labels[0][no_sub]) & set(np.unique(scene.subpart_map[scene.subpart_map > 0]))


def test_cell_labels_of_a_cropped_scene_follow_the_padded_frame():
    """A 256 x 160 image fills the top 40 rows of the grid (1024 x 640 after resizing); the rest is padding."""
    full = generate_scene(3)
    scene = type(full)(full.image[:160], full.whole_map[:160], full.part_map[:160], full.subpart_map[:160],
                       full.part_parent, full.subpart_parent)
    labels, on_object = cell_labels(scene)
    square, _ = cell_labels(full)
    grid = labels.reshape(3, 64, 64)
    assert np.array_equal(grid[:, :40], square.reshape(3, 64, 64)[:, :40])
    assert not on_object.reshape(64, 64)[40:].any() and on_object.reshape(64, 64)[:40].any()
    assert not grid[2, 40:].any()


def test_a_frozen_decoder_keeps_its_start_while_the_encoder_learns_with_the_code_loss():
    from trimask.commands.train import FROZEN_DECODER
    from trimask.training.trainer import TrainConfig, scene_to_sample, train

    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    code_match_start(sam)
    prepare_encoder(sam.image_encoder)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    cfg = TrainConfig(seed=0, steps=2, lr=1e-3, warmup_steps=1, rounds=2, save_every=10**6,
                      frozen=FROZEN_DECODER, code_loss_weight=1.0)
    summary = train(sam, cfg, lambda i, rng: scene_to_sample(generate_scene(i), rng, n_groups=2), log=lambda line: None)
    assert summary["steps"] == 2 and summary["code"] > 0
    after = sam.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.startswith(FROZEN_DECODER):
            assert not changed, name
    assert not torch.equal(before["image_encoder.stem.0.0.weight"], after["image_encoder.stem.0.0.weight"])
    assert not torch.equal(before["mask_decoder.iou_prediction_head.layers.0.weight"],
                           after["mask_decoder.iou_prediction_head.layers.0.weight"])


def test_the_code_loss_summed_by_region_equals_the_loss_over_every_pair():
    """The loss sums its logistic terms region by region with matrix products; written out over
    every (anchor, cell) pair with masks, the loss and its gradient are the same."""
    from trimask.training.code_pretrain import MATCH, MATCH_WIDTH, _anchor_terms

    scene = generate_scene(5_000_000 + 3, varied_aspect=True)
    labels, on_object = cell_labels(scene)
    pick = np.random.default_rng(0).choice(np.flatnonzero(on_object), 100, replace=False)
    codes = torch.randn(16, 64 * 64, generator=torch.Generator().manual_seed(0)) * 2
    for level in range(3):
        region, parent = labels[level], labels[level + 1] if level < 2 else None
        fast_codes, slow_codes = codes.clone().requires_grad_(), codes.clone().requires_grad_()
        fast, gap = _anchor_terms(fast_codes[:, pick].T @ fast_codes, region, parent, pick)

        dots = slow_codes[:, pick].T @ slow_codes
        same = torch.from_numpy(region[pick][:, None] == region[None, :])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            (dots - MATCH) / MATCH_WIDTH, same.float(), reduction="none")
        pos, neg = same.float(), (~same).float()
        slow = (bce * pos).sum(1) / pos.sum(1) + (bce * neg).sum(1) / neg.sum(1)
        if parent is not None:
            near = (torch.from_numpy(parent[pick][:, None] == parent[None, :]) & ~same).float()
            assert near.sum() > 0
            slow = slow + (bce * near).sum(1) / near.sum(1).clamp(min=1)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
        assert abs(gap - float(dots[same].mean() - dots[~same].mean())) < 1e-3
        fast.mean().backward()
        slow.mean().backward()
        torch.testing.assert_close(fast_codes.grad, slow_codes.grad, rtol=1e-3, atol=1e-6)
