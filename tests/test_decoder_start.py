"""The code-match start of SAM's decoder and the encoder's region-code pre-training."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from trimask.models.build import build_sam
from trimask.preprocess import preprocess
from trimask.training.code_pretrain import cell_labels, prepare_encoder, pretrain_codes, region_code_loss
from trimask.training.decoder_start import CODE, CODE_CHANNELS, FETCH_FREQUENCIES, code_match_start
from trimask.training.evaluate import _center, postprocess
from trimask.training.scenes import generate_scene
from trimask.training.trainer import decode, to_frame


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _oracle_embedding(scene, seed: int = 1) -> torch.Tensor:
    """Codes the encoder is meant to write: a random 16-d vector of norm 4 per region and level."""
    gen = torch.Generator().manual_seed(seed)
    sub = np.where(scene.subpart_map > 0, scene.subpart_map, scene.part_map + scene.subpart_map.max() + 1)
    out = torch.zeros(256, *scene.whole_map.shape)
    for level, ids in enumerate((sub, scene.part_map, scene.whole_map)):
        table = torch.randn(int(ids.max()) + 1, 16, generator=gen)
        table = 4 * table / table.norm(dim=1, keepdim=True)
        table[0] = 0  # background
        codes = table[torch.from_numpy(ids.astype(np.int64))] * torch.from_numpy(scene.whole_map > 0)[..., None]
        out[list(CODE[level])] = codes.permute(2, 0, 1)
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
    return [(p, w, _center(p)) for _, p, w in found[:count]]


def _answers(sam, emb, clicks, multimask=True) -> np.ndarray:
    """Masks at image resolution for positive clicks (one list of (x, y) per prompt)."""
    pts = torch.tensor(np.stack([to_frame(np.array(c), (256, 256)) for c in clicks]), dtype=torch.float32)
    with torch.no_grad():
        logits, _ = decode(sam, emb, pts, torch.ones(pts.shape[:2]), None, None, multimask)
    return postprocess(logits, (256, 256)).numpy()


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
    first, second = _center(wholes[0]), _center(wholes[1])
    emb = _oracle_embedding(scene)
    one = _answers(sam, emb, [[first]], multimask=False)[0, 0]
    both = _answers(sam, emb, [[first, second]], multimask=False)[0, 0]
    assert _iou(one, wholes[0]) > 0.8
    assert _iou(both, wholes[0] | wholes[1]) > 0.8


def test_region_code_loss_separates_regions_and_the_other_channels_stay_silent():
    torch.manual_seed(0)
    sam = build_sam("tiny", random_init=True)
    encoder = sam.image_encoder
    prepare_encoder(encoder)
    scenes = [generate_scene(s) for s in range(4)]
    rng = np.random.default_rng(0)

    def gaps() -> list[float]:
        with torch.no_grad():
            return [region_code_loss(encoder(preprocess(s.image)), s, rng)[1]["gap_part"] for s in scenes]

    start = float(np.mean(gaps()))
    summary = pretrain_codes(encoder, lambda i: scenes[i % 4], steps=40, seed=0, log=lambda line: None)
    assert summary["steps"] == 40
    assert float(np.mean(gaps())) > start + 4.0
    with torch.no_grad():
        emb = encoder(preprocess(scenes[0].image))
    other = [c for c in range(256) if c not in set(CODE_CHANNELS)]
    assert torch.count_nonzero(emb[0, other]) == 0
    assert emb[0, list(CODE_CHANNELS)].abs().mean() > 0.1


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
